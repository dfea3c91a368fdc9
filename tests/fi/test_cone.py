"""The cone-of-influence engine against whole-tensor runs of the same kernels, and its window geometry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from harden.fi.engine import run_campaign
from harden.fi.cone import Cone, GoldenBlock
from harden.fi.config import CampaignConfig
from harden.fi.graphinfo import GraphInfo
from harden.fi.journal import JournalContents
from harden.fi.nodes import NodeSessions, golden_pass
from harden.fi.sites import list_sites
from harden.fi.window import Axis, crop
from tests.fi.tiny_models import classifier, conv_classifier_cnn, labelled_inputs, residual_cnn, windowed_cnn

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def _whole_graph(info: GraphInfo, sessions: NodeSessions, x: np.ndarray, tensor: str, elem: int,
                 value: np.floating) -> np.ndarray:
    """Scores of one image with one element of `tensor` replaced, every node run on whole tensors."""
    values = {info.input_name: x[None]}
    for i, node in enumerate(info.nodes):
        values.update(sessions.run(i, values))
        if tensor in node.output:
            t = values[tensor].copy()
            t.reshape(-1)[elem] = value
            values[tensor] = t
    return values[info.scores][0]


def _walk_setup(model: onnx.ModelProto, x: np.ndarray) -> tuple[GraphInfo, NodeSessions, GoldenBlock]:
    """The graph analysis, node sessions and golden tensors a cone walk over `x` needs."""
    info = GraphInfo(model, example=x[:1])
    sessions = NodeSessions(info, ["CPUExecutionProvider"], threads=1)
    return info, sessions, GoldenBlock(golden_pass(sessions, x, batch=info.run_batch or len(x)))


def _faults(rng: np.random.Generator, golden: np.ndarray) -> np.ndarray:
    """Faulty values of every kind, in golden's own type (float32, a float16 graph's float16, a QDQ graph's
    stored integers): bit flips of the golden value (sign, exponent, mantissa), NaN, ±inf and a huge finite
    value; for integers, their extremes."""
    width = golden.dtype.itemsize * 8
    uint = _uint(golden)
    bits = rng.integers(0, width, len(golden)).astype(uint)
    flipped = (golden.view(uint) ^ (uint(1) << bits)).view(golden.dtype)
    if golden.dtype.kind in "iu":
        extremes = [np.iinfo(golden.dtype).min, np.iinfo(golden.dtype).max]
    else:
        extremes = [np.nan, np.inf, -np.inf, np.finfo(golden.dtype).max / 2]
    special = rng.choice(np.array(extremes, dtype=golden.dtype), len(golden))
    return np.where(rng.random(len(golden)) < 0.1, special, flipped).astype(golden.dtype)


def _uint(a: np.ndarray) -> type:
    """The unsigned type of a's width, to compare bit patterns (NaN == NaN, −0 ≠ +0)."""
    return {1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize]


def _check_against_whole_graph(model: onnx.ModelProto, x: np.ndarray, faults: int,
                               max_sites: int | None = None, any_nan: bool = False) -> None:
    """Random positions (borders included) and faults at evenly spread activation sites: identical score bits.

    A model with a fixed batch of 1, or whose rows are coupled, gets one row per walk, as the engine gives it.
    """
    info, sessions, golden = _walk_setup(model, x)
    rng = np.random.default_rng(0)
    # folded activations (images × windows rows) never take the cone: they rerun the whole model
    sites = [s for s in list_sites(info) if s.kind == "activation" and not info.tensors[s.tensor].fold]
    if max_sites is not None:
        sites = [sites[i] for i in sorted(set(np.linspace(0, len(sites) - 1, max_sites).astype(int).tolist()))]
    step = info.run_batch or faults
    for site in sites:
        cone = Cone(info, sessions, site.tensor)
        rows = rng.integers(0, len(x), faults)
        elems = rng.integers(0, site.elements, faults)
        faulty = _faults(rng, golden[site.tensor].reshape(len(x), -1)[rows, elems])
        got = np.concatenate([cone.scores(golden, rows[i:i + step], elems[i:i + step], faulty[i:i + step],
                                          golden[info.scores][rows[i:i + step]])[0] for i in range(0, faults, step)])
        want = np.stack([_whole_graph(info, sessions, x[r], site.tensor, e, f) for r, e, f in zip(rows, elems, faulty)])
        assert _same_bits(got, want, any_nan), site.name


def _same_bits(got: np.ndarray, want: np.ndarray, any_nan: bool = False) -> bool:
    """Whether two score arrays hold the same bit patterns; with `any_nan`, NaNs of any payload match.

    A graph that computes in float16 needs that: ORT's float16 kernels do not
    all keep a NaN's payload (one batch size does, another gives the default
    NaN), and a NaN score is judged the same whatever its payload.
    """
    same = got.view(_uint(got)) == want.view(_uint(want))
    if any_nan:
        same |= np.isnan(got) & np.isnan(want)
    return got.dtype == want.dtype and bool(same.all())


@pytest.mark.parametrize("make", [lambda: windowed_cnn(), lambda: windowed_cnn(squeeze=True),
                                  lambda: residual_cnn(stride=2), lambda: residual_cnn(dilation=2, group=2),
                                  lambda: conv_classifier_cnn()],
                         ids=["windowed", "squeeze", "residual-stride2", "residual-dilated-grouped", "conv-classifier"])
def test_cone_equals_the_whole_graph_bit_for_bit(make) -> None:  # type: ignore[no-untyped-def]
    """Every activation site, NaN and ±inf faults included."""
    model = make()
    x, _ = labelled_inputs(model, 5)
    _check_against_whole_graph(model, x, faults=40)


@pytest.mark.parametrize("name", ["inception_v1", "resnet50", "squeezenet"])
def test_cone_equals_the_whole_graph_on_zoo_graphs(name: str) -> None:
    """The onnx wheel's light zoo graphs (opset 9: Concat, LRN, padded pools, Reshape to a fixed [1, N]; and
    SqueezeNet's N×1000×1×1 scores)."""
    model = onnx.load(str(LIGHT / f"light_{name}.onnx"))
    x = np.random.default_rng(1).standard_normal((2, 3, 224, 224)).astype(np.float32)
    _check_against_whole_graph(model, x, faults=3, max_sites=5)


def test_golden_pass_scores_match_the_plain_model() -> None:
    """Node by node at level 'all' is the model: its scores equal a plain session's to float rounding."""
    from harden.graph.ort import make_session

    model = windowed_cnn()
    x, _ = labelled_inputs(model, 6)
    info = GraphInfo(model, example=x[:1])
    golden = golden_pass(NodeSessions(info, ["CPUExecutionProvider"]), x, batch=4)
    plain = make_session(model, opt_level="disable").run(None, {"x": x})[0]
    np.testing.assert_allclose(golden[info.scores], plain, rtol=1e-5, atol=1e-5)
    assert set(golden) >= {n.output[0] for n in info.nodes}


def test_masked_faults_end_early_with_golden_scores() -> None:
    """A null fault, or a negative value that stays negative before a Relu, ends at the first check."""
    model = windowed_cnn()
    x, _ = labelled_inputs(model, 4)
    info, sessions, golden = _walk_setup(model, x)
    cone = Cone(info, sessions, "n0")  # BatchNorm output, read only by a Relu
    values = golden["n0"].reshape(len(x), -1)
    rows = np.repeat(np.arange(len(x)), 8)
    elems = np.concatenate([np.flatnonzero(values[r] < 0)[:8] for r in range(len(x))])
    faulty = values[rows, elems] * np.float32(4)  # still negative
    scores, early = cone.scores(golden, rows, elems, faulty, golden[info.scores][rows])
    assert early == len(rows)
    assert np.array_equal(scores, golden[info.scores][rows])
    scores, early = cone.scores(golden, rows, elems, values[rows, elems], golden[info.scores][rows])
    assert early == len(rows) and np.array_equal(scores, golden[info.scores][rows])


@pytest.mark.parametrize("kernel,stride,dilation,pads", [(3, 1, 1, (1, 1)), (3, 2, 1, (1, 1)), (1, 2, 1, (0, 0)),
                                                         (3, 1, 2, (2, 2)), (7, 2, 1, (3, 3)), (3, 2, 1, (0, 2)),
                                                         (2, 2, 1, (0, 0)), (5, 3, 2, (1, 4))])
def test_axis_reach_holds_every_output_a_window_touches(kernel: int, stride: int, dilation: int,
                                                        pads: tuple[int, int]) -> None:
    """Against brute force: every output reading a changed input lies in the window, which stays in bounds."""
    n_in = 23
    n_out = (n_in + sum(pads) - (kernel - 1) * dilation - 1) // stride + 1
    axis = Axis(kernel, stride, dilation, pads[0], pads[1], n_in, n_out)
    reads = [{o * stride - pads[0] + k * dilation for k in range(kernel)} for o in range(n_out)]
    for size in (1, 2, 5):
        starts = np.arange(0, n_in - size + 1)
        origin, n = axis.reach(starts, size)
        assert 1 <= n <= n_out
        for s, o in zip(starts.tolist(), origin.tolist()):
            assert 0 <= o and o + n <= n_out
            touched = [j for j in range(n_out) if reads[j] & set(range(s, s + size))]
            assert all(o <= j < o + n for j in touched), (s, o, n, touched)
        # the crop that _slide reads for outputs [o, o+n) holds every input those outputs read
        for o in origin.tolist():
            first = o * stride - pads[0]
            read = set().union(*reads[o:o + n])
            assert min(read) >= first and max(read) < first + axis.crop_length(n)


def test_crop_past_the_border_is_filled_with_the_padding_value() -> None:
    t = np.arange(2 * 2 * 4 * 5, dtype=np.float32).reshape(2, 2, 4, 5)
    rows, y0, x0 = np.array([1, 0]), np.array([-1, 1]), np.array([3, 0])
    got = crop(t, rows, y0, x0, 3, 3, fill=-np.inf)
    padded = np.pad(t, ((0, 0), (0, 0), (1, 1), (0, 1)), constant_values=-np.inf)
    assert np.array_equal(got[0], padded[1, :, 0:3, 3:6]) and np.array_equal(got[1], padded[0, :, 2:5, 0:3])
    with pytest.raises(ValueError):
        crop(t, rows, y0, x0, 3, 3)


def test_unsupported_ops_in_the_middle_fall_back_to_whole_tensors() -> None:
    """A Transpose pair (no window rule) between two convs: the walk goes on whole tensors, still exact."""
    rng = np.random.default_rng(3)
    w = lambda *s: numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.5)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["c0"], ["t0"], perm=[0, 1, 3, 2]),
             helper.make_node("Relu", ["t0"], ["r0"]),
             helper.make_node("Transpose", ["r0"], ["t1"], perm=[0, 1, 3, 2]),
             helper.make_node("Conv", ["t1", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["c1"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("Gemm", ["m", "wf"], ["logits"], transB=1)]
    inits = [w(3, 1, 3, 3), w(3, 3, 3, 3), w(4, 3)]
    for init, name in zip(inits, ("w0", "w1", "wf")):
        init.name = name
    x = rng.standard_normal((3, 1, 12, 12)).astype(np.float32)
    info, sessions, golden = _walk_setup(classifier(nodes, inits, "t", (1, 12, 12), 4, opset=13), x)
    cone = Cone(info, sessions, "c0")
    rows, elems = np.array([0, 1, 2, 2]), np.array([0, 77, 200, 431])
    faulty = np.array([5.0, -3.0, 1e6, np.nan], dtype=np.float32)
    got, _ = cone.scores(golden, rows, elems, faulty, golden[info.scores][rows])
    want = np.stack([_whole_graph(info, sessions, x[r], "c0", e, f) for r, e, f in zip(rows, elems, faulty)])
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def campaigns_by_engine(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, tmp_path: Path, threads: int = 0,
                        **config: object) -> dict[str, JournalContents]:
    """The same campaign (batch 16, `config` otherwise) run by the cone engine and by the suffix engine."""
    out = {}
    for engine in ("cone", "suffix"):
        run_campaign(model, x, y, CampaignConfig(batch=16, engine=engine, **config),  # type: ignore[arg-type]
                     tmp_path / f"{engine}.jsonl", progress=False, threads=threads)
        out[engine] = JournalContents(tmp_path / f"{engine}.jsonl")
    return out


def assert_engines_agree(contents: dict[str, JournalContents]) -> None:
    """Both engines drew the same faults, and their SDC verdicts match (their kernels differ only in
    rounding), on a campaign that did see SDCs."""
    flags = {engine: [(r["site"], r["image"], r["element"], r["bits"], r["sdc"]) for r in c.records()]
             for engine, c in contents.items()}
    assert len(flags["cone"]) == len(flags["suffix"]) > 0
    assert [f[:-1] for f in flags["cone"]] == [f[:-1] for f in flags["suffix"]]  # the plan ignores the engine
    assert np.mean([a == b for a, b in zip(flags["cone"], flags["suffix"])]) >= 0.99
    assert sum(f[-1] for f in flags["cone"]) > 0


def test_cone_and_suffix_campaigns_agree(tmp_path: Path) -> None:
    model = windowed_cnn()
    x, y = labelled_inputs(model, 24)
    assert_engines_agree(campaigns_by_engine(model, x, y, tmp_path, kinds=("activation",), injections=120,
                                             cache_mb=0.05))


def test_cone_engine_walks_weight_faults_without_suffix_sessions(tmp_path: Path, monkeypatch) -> None:
    """Under the cone engine a weight fault's faulty layer output starts a node-by-node walk: no per-site
    suffix session and no prefix pass are built, and the verdicts match the suffix engine's."""
    model = residual_cnn(seed=3)
    x, y = labelled_inputs(model, 24)
    flags = {}
    for engine in ("suffix", "cone"):
        if engine == "cone":
            def refuse(*args: object, **kwargs: object) -> None:
                raise AssertionError("the cone engine built a suffix session or a prefix pass")
            monkeypatch.setattr("harden.fi.runner.Suffix", refuse)
            monkeypatch.setattr("harden.fi.engine.expose", refuse)
        config = CampaignConfig(kinds=("weight",), injections=80, batch=16, engine=engine)
        run_campaign(model, x, y, config, tmp_path / f"{engine}.jsonl", progress=False)
        records = list(JournalContents(tmp_path / f"{engine}.jsonl").records())
        flags[engine] = [(r["site"], r["image"], r["element"], r["bits"], r["sdc"]) for r in records]
    assert len(flags["cone"]) == len(flags["suffix"]) > 0
    assert [f[:-1] for f in flags["cone"]] == [f[:-1] for f in flags["suffix"]]
    assert np.mean([a == b for a, b in zip(flags["cone"], flags["suffix"])]) >= 0.99
    assert sum(f[-1] for f in flags["cone"]) > 0


def test_shards_joined_in_one_walk_give_the_same_file(tmp_path: Path, monkeypatch) -> None:
    """Consecutive shards of a site run as one cone walk; the records equal those of one walk per shard."""
    import harden.fi.runner as runner_module

    model = windowed_cnn()
    x, y = labelled_inputs(model, 24)
    config = CampaignConfig(injections=100, batch=8)  # blocks of all 24 images: shards use different rows
    joined = []
    many = runner_module.SiteRunner.inject_many

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        joined.append(len(args[1]))
        return many(self, *args, **kwargs)

    monkeypatch.setattr(runner_module.SiteRunner, "inject_many", spy)
    run_campaign(model, x, y, config, tmp_path / "joined.jsonl", progress=False)
    assert joined and max(joined) > 1
    monkeypatch.setattr(runner_module, "WALK_BYTES", 0)  # a walk may then carry one batch only
    joined.clear()
    run_campaign(model, x, y, config, tmp_path / "single.jsonl", progress=False)
    assert joined and max(joined) == 1  # one shard per walk
    a = list(JournalContents(tmp_path / "joined.jsonl").records())
    b = list(JournalContents(tmp_path / "single.jsonl").records())
    assert len(a) == len(b) > 0 and a == b


def test_nan_at_a_maxpool_border_follows_orts_implicit_padding() -> None:
    """Whether ORT's MaxPool keeps a NaN depends on its place in the pooling window, which explicit −inf padding
    would shift at the borders, so NaN rows are redone on the whole tensor. Every position of one map is tried."""
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c0"], ["m"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["m", "w1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c1"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "wf"], ["logits"], transB=1)]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w0", (2, 1, 3, 3)), ("w1", (3, 2, 3, 3)), ("wf", (4, 3)))]
    x = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    info, sessions, golden = _walk_setup(classifier(nodes, inits, "p", (1, 8, 8), 4, opset=13), x)
    elems = np.arange(64)
    rows = np.zeros(64, dtype=np.int64)
    faulty = np.full(64, np.nan, dtype=np.float32)
    got, _ = Cone(info, sessions, "c0").scores(golden, rows, elems, faulty, golden[info.scores][rows])
    want = np.stack([_whole_graph(info, sessions, x[0], "c0", e, np.float32(np.nan)) for e in elems])
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
