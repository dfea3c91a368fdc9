"""The exact final-layer analysis of float16 graphs (onnxconverter-common's `convert_float_to_float16`).

What ONNX Runtime 1.32's CPU provider computes, measured on this CPU (tests/fi/test_exact_half.py keeps the
facts the analysis rests on):

- It has no float16 kernel for Gemm, MatMul, Add, Mul, Div, ReduceL2, Softmax or LogSoftmax: it inserts
  Casts and computes them in float32 (Softmax and LogSoftmax as their float32 function bodies).
- A whole-graph session then drops the Cast pairs between consecutive float32 nodes, at every optimisation
  level ('disable' included), even the converter's own Casts around Max: a chain of float16 nodes runs in
  float32 and only the graph's output (or an exposed tensor) is rounded to float16.
- One node per session, which is how the injector's engine runs a graph (every tensor as the graph
  declares it, each a float16 site), rounds every node's output to float16. Add, Sub, Mul and Div are then
  correctly rounded (float32 is wide enough that rounding twice rounds once); Gemm, MatMul and ReduceL2
  accumulate in float32, in an order numpy does not always share, and round once; overflow gives ±Inf.
- Results depend on how a node is run: a Gemm or MatMul of one row differs from one of several (a
  matrix-vector kernel), a LogSoftmax of an odd number of rows from an even one, and at level 'all' a Gemm
  whose weight is stored (prepacked) from one whose weight is fed.

So the analysis is exact relative to one fixed reference, `HalfChain`: each node of the head in its own
session at level 'disable' (where a fed weight and a stored one give the same bits), rows in batches of
even size, from the head's input features as ONNX Runtime's session gives them (the same run as the float32
analysis's). The sites are the float16 tensors and initializers of the head, 16 bits each.

The closed form is the float32 analysis's (`exact_linear`, `exact_text`), its real-arithmetic envelope with
bounds widened by every float16 rounding of the chain (`_bounds`): a fault is decided in closed form only
where the margin exceeds them, and the rest is recomputed by the reference itself, never by numpy. A weight
or bias fault moves one output element of its layer; its float16 value is decided exactly where the
float32 accumulation's error bound cannot straddle a float16 rounding boundary, else that layer runs on
the faulty weight; the rest of the chain then runs on the faulty row. Faults that leave a stored value
unchanged thus cost nothing, and float16's frequent ties are settled by the reference's own argmax.

Policy 'range' (`--clamp range`) clamps the faulty value alone, as the engine does, to its tensor's
profiled peak or max |W|, both float16 values; 'range-output' and the graph's own range clips, which clamp
whole tensors between the nodes, are refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import cast

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from harden.errors import HardenError
from harden.fi.bitflip import flip
from harden.fi.exact_linear import LinearHead
from harden.fi.exact_site import U32, RangePolicy, Site, after_softmax
from harden.fi.exact_text import TextHead
from harden.fi.integer_head import constant_producers, part_session
from harden.fi.outcome import nonfinite_rows, top1_class
from harden.fi.profile import clamp_to_range

# float16's unit roundoff, and half the spacing of its subnormals (the rounding error of a value below 2⁻¹⁴).
U16 = 2.0**-11
SUB16 = 2.0**-25
# Faults whose scores could leave ±SAFE16 are recomputed: float16 overflows at 65520.
SAFE16 = 32768.0
# How much wider than the sum of the roundings counted in `_bounds` the bounds are: a fault within them is
# recomputed, which costs time, never exactness.
FACTOR = 4.0
# Rows per ONNX Runtime run.
CHUNK = 4096


def is_half(model: onnx.ModelProto) -> bool:
    """Whether the model stores float16 values or takes a float16 input (a converted graph)."""
    f16 = onnx.TensorProto.FLOAT16
    return any(t.data_type == f16 for t in model.graph.initializer) or any(
        i.type.tensor_type.elem_type == f16 for i in model.graph.input)


def softmax_band(classes: int, log: bool) -> float:
    """The logit gap below which a float16 (Log)Softmax may tie two classes (exact_site.after_softmax's band).

    Probabilities of logits d apart are in the ratio exp(d); float32's Softmax errs by under 1e-5/4
    (tests/fi/test_exact_onnx.py) and float16 rounds each by 2⁻¹¹ (the leaders' probabilities, ≥ 1/C, are
    normal for C < 16384), so they stay apart while d > 2⁻¹⁰ + 1e-5: half the band. LogSoftmax's outputs,
    as large as d + ln C, round by 2⁻¹¹ of that, hence its wider band.
    """
    if classes >= 16384:
        raise HardenError(f"exact analysis: a float16 Softmax over {classes} classes may round its leaders' "
                          "probabilities as subnormals; the analysis covers fewer than 16384 classes")
    return 2.0**-8 * (1 + math.log(classes) if log else 1)


class HalfChain:
    """The head's nodes, from its input to the scores, each run alone in ONNX Runtime (the reference above).

    `run` recomputes only the nodes downstream of the tensors it is given, reading every other tensor from
    the golden run; a node whose weight is fed (`run_node`'s `fed`) gets a session of its own.
    """

    def __init__(self, model: onnx.ModelProto, start: str, threads: int = 0,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        self.model, self.start, self.threads, self.providers = model, start, threads, tuple(providers)
        self.constant, self.made = constant_producers(model)
        inferred = onnx.shape_inference.infer_shapes(model)
        self.types = {v.name: v.type.tensor_type.elem_type for v in (
            *inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
        self.types.update({t.name: t.data_type for t in model.graph.initializer})
        reached, self.nodes = {start}, []
        for node in model.graph.node:
            if any(t in reached for t in node.input):
                self.nodes.append(node)
                reached.update(o for o in node.output if o)
        self.output = model.graph.output[0].name
        if self.output not in reached:
            raise HardenError(f"exact analysis: the scores do not depend on the head's input {start!r}")
        for node in self.nodes:
            outside = [t for t in node.input if t and t not in reached and t not in self.constant]
            if outside:
                raise HardenError(f"exact analysis: {node.op_type} {node.name!r} reads {outside[0]!r} from outside "
                                  "the classifier head")
        self._sessions: dict[tuple[int, str], ort.InferenceSession] = {}

    def index(self, tensor: str) -> int:
        """The position in the chain of the node that reads the constant `tensor` (a weight or bias)."""
        for i, node in enumerate(self.nodes):
            if tensor in node.input:
                return i
        raise HardenError(f"exact analysis: no node of the head reads {tensor!r}")

    def _session(self, i: int, fed: str) -> ort.InferenceSession:
        if (i, fed) not in self._sessions:
            node = self.nodes[i]
            inputs = {t: self.types[t] for t in node.input if t and (t not in self.constant or t == fed)}
            producers = [self.made[t] for t in node.input if t in self.made and t != fed]
            out = node.output[0]
            self._sessions[i, fed] = part_session(self.model, [*producers, node], inputs, (out, self.types[out]))
        return self._sessions[i, fed]

    def run_node(self, i: int, values: dict[str, np.ndarray], fed: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Node i's output on `values` (its variable inputs, one row per image), with the constants in `fed`
        replacing the stored ones; an odd number of rows is padded with a copy of the last (see above)."""
        name = next(iter(fed)) if fed else ""
        node = self.nodes[i]
        feeds = {t: values[t] for t in node.input if t and t not in self.constant}
        rows = len(next(iter(feeds.values())))
        if rows % 2:
            feeds = {t: np.concatenate([v, v[-1:]]) for t, v in feeds.items()}
        (out,) = self._session(i, name).run([node.output[0]], {**feeds, **(fed or {})})
        return out[:rows]

    def golden(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """Every tensor of the head, fault-free, for the images whose head input is `features`."""
        parts: dict[str, list[np.ndarray]] = {}
        for s in range(0, len(features), CHUNK):
            values = {self.start: features[s:s + CHUNK]}
            for i, node in enumerate(self.nodes):
                values[node.output[0]] = self.run_node(i, values)
            for name, value in values.items():
                parts.setdefault(name, []).append(value)
        return {name: np.concatenate(chunks) for name, chunks in parts.items()}

    def run(self, golden: dict[str, np.ndarray], rows: np.ndarray, changed: dict[str, np.ndarray],
            start: int = 0) -> np.ndarray:
        """The scores of images `rows` with the tensors in `changed` (rows as `rows`) replacing the golden ones,
        running the nodes from `start` on that read a changed tensor or one computed from it."""
        values, dirty = dict(changed), set(changed)
        for i in range(start, len(self.nodes)):
            node = self.nodes[i]
            if any(t in dirty for t in node.input):
                feeds = {t: values[t] if t in values else golden[t][rows]
                         for t in node.input if t and t not in self.constant}
                values[node.output[0]] = self.run_node(i, feeds)
                dirty.add(node.output[0])
        return values[self.output] if self.output in values else golden[self.output][rows]


def _flat(values: np.ndarray) -> np.ndarray:
    return values.reshape(len(values), -1)


class _HalfSites:
    """The float32 analysis's sites of one head, with float16 bounds and the chain as their recompute path."""

    def __init__(self, model: onnx.ModelProto, head: LinearHead | TextHead, chain: HalfChain,
                 golden: dict[str, np.ndarray], fmt: str, policy: RangePolicy) -> None:
        self.model, self.head, self.chain, self.golden, self.fmt = model, head, chain, golden, fmt
        self.policy = policy
        self.stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.n = len(golden[chain.start])

    def all(self) -> list[Site]:
        h, g, rp = self.head, self.golden, self.policy
        feats = _flat(g[h.input]).astype(np.float32)
        if isinstance(h, LinearHead):
            sites = h.sites(feats, _flat(g[h.output]).astype(np.float32), self.fmt, rp)
        else:
            names = [h.proj_output, h.cosine, h.output, h.unit]
            sites = h.sites(feats, {t: _flat(g[t]).astype(np.float32) for t in names}, self.fmt, rp)
        out = []
        for site in sites:
            tau, k16, limit = self._bounds(site)
            inner = site.delta

            def delta(rows: slice, ks: np.ndarray, bit: int, inner=inner, k16=k16, group=site.group):  # type: ignore[no-untyped-def]
                change, slack = inner(rows, ks, bit)
                with np.errstate(invalid="ignore", over="ignore"):
                    return change, slack + k16[group[ks]] * np.abs(change)

            kappa = None if site.kappa is None else site.kappa + k16
            site = replace(site, tau=site.tau + tau, delta=delta, kappa=kappa, limit=np.minimum(site.limit, limit),
                           reach=None, zmax=None, clip_free=None, clip_radius=None, nan_to_zero=False)
            if h.softmax:
                classes = _flat(g[self.chain.output]).shape[1]
                site = after_softmax(site, h.softmax == "LogSoftmax", softmax_band(classes, h.softmax == "LogSoftmax"))
            out.append(replace(site, recompute=self._recompute(site)))
        return out

    # -- bounds ------------------------------------------------------------------------------------------

    def _bounds(self, site: Site) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tau (N), k16 (G), limit (K)) for `site`: every float16 rounding between the site's closed form and
        the scores is within tau + k16[g]·|Δ| of it (in the site's base units), and a fault within `limit`
        cannot overflow float16."""
        h = self.head
        if site.role == "output":  # the stored score itself: nothing rounds after it
            zero = np.zeros(self.n)
            return zero, np.zeros(site.directions.shape[0]), np.full(site.size, np.inf)
        if isinstance(h, LinearHead):
            return self._linear_bounds(site)
        return self._text_bounds(site)

    def _linear_bounds(self, site: Site) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """logits = fp16(f32(f·Wᵀ + b)), rounded once (Gemm) or twice (MatMul, then Add); each rounding is
        within U16·|value| + SUB16, and every value within the float32 site's own bound (`site.tau`) of the
        real one. A bound on the values, not on Σ|terms|, matters on a long dot product, whose terms cancel."""
        h = cast(LinearHead, self.head)
        f = _flat(self.golden[h.input]).astype(np.float64)
        w = h.weight.astype(np.float64)
        b = np.zeros(len(w)) if h.bias is None else h.bias.astype(np.float64)
        twice = h.bias is not None and self._op(h.weight_name) == "MatMul"
        value = np.abs(f @ w.T + b).max(axis=1) + site.tau
        bmax = float(np.abs(b).max())
        tau = FACTOR * (U16 * (2 * value + bmax) + 2 * SUB16) if twice else FACTOR * (U16 * value + SUB16)
        room = max(SAFE16 - float(value.max()) - bmax, 0.0)
        roundings = 2 if twice else 1
        if site.role == "input":
            vmax = np.abs(w).max(axis=0)
            with np.errstate(divide="ignore"):
                return tau, FACTOR * roundings * U16 * vmax, room / vmax
        return tau, np.full(len(w), FACTOR * roundings * U16), np.full(site.size, room)

    def _text_bounds(self, site: Site) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The text head's chain z → ‖z‖ → ẑ = z/‖z‖ → cos = ẑ·Wᵀ → scale·cos rounds z, ‖z‖, each ẑ_e, each
        cosine and each logit. The norm is one positive factor for every class, so in units of S = z·Wᵀ the
        rest err by U16·Σ_e|W_ce||z_e| each (the projection's own rounding, ẑ's, the cosine's and the
        logit's, which can only tie two classes), U16·|W_ce z_e| for the faulty z_e's rounding and the
        subnormal floor SUB16 per value, times ‖z‖; a fault adds the same for its own term."""
        h = cast(TextHead, self.head)
        g = self.golden
        w = np.abs(h.weight.astype(np.float64))  # C×E
        mult = 1.0 if h.scale is None else float(h.scale)
        l1 = float(w.sum(axis=1).max())
        floor = l1 + 3 + 1 / mult
        e, d = w.shape[1], h.proj_weight.shape[1]
        acc = (e + d + 10) * U32  # float32 accumulations, for good measure
        if site.role in ("weight", "cosine"):  # cosine units
            unit = np.abs(_flat(g[h.unit]).astype(np.float64))
            cos = np.abs(_flat(g[h.cosine]).astype(np.float64)).max(axis=1)
            reach = (unit @ w.T).max(axis=1)
            tau = FACTOR * (U16 * 2 * (reach + cos) + acc * reach + SUB16 * floor)
            room = max(SAFE16 / max(mult, 1.0) - float(reach.max()), 0.0)
            return tau, np.full(len(w), FACTOR * 3 * U16), np.full(site.size, room)
        z = np.abs(_flat(g[h.proj_output]).astype(np.float64))
        wmax = w.max(axis=0)
        big = (z @ w.T).max(axis=1)
        tau = FACTOR * (U16 * (4 * big + 2 * (z * wmax).max(axis=1)) + acc * big
                        + 2 * np.linalg.norm(z, axis=1) * SUB16 * floor)
        room = max(SAFE16 - float(z.max()), 0.0) if mult * l1 < SAFE16 else 0.0
        if site.role == "input":
            p = np.abs(h.proj_weight.astype(np.float64))  # E×d
            wu, norm, pmax = (w @ p).max(axis=0), np.linalg.norm(p, axis=0), p.max(axis=0)
            with np.errstate(divide="ignore"):
                limit = room / pmax
        else:
            wu, norm, limit = wmax, np.ones(e), np.full(site.size, room)
        return tau, FACTOR * ((6 * U16 + acc) * wu + 2 * SUB16 * floor * norm), limit

    def _op(self, constant: str) -> str:
        return self.chain.nodes[self.chain.index(constant)].op_type

    # -- recompute ---------------------------------------------------------------------------------------

    def _recompute(self, site: Site) -> Callable[[np.ndarray, np.ndarray, int], np.ndarray]:
        if site.tensor in self.stored:
            return self._weight_recompute(site)
        return self._activation_recompute(site.tensor)

    def _activation_recompute(self, tensor: str) -> Callable[[np.ndarray, np.ndarray, int], np.ndarray]:
        golden = self.golden[tensor]
        peak = self.policy.element_peak(tensor)

        def recompute(n: np.ndarray, k: np.ndarray, bit: int) -> np.ndarray:
            rows = _flat(golden[n]).copy()
            m = np.arange(len(n))
            rows[m, k] = _clamp(flip(rows[m, k], np.full(len(k), bit), self.fmt), peak)
            return _flat(self.chain.run(self.golden, n, {tensor: rows.reshape((len(n),) + golden.shape[1:])}))

        return recompute

    def _weight_recompute(self, site: Site) -> Callable[[np.ndarray, np.ndarray, int], np.ndarray]:
        """A fault in a stored weight or bias changes one output element of the node that reads it: its float16
        value where the float32 accumulation's error bound decides it, else the node's own run on the faulty
        weight; then the chain from that node's output."""
        name = site.tensor
        i = self.chain.index(name)
        node = self.chain.nodes[i]
        stored = self.stored[name]
        data = next(t for t in node.input if t and t not in self.chain.constant)
        x = _flat(self.golden[data]).astype(np.float64)
        out_name = node.output[0]
        out = _flat(self.golden[out_name])
        matrix = stored.ndim >= 2
        if matrix:  # the analysis's rows (outputs) × columns (inputs) layout of the stored weight
            layout = stored.reshape(stored.shape[0], -1) if node.op_type == "Conv" else \
                (stored.T if name in self.head.transposed else stored)
            cols = layout.shape[1]
        w = _node_weight(self.stored, node, self.chain.constant, name)
        raw, reach = _node_raw(node.op_type, x, w, self.stored, node)
        exact = node.op_type == "Add"  # two float16 operands: the float64 sum is exact
        length = x.shape[1]
        peak = self.policy.weight_peak(stored.astype(np.float32))

        def to_stored(k: np.ndarray) -> np.ndarray:
            if not matrix or name not in self.head.transposed or node.op_type == "Conv":
                return k
            c, j = np.divmod(k, cols)
            return j * layout.shape[0] + c

        def recompute(n: np.ndarray, k: np.ndarray, bit: int) -> np.ndarray:
            flat = to_stored(k)
            old = stored.reshape(-1)[flat]
            new = _clamp(flip(old, np.full(len(k), bit), self.fmt), peak)
            c, j = (np.divmod(k, cols) if matrix else (k, None))
            with np.errstate(all="ignore"):
                delta = new.astype(np.float64) - old.astype(np.float64)
                change = delta * x[n, j] if j is not None else delta
                v = raw[n, c] + change
                err = 0.0 if exact else (length + 2) * U32 * (reach[n, c] + np.abs(change)) * (1 + 2.0**-20)
                low, high = (v - err).astype(np.float16), (v + err).astype(np.float16)
            rows = out[n].copy()
            known = np.isfinite(delta) & (low == high)
            rows[np.flatnonzero(known), c[known]] = low[known]
            for kk in np.unique(k[~known]):
                m = np.flatnonzero((k == kk) & ~known)
                faulty = stored.copy()
                faulty.reshape(-1)[to_stored(np.array([kk]))] = new[m[0]]
                feeds = {t: self.golden[t][n[m]] for t in node.input if t and t not in self.chain.constant}
                rows[m] = _flat(self.chain.run_node(i, feeds, {name: faulty}))
            changed = {out_name: rows.reshape((len(n),) + self.golden[out_name].shape[1:])}
            return _flat(self.chain.run(self.golden, n, changed, start=i + 1))

        return recompute


def _clamp(values: np.ndarray, peak: float | None) -> np.ndarray:
    """The range policy on faulty float16 values, as the engine applies it (a profiled peak is itself a float16
    value, so clamping to it in float16 is clamping to it exactly)."""
    if peak is None:
        return values
    with np.errstate(invalid="ignore"):
        return clamp_to_range(values, peak)


def _node_weight(stored: dict[str, np.ndarray], node: onnx.NodeProto, constant: set[str], name: str) -> np.ndarray:
    """The node's weight as rows (outputs) × columns (inputs), float64: a Gemm's (transB), a MatMul's
    transpose, a Conv's C×d; an Add's bias has none (ones: the data input passes through)."""
    if node.op_type == "Add":
        return np.empty((0, 0))
    wname = node.input[1] if node.input[1] in constant else node.input[0]
    w = stored[wname].astype(np.float64)
    if node.op_type == "Conv":
        return w.reshape(w.shape[0], -1)
    if node.op_type == "MatMul":
        return w.T
    trans = next((a.i for a in node.attribute if a.name == "transB"), 0)
    return w if trans else w.T


def _node_raw(op: str, x: np.ndarray, w: np.ndarray, stored: dict[str, np.ndarray],
              node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray]:
    """(the real value of each output element, Σ|terms|) of a Gemm, MatMul, 1×1 Conv or Add of a bias."""
    if op == "Add":
        bias_name = next(t for t in node.input if t in stored)
        b = stored[bias_name].astype(np.float64).reshape(-1)
        return x + b, np.abs(x) + np.abs(b)
    raw, reach = x @ w.T, np.abs(x) @ np.abs(w).T
    if len(node.input) > 2 and node.input[2]:
        b = stored[node.input[2]].astype(np.float64).reshape(-1)
        raw, reach = raw + b, reach + np.abs(b)
    return raw, reach


def half_sites(model: onnx.ModelProto, head: LinearHead | TextHead, features: np.ndarray, policy: RangePolicy, fmt: str,
               threads: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",)) -> tuple[list[Site], np.ndarray]:
    """The sites of a float16 graph's head and the reference's golden top-1, from the head's input `features`
    (as ONNX Runtime's session gives them, float16), under `policy` (none or range). `model` is the named
    copy the head was located in."""
    if fmt != "fp16":
        raise HardenError(f"exact analysis: a float16 graph stores fp16 values, not {fmt}")
    if policy.name == "range-output" or head.clips:
        why = "policy 'range-output'" if not head.clips else "a range clip in the graph"
        raise HardenError(f"exact analysis: {why} on a float16 graph is not covered (it clamps whole tensors "
                          "between the head's float16 nodes); the sampled campaign covers it")
    names = [head.weight_name] + ([head.bias_name] if isinstance(head, LinearHead) and head.bias_name else []) + (
        [head.proj_weight_name, head.proj_bias_name] if isinstance(head, TextHead) else [])
    stored = {t.name: t.data_type for t in model.graph.initializer}
    if any(stored.get(t) != onnx.TensorProto.FLOAT16 for t in names):
        raise HardenError("exact analysis: this float16 graph keeps its classifier's weights in float32; the "
                          "analysis covers float16 classifiers and float32 graphs")
    chain = HalfChain(model, head.input, threads, providers)
    golden = chain.golden(np.asarray(features, np.float16))
    scores = _flat(golden[chain.output])
    if nonfinite_rows(scores).any():
        raise HardenError("exact analysis: the fault-free scores hold NaN or Inf for some images")
    return _HalfSites(model, head, chain, golden, fmt, policy).all(), top1_class(scores)
