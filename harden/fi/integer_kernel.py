"""How ONNX Runtime's CPU kernels multiply uint8 activations by int8 weights, which depends on the CPU.

An integer layer's accumulator is meant to be Σ_k (x[k] − zx)·(w[k] − zw), and
ONNX Runtime's math library (MLAS) computes exactly that where the CPU has VNNI
instructions. On AVX2 (and AVX-512 without VNNI) its uint8 × int8 kernel uses
vpmaddubsw instead, which adds each pair of adjacent raw products
x[2j]·w[2j] + x[2j+1]·w[2j+1] into an int16 that saturates, before widening to
int32; the zero points are applied afterwards as exact corrections. There,

    acc = Σ_j sat16(x[2j]·w[2j] + x[2j+1]·w[2j+1]) − zw·Σ x − zx·Σ w + K·zx·zw,

which differs from the exact sum wherever a pair leaves [−32768, 32767] (a
uint8 near 255 against int8 weights near ±128). ONNX Runtime's quantisation
guide describes this and suggests reduce_range or per-channel weights on such
CPUs. The deployed model computes the saturated value, so the exact analysis
must too: it is the exact sum plus each pair's `excess`, sat16(p) − p, which is
zero wherever nothing saturates. Which kernel runs is asked of ONNX Runtime
itself, once per op, with a product that saturates only in pairs: on an AVX2
CPU with onnxruntime 1.32, MatMulInteger, QLinearMatMul, QGemm and QLinearConv
saturate and ConvInteger does not; int8 × int8 and uint8 × uint8 products do
not saturate.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import onnx
from onnx import TensorProto, helper

INT16 = (-(2**15), 2**15 - 1)


# The ops whose kernels are probed, with the shapes of a four-term product: (input, weight), and whether the op
# requantises (takes scales and zero points between its operands, and returns uint8).
PROBED = {"MatMulInteger": ((1, 4), (4, 1), False), "ConvInteger": ((1, 4, 1, 1), (1, 4, 1, 1), False),
          "QLinearMatMul": ((1, 4), (4, 1), True), "QLinearConv": ((1, 4, 1, 1), (1, 4, 1, 1), True),
          "QGemm": ((1, 4), (4, 1), True)}
# the probe's output scale for the requantising ops: 4·255·127 = 129540 gives 127, 2·32767 gives 64
PROBE_SCALE = 1024.0


@cache
def pairs_saturate(op: str, provider: str = "CPUExecutionProvider") -> bool:
    """Whether ONNX Runtime's uint8 × int8 kernel for `op` on this machine adds adjacent products in saturating
    int16: 4·255·127 = 129540 comes back as 2·32767 (each pair saturated) where it does."""
    from harden.graph.ort import make_session

    x_shape, w_shape, requantises = PROBED[op]
    inits = [onnx.numpy_helper.from_array(np.full(w_shape, 127, np.int8), "w")]
    inputs = ["x", "w"]
    if requantises:
        scales = {"xs": 1.0, "ws": 1.0, "ys": PROBE_SCALE}
        inits += [onnx.numpy_helper.from_array(np.array(v, np.float32), k) for k, v in scales.items()]
        inits += [onnx.numpy_helper.from_array(np.array(0, dt), k) for k, dt in
                  (("xz", np.uint8), ("wz", np.int8), ("yz", np.uint8))]
        inputs = ["x", "xs", "xz", "w", "ws", "wz", *([""] if op == "QGemm" else []), "ys", "yz"]
    node = helper.make_node(op, inputs, ["y"], domain="com.microsoft" if op == "QGemm" else "")
    out = TensorProto.UINT8 if requantises else TensorProto.INT32
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.UINT8, x_shape)],
                              [helper.make_tensor_value_info("y", out, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    session = make_session(model, providers=[provider], opt_level="disable", threads=1, spinning=False)
    (y,) = session.run(None, {"x": np.full(x_shape, 255, np.uint8)})
    exact = 4 * 255 * 127
    got = int(np.asarray(y).reshape(-1)[0])
    return got != (round(exact / PROBE_SCALE) if requantises else exact)


def arithmetic(provider: str = "CPUExecutionProvider") -> dict[str, str]:
    """How ONNX Runtime sums uint8 × int8 products for each probed op on this machine, for a report."""
    return {op: "saturating int16 pairs" if pairs_saturate(op, provider) else "exact int32" for op in PROBED}


# ops that make a graph quantised: its integer layers as declared (QOperator, dynamic), or the QuantizeLinear and
# DequantizeLinear pairs ONNX Runtime fuses into them (QDQ)
QUANTISED = frozenset({*PROBED, "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def kernel_note(model: onnx.ModelProto, provider: str = "CPUExecutionProvider") -> str | None:
    """What a user of a quantised graph must know on a CPU whose kernels saturate: its results hold for CPUs like
    this one. None for float graphs, and where every uint8 × int8 product is summed exactly."""
    if not any(n.op_type in QUANTISED for n in model.graph.node):
        return None
    saturating = [op for op in PROBED if pairs_saturate(op, provider)]
    if not saturating:
        return None
    return (f"this CPU's ONNX Runtime sums uint8 × int8 products in saturating int16 pairs ({', '.join(saturating)}; "
            "no VNNI): what runs this graph's integer kernels here (its deployed scores, the exact final-layer counts, "
            "a QOperator or dynamic graph's campaign) holds for CPUs like this one, not for CPUs with VNNI")


class Kernel:
    """The arithmetic of one integer layer's products, exact or pairwise-saturating, with the pair terms that
    a fault's move must add to the exact one. Features pair as (2j, 2j + 1) along the summed axis; the last of
    an odd count pairs with a zero."""

    def __init__(self, saturates: bool) -> None:
        self.saturates = saturates

    @classmethod
    def of(cls, op: str, x_dtype: np.dtype, w_dtype: np.dtype, provider: str = "CPUExecutionProvider") -> Kernel:
        """The kernel ONNX Runtime runs for `op` with stored inputs of `x_dtype` and weights of `w_dtype`."""
        u8s8 = np.dtype(x_dtype) == np.uint8 and np.dtype(w_dtype) == np.int8
        return cls(u8s8 and pairs_saturate(op, provider))

    def __repr__(self) -> str:
        return f"Kernel(saturates={self.saturates})"

    @property
    def note(self) -> str:
        """What a report says of the arithmetic: nothing for the exact sum, which is what the graph declares."""
        return ", summed in saturating int16 pairs as ONNX Runtime's kernel does on this CPU" if self.saturates \
            else ""

    @staticmethod
    def excess(pairs: np.ndarray) -> np.ndarray:
        """sat16(p) − p for pair sums `p`: what saturation takes off each (zero inside the int16 range)."""
        return np.clip(pairs, *INT16) - pairs

    @staticmethod
    def partner(features: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Each feature's pair partner (f xor 1) and whether it exists (not past the last of `count`)."""
        other = np.asarray(features) ^ 1
        return np.minimum(other, count - 1), other < count

    def pair_values(self, own: np.ndarray, mate: np.ndarray, features: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Raw pair sums own·w[f, c] + mate·w[f', c] (f' the partner of f) for stored inputs `own` at the k
        `features` and `mate` at their partners (… × k each) and weights `w` (F × C): … × k × C."""
        other, present = self.partner(features, w.shape[0])
        # only the k rows taken are widened: a whole 4096 × 1000 head per call made AlexNet's analysis 5x slower
        mine, theirs = w[features].astype(np.int64), w[other].astype(np.int64) * present[:, None]
        return own.astype(np.int64)[..., None] * mine + mate.astype(np.int64)[..., None] * theirs

    def pair_sums(self, x: np.ndarray, w: np.ndarray, features: np.ndarray) -> np.ndarray:
        """The raw pair sums of stored input rows `x` (… × F) at the k `features`: … × k × C."""
        other, _ = self.partner(features, w.shape[0])
        return self.pair_values(x[..., features], x[..., other], features, w)

    def correction(self, x: np.ndarray, w: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
        """Σ_j excess(pair j) for stored inputs `x` (N × F × P) and weights `w` (F × C): N × C × P, what the
        kernel's accumulators differ from the exact ones by (zeros for an exact kernel)."""
        n, features, pixels = x.shape
        out = np.zeros((n, w.shape[1], pixels), np.int64)
        if not self.saturates:
            return out
        evens = np.arange(0, features, 2)
        rows = x.transpose(0, 2, 1)  # N × P × F
        step = max(1, chunk // max(1, len(evens) * w.shape[1] * pixels))
        for i in range(0, n, step):
            pairs = self.pair_sums(rows[i:i + step], w, evens)  # n × P × J × C
            out[i:i + step] = self.excess(pairs).sum(axis=2).transpose(0, 2, 1)
        return out

    def move_excess(self, pairs: np.ndarray, change: np.ndarray) -> np.ndarray:
        """How much the saturation changes when pair sums `pairs` grow by `change` (broadcast): what a fault's
        move gains over the exact one."""
        if not self.saturates:
            return np.zeros(np.broadcast_shapes(np.shape(pairs), np.shape(change)), np.int64)
        return self.excess(pairs + change) - self.excess(pairs)

    def rows_change(self, before: np.ndarray, after: np.ndarray, w: np.ndarray, chunk: int = 1 << 22) -> np.ndarray:
        """How much the saturation changes from stored input rows `before` to `after` (R × F, one pixel each)
        with weights `w` (F × C): R × C, summed over the pairs that changed (zeros for an exact kernel)."""
        out = np.zeros((len(before), w.shape[1]), np.int64)
        if not self.saturates:
            return out
        count = w.shape[0]
        changed = np.zeros((len(before), count + count % 2), bool)
        changed[:, :count] = before != after
        rows, pairs = np.nonzero(changed.reshape(len(before), -1, 2).any(axis=2))
        step = max(1, chunk // max(1, w.shape[1]))
        for i in range(0, len(rows), step):
            r, first = rows[i:i + step], 2 * pairs[i:i + step]
            second, _ = self.partner(first, count)
            old = self.pair_values(before[r, first], before[r, second], first, w)
            new = self.pair_values(after[r, first], after[r, second], first, w)
            np.add.at(out, r, self.excess(new) - self.excess(old))
        return out
