"""The cone-of-influence engine: recompute only what one activation fault can reach.

A suffix run (harden.fi.suffix) recomputes every downstream tensor in full,
although a flipped pixel changes only a small window of each following feature
map until a global pooling or a classifier mixes it with the rest. This engine
walks the site's downstream nodes one at a time (harden.fi.nodes) on per-row
windows (harden.fi.window): pointwise ops and channel concatenation run on the
window, Conv and pooling on a crop of their padded golden input with the
window written in, and any other op on the whole tensor rebuilt from the
golden one. After every node whose result is the only value still carrying
the fault, rows whose value equals the golden bit for bit are finished: the
fault was masked (a Relu ate it, or it rounded away), so their scores are the
golden scores. Both savings are exact, and the tests check every result
against a whole-graph run of the same kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from harden.fi.graphinfo import GraphInfo
from harden.fi.nodes import NodeSessions, Override
from harden.fi.window import Axis, Window, crop, paste, union

# Ops that compute each pixel from the same pixel of their inputs, so a window maps to itself.
POINTWISE = {
    "Abs", "Add", "BatchNormalization", "Cast", "Ceil", "Clip", "Concat", "Div", "Dropout", "Elu", "Erf", "Exp",
    "Floor", "Gelu", "HardSigmoid", "HardSwish", "Identity", "LRN", "LeakyRelu", "Log", "Max", "Mean", "Min",
    "Mish", "Mul", "Neg", "Pow", "PRelu", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Softplus",
    "Softsign", "Sqrt", "Sub", "Sum", "Tanh",
    # a QDQ graph's activations are requantised per tensor (per-axis scales fail _pointwise_ok's shape check)
    "QuantizeLinear", "DequantizeLinear",
    # a QOperator graph's pointwise integer ops (ONNX Runtime's com.microsoft domain)
    "QLinearAdd", "QLinearMul", "QLinearLeakyRelu", "QLinearSigmoid", "QLinearConcat",
}
SLIDING = {"Conv", "MaxPool", "AveragePool", "QLinearConv"}
# Where each op's weight is, for its kernel shape.
_WEIGHT_INPUT = {"Conv": 1, "QLinearConv": 3}


class GoldenBlock(dict[str, np.ndarray]):
    """The golden tensors of one cache block: every tensor of a node-by-node run, not a prefix cache."""


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class Cone:
    """Faulty class scores of B rows, each with one corrupted element of an activation `tensor`."""

    def __init__(self, info: GraphInfo, sessions: NodeSessions, tensor: str) -> None:
        self.info, self.sessions, self.tensor = info, sessions, tensor
        self.order = sorted(info.suffix_nodes(tensor))
        self.last_read: dict[str, int] = {}
        for pos, i in enumerate(self.order):
            for t in info.nodes[i].input:
                if t:
                    self.last_read[t] = pos
        self.sliding: dict[int, tuple[Axis, Axis, float, Override] | None] = {}

    def needs(self) -> set[str]:
        """The golden tensors the walk reads: every non-constant input and output of its nodes."""
        names = {self.tensor}
        for i in self.order:
            node = self.info.nodes[i]
            names.update(t for t in (*node.input, *node.output) if t and t not in self.info.constants)
        return names

    # -- the walk ---------------------------------------------------------------------------------------

    def scores(self, golden: GoldenBlock, rows: np.ndarray, elems: np.ndarray, faulty: np.ndarray,
               golden_scores: np.ndarray) -> tuple[np.ndarray, int]:
        """Scores of each row with element elems[i] of the site set to faulty[i]; also how many rows ended early."""
        return self.walk(golden, rows, self._start(golden, rows, elems, faulty), golden_scores)

    def walk(self, golden: GoldenBlock, rows: np.ndarray, start: Window | np.ndarray,
             golden_scores: np.ndarray) -> tuple[np.ndarray, int]:
        """Scores of each row whose site tensor is `start`: a window, or whole rows (a weight fault changes a
        whole channel of its layer's output); also how many rows ended early."""
        info = self.info
        alive = np.arange(len(rows))
        state: dict[str, Window | np.ndarray] = {self.tensor: start}
        for pos, i in enumerate(self.order):
            node = info.nodes[i]
            state.update(self._run(i, node, state, golden, rows))
            for t in [t for t in state if self.last_read.get(t, -1) <= pos and t != info.scores]:
                del state[t]
            if info.scores not in state:
                keep = self._still_faulty(state, golden, rows)
                if keep is not None and not keep.all():
                    alive, rows = alive[keep], rows[keep]
                    state = {t: v.take(keep) if isinstance(v, Window) else v[keep] for t, v in state.items()}
                    if not len(rows):
                        break
        out = np.array(golden_scores, copy=True)
        if len(rows):
            out[alive] = state[info.scores]
        return out, len(golden_scores) - len(alive)

    def _start(self, golden: GoldenBlock, rows: np.ndarray, elems: np.ndarray,
               faulty: np.ndarray) -> Window | np.ndarray:
        """The site tensor of each row with its one element corrupted: a 1×1 window, or whole if not a map."""
        base = golden[self.tensor]
        if base.ndim != 4:
            value = base[rows]
            value.reshape(len(rows), -1)[np.arange(len(rows)), elems] = faulty
            return value
        _, c, h, w = base.shape
        ch, y, x = elems // (h * w), (elems // w) % h, elems % w
        data = crop(base, rows, y, x, 1, 1)
        data[np.arange(len(rows)), ch, 0, 0] = faulty
        return Window(y, x, data, (h, w))

    def _still_faulty(self, state: dict[str, Window | np.ndarray], golden: GoldenBlock,
                      rows: np.ndarray) -> np.ndarray | None:
        """Rows whose only faulty value differs from the golden one; None while several values carry faults."""
        if len(state) != 1:
            return None
        (name, value), = state.items()
        if isinstance(value, Window):
            reference = crop(golden[name], rows, value.y0, value.x0, *value.size)
            got = value.data
        else:
            if not self.info.tensors[name].batched:
                return None
            reference, got = golden[name][rows], value
        same = _bits(got).reshape(len(rows), -1) == _bits(reference).reshape(len(rows), -1)
        return ~same.all(axis=1)

    def _run(self, i: int, node: onnx.NodeProto, state: dict[str, Window | np.ndarray], golden: GoldenBlock,
             rows: np.ndarray) -> dict[str, Window | np.ndarray]:
        """Node i's outputs: windowed where the op allows it, whole otherwise."""
        inputs = [t for t in dict.fromkeys(node.input) if t and t not in self.info.constants]
        hit = [t for t in inputs if t in state]
        windows = [t for t in hit if isinstance(state[t], Window)]
        if hit and len(windows) == len(hit):
            out: Window | None = None
            if node.op_type in SLIDING and hit == [node.input[0]]:
                plan = self._sliding_plan(i, node)
                if plan is not None:
                    out = self._slide(i, node, state[hit[0]], plan, golden, rows)
            elif self._pointwise_ok(node, state[windows[0]].full):
                out = self._pointwise(i, node, inputs, state, golden, rows)
            if out is not None:
                # a window over the whole map is the whole tensor: from here on no crops are needed
                return {node.output[0]: out.data if out.covers_all() else out}
        feeds = {t: self._whole(t, state[t], golden, rows) if t in state else self._golden(t, golden, rows)
                 for t in inputs}
        return dict(self.sessions.run(i, feeds))

    def _golden(self, name: str, golden: GoldenBlock, rows: np.ndarray) -> np.ndarray:
        value = golden[name]
        return value[rows] if self.info.tensors[name].batched else value

    def _whole(self, name: str, value: Window | np.ndarray, golden: GoldenBlock, rows: np.ndarray) -> np.ndarray:
        """The full tensor of each row: golden, with the row's window written in."""
        if not isinstance(value, Window):
            return value
        base = golden[name][rows]
        paste(base, value.data, value.y0, value.x0)
        return base

    # -- pointwise ops ----------------------------------------------------------------------------------

    def _pointwise_ok(self, node: onnx.NodeProto, full: tuple[int, int]) -> bool:
        """Whether every input maps pixel to pixel onto the output's window (else the node runs whole)."""
        info = self.info
        if node.op_type not in POINTWISE or len([o for o in node.output if o]) != 1:
            return False
        out = info.tensors[node.output[0]]
        if len(out.shape) != 4 or out.shape[2:] != full or not out.batched:
            return False
        if node.op_type in ("Concat", "QLinearConcat") and _attrs(node).get("axis") not in (1, -3):
            return False
        for t in node.input:
            if not t:
                continue
            shape = info.constants[t].shape if t in info.constants else info.tensors[t].shape
            spatial = tuple(shape[-2:]) if len(shape) >= 2 else ((1, *shape) if shape else (1, 1))
            batched = t not in info.constants and info.tensors[t].batched
            if batched and len(shape) == 4 and spatial in (full, (1, 1)):
                continue
            if not batched and all(d == 1 for d in spatial):
                continue
            return False
        return True

    def _pointwise(self, i: int, node: onnx.NodeProto, inputs: Sequence[str], state: dict[str, Window | np.ndarray],
                   golden: GoldenBlock, rows: np.ndarray) -> Window:
        hit = [state[t] for t in inputs if t in state]
        assert all(isinstance(w, Window) for w in hit)
        wins: list[Window] = hit  # type: ignore[assignment]
        first = wins[0]
        if all(w is first or (np.array_equal(w.y0, first.y0) and np.array_equal(w.x0, first.x0)
                              and w.size == first.size) for w in wins):
            y0, x0, (h, w) = first.y0, first.x0, first.size
        else:
            y0, x0, h, w = union(wins)
        feeds: dict[str, np.ndarray] = {}
        for t in inputs:
            value = state.get(t)
            if isinstance(value, Window):
                if value.size == (h, w) and np.array_equal(value.y0, y0) and np.array_equal(value.x0, x0):
                    feeds[t] = value.data
                else:
                    base = crop(golden[t], rows, y0, x0, h, w)
                    paste(base, value.data, value.y0 - y0, value.x0 - x0)
                    feeds[t] = base
            elif self.info.tensors[t].batched and self.info.tensors[t].shape[2:] == first.full:
                feeds[t] = crop(golden[t], rows, y0, x0, h, w)
            else:
                feeds[t] = self._golden(t, golden, rows)
        (data,) = self.sessions.run(i, feeds).values()
        return Window(y0, x0, data, first.full)

    # -- Conv and pooling -------------------------------------------------------------------------------

    def _sliding_plan(self, i: int, node: onnx.NodeProto) -> tuple[Axis, Axis, float, Override] | None:
        """The two spatial axes, pad value and attribute override of a 2-D Conv or pool; None if unsupported."""
        if i in self.sliding:
            return self.sliding[i]
        info = self.info
        a = _attrs(node)
        x, y = info.tensors[node.input[0]], info.tensors[node.output[0]]
        plan = None
        weight = node.input[_WEIGHT_INPUT[node.op_type]] if node.op_type in _WEIGHT_INPUT else ""
        if weight in info.constants:
            kernel = list(info.constants[weight].shape[2:])
        else:
            kernel = list(a.get("kernel_shape", []))  # type: ignore[arg-type]
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        pads = list(a.get("pads", [0, 0, 0, 0]))  # type: ignore[arg-type]
        unsupported = (
            len(kernel) != 2 or len(x.shape) != 4 or len(y.shape) != 4 or auto not in ("NOTSET", "VALID")
            or len([o for o in node.output if o]) != 1
            or (node.op_type == "AveragePool" and any(pads) and not a.get("count_include_pad", 0))
            or (node.op_type == "AveragePool" and a.get("ceil_mode", 0))
            or (node.op_type == "MaxPool" and a.get("storage_order", 0))
        )
        if not unsupported:
            if auto == "VALID":
                pads = [0, 0, 0, 0]
            strides = list(a.get("strides", [1, 1]))  # type: ignore[arg-type]
            dilations = list(a.get("dilations", [1, 1]))  # type: ignore[arg-type]
            ay = Axis(kernel[0], strides[0], dilations[0], pads[0], pads[2], x.shape[2], y.shape[2])
            ax = Axis(kernel[1], strides[1], dilations[1], pads[1], pads[3], x.shape[3], y.shape[3])
            override: Override = (("auto_pad", None), ("ceil_mode", None), ("pads", (0, 0, 0, 0)))
            if node.op_type in _WEIGHT_INPUT:
                override = (("auto_pad", None), ("pads", (0, 0, 0, 0)))
            fill = _pad_value(node, x.dtype, info.constants)
            plan = None if fill is None else (ay, ax, fill, override)
        self.sliding[i] = plan
        return plan

    def _slide(self, i: int, node: onnx.NodeProto, win: Window | np.ndarray,
               plan: tuple[Axis, Axis, float, Override], golden: GoldenBlock, rows: np.ndarray) -> Window:
        """The op on a crop of its padded golden input holding the window; its output window."""
        assert isinstance(win, Window)
        ay, ax, fill, override = plan
        h, w = win.size
        oy, n_y = ay.reach(win.y0, h)
        ox, n_x = ax.reach(win.x0, w)
        # the input rows and columns the outputs read, in unpadded coordinates (the padding is made up by crop)
        cy, cx = oy * ay.stride - ay.pad_begin, ox * ax.stride - ax.pad_begin
        base = crop(golden[node.input[0]], rows, cy, cx, ay.crop_length(n_y), ax.crop_length(n_x), fill)
        paste(base, win.data, win.y0 - cy, win.x0 - cx)
        feeds = {t: base if t == node.input[0] else self._golden(t, golden, rows)
                 for t in dict.fromkeys(node.input) if t and t not in self.info.constants}
        (data,) = self.sessions.run(i, feeds, override).values()
        if node.op_type == "MaxPool" and np.issubdtype(data.dtype, np.floating):
            self._maxpool_nan_rows(i, node, win, golden, rows, oy, ox, data)
        return Window(oy, ox, data, (ay.length_out, ax.length_out))

    def _maxpool_nan_rows(self, i: int, node: onnx.NodeProto, win: Window, golden: GoldenBlock, rows: np.ndarray,
                          oy: np.ndarray, ox: np.ndarray, data: np.ndarray) -> None:
        """Redo rows whose window holds a NaN on the whole tensor, with the node's own padding.

        Whether ORT's MaxPool keeps or drops a NaN depends on where the NaN sits
        in its pooling window, and its implicit padding is not an element, so at
        a border the crop's explicit −inf padding could change the answer.
        """
        nan = np.isnan(win.data).reshape(len(rows), -1).any(axis=1)
        if not nan.any():
            return
        whole = self._whole(node.input[0], win.take(nan), golden, rows[nan])
        feeds = {t: whole if t == node.input[0] else self._golden(t, golden, rows[nan])
                 for t in dict.fromkeys(node.input) if t and t not in self.info.constants}
        (out,) = self.sessions.run(i, feeds).values()
        data[nan] = crop(out, np.arange(int(nan.sum())), oy[nan], ox[nan], *data.shape[2:])


def windows_reach_a_conv(info: GraphInfo, tensor: str) -> bool:
    """Whether a window from `tensor` can reach a Conv: through pointwise ops and pools only, since any other
    op (a dynamic quantiser, whose scale reads the whole tensor; a Reshape; a classifier) takes it whole."""
    reached = info.downstream_nodes(tensor, through=_keeps_windows)
    return any(info.nodes[i].op_type in _WEIGHT_INPUT for i in reached)


def _keeps_windows(node: onnx.NodeProto) -> bool:
    """Whether a node's output is windowed where its input is, as Cone._run runs it (a node of several outputs,
    such as a BatchNormalization in training mode, runs whole)."""
    return (node.op_type in POINTWISE or node.op_type in SLIDING) and len([o for o in node.output if o]) == 1


def _pad_value(node: onnx.NodeProto, dtype: np.dtype, constants: dict[str, np.ndarray]) -> float | None:
    """What the op reads in its padding, so that a crop can make it up: the smallest value for MaxPool, real
    zero for the rest, which in a QLinearConv's quantised input is its zero point (None if not a constant)."""
    if node.op_type == "MaxPool":
        return float("-inf") if np.issubdtype(dtype, np.floating) else float(np.iinfo(dtype).min)
    if node.op_type == "QLinearConv":
        zero = node.input[2] if len(node.input) > 2 else ""
        if zero and (zero not in constants or constants[zero].size != 1):
            return None
        return float(constants[zero].reshape(-1)[0]) if zero else 0.0
    return 0.0


def _bits(a: np.ndarray) -> np.ndarray:
    """The raw bits of an array, so that equality is exact (NaN == NaN, −0 ≠ +0)."""
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])
