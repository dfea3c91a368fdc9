"""On tiny ONNX models, the exact analysis equals brute-force ONNX Runtime injection of ALL its faults.

Brute force here is independent of the closed form and of the engine: a weight
fault re-runs the model with the weight fed as an input holding the flipped
value; an activation fault runs the graph cut at that tensor (onnx.utils'
extractor) with the flipped value fed in. Each fault runs over every image.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from harden.errors import HardenError
from harden.fi.bitflip import WIDTH, tensor_scale
from harden.fi.exact_linear import LinearHead
from harden.fi.exact_onnx import analyse_model, head_tensors, locate_head
from harden.fi.exact_site import RangePolicy, flip_bit
from harden.fi.outcome import fault_outcome
from harden.fi.profile import profile_ranges
from harden.graph.ort import expose, make_session
from harden.graph.text_head import TextHeadPass
from harden.head import HeadParams

C, D, E = 3, 6, 4


def _backbone_model(seed: int, softmax: bool | str = False) -> onnx.ModelProto:
    """x (N×1×3×3) → Flatten → Gemm → Relu → Gemm classifier (→ Softmax, or the op `softmax` names)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(size=(D, 9)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.normal(size=D).astype(np.float32), "b0"),
             numpy_helper.from_array(rng.normal(size=(C, D)).astype(np.float32), "fc.weight"),
             numpy_helper.from_array(rng.normal(size=C).astype(np.float32), "fc.bias")]
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "w0", "b0"], ["h"], name="fc0", transB=1),
             helper.make_node("Relu", ["h"], ["feat"], name="relu"),
             helper.make_node("Gemm", ["feat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1)]
    return scores_model(nodes, inits, C, softmax if isinstance(softmax, str) else "Softmax" if softmax else "")


def scores_model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], classes: int,
                 softmax: str = "") -> onnx.ModelProto:
    """The model of `nodes` that computes "logits" (N×classes) from x (N×1×3×3), then the op `softmax` names."""
    out = "logits"
    if softmax:
        nodes = [*nodes, helper.make_node(softmax, ["logits"], ["prob"], name="softmax", axis=1)]
        out = "prob"
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 3, 3])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _pooled_conv_model(seed: int) -> onnx.ModelProto:
    """x (N×1×3×3) → Conv 3×3 → Relu → GlobalAveragePool → 1×1 Conv classifier: scores N×C×1×1, as the model
    zoo's DenseNet-121 writes them."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(size=(D, 1, 3, 3)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.normal(size=D).astype(np.float32), "b0"),
             numpy_helper.from_array(rng.normal(size=(C, D, 1, 1)).astype(np.float32), "fc.weight"),
             numpy_helper.from_array(rng.normal(size=C).astype(np.float32), "fc.bias")]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["h"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("GlobalAveragePool", ["r"], ["feat"], name="pool"),
             helper.make_node("Conv", ["feat", "fc.weight", "fc.bias"], ["logits"], name="fc")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 3, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", C, 1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _text_model(seed: int, softmax: bool = False) -> onnx.ModelProto:
    rng = np.random.default_rng(seed + 100)
    emb = rng.normal(size=(C, E)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    head = HeadParams(rng.normal(size=(E, D)).astype(np.float32), (0.1 * rng.normal(size=E)).astype(np.float32),
                      emb, 2.0, ["a", "b", "c"])
    return TextHeadPass(head).run(_backbone_model(seed, softmax))


def _images(seed: int, n: int = 10) -> np.ndarray:
    return np.random.default_rng(seed + 7).normal(size=(n, 1, 3, 3)).astype(np.float32)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = make_session(model, opt_level="disable")
    return session.run([model.graph.output[0].name], feeds)[0]


def _brute_weight(model: onnx.ModelProto, name: str, x: np.ndarray, top1: np.ndarray, policy: RangePolicy,
                  fmt: str) -> np.ndarray:
    """SDC per bit with the weight fed as a graph input, every element × bit × image."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    init = next(t for t in m.graph.initializer if t.name == name)
    value = numpy_helper.to_array(init).astype(np.float32)
    m.graph.initializer.remove(init)
    m.graph.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
    session = make_session(m, opt_level="disable")
    out = m.graph.output[0].name
    sdc = np.zeros(WIDTH[fmt], np.int64)
    for bit in range(WIDTH[fmt]):
        for k in range(value.size):
            w = value.copy()
            w.ravel()[k] = flip_bit(value.ravel()[k:k + 1], bit, fmt, tensor_scale(value, fmt),
                                    policy.weight_peak(value))[0]
            sdc[bit] += fault_outcome(session.run([out], {"x": x, name: w})[0].reshape(len(x), -1), top1)[0].sum()
    return sdc


def _brute_activation(model: onnx.ModelProto, tensor: str, x: np.ndarray, top1: np.ndarray, policy: RangePolicy,
                      fmt: str) -> np.ndarray:
    """SDC per bit with the graph cut at `tensor` and each image's flipped value fed in."""
    golden = make_session(expose(model, [tensor]), opt_level="disable").run([tensor], {"x": x})[0]
    inferred = onnx.shape_inference.infer_shapes(model)
    suffix = onnx.utils.Extractor(inferred).extract_model([tensor], [model.graph.output[0].name])
    session = make_session(suffix, opt_level="disable")
    sdc = np.zeros(WIDTH[fmt], np.int64)
    flat = golden.reshape(len(x), -1)
    for bit in range(WIDTH[fmt]):
        for k in range(flat.shape[1]):
            t = flat.copy()
            t[:, k] = flip_bit(flat[:, k], bit, fmt, policy.act_scale(tensor, fmt), policy.element_peak(tensor))
            scores = session.run(None, {tensor: t.reshape(golden.shape)})[0]
            sdc[bit] += fault_outcome(scores.reshape(len(x), -1), top1)[0].sum()
    return sdc


MODELS = {"linear": _backbone_model, "text": _text_model, "pooled-conv": _pooled_conv_model,
          "linear-softmax": lambda seed: _backbone_model(seed, softmax=True),
          "linear-logsoftmax": lambda seed: _backbone_model(seed, softmax="LogSoftmax"),
          "text-softmax": lambda seed: _text_model(seed, softmax=True)}


@pytest.mark.parametrize("policy", ["none", "range"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_exact_equals_ort_brute_force_on_every_fault(kind: str, policy: str) -> None:
    """Every fault of every site, decided as ONNX Runtime decides it; Softmax outputs (most zoo graphs end in
    one) included: their top-1 is the scores' own except within rounding of a tie."""
    model = MODELS[kind](0)
    x = _images(0)
    result = analyse_model(model, x, policy=policy)
    head = locate_head(model)
    assert head.kind == ("text" if kind.startswith("text") else "linear")
    assert head.softmax == {"softmax": "Softmax", "logsoftmax": "LogSoftmax"}.get(kind.partition("-")[2], "")
    top1 = _run(model, {"x": x}).reshape(len(x), -1).argmax(1)
    rp = RangePolicy(policy, profile_ranges(model, x, head_tensors(head)))
    weights = {s.tensor for s in result.sites if s.role in ("weight", "bias", "proj_weight", "proj_bias")}
    for site in result.sites:
        if site.tensor in weights:
            brute = _brute_weight(model, site.tensor, x, top1, rp, "fp32")
        elif site.tensor == model.graph.output[0].name:
            continue  # a flip in the model output itself has nothing downstream to run; covered in numpy tests
        else:
            brute = _brute_activation(model, site.tensor, x, top1, rp, "fp32")
        assert site.sdc == brute.tolist(), site.tensor
    assert {s.role for s in result.sites} >= {"weight", "input"}


def test_linear_head_is_located_by_onnx_names() -> None:
    head = locate_head(_backbone_model(1))
    assert isinstance(head, LinearHead)
    assert (head.input, head.output, head.weight_name, head.bias_name, head.layer) == (
        "feat", "logits", "fc.weight", "fc.bias", "fc")
    text = locate_head(_text_model(1))
    assert text.kind == "text" and text.input == "feat" and text.scale == pytest.approx(np.exp(2.0), rel=1e-6)


def test_a_1x1_conv_on_a_global_pool_is_located_and_one_on_a_map_refused() -> None:
    head = locate_head(_pooled_conv_model(1))
    assert isinstance(head, LinearHead) and head.weight.shape == (C, D)
    assert (head.input, head.output, head.weight_name, head.bias_name, head.layer) == (
        "feat", "logits", "fc.weight", "fc.bias", "fc")
    on_map = _pooled_conv_model(1)
    on_map.graph.node[3].input[0] = "r"  # the classifier now reads the 3×3 map, not its pool
    with pytest.raises(HardenError, match="1×1 Conv on a GlobalAveragePool"):
        locate_head(on_map)


def test_a_classifier_weight_stored_flat_and_reshaped_matches_brute_force() -> None:
    from tests.fi.tiny_models import reshaped_weight_mlp

    model = reshaped_weight_mlp(seed=1)
    x = np.random.default_rng(8).normal(size=(10, 2, 3, 3)).astype(np.float32)
    result = analyse_model(model, x, roles=["weight"])
    top1 = _run(model, {"x": x}).argmax(1)
    assert result.sites[0].tensor == "wf_flat"
    assert result.site("wf_flat").sdc == _brute_weight(model, "wf_flat", x, top1, RangePolicy("none"), "fp32").tolist()


def test_softmax_over_another_axis_or_of_a_softmax_is_refused() -> None:
    model = _backbone_model(2, softmax=True)
    model.graph.node[-1].attribute[0].i = 0  # over the images
    with pytest.raises(HardenError, match="normalises axis 0, not the classes"):
        locate_head(model)
    model = _backbone_model(2, softmax="LogSoftmax")
    model.graph.node.append(helper.make_node("Softmax", ["prob"], ["p2"], name="again", axis=1))
    model.graph.output[0].name = "p2"
    with pytest.raises(HardenError, match="applies another LogSoftmax"):
        locate_head(model)


@pytest.mark.parametrize("fmt", ["int8", "fp8-e4m3", "fp8-e5m2"])
def test_scaled_formats_on_onnx_model_match_brute_force(fmt: str) -> None:
    model = _backbone_model(3)
    x = _images(3)
    result = analyse_model(model, x, policy="none", fmt=fmt, roles=["weight", "input"])
    top1 = _run(model, {"x": x}).argmax(1)
    rp = RangePolicy("none", profile_ranges(model, x, ["feat"]))
    assert result.site("fc.weight").sdc == _brute_weight(model, "fc.weight", x, top1, rp, fmt).tolist()
    assert result.site("feat").sdc == _brute_activation(model, "feat", x, top1, rp, fmt).tolist()
    assert sum(result.site("fc.weight").sdc) > 0


def test_stored_index_maps_to_the_transposed_layout() -> None:
    from harden.fi.exact_onnx import stored_to_element

    head = locate_head(_text_model(4))
    wt = head.weight_name
    assert wt in head.transposed and head.proj_weight_name not in head.transposed
    e, c = 2, 1  # stored Wᵀ is E×C; the analysis enumerates W as C×E
    assert stored_to_element(head, wt, np.array([e * C + c]))[0] == c * E + e
    assert stored_to_element(head, head.proj_weight_name, np.array([7]))[0] == 7


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("opset", [11, 13])
def test_ort_softmax_keeps_the_order_the_tie_band_assumes(opset: int, op: str) -> None:
    """The exact analysis trusts a Softmax to keep the order of scores more than SOFTMAX_TIE apart: that holds
    if ONNX Runtime's float32 Softmax is within SOFTMAX_TIE / 4 (relative) of the exact one. A runtime whose
    Softmax were less accurate would fail here before it could skew a count."""
    from harden.fi.exact_site import SOFTMAX_TIE

    graph = helper.make_graph([helper.make_node(op, ["z"], ["p"], axis=1)], "softmax",
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 10])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 10])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    rng = np.random.default_rng(0)
    for scale in (0.1, 1.0, 10.0, 100.0, 1000.0):
        z = (rng.standard_normal((20000, 10)) * scale).astype(np.float32)
        out = _run(model, {"z": z}).astype(np.float64)
        e = np.exp(z - z.max(axis=1, keepdims=True).astype(np.float64))
        exact = e / e.sum(axis=1, keepdims=True)
        p = np.exp(out) if op == "LogSoftmax" else out
        big = exact > 1e-3
        assert (np.abs(p - exact)[big] / exact[big]).max() < SOFTMAX_TIE / 4, scale
        # scores SOFTMAX_TIE apart at the top (or one float32 step, where that is wider) keep their order
        rows, top = np.arange(len(z)), z.argmax(axis=1)
        runner_up = np.minimum(z[rows, top] - np.float32(SOFTMAX_TIE), np.nextafter(z[rows, top], -np.inf))
        z[rows, (top + 1) % 10] = runner_up
        assert (_run(model, {"z": z}).argmax(axis=1) == top).all(), scale


def test_progress_counts_every_fault_once() -> None:
    """certify's bar for the exact analysis: the parts reported add up to the faults counted, near ties included."""
    from harden.fi.exact import analyse_site
    from harden.fi.exact_onnx import model_sites

    model = _backbone_model(5)
    x = _images(5, n=40)
    _, sites, top1, _ = model_sites(model, x)
    for site in sites:
        site.tau[:3] = np.inf  # three images analysed one by one, as near a tie
        parts: list[int] = []
        result = analyse_site(site, top1, "fp32", parts.append)
        assert sum(parts) == result.total_faults == site.size * len(x) * 32, site.tensor


def test_an_image_whose_golden_top1_is_a_rounding_tie_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where numpy's float32 pass of the head and ONNX Runtime's disagree on an image's fault-free top-1, every
    fault of it sent to the float32 path would count as an SDC. Such an image is left out and counted, and
    the others' counts are those of an analysis without it."""
    from harden.fi.exact import ExactResult
    from harden.fi.exact_linear import LinearHead

    model, x = _backbone_model(3), _images(3)
    expected = analyse_model(model, x[1:])
    logits = LinearHead.logits

    def numpy_disagrees_on_image_0(self: LinearHead, features: np.ndarray) -> np.ndarray:
        out = logits(self, features)
        out[0] = np.roll(out[0], 1)  # its top-1 moves to the next class
        return out

    monkeypatch.setattr(LinearHead, "logits", numpy_disagrees_on_image_0)
    result = analyse_model(model, x)
    assert result.rounding_ties == 1 and result.images == len(x) - 1
    assert [(s.sdc, s.due) for s in result.sites] == [(s.sdc, s.due) for s in expected.sites]
    assert ExactResult.from_dict(result.to_dict()).rounding_ties == 1


@pytest.mark.parametrize("kind", ["linear", "linear-softmax", "pooled-conv", "text", "text-softmax",
                                  "text-cosines-only"])
def test_a_model_range_clipped_by_rewrite_is_analysed_with_its_clips(kind: str) -> None:
    """`harden rewrite --range-clip` puts NaN → 0 and Clip(±peak) after the classifier (the text head's
    projection and cosines); the analysis once stopped there ('the class scores come from Clip'). It now looks
    through harden's own clip, applies it in every policy, and matches ONNX Runtime on every fault of the
    clipped graph. The bounds are tightened to 70% of the peaks of 3 calibration images, so that the clips bite
    fault-free too, and several scores meet at a bound, where the lowest class wins the tie."""
    from harden.graph.range_clip import RangeClipPass

    if kind == "text-cosines-only":  # z unclipped: an overflowing z' makes NaN cosines, which the clip zeroes
        original = MODELS["text"](0)
        model = RangeClipPass(_images(1, n=3), layers=[locate_head(original).cosine]).run(original)
    else:
        model = RangeClipPass(_images(1, n=3)).run(MODELS[kind](0))
    for init in model.graph.initializer:
        if init.name.endswith(("/min", "/max")):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(0.7), init.name))
    x = _images(0)
    head = locate_head(model)
    if kind.startswith("text"):
        clipped = [head.cosine] if kind == "text-cosines-only" else [head.proj_output, head.cosine]
    else:
        clipped = [head.output]
    assert set(clipped) == set(head.clips)
    result = analyse_model(model, x)
    top1 = _run(model, {"x": x}).reshape(len(x), -1).argmax(1)
    rp = RangePolicy("none", clips=head.clips)
    weights = {s.tensor for s in result.sites if s.role in ("weight", "bias", "proj_weight", "proj_bias")}
    for site in result.sites:
        if site.tensor == model.graph.output[0].name:
            continue
        brute = (_brute_weight if site.tensor in weights else _brute_activation)(model, site.tensor, x, top1, rp,
                                                                                 "fp32")
        assert site.sdc == brute.tolist(), site.tensor



def test_a_clip_radius_keeps_the_clip_idle() -> None:
    """Weight flips below a site's pruning radius are counted without being visited, so with a clip downstream
    that radius must also keep the clip idle: every change up to it, either way, passes the site's own clip
    check."""
    from harden.fi.exact_onnx import model_sites
    from harden.graph.range_clip import RangeClipPass

    model = RangeClipPass(_images(1, n=3)).run(_text_model(0))
    _, sites, top1, _ = model_sites(model, _images(0))
    checked = 0
    for site in sites:
        if site.clip_radius is None:
            continue
        assert site.clip_free is not None
        ks = np.arange(site.size)
        radius = site.clip_radius[:, site.group[ks]]
        for sign in (1.0, -1.0):
            idle = site.clip_free(slice(0, len(top1)), ks, sign * 0.999 * radius)
            assert idle[radius > 0].all(), site.tensor
        checked += int((radius > 0).sum())
    assert checked > 0
