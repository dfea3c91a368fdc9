"""The integer kernels' arithmetic: the pairwise saturation of ONNX Runtime's uint8 × int8 kernels on AVX2 CPUs.

The first tests pin the saturating arithmetic against its definition, on any CPU. The last ones check that the
kernel the probe picks reproduces ONNX Runtime's own accumulators on products made to saturate, on whatever CPU
runs the suite: exactly where it has VNNI, pairwise saturated where it has AVX2 alone.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from harden.fi.integer_kernel import PROBED, Kernel, kernel_note, pairs_saturate
from harden.graph.ort import make_session


def saturated_sums(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The definition: Σ_j sat16(x[2j]·w[2j] + x[2j+1]·w[2j+1]) − Σ_k x[k]·w[k], for x N × F × P and w F × C."""
    products = x.astype(np.int64)[:, :, None, :] * w.astype(np.int64)[None, :, :, None]  # N × F × C × P
    if w.shape[0] % 2:
        products = np.concatenate([products, np.zeros_like(products[:, :1])], axis=1)
    pairs = products[:, 0::2] + products[:, 1::2]
    return (np.clip(pairs, -32768, 32767) - pairs).sum(axis=1)


@pytest.mark.parametrize("features", [1, 2, 5, 8, 33])
def test_the_correction_is_each_pairs_saturation(features: int) -> None:
    rng = np.random.default_rng(features)
    x = rng.integers(200, 256, (6, features, 3)).astype(np.uint8)
    w = rng.choice(np.array([-128, -127, 127, 126, -3], np.int8), (features, 4))
    want = saturated_sums(x, w)
    assert np.array_equal(Kernel(True).correction(x, w, chunk=50), want)
    assert (want != 0).any() == (features > 1)  # one product alone never leaves int16; pairs here do
    assert not Kernel(False).correction(x, w).any()


@pytest.mark.parametrize("features", [1, 4, 7])
def test_moves_carry_the_change_of_their_pairs_saturation(features: int) -> None:
    """A changed input or weight moves the saturated accumulator by the exact move plus `move_excess` of its
    pair; rows with any number of changed features move by `rows_change`."""
    rng = np.random.default_rng(7)
    kernel = Kernel(True)
    x = rng.integers(180, 256, (9, features)).astype(np.uint8)
    w = rng.choice(np.array([-128, 127, 90, -90], np.int8), (features, 3))
    before = saturated_sums(x[:, :, None], w)[..., 0]
    for f in range(features):
        moved = x.copy()
        moved[:, f] = rng.integers(0, 256, len(x))
        change = (moved[:, f].astype(np.int64) - x[:, f])[:, None] * w[f].astype(np.int64)[None]
        pairs = kernel.pair_sums(x, w, np.array([f]))[:, 0]
        want = saturated_sums(moved[:, :, None], w)[..., 0] - before
        assert np.array_equal(kernel.move_excess(pairs, change), want)
        assert np.array_equal(kernel.rows_change(x, moved, w), want)
    scattered = x.copy()
    scattered[rng.random(x.shape) < 0.5] = 0
    assert np.array_equal(kernel.rows_change(x, scattered, w, chunk=2),
                          saturated_sums(scattered[:, :, None], w)[..., 0] - before)
    assert not Kernel(False).rows_change(x, scattered, w).any()


def _integer_model(op: str, features: int, w: np.ndarray, zx: int, zw: int) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """A MatMulInteger or ConvInteger of `features` terms per output, the stored weight `w` (F × C)."""
    if op == "MatMulInteger":
        shape, weight = (5, features), w
    else:
        shape, weight = (5, features, 1, 1), w.T.reshape(w.shape[1], features, 1, 1)
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.array(zx, np.uint8), "zx"),
             numpy_helper.from_array(np.array(zw, np.int8), "zw")]
    graph = helper.make_graph([helper.make_node(op, ["x", "w", "zx", "zw"], ["acc"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.UINT8, shape)],
                              [helper.make_tensor_value_info("acc", TensorProto.INT32, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model, shape


@pytest.mark.parametrize("op", ["MatMulInteger", "ConvInteger"])
@pytest.mark.parametrize("features", [3, 16, 301])
def test_the_probed_kernel_reproduces_onnx_runtime_on_saturating_products(op: str, features: int) -> None:
    """Products near ±32,640, so that most pairs overflow int16: the exact sum plus the probed kernel's
    correction equals ONNX Runtime's accumulator, with zero points on both operands."""
    rng = np.random.default_rng(features)
    w = rng.choice(np.array([-128, 127, 120, -120, 5], np.int8), (features, 6))
    zx, zw = 3, 2
    model, shape = _integer_model(op, features, w, zx, zw)
    x = rng.integers(200, 256, shape).astype(np.uint8)
    (acc,) = make_session(model, opt_level="disable").run(None, {"x": x})
    rows = x.reshape(5, features)
    kernel = Kernel.of(op, np.dtype(np.uint8), np.dtype(np.int8))
    exact = (rows.astype(np.int64) - zx) @ (w.astype(np.int64) - zw)
    mine = exact + kernel.correction(rows[:, :, None], w)[..., 0]
    assert np.array_equal(mine, np.asarray(acc).reshape(5, -1))
    assert kernel.saturates == (not np.array_equal(exact, np.asarray(acc).reshape(5, -1)))


def test_the_probe_answers_for_every_op_and_only_uint8_by_int8_saturates() -> None:
    for op in PROBED:
        assert isinstance(pairs_saturate(op), bool)
    assert not Kernel.of("MatMulInteger", np.dtype(np.int8), np.dtype(np.int8)).saturates
    assert not Kernel.of("QGemm", np.dtype(np.uint8), np.dtype(np.uint8)).saturates
    assert Kernel(True).note and not Kernel(False).note


def test_a_quantised_graph_is_noted_where_this_cpu_saturates_and_a_float_one_never() -> None:
    """The CLI's note: present for a quantised graph exactly where a probed kernel saturates on this CPU."""
    model, _ = _integer_model("MatMulInteger", 4, np.ones((4, 2), np.int8), 0, 0)
    note = kernel_note(model)
    saturating = [op for op in PROBED if pairs_saturate(op)]
    assert (note is not None) == bool(saturating)
    if note:
        assert all(op in note for op in saturating) and "VNNI" in note
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "f",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    assert kernel_note(helper.make_model(graph)) is None
