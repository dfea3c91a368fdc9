"""A classifier that scores a feature map (1×1 Conv → ReLU → GlobalAveragePool, as SqueezeNet): the exact
analysis equals brute-force ONNX Runtime injection of every fault.

Brute force is test_exact_onnx's: the weight fed as a graph input holding the flipped value, or the graph
cut at the Conv's output with the flipped value fed in, over every image.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from harden.errors import HardenError
from harden.fi.exact_onnx import analyse_model, head_tensors, locate_head
from harden.fi.exact_pooled import PooledConvHead
from harden.fi.exact_site import RangePolicy
from harden.fi.profile import profile_ranges
from harden.graph.ort import make_session
from tests.fi.test_exact_onnx import _brute_activation, _brute_weight

C, D = 3, 4


def _map_model(seed: int, relu: bool = True, softmax: str = "", scale: float = 1.0,
               flatten: bool = False, d: int = D) -> onnx.ModelProto:
    """x (N×2×3×3) → Conv 3×3 → Relu → 1×1 Conv classifier → [Relu] → GlobalAveragePool [→ Flatten]
    [→ (Log)Softmax]: SqueezeNet's tail on a 3×3 map. `scale` sizes the classifier's weights: at 1, a flip of
    bit 30 in many of them gives Inf or NaN; at 0.05, a huge finite weight whose products overflow."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(size=(d, 2, 3, 3)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.normal(size=d).astype(np.float32), "b0"),
             numpy_helper.from_array((scale * rng.normal(size=(C, d, 1, 1))).astype(np.float32), "cls.weight"),
             numpy_helper.from_array((scale * rng.normal(size=C)).astype(np.float32), "cls.bias")]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["h"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["feat"], name="relu0"),
             helper.make_node("Conv", ["feat", "cls.weight", "cls.bias"], ["scores_map"], name="cls",
                              kernel_shape=[1, 1], strides=[1, 1], pads=[0, 0, 0, 0])]
    last = "scores_map"
    if relu:
        nodes.append(helper.make_node("Relu", [last], ["relu_map"], name="relu"))
        last = "relu_map"
    nodes.append(helper.make_node("GlobalAveragePool", [last], ["pooled"], name="pool"))
    last, shape = "pooled", ["N", C, 1, 1]
    if flatten:
        nodes.append(helper.make_node("Flatten", [last], ["flat"], name="flatten"))
        last, shape = "flat", ["N", C]
    if softmax:
        nodes.append(helper.make_node(softmax, [last], ["prob"], name="softmax", axis=1))
        last = "prob"
    graph = helper.make_graph(nodes, "tiny-map", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                ["N", 2, 3, 3])],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11 if softmax and not flatten else 17)])
    model.ir_version = 8
    return model


def _images(seed: int, n: int = 10) -> np.ndarray:
    return np.random.default_rng(seed + 7).normal(size=(n, 2, 3, 3)).astype(np.float32)


def _check_against_brute_force(model: onnx.ModelProto, x: np.ndarray, policy: str = "none",
                               fmt: str = "fp32") -> None:
    result = analyse_model(model, x, policy=policy, fmt=fmt)
    assert result.rounding_ties == 0 and result.images == len(x)
    head = locate_head(model)
    session = make_session(model, opt_level="disable")
    top1 = session.run(None, {"x": x})[0].reshape(len(x), -1).argmax(1)
    rp = RangePolicy(policy, profile_ranges(model, x, head_tensors(head)))
    assert [s.role for s in result.sites] == ["weight", "bias", "output"]
    for site in result.sites:
        if site.role == "output":
            brute = _brute_activation(model, site.tensor, x, top1, rp, fmt)
        else:
            brute = _brute_weight(model, site.tensor, x, top1, rp, fmt)
        assert site.sdc == brute.tolist(), site.tensor


@pytest.mark.parametrize("policy", ["none", "range"])
@pytest.mark.parametrize("softmax", ["", "Softmax", "LogSoftmax"])
def test_every_fault_is_decided_as_onnx_runtime_decides_it(softmax: str, policy: str) -> None:
    """Weights near 1, so that bit 30 makes many of them Inf or NaN (NaN scores, +Inf scores, all-zero maps)."""
    _check_against_brute_force(_map_model(0, softmax=softmax), _images(0), policy)


@pytest.mark.parametrize("seed", [1, 2])
def test_huge_finite_weights_whose_products_overflow(seed: int) -> None:
    """Small weights: bit 30 makes them huge but finite, and their products overflow at some positions only."""
    _check_against_brute_force(_map_model(seed, scale=0.05, softmax="Softmax"), _images(seed))
    _check_against_brute_force(_map_model(seed, scale=0.05, flatten=True), _images(seed))


def test_without_the_relu_and_in_scaled_formats() -> None:
    _check_against_brute_force(_map_model(3, relu=False), _images(3))
    _check_against_brute_force(_map_model(4, relu=False, scale=0.05, softmax="Softmax"), _images(4))
    for fmt in ("bf16", "fp16", "int8"):
        _check_against_brute_force(_map_model(5), _images(5), fmt=fmt)


def test_the_head_is_located_by_its_onnx_names() -> None:
    head = locate_head(_map_model(1, softmax="Softmax"))
    assert isinstance(head, PooledConvHead) and head.relu and head.softmax == "Softmax"
    assert (head.input, head.output, head.pooled, head.weight_name, head.bias_name, head.layer) == (
        "feat", "scores_map", "pooled", "cls.weight", "cls.bias", "cls")
    assert head.weight.shape == (C, D)
    assert not locate_head(_map_model(1, relu=False)).relu


def test_a_tail_whose_maps_feed_other_nodes_or_a_strided_conv_is_refused() -> None:
    model = _map_model(1)
    model.graph.output.append(helper.make_tensor_value_info("relu_map", TensorProto.FLOAT, None))
    with pytest.raises(HardenError, match="the classifier's Conv → Relu → pool tail also feeds 'relu_map'"):
        locate_head(model)
    model = _map_model(1)
    next(a for a in model.graph.node[2].attribute if a.name == "strides").ints[:] = [2, 2]
    with pytest.raises(HardenError, match="not an unpadded, ungrouped, unstrided 1×1"):
        locate_head(model)


def test_range_output_and_float16_are_refused_in_one_line() -> None:
    from onnxconverter_common import float16

    with pytest.raises(HardenError, match="analysed under --clamp none or range"):
        analyse_model(_map_model(1), _images(1), policy="range-output")
    half = float16.convert_float_to_float16(_map_model(1), keep_io_types=True)
    with pytest.raises(HardenError, match="float16 graph's Conv → ReLU → pool classifier is not covered"):
        analyse_model(half, _images(1))


def test_an_image_within_the_softmax_tie_band_is_left_out() -> None:
    """Two classes with the same weights and bias score the same on every image: every image is then a tie."""
    model = _map_model(6, softmax="Softmax")
    weight = next(t for t in model.graph.initializer if t.name == "cls.weight")
    w = numpy_helper.to_array(weight).copy()
    w[1] = w[0]
    weight.CopyFrom(numpy_helper.from_array(w, "cls.weight"))
    bias = next(t for t in model.graph.initializer if t.name == "cls.bias")
    b = numpy_helper.to_array(bias).copy()
    b[1] = b[0]
    bias.CopyFrom(numpy_helper.from_array(b, "cls.bias"))
    x = _images(6)
    top = make_session(model, opt_level="disable").run(None, {"x": x})[0].reshape(len(x), -1).argmax(1)
    tied = int(np.isin(top, [0, 1]).sum())
    if tied == len(x):
        with pytest.raises(HardenError, match="every image the fault-free top-1 is a rounding tie"):
            analyse_model(model, x)
        return
    assert analyse_model(model, x).rounding_ties == tied


def _set(model: onnx.ModelProto, name: str, edit) -> None:  # type: ignore[no-untyped-def]
    """Replace initializer `name` by edit(its value)."""
    init = next(t for t in model.graph.initializer if t.name == name)
    init.CopyFrom(numpy_helper.from_array(edit(numpy_helper.to_array(init).copy()), name))


def test_near_ties_are_decided_within_float32_rounding() -> None:
    """Class 1 is class 0 scaled by 1 + 2⁻²⁰: their scores differ by about a millionth, so low-mantissa flips
    land within the rounding of the Conv and the pool, where the bounds must hand them to ONNX Runtime."""
    def near_copy(w: np.ndarray) -> np.ndarray:
        w[1] = w[0] * np.float32(1 + 2.0**-20)
        return w

    for seed in (7, 8):
        model = _map_model(seed, flatten=True)
        _set(model, "cls.weight", near_copy)
        _set(model, "cls.bias", near_copy)
        _check_against_brute_force(model, _images(seed, 16))


def test_infinite_weights_and_biases() -> None:
    """A weight or bias of exactly ±1 becomes ±Inf at bit 30: a channel of all −Inf terms pools to exactly 0,
    one +Inf term makes the score +Inf, and Inf × 0 makes it NaN."""
    def ones(w: np.ndarray) -> np.ndarray:
        w.ravel()[0], w.ravel()[-1] = 1.0, -1.0
        return w

    for softmax in ("", "Softmax"):
        model = _map_model(9, softmax=softmax)
        _set(model, "cls.weight", ones)
        _set(model, "cls.bias", ones)
        _check_against_brute_force(model, _images(9))


def test_most_weight_faults_are_settled_without_onnx_runtime() -> None:
    """Recomputing a weight fault runs the whole Conv; the bracket and the exact value must leave it only the
    faults within rounding of a tie or of overflow."""
    result = analyse_model(_map_model(10, scale=0.05), _images(10, 40), roles=["weight", "bias"])
    assert result.total_faults == 40 * (C * D + C) * 32
    assert result.recomputed < 0.002 * result.total_faults


@pytest.mark.parametrize("clipped", [False, True], ids=["plain", "range-clipped"])
def test_the_exact_value_and_its_slack_hold_what_onnx_runtime_computes(clipped: bool) -> None:
    """For weight and bias flips of every bit on a 64-channel map: |ORT's faulty score − (base + Δ)| is within
    tau + slack, and the bound is not loose by more than about 10⁴ times the actual error. Behind a range
    clip (its bound at a tenth of the Conv's peak, so that it bites) the position-by-position interval is."""
    from harden.graph.range_clip import RangeClipPass

    from harden.fi.exact_locate import _Graph
    from harden.fi.exact_pooled import _PooledSites
    from harden.graph.ort import expose

    model, x = _map_model(11, d=64, flatten=True), _images(11, 6)
    if clipped:
        model = RangeClipPass(x).run(model)
        for bound in model.graph.initializer:
            if bound.name.endswith(("/1/min", "/1/max")):
                bound.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bound) / 10, bound.name))
    head = locate_head(model)
    assert isinstance(head, PooledConvHead) and bool(head.clips) == clipped
    names = head_tensors(head)
    values = dict(zip(names, make_session(expose(_Graph(model).model, names), opt_level="disable").run(names, {"x": x})))
    top1 = values[head.pooled].reshape(len(x), -1).argmax(1)
    sites = _PooledSites(head, values, top1, "fp32", RangePolicy("none", clips=head.clips), ("CPUExecutionProvider",))
    evaluate = sites._interval if clipped else sites._exact
    rng = np.random.default_rng(0)
    worst = 0.0
    for bit in range(31):
        for col in (None, "weight"):
            flat = (head.weight if col else sites.b).ravel()
            every = flat.copy()
            every.view(np.uint32)[:] ^= np.uint32(1 << bit)
            size = np.where(np.isfinite(every), np.abs(every), 0)
            m = np.concatenate([rng.integers(0, flat.size, 6), np.argsort(size)[-6:]])  # the largest flips too
            n = rng.integers(0, len(x), len(m))
            new = every[m]
            dw = new.astype(np.float64) - flat[m]
            k = m // 64 if col else m
            delta, slack = evaluate(n, k, m % 64 if col else None, dw)
            for i in range(len(m)):
                w, b = head.weight.copy(), sites.b.copy()
                (w.reshape(-1) if col else b)[m[i]] = new[i]
                score = sites.tail.scores(sites.x[n[i]], w, b)[k[i]]
                if not np.isfinite(score) or not np.isfinite(delta[i]):
                    continue
                error = abs(float(score) - (sites.base[n[i], k[i]] + delta[i]))
                bound = sites.tau_w[n[i]] + slack[i]
                assert error <= bound, (bit, col, i)
                worst = max(worst, error / bound)
    assert worst > 1e-4  # the test measures real rounding, not zeros


def test_a_tail_range_clipped_by_rewrite_matches_brute_force() -> None:
    """`harden rewrite --range-clip` puts NaN → 0 and Clip(±peak) between the classifier's Conv and its ReLU:
    no score can overflow then, and a NaN weight pools to exactly 0. Near ties too, and weights whose flips
    give Inf, NaN and huge values."""
    from harden.graph.range_clip import RangeClipPass

    def near_copy(w: np.ndarray) -> np.ndarray:
        w[1] = w[0] * np.float32(1 + 2.0**-20)
        return w

    for seed, softmax, scale in ((12, "", 1.0), (15, "Softmax", 1.0), (16, "", 0.05)):
        model, x = _map_model(seed, softmax=softmax, scale=scale), _images(seed)
        clipped = RangeClipPass(x).run(model)
        assert locate_head(clipped).clips
        for policy in ("none", "range"):
            _check_against_brute_force(clipped, x, policy)
    model = _map_model(17, flatten=True)
    _set(model, "cls.weight", near_copy)
    _set(model, "cls.bias", near_copy)
    _check_against_brute_force(RangeClipPass(_images(17, 16)).run(model), _images(17, 16))

    def ones(w: np.ndarray) -> np.ndarray:  # ±1 flip to ±Inf at bit 30; Inf × 0 is NaN, which the clip zeroes
        w.ravel()[0], w.ravel()[-1] = 1.0, -1.0
        return w

    model = _map_model(18, softmax="Softmax")
    _set(model, "cls.weight", ones)
    _set(model, "cls.bias", ones)
    _check_against_brute_force(RangeClipPass(_images(18)).run(model), _images(18))


def test_a_pooled_sum_within_rounding_of_float32s_max_is_left_to_onnx_runtime() -> None:
    """A bias whose bit-30 flip makes the pool's sum exceed FLT_MAX by 5e-6 (relative): too close for the bounds
    to call it +Inf, yet ONNX Runtime's sum overflows, and behind a Softmax a +Inf top score is a NaN row, an SDC.
    Class 0 is made the top class, the one where that outcome differs from a huge finite score."""
    flt_max = float(np.finfo(np.float32).max)
    bias = np.float32(flt_max * (1 + 5e-6) / 9 / 2.0**128)  # the 3×3 map: 9 positions

    def boost(w: np.ndarray) -> np.ndarray:
        w[0] = np.abs(w[0]) + 2
        return w

    def set_bias(b: np.ndarray) -> np.ndarray:
        b[0] = bias
        return b

    model = _map_model(13, softmax="Softmax")
    _set(model, "cls.weight", boost)
    _set(model, "cls.bias", set_bias)
    x = _images(13)
    assert (make_session(model, opt_level="disable").run(None, {"x": x})[0].reshape(len(x), -1).argmax(1) == 0).any()
    _check_against_brute_force(model, x)


def test_conv_outputs_of_exactly_one_flip_to_infinities() -> None:
    """Classes whose weights are 0 and bias ±1 output exactly ±1 at every position, which bit 30 makes ±Inf:
    without the ReLU the pooled score is ±Inf, with it −Inf is zeroed."""
    def zero_rows(w: np.ndarray) -> np.ndarray:
        w[1:] = 0.0
        return w

    def unit_bias(b: np.ndarray) -> np.ndarray:
        b[1], b[2] = 1.0, -1.0
        return b

    for relu in (False, True):
        for softmax in ("", "Softmax"):
            model = _map_model(14, relu=relu, softmax=softmax)
            _set(model, "cls.weight", zero_rows)
            _set(model, "cls.bias", unit_bias)
            _check_against_brute_force(model, _images(14))
