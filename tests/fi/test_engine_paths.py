"""The fast engine against its slow references: null faults, suffix runs and weight deltas."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from harden.fi.cone import GoldenBlock
from harden.fi.config import CampaignConfig
from harden.fi.runner import SAME_KERNELS, SiteRunner, prefix_cache
from harden.fi.graphinfo import GraphInfo
from harden.fi.nodes import NodeSessions, golden_pass
from harden.fi.reference import activation_full, weight_full
from harden.fi.sites import Site, list_sites
from harden.graph.ort import make_session
from tests.fi.tiny_models import (classifier, conv_classifier_cnn, folded_batch_mlp, labelled_inputs, matmul_mlp,
                                  residual_cnn, tied_cnn)

CONFIG = CampaignConfig()


def _runner(model: onnx.ModelProto, name: str, x: np.ndarray, config: CampaignConfig = CONFIG,
            cone: bool = False) -> tuple[GraphInfo, SiteRunner, dict, np.ndarray, Site]:
    """A site's runner with its cache and golden scores: the suffix engine's prefix cache, or with `cone` the
    cone engine's node-by-node golden block."""
    info = GraphInfo(model, example=x[:1])
    site = next(s for s in list_sites(info) if s.name == name)
    if cone:
        sessions = NodeSessions(info, config.providers, threads=1)
        runner = SiteRunner(info, site, config, {}, {}, sessions=sessions)
        block = GoldenBlock(golden_pass(sessions, x, len(x)))
        return info, runner, block, block[info.scores], site
    runner = SiteRunner(info, site, config, {}, {})
    cache, golden = prefix_cache(info, [runner], x, config)
    return info, runner, cache, golden, site


def _golden(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return make_session(model, opt_level="disable").run(None, {"x": x})[0]


@pytest.mark.parametrize("level", SAME_KERNELS)
@pytest.mark.parametrize("make", [residual_cnn, matmul_mlp])
def test_null_fault_reproduces_golden_bit_for_bit(make, level: str) -> None:
    """At these levels the engine takes the prefix's scores as every site's golden: that must be exact."""
    model = make()
    x, _ = labelled_inputs(model, 6)
    golden = _golden(model, x)
    for site in list_sites(GraphInfo(model, example=x[:1])):
        _, runner, cache, prefix_golden, _ = _runner(model, site.name, x, CampaignConfig(opt_level=level))
        assert np.array_equal(prefix_golden, golden)
        rows = slice(0, len(x))
        elems = np.random.default_rng(0).integers(0, site.elements, len(x))
        values = runner.golden_values(cache, rows, elems)
        out = runner.scores(cache, rows, elems, values, values)
        assert np.array_equal(out, golden), site.name


def _suffix_check(model: onnx.ModelProto, names: tuple[str, ...], seed: int) -> None:
    """Suffix-engine activation faults at `names` against the slow path (a Where spliced into the whole model)."""
    x, _ = labelled_inputs(model, 8)
    for name in names:
        _, runner, cache, golden, site = _runner(model, name, x)
        rng = np.random.default_rng(seed)
        elems = rng.integers(0, site.elements, len(x))
        faulty = rng.uniform(-20, 20, len(x)).astype(np.float32)
        rows = slice(0, len(x))
        fast = runner.scores(cache, rows, elems, runner.golden_values(cache, rows, elems), faulty)
        slow = activation_full(model, x, name, elems, faulty)
        np.testing.assert_array_equal(fast, slow.reshape(len(x), -1))  # N×C×1×1 scores are read as N×C
        assert not np.array_equal(fast, golden)  # the faults did something


def test_suffix_equals_whole_graph_injection() -> None:
    _suffix_check(residual_cnn(), ("c1", "c2", "logits"), seed=3)


@pytest.mark.parametrize("cone", [False, True], ids=["suffix", "cone"])
def test_a_1x1_conv_classifier_with_n_c_1_1_scores_matches_the_reference(cone: bool) -> None:
    """Scores read through the analysis's added Flatten are the model's own N×C×1×1 output, fault for fault
    (the cone engine's activation faults: tests/fi/test_cone.py, against its own kernels)."""
    model = conv_classifier_cnn()
    if not cone:
        _suffix_check(model, ("c1", "cls"), seed=4)
    for name in ("w1", "wc", "bc"):
        _weight_check(model, name, cone=cone)


def _weight_check(model: onnx.ModelProto, name: str, n: int = 6, seed: int = 0, rerun: bool = False,
                  cone: bool = False, rtol: float = 1e-5, atol: float = 1e-5,
                  shifts: tuple[float, ...] = (-3.0, 2.5, 7.0), opposite: bool = False) -> None:
    """Weight faults (the golden value plus one of `shifts`; a stored integer saturates; with `opposite`, a
    stored integer goes to the far extreme of its type) through the fast path against the slow path, a copy
    of the model with the faulty stored tensor."""
    x, _ = labelled_inputs(model, n)
    _, runner, cache, golden, site = _runner(model, name, x, cone=cone)
    assert (runner.cone is not None) == cone
    rng = np.random.default_rng(seed)
    elems = rng.permutation(site.elements)[:n] if site.elements >= n else rng.integers(0, site.elements, n)
    rows = slice(0, n)
    gold = runner.golden_values(cache, rows, elems)
    faulty = gold + rng.choice(shifts, n)
    if gold.dtype.kind in "iu":
        faulty = np.clip(np.rint(faulty), np.iinfo(gold.dtype).min, np.iinfo(gold.dtype).max)
    if opposite:
        faulty = np.where(gold >= 0, np.iinfo(gold.dtype).min, np.iinfo(gold.dtype).max)
    faulty = faulty.astype(gold.dtype)
    fast = runner.scores(cache, rows, elems, gold, faulty, golden[rows] if cone else None)
    for i in range(n):
        slow = weight_full(model, x[i:i + 1], site.tensor, int(elems[i]), float(faulty[i])).reshape(-1)
        np.testing.assert_allclose(fast[i], slow, rtol=rtol, atol=atol, err_msg=f"{name} row {i}")
    assert not np.allclose(fast, golden, rtol=rtol / 10, atol=atol / 100), f"{name}: the faults had no effect"
    assert (runner.rerun is not None) == rerun, "the additive fast path must serve Conv/Gemm/MatMul"


@pytest.mark.parametrize("cone", [False, True], ids=["suffix", "cone"])
@pytest.mark.parametrize("kw", [dict(), dict(stride=2), dict(group=2), dict(group=4, dilation=2),
                                dict(stride=2, dilation=3), dict(trans_b=0)])
def test_fast_weight_path_equals_slow_path_conv_gemm(kw, cone: bool) -> None:
    """Under the cone engine the faulty layer output starts a node-by-node walk instead of a suffix session."""
    model = residual_cnn(seed=5, **kw)
    for name in ("w1", "b1", "w2", "b2", "wf", "bf"):
        _weight_check(model, name, cone=cone)


@pytest.mark.parametrize("cone", [False, True], ids=["suffix", "cone"])
def test_fast_weight_path_equals_slow_path_matmul_and_constant(cone: bool) -> None:
    model = matmul_mlp(seed=2)
    for name in ("w1", "w2", "b1", "b2"):  # b1, b2 enter through the Add after each MatMul
        _weight_check(model, name, cone=cone)


@pytest.mark.parametrize("cone", [False, True], ids=["suffix", "cone"])
def test_conv_transpose_weights_use_exact_node_rerun(cone: bool) -> None:
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "wt")
    wf = numpy_helper.from_array(rng.standard_normal((3, 2 * 9 * 9)).astype(np.float32), "wf")
    nodes = [helper.make_node("ConvTranspose", ["x", "wt"], ["ct"], name="deconv", strides=[2, 2]),
             helper.make_node("Flatten", ["ct"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wf"], ["logits"], name="fc", transB=1)]
    _weight_check(classifier(nodes, [w, wf], "ct", (3, 4, 4), 3), "wt", n=4, rerun=True, cone=cone)


def test_relu_masked_faults_skip_the_run_and_match_the_whole_graph() -> None:
    model = residual_cnn()
    x, _ = labelled_inputs(model, 8)
    _, runner, cache, golden, site = _runner(model, "c1", x)
    assert runner.relu_only
    flat = cache["c1"].reshape(len(x), -1)
    elems = np.array([int(np.flatnonzero(row < 0)[0]) if i % 2 else int(np.flatnonzero(row > 0)[0])
                      for i, row in enumerate(flat)])
    gold = runner.golden_values(cache, slice(0, 8), elems)
    faulty = np.where(gold < 0, gold * 1e30, gold * -3).astype(np.float32)  # odd rows masked, even rows not
    faulty[1] = -np.inf
    assert runner.masked(gold, faulty).tolist() == [False, True] * 4
    fast = runner.scores(cache, slice(0, 8), elems, gold, faulty, golden)
    np.testing.assert_array_equal(fast, activation_full(model, x, "c1", elems, faulty))
    np.testing.assert_array_equal(fast[1::2], golden[1::2])


def test_add_then_relu_masking_matches_the_whole_graph() -> None:
    model = residual_cnn()
    x, _ = labelled_inputs(model, 16)
    _, runner, cache, golden, site = _runner(model, "c2", x)
    assert runner.add_other == "skip" and not runner.relu_only
    rng = np.random.default_rng(1)
    elems = rng.integers(0, site.elements, 16)
    gold = runner.golden_values(cache, slice(0, 16), elems)
    faulty = np.where(np.arange(16) % 2 == 0, gold - 50.0, gold + 50.0).astype(np.float32)
    other = cache["skip"].reshape(16, -1)[np.arange(16), elems]
    skipped = runner.masked(gold, faulty, other)
    assert skipped.any() and not skipped.all()
    fast = runner.scores(cache, slice(0, 16), elems, gold, faulty, golden)
    np.testing.assert_array_equal(fast, activation_full(model, x, "c2", elems, faulty))


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_fast_conv_weight_path_with_auto_pad(auto_pad: str) -> None:
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(4)
    out = {"VALID": 3, "SAME_UPPER": 4, "SAME_LOWER": 4}[auto_pad]  # 7×7 input, kernel 3, stride 2
    w = numpy_helper.from_array(rng.standard_normal((2, 3, 3, 3)).astype(np.float32), "wc")
    wf = numpy_helper.from_array(rng.standard_normal((3, 2 * out * out)).astype(np.float32), "wf")
    nodes = [helper.make_node("Conv", ["x", "wc"], ["c"], name="conv", strides=[2, 2], auto_pad=auto_pad,
                              kernel_shape=[3, 3]),
             helper.make_node("Flatten", ["c"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "wf"], ["logits"], name="fc", transB=1)]
    _weight_check(classifier(nodes, [w, wf], "ap", (3, 7, 7), 3), "wc", n=8)


def test_bias_through_add_is_bit_exact() -> None:
    model = matmul_mlp(seed=3)
    x, _ = labelled_inputs(model, 5)
    for name in ("b1", "b2"):
        _, runner, cache, golden, site = _runner(model, name, x)
        elems = np.arange(5) % site.elements
        gold = runner.golden_values(cache, slice(0, 5), elems)
        faulty = (gold * 3 - 1).astype(np.float32)
        fast = runner.scores(cache, slice(0, 5), elems, gold, faulty)
        for i in range(5):
            np.testing.assert_array_equal(fast[i], weight_full(model, x[i:i + 1], name, int(elems[i]),
                                                               float(faulty[i]))[0])


def test_a_shared_weight_is_one_site() -> None:
    """A weight read by two convs, and a bias read directly and through an Identity, are listed once."""
    model = tied_cnn()
    sites = {s.name: s for s in list_sites(GraphInfo(model)) if s.kind == "weight"}
    assert sorted(sites) == ["bb", "bf", "w", "wf"]
    assert sites["w"].shared and sites["w"].node == "conv1" and sites["bb"].shared and not sites["wf"].shared


def _initializers_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model as exporters before IR 4 wrote it: every initializer also listed as a graph input."""
    from onnx import helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                            for t in copy.graph.initializer)
    return copy


@pytest.mark.parametrize("make, names", [(tied_cnn, ("w", "bb")), (folded_batch_mlp, ("w", "b"))],
                         ids=["shared", "folded-batch"])
def test_weights_without_a_per_image_layer_output_rerun_the_whole_model(make, names) -> None:
    """Shared weights reach every reader; a layer output of images × windows rows cannot start a suffix.
    Both run the whole model per fault: the slow reference path, bit for bit, and its own golden."""
    model = make()
    x, _ = labelled_inputs(model, 6)
    for name in names:
        _, runner, cache, golden, site = _runner(model, name, x)
        assert runner.whole is not None
        rng = np.random.default_rng(1)
        elems = rng.integers(0, site.elements, len(x))
        rows = slice(0, len(x))
        gold = runner.golden_values(cache, rows, elems)
        faulty = (gold + rng.choice([-3.0, 2.5, 7.0], len(x))).astype(np.float32)
        fast = runner.scores(cache, rows, elems, gold, faulty)
        for i in range(len(x)):
            np.testing.assert_array_equal(fast[i], weight_full(model, x[i:i + 1], name, int(elems[i]),
                                                               float(faulty[i]))[0], err_msg=f"{name} row {i}")
        assert not np.allclose(fast, golden), f"{name}: the faults had no effect"
        np.testing.assert_array_equal(runner.null_scores(cache, len(x)), golden)


def test_a_folded_activation_is_a_site_injected_per_image() -> None:
    """A MatMul output with two rows per image (a Swin window fold) is a site; the whole-model path puts each
    row's fault into that image's rows, as the reference splice does, bit for bit."""
    model = folded_batch_mlp()
    x, _ = labelled_inputs(model, 6)
    info = GraphInfo(model, example=x[:1])
    assert info.tensors["h"].fold == 2 and not info.tensors["h"].batched
    site = next(s for s in list_sites(info) if s.name == "h")
    assert site.shape == (2, 8) and site.elements == 16
    _, runner, cache, golden, _ = _runner(model, "h", x)
    assert runner.whole is not None and runner.cone is None
    rows = slice(0, len(x))
    elems = np.array([0, 15, 8, 7, 3, 12])  # both of each image's rows
    faulty = np.float32([9.0, -4.0, 30.0, 2.5, -8.0, 11.0])
    gold = runner.golden_values(cache, rows, elems)
    assert np.array_equal(gold, cache["h"].reshape(len(x), -1)[np.arange(len(x)), elems])
    fast = runner.scores(cache, rows, elems, gold, faulty)
    np.testing.assert_array_equal(fast, activation_full(model, x, "h", elems, faulty))
    assert not np.array_equal(fast, golden)
    np.testing.assert_array_equal(runner.null_scores(cache, len(x)), golden)


def test_whole_model_sites_of_a_model_listing_initializers_as_inputs() -> None:
    """Before IR 4 every initializer was also a graph input: the whole-model session must not declare it twice.
    ORT then treats every weight as overridable, so the reference's kernels differ: equal to float rounding."""
    model = _initializers_as_inputs(tied_cnn())
    x, _ = labelled_inputs(model, 4)
    _, runner, cache, _, site = _runner(model, "w", x)
    elems = np.arange(4) * 7
    gold = runner.golden_values(cache, slice(0, 4), elems)
    faulty = (gold * 9 + 1).astype(np.float32)
    fast = runner.scores(cache, slice(0, 4), elems, gold, faulty)
    for i in range(4):
        np.testing.assert_allclose(fast[i], weight_full(model, x[i:i + 1], "w", int(elems[i]), float(faulty[i]))[0],
                                   rtol=1e-5, atol=1e-5)


def _weights_listed_as_inputs() -> onnx.ModelProto:
    """A graph as IR version 3 wrote them (the model zoo's): every initializer also a graph input."""
    model = residual_cnn(seed=4)
    model.ir_version = 3
    model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in model.graph.initializer)
    return model


def _half_cnn() -> onnx.ModelProto:
    from onnxconverter_common import float16

    return float16.convert_float_to_float16(residual_cnn(seed=5))


@pytest.mark.parametrize("make", [residual_cnn, lambda: residual_cnn(seed=2, group=2, stride=2, dilation=2),
                                  _weights_listed_as_inputs, _half_cnn, matmul_mlp])
def test_suffix_sessions_share_the_weights_and_write_the_same_file(make, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """At level 'disable' every site's suffix session reads one copy of the weights (a Conv's fed as an
    input, the rest shared constants), and the campaign file is the one each session would write on its own
    copies; at other levels nothing is shared."""
    from harden.fi.engine import run_campaign
    from harden.graph.ort import SharedWeights

    model = make_model = make()
    x, y = labelled_inputs(model, 24)
    given: list[set[str]] = []
    fed: set[str] = set()
    real = make_session

    def spy(model, *args, shared=None, **kwargs):  # type: ignore[no-untyped-def]
        weights = {t.name for t in make_model.graph.initializer}
        fed.update({v.name for v in model.graph.input} & weights)
        given.append(set(shared or ()) | ({v.name for v in model.graph.input} & weights))
        return real(model, *args, shared=shared, **kwargs)

    monkeypatch.setattr("harden.fi.suffix.make_session", spy)
    files = {}
    for label, least, level in (("own", 10**12, "disable"), ("shared", 1, "disable"), ("basic", 1, "basic")):
        monkeypatch.setattr(SharedWeights, "MIN_ELEMENTS", least)
        given.clear()
        fed.clear()
        config = CampaignConfig(injections=40, batch=8, engine="suffix", opt_level=level)
        run_campaign(model, x, y, config, tmp_path / f"{label}.jsonl", progress=False)
        files[label] = (tmp_path / f"{label}.jsonl").read_bytes()
        assert given, "no suffix session was built"
        inits = {t.name for t in model.graph.initializer}
        if label == "shared":
            assert all(names and names <= inits for names in given)
            convs = {t for n in model.graph.node if n.op_type == "Conv" for t in n.input[1:]}
            assert fed <= convs and bool(fed) == (make is not matmul_mlp)  # Conv weights downstream are fed
        else:
            assert not any(given)
    assert files["shared"] == files["own"]
