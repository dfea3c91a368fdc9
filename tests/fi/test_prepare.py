"""The evaluation pass of the cone engine: one node-by-node run gives the eval set and the first cache block."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from harden.errors import HardenError
from harden.fi import CampaignConfig, run_campaign
from harden.fi.cone import Cone
from harden.fi.graphinfo import GraphInfo
from harden.fi.journal import JournalContents
from harden.fi.nodes import NODE_LEVEL, NodeSessions, golden_pass
from harden.fi.prepare import prepare_eval, prepare_eval_nodes, select_eval
from harden.fi.profile import profile_ranges
from tests.fi.tiny_models import labelled_inputs, residual_cnn


@pytest.fixture(scope="module")
def setup() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    model = residual_cnn()
    x, y = labelled_inputs(model, 24)
    y[[1, 4, 5, 11]] = (y[[1, 4, 5, 11]] + 1) % 4  # four wrong labels: those images are left out
    return model, x, y


def _node_eval(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, block: int):  # type: ignore[no-untyped-def]
    info = GraphInfo(model, example=x[:1])
    sessions = NodeSessions(info, ["CPUExecutionProvider"])
    tensors = [n.output[0] for n in model.graph.node if n.op_type == "Conv"]
    keep = set().union(*(Cone(info, None, t).needs() for t in tensors))
    return info, sessions, tensors, keep, prepare_eval_nodes(sessions, x, y, tensors, 5, keep, block)


@pytest.mark.parametrize("block", [3, 8])
def test_node_pass_keeps_the_images_and_ranges_of_the_whole_graph_pass(setup, block: int) -> None:
    """Whether the first block is built in the first chunk's arrays (3) or apart (8)."""
    model, x, y = setup
    _, _, tensors, _, (ev, _) = _node_eval(model, x, y, block)
    whole = prepare_eval(model, x, y, tensors, opt_level=NODE_LEVEL)
    assert np.array_equal(ev.ids, whole.ids) and not {1, 4, 5, 11} & set(ev.ids.tolist())
    assert np.array_equal(ev.golden_class, whole.golden_class)
    assert ev.ranges.keys() == whole.ranges.keys()
    assert all(np.isclose(ev.ranges[t], whole.ranges[t], rtol=1e-5) for t in tensors)


@pytest.mark.parametrize("block", [3, 8, 20, 64])
def test_first_block_is_the_golden_pass_of_the_first_kept_images(setup, block: int) -> None:
    """Bit for bit, across chunks of 5 images with left-out images among them, whatever the block size."""
    model, x, y = setup
    info, sessions, _, keep, (ev, first) = _node_eval(model, x, y, block)
    assert first is not None
    expected = golden_pass(sessions, ev.inputs[:block], 7, keep)
    assert first.keys() == expected.keys()
    for name, value in expected.items():
        assert value.dtype == first[name].dtype
        assert np.array_equal(value.view(np.uint8), first[name].view(np.uint8)), name
    assert len(first[info.scores]) == min(block, len(ev.ids))


def test_ranges_cover_the_images_and_every_chunk_once_the_block_is_full(setup) -> None:
    """Ranges come from every chunk, also those after the block has filled (which keep no tensors), and an
    input site (--all-tensors) gets the images' own range."""
    model, x, y = setup
    info = GraphInfo(model, example=x[:1])
    sessions = NodeSessions(info, ["CPUExecutionProvider"])
    tensors = [info.input_name] + [n.output[0] for n in model.graph.node if n.op_type == "Conv"]
    keep = set(Cone(info, None, "c1").needs())
    ev, first = prepare_eval_nodes(sessions, x, y, tensors, 5, keep, 2)
    whole = prepare_eval(model, x, y, tensors, opt_level=NODE_LEVEL)
    assert first is not None and len(first[info.scores]) == 2
    assert ev.ranges[info.input_name] == float(np.abs(x).max())
    assert all(np.isclose(ev.ranges[t], whole.ranges[t], rtol=1e-5) for t in tensors)


def test_the_evaluation_pass_holds_no_more_than_a_block(setup, monkeypatch) -> None:
    """A batch larger than the block runs in chunks of the block's size, and once the block is full a chunk
    keeps no tensor: on a 224 px ResNet-50 the pass held 64 images' tensors for a block of 7
    (tools/inject_memory.py)."""
    import harden.fi.prepare as prepare

    model, x, y = setup
    calls: list[tuple[int, int]] = []
    real = prepare.node_pass

    def watched(sessions, x, batch, keep=None, seen=None):  # type: ignore[no-untyped-def]
        calls.append((len(x), len(set(keep or ()))))
        return real(sessions, x, batch, keep, seen)

    monkeypatch.setattr(prepare, "node_pass", watched)
    info, _, _, keep, (ev, first) = _node_eval(model, x, y, 3)  # chunks of 5 asked for
    assert first is not None and max(n for n, _ in calls) == 3
    assert calls[0][1] == len(keep) and calls[-1][1] == 0


def test_first_block_built_in_the_first_chunk_leaves_the_images_alone(setup) -> None:
    """A block no larger than a chunk is built in the chunk's own arrays, but a kept tensor that is the images
    themselves is copied, never written to."""
    model, x, y = setup
    before = x.copy()
    info = GraphInfo(model, example=x[:1])
    sessions = NodeSessions(info, ["CPUExecutionProvider"])
    keep = set(Cone(info, None, "c1").needs()) | {info.input_name}
    ev, first = prepare_eval_nodes(sessions, x, y, [], 5, keep, 4)
    assert first is not None
    assert np.array_equal(x.view(np.uint8), before.view(np.uint8))
    assert np.array_equal(first[info.input_name], ev.inputs[:4])
    expected = golden_pass(sessions, ev.inputs[:4], 4, keep)
    assert all(np.array_equal(value.view(np.uint8), first[name].view(np.uint8)) for name, value in expected.items())


def test_building_the_block_in_place_leaves_the_scores_of_the_first_chunk_alone(setup) -> None:
    """The first chunk is a left-out image, then two of different classes: moving the held rows up must not
    move their scores, or the second image would be judged on the third's."""
    model, x, y = setup
    a = next(i for i in range(len(y)) if i not in (1, 4, 5, 11))
    b = next(i for i in range(len(y)) if i not in (1, 4, 5, 11) and y[i] != y[a])
    order = [1, a, b] + [i for i in range(len(y)) if i not in (1, a, b)]
    _, _, tensors, _, (ev, first) = _node_eval(model, x[order], y[order], 3)
    whole = prepare_eval(model, x[order], y[order], tensors, opt_level=NODE_LEVEL)
    assert np.array_equal(ev.ids, whole.ids) and ev.ids[:2].tolist() == [1, 2]
    assert first is not None


def test_first_block_is_left_to_the_campaign_when_one_pass_cannot_tell_it(setup, monkeypatch) -> None:
    """A held row that the softmax filter drops afterwards (its Top2Diff rounds to 0) leaves a gap: no block."""
    import harden.fi.prepare as prepare

    model, x, y = setup
    real = prepare.softmax_top2diff

    def first_row_ties(scores: np.ndarray, probabilities: bool = False) -> np.ndarray:
        t2d = real(scores, probabilities)
        t2d[0] = 0.0
        return t2d

    monkeypatch.setattr(prepare, "softmax_top2diff", first_row_ties)
    _, _, _, _, (ev, first) = _node_eval(model, x, y, 8)
    assert 0 not in ev.ids and first is None


def test_cone_campaign_records_do_not_depend_on_where_block_zero_came_from(setup, tmp_path: Path) -> None:
    """From the evaluation pass (default), or from its own golden pass (a separate profiling set)."""
    model, x, y = setup
    config = CampaignConfig(injections=30, batch=8, cache_images=8)
    run_campaign(model, x, y, config, tmp_path / "a.jsonl", progress=False)
    run_campaign(model, x, y, config, tmp_path / "b.jsonl", progress=False, profile_inputs=x)
    a, b = (list(JournalContents(tmp_path / f"{n}.jsonl").records()) for n in "ab")
    assert a == b and len(a) == 30 * len(JournalContents(tmp_path / "a.jsonl").header["sites"])


def test_a_cone_campaign_holds_one_block_of_golden_tensors_at_a_time(setup, tmp_path: Path, monkeypatch) -> None:
    """Block 0 from the evaluation pass, then four more: each block's tensors are gone before the next one's
    golden pass, so the cache budget bounds what the campaign holds."""
    import gc
    import weakref

    import harden.fi.engine as engine

    model, x, y = setup
    alive: list[weakref.ref] = []
    passes: list[int] = []
    real_prepare, real_pass = engine.prepare_eval_nodes, engine.golden_pass

    def prepare(*args, **kwargs):  # type: ignore[no-untyped-def]
        ev, first = real_prepare(*args, **kwargs)
        alive.extend(weakref.ref(v) for v in first.values())
        return ev, first

    def golden(*args, **kwargs):  # type: ignore[no-untyped-def]
        passes.append(len(alive))
        gc.collect()
        assert not [r for r in alive if r() is not None], "an earlier block's tensors are still held"
        values = real_pass(*args, **kwargs)
        alive.extend(weakref.ref(v) for v in values.values())
        return values

    monkeypatch.setattr(engine, "prepare_eval_nodes", prepare)
    monkeypatch.setattr(engine, "golden_pass", golden)
    summary = run_campaign(model, x, y, CampaignConfig(injections=20, batch=4, cache_images=4), tmp_path / "c.jsonl",
                           progress=False)
    assert summary.complete and len(passes) >= 3 and passes[0] > 0  # block 0 came from the evaluation pass


def test_tied_scores_are_named_as_ties_not_as_misclassification() -> None:
    """A constant output (an untrained, zero classifier) is 100% 'correct' on class 0 but leaves no image."""
    x = np.zeros((4, 1, 2, 2), dtype=np.float32)
    with pytest.raises(HardenError, match="all 4 correctly classified images have tied top-two scores"):
        select_eval(x, np.zeros(4, dtype=np.int64), np.zeros((4, 3), dtype=np.float32), {})
    labels = np.array([0, 1, 1, 1])  # one image right, and it is a tie: the message speaks of one image
    with pytest.raises(HardenError, match="the one correctly classified image has tied top-two scores"):
        select_eval(x, labels, np.zeros((4, 3), dtype=np.float32), {})
    with pytest.raises(HardenError, match="no evaluation image is classified correctly"):
        select_eval(x, np.ones(4, dtype=np.int64), np.tile(np.float32([2, 1, 0]), (4, 1)), {})


@pytest.mark.parametrize("level", ["disable", NODE_LEVEL])
def test_the_profiling_pass_gives_the_same_set_however_the_images_are_cut(setup, level: str) -> None:
    """What lets the profiling pass cut its runs to fit its budget: golden scores and ranges alike, bit for bit."""
    model, x, y = setup
    tensors = [n.output[0] for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    sets = [prepare_eval(model, x, y, tensors, batch=batch, opt_level=level, threads=1) for batch in (1, 7, 24)]
    for ev in sets[1:]:
        assert ev.header() == sets[0].header()
        assert np.array_equal(ev.top2diff.view(np.uint64), sets[0].top2diff.view(np.uint64))


def _run_sizes(monkeypatch) -> list[int]:  # type: ignore[no-untyped-def]
    """A list that collects how many images each run of the profiling pass carries."""
    from harden.fi import profile

    sizes: list[int] = []
    real = profile.run_batched

    def spy(session, x, *args, **kwargs):  # type: ignore[no-untyped-def]
        sizes.append(len(x))
        return real(session, x, *args, **kwargs)

    monkeypatch.setattr(profile, "run_batched", spy)
    return sizes


def _profiled_bytes(model: onnx.ModelProto, x: np.ndarray) -> tuple[list[str], int]:
    """The tensors a campaign profiles, and their bytes per image."""
    info = GraphInfo(model, example=x[:1])
    act = [n.output[0] for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    return act, sum(int(np.prod(info.tensors[t].shape[1:])) * 4 for t in act)


def test_the_profiling_pass_keeps_to_its_budget(setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every tensor a run profiles is alive at its end, so the runs going at once must fit the budget: two runs
    of 64 images of a 224 px ResNet-50 held 7.75 GB. The first image runs alone, to measure them."""
    model, x, _ = setup
    tensors, per_image = _profiled_bytes(model, x)
    sizes = _run_sizes(monkeypatch)
    wide = profile_ranges(model, x, tensors, batch=16, threads=2)
    assert sorted(sizes) == [1, 7, 16]  # 24 images fit the default budget: the probe, then runs of --batch
    sizes.clear()
    narrow = profile_ranges(model, x, tensors, batch=16, threads=2, budget=int(3.5 * per_image * 2))
    assert sorted(sizes) == [1, 2] + [3] * 7  # two runs at once, three and a half images' tensors each
    assert narrow == wide


def test_a_campaign_profiles_within_its_cache_budget(setup, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The suffix engine's evaluation pass profiles every site: `cache_mb` bounds it as it bounds the cache."""
    model, x, y = setup
    _, per_image = _profiled_bytes(model, x)
    sizes = _run_sizes(monkeypatch)
    budget = 3.5 * per_image * 2 / 2**20
    config = CampaignConfig(kinds=("activation",), injections=8, batch=16, engine="suffix", cache_mb=budget)
    run_campaign(model, x, y, config, tmp_path / "small.jsonl", progress=False, threads=2)
    assert sizes and max(sizes) == 3
