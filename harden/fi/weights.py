"""Weight faults as additive perturbations of a layer's output, computed from its cached input.

Conv, Gemm and MatMul are linear in each parameter, so replacing one weight w
by w' changes the output by (w' − w) times the input values that weight meets:

- Conv: ΔY[m, o] = δ · Xpad[c_in, o·s + k·d] on output channel m (groups map
  m to its input channel block); a bias fault adds δ to all of channel m.
- Gemm: Y = α·A'B' + β·C, so a B fault adds α·δ·A[:, p] to column q (indices
  swapped under transB); a C fault adds β·δ where C broadcasts.
- MatMul: Y = A @ W adds δ·A[..., p] to column q.

Each batch element carries its own fault, so a whole batch of weight faults runs
through the same suffix as activation faults. Layers this does not cover
(ConvTranspose, unusual layouts) recompute the single node once per fault with
the faulty weight, which is exact and still avoids the full model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper

from harden.fi.graphinfo import GraphInfo
from harden.graph.ort import make_session


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def conv_delta(node: onnx.NodeProto, index: int, weight: np.ndarray, elems: np.ndarray, delta: np.ndarray,
               x: np.ndarray, y: np.ndarray) -> None:
    """Add the output change of one Conv weight/bias fault per batch row to `y` (in place)."""
    n = len(elems)
    rows = np.arange(n)
    if index == 2:
        y[rows, elems] += delta.reshape((n,) + (1,) * (y.ndim - 2)).astype(y.dtype)
        return
    a = _attrs(node)
    m_out, c_per_group = weight.shape[:2]
    kernel = weight.shape[2:]
    nd = len(kernel)
    group = int(a.get("group", 1))  # type: ignore[call-overload]
    strides = list(a.get("strides", [1] * nd))  # type: ignore[call-overload]
    dil = list(a.get("dilations", [1] * nd))  # type: ignore[call-overload]
    in_sp, out_sp = x.shape[2:], y.shape[2:]
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        total = [max((o - 1) * s + (k - 1) * d + 1 - i, 0) for o, s, k, d, i in zip(out_sp, strides, kernel, dil, in_sp)]
        begin = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
    elif auto == "VALID":
        begin = [0] * nd
    else:
        begin = list(a.get("pads", [0] * (2 * nd)))[:nd]  # type: ignore[call-overload]
    idx = np.unravel_index(elems, weight.shape)
    m, c = idx[0], idx[1]
    cin = (m // (m_out // group)) * c_per_group + c
    gather: list[np.ndarray] = [rows.reshape((n,) + (1,) * nd), cin.reshape((n,) + (1,) * nd)]
    valid = np.ones((n,) + tuple(out_sp), dtype=bool)
    for d in range(nd):
        pos = (np.arange(out_sp[d])[None, :] * strides[d] + idx[2 + d][:, None] * dil[d] - begin[d])
        ok = (pos >= 0) & (pos < in_sp[d])
        shape = [n] + [1] * nd
        shape[1 + d] = out_sp[d]
        gather.append(np.clip(pos, 0, in_sp[d] - 1).reshape(shape))
        valid &= ok.reshape(shape)
    window = np.where(valid, x[tuple(gather)], np.float32(0))
    y[rows, m] += delta.reshape((n,) + (1,) * nd).astype(np.float32) * window


def gemm_delta(node: onnx.NodeProto, index: int, weight: np.ndarray, elems: np.ndarray, delta: np.ndarray,
               x: np.ndarray, y: np.ndarray) -> bool:
    """Gemm with the activation as A (rows = images); False when the layout is not covered."""
    a = _attrs(node)
    alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))  # type: ignore[arg-type]
    if int(a.get("transA", 0)) or index == 0 or x.ndim != 2:  # type: ignore[call-overload]
        return False
    n = len(elems)
    rows = np.arange(n)
    if index == 2:
        if weight.ndim > 2 or (weight.ndim == 2 and weight.shape[0] != 1):
            return False  # a C with one row per batch row is not a per-image parameter
        flat_shape = weight.shape[-1:] if weight.ndim else ()
        for r in range(n):
            unit = np.zeros(flat_shape, dtype=np.float32)
            unit.flat[elems[r]] = 1.0
            cols = np.flatnonzero(np.broadcast_to(unit, (y.shape[1],)))
            y[r, cols] += np.float32(beta * delta[r])
        return True
    p, q = np.unravel_index(elems, weight.shape)
    if int(a.get("transB", 0)):  # type: ignore[call-overload]
        p, q = q, p
    y[rows, q] += np.float32(alpha) * delta.astype(np.float32) * x[rows, p]
    return True


def matmul_delta(index: int, weight: np.ndarray, elems: np.ndarray, delta: np.ndarray,
                 x: np.ndarray, y: np.ndarray) -> bool:
    """MatMul with a 2-D constant right operand; False otherwise."""
    if weight.ndim != 2 or x.ndim < 2:
        return False
    n = len(elems)
    rows = np.arange(n)
    p, q = np.unravel_index(elems, weight.shape)
    d = delta.astype(np.float32)
    if index != 1:
        return False  # a constant left operand (W @ X) takes the exact node rerun
    y[rows, ..., q] += d.reshape((n,) + (1,) * (y.ndim - 2)) * x[rows, ..., p]
    return True


class NodeRerun:
    """Recompute one node per fault with its parameter fed as an input: exact for any op."""

    def __init__(self, info: GraphInfo, node: onnx.NodeProto, index: int, providers: Sequence[str],
                 threads: int = 0) -> None:
        self.node, self.index = node, index
        names = [n for n in node.input if n]
        # which inputs have a row per image; any other is one value per run, fed whole
        self.image_rows = {name: info.image_rows(name) for name in names if name not in info.constants}
        inputs = []
        for name in names:
            if name in info.constants:
                v = info.constants[name]
                inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)))
            else:
                t = info.tensors[name]
                dims = ["N", *t.shape[1:]] if self.image_rows[name] else list(t.shape)
                inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(t.dtype), dims))
        kind = helper.np_dtype_to_tensor_dtype(info.tensors[node.output[0]].dtype)
        out = helper.make_tensor_value_info(node.output[0], kind, None)
        graph = helper.make_graph([node], "node", inputs, [out])
        model = helper.make_model(graph, opset_imports=list(info.model.opset_import))
        model.ir_version = info.model.ir_version
        self.constants = {n: info.constants[n] for n in names if n in info.constants}
        self.session = make_session(model, providers=providers, opt_level="disable", threads=threads, spinning=False)

    def apply(self, weight_name: str, weight: np.ndarray, elems: np.ndarray, faulty: np.ndarray,
              acts: dict[str, np.ndarray], y: np.ndarray) -> None:
        """Replace each row of `y` by the node's output under that row's faulty weight."""
        for r in range(len(elems)):
            w = weight.copy()
            w.flat[elems[r]] = faulty[r]
            feeds = {**self.constants, weight_name: w,
                     **{k: v[r:r + 1] if self.image_rows[k] else v for k, v in acts.items()}}
            y[r] = self.session.run(None, feeds)[0][0]
