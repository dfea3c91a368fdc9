"""Campaign files: determinism, resume after truncation or kill -9, sharding and merging, summaries."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from harden.errors import HardenError
from harden.fi import CampaignConfig, CampaignSummary, FaultModel, merge_shards, run_campaign, summarise_jsonl
from harden.fi.journal import JournalContents
from tests.fi.tiny_models import (fixed_batch_cnn, folded_batch_mlp, labelled_inputs, residual_cnn, shared_wide_cnn,
                                  tied_cnn)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    model = residual_cnn()
    x, y = labelled_inputs(model, 20)
    return model, x, y


def _run(setup, path: Path, **kw) -> CampaignSummary:
    model, x, y = setup
    cfg = CampaignConfig(**{"injections": 30, "batch": 8, **kw})
    return run_campaign(model, x, y, cfg, path, progress=False)


def test_same_seed_same_bytes_other_seed_other_faults(setup, tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    _run(setup, a)
    _run(setup, b)
    _run(setup, c, seed=1)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_thread_count_changes_no_byte(setup, tmp_path: Path) -> None:
    model, x, y = setup
    cfg = CampaignConfig(injections=30, batch=8)
    files = [tmp_path / f"t{n}.jsonl" for n in (1, 2)]
    for n, path in zip((1, 2), files):
        run_campaign(model, x, y, cfg, path, progress=False, threads=n)
    assert files[0].read_bytes() == files[1].read_bytes()


@pytest.mark.parametrize("engine", ["cone", "suffix"])
def test_thread_count_changes_no_byte_of_whole_model_faults(engine: str, tmp_path: Path) -> None:
    """A shared weight's faults rerun the whole model one image at a time; on 2 threads ORT's Conv gave those
    runs other bits than the batched golden run, so they run on one thread each, side by side."""
    model = shared_wide_cnn()
    x, y = labelled_inputs(model, 12)
    cfg = CampaignConfig(injections=24, batch=6, layers="conv1", kinds=("weight",), engine=engine)
    files = [tmp_path / f"t{n}.jsonl" for n in (1, 2)]
    for n, path in zip((1, 2), files):
        run_campaign(model, x, y, cfg, path, progress=False, threads=n)
    records = list(JournalContents(files[0]).records())
    assert {r["site"] for r in records} == {"w"} and len(records) == 24
    assert files[0].read_bytes() == files[1].read_bytes()


def test_thread_count_changes_no_bit_of_the_evaluation_and_profile() -> None:
    """One image per run, the shape where ORT's Conv depends on its thread count: the same scores and ranges."""
    from harden.fi.prepare import prepare_eval

    model = shared_wide_cnn()
    x, y = labelled_inputs(model, 6)
    runs = [prepare_eval(model, x, y, ["c1", "c2"], batch=1, threads=n) for n in (1, 2)]
    separate = [prepare_eval(model, x, y, ["c1", "c2"], profile_inputs=x, batch=1, opt_level="basic", threads=n)
                for n in (1, 2)]
    for one, two in (runs, separate):
        assert one.ranges == two.ranges
        assert one.top2diff.tobytes() == two.top2diff.tobytes()


def test_concurrent_walks_are_journaled_in_file_order(setup, tmp_path: Path, monkeypatch) -> None:
    """Walks that finish out of order (the first one made slow) still give the one-worker file, byte for byte."""
    import threading

    from harden.fi.runner import SiteRunner

    model, x, y = setup
    cfg = CampaignConfig(injections=30, batch=8)
    alone, together = tmp_path / "alone.jsonl", tmp_path / "together.jsonl"
    run_campaign(model, x, y, cfg, alone, progress=False, threads=1)
    inject_many = SiteRunner.inject_many
    calls: list[str] = []

    def slow_first(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(threading.current_thread().name)
        if len(calls) == 1:
            time.sleep(0.5)
        return inject_many(self, *args, **kwargs)

    monkeypatch.setattr(SiteRunner, "inject_many", slow_first)
    run_campaign(model, x, y, cfg, together, progress=False, threads=3)
    assert len(calls) > 3 and all(name.startswith("walk") for name in calls)
    assert together.read_bytes() == alone.read_bytes()


def test_a_long_walk_is_split_so_that_every_worker_has_one(setup, tmp_path: Path, monkeypatch) -> None:
    """One site's 8 shards make one walk alone; with 4 workers, 8 walks of one shard each; the same file."""
    from harden.fi.runner import SiteRunner

    model, x, y = setup
    cfg = CampaignConfig(injections=64, batch=8, layers="conv1", kinds=("activation",))
    inject_many = SiteRunner.inject_many
    walks: list[int] = []

    def counted(self, cache, rows, *args, **kwargs):  # type: ignore[no-untyped-def]
        walks.append(len(rows))
        return inject_many(self, cache, rows, *args, **kwargs)

    monkeypatch.setattr(SiteRunner, "inject_many", counted)
    files = [tmp_path / f"w{n}.jsonl" for n in (1, 4)]
    run_campaign(model, x, y, cfg, files[0], progress=False, threads=1)
    assert walks == [8]
    walks.clear()
    run_campaign(model, x, y, cfg, files[1], progress=False, threads=4)
    assert walks == [1] * 8
    assert files[0].read_bytes() == files[1].read_bytes()


def test_golden_scores_from_the_profiling_pass_are_the_plain_models(setup) -> None:
    from harden.fi.prepare import prepare_eval
    from harden.graph.ort import make_session

    model, x, y = setup
    plain = make_session(model, opt_level="disable").run(None, {"x": x})[0]
    tensors = [n.output[0] for n in model.graph.node if n.op_type == "Conv"]
    ev = prepare_eval(model, x, y, tensors)  # one pass: golden scores and ranges
    separate = prepare_eval(model, x, y, tensors, profile_inputs=x)  # golden run and profiling apart
    assert ev.ranges == separate.ranges and all(v > 0 for v in ev.ranges.values())
    assert np.array_equal(ev.ids, separate.ids) and np.array_equal(ev.top2diff, separate.top2diff)
    assert np.array_equal(ev.golden_class, plain.argmax(axis=1)[ev.ids])


def test_records_count_and_summary(setup, tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    summary = _run(setup, path)
    assert summary.complete and len(summary.layers) == 9
    assert all(layer.injections == 30 for layer in summary.layers)
    records = list(JournalContents(path).records())
    assert len(records) == 9 * 30
    for layer in summary.layers:
        recs = [r for r in records if r["site"] == layer.site]
        assert layer.sdc.k == sum(r["sdc"] for r in recs)
        assert layer.sdc.low <= layer.sdc.value <= layer.sdc.high
        assert sum(n for _, n in layer.by_bit.values()) == 30
    again = CampaignSummary.from_dict(json.loads(json.dumps(summary.to_dict())))
    assert again.to_dict() == summary.to_dict()
    assert summarise_jsonl(path, confidence=0.99).layers[0].sdc.confidence == 0.99


def test_known_bit_flips_in_records(setup, tmp_path: Path) -> None:
    path = tmp_path / "sign.jsonl"
    _run(setup, path, fault=FaultModel("flip", "fp32", bits=(31,)), layers="c1,w2")
    records = list(JournalContents(path).records())
    assert records and all(r["faulty"] == -r["golden"] for r in records)
    path = tmp_path / "bf16.jsonl"
    _run(setup, path, fault=FaultModel("stuck-at-0", "bf16", bits=(15,)), layers="c1")
    from harden.fi.bitflip import quantise

    records = list(JournalContents(path).records())
    golden = np.asarray([r["golden"] for r in records], dtype=np.float32)
    assert (golden < 0).any()
    # sign stuck at 0 in bf16: |value| rounded to bf16
    assert [r["faulty"] for r in records] == [float(v) for v in np.abs(quantise(golden, "bf16"))]


@pytest.mark.parametrize("fmt", ["fp8-e4m3", "fp8-e5m2"])
def test_fp8_stores_with_the_tensors_scale(setup, tmp_path: Path, fmt: str) -> None:
    """A weight is stored with max|weight| / the format's max as its scale, an activation with its profiled
    peak's; the sign bit then negates the stored value."""
    from harden.fi.bitflip import FULL_SCALE, peak_scale, quantise, tensor_scale

    path = tmp_path / f"{fmt}.jsonl"
    model = setup[0]
    _run(setup, path, fault=FaultModel("flip", fmt, bits=(7,)), layers="c1,w2")
    contents = JournalContents(path)
    weight = next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == "w2")
    scales = {"w2": tensor_scale(weight, fmt), "c1": peak_scale(contents.evaluation.ranges["c1"], fmt)}
    assert scales["w2"] == np.float32(np.abs(weight).max() / FULL_SCALE[fmt])
    for r in contents.records():
        stored = quantise(np.float32([r["golden"]]), fmt, scales[r["site"]])[0]
        assert r["faulty"] == -stored


def test_resume_after_truncation_mid_shard(setup, tmp_path: Path) -> None:
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    _run(setup, full)
    data = full.read_bytes()
    lines = data.split(b"\n")
    # keep the header and a few shards, then half of a record line: a kill in mid-write
    keep = b"\n".join(lines[:40]) + b"\n" + lines[40][: len(lines[40]) // 2]
    cut.write_bytes(keep)
    done_before = len(JournalContents(cut).shards)
    assert 0 < done_before < JournalContents(full).header["total_shards"]
    _run(setup, cut)
    assert cut.read_bytes() == data


def test_kill_9_then_resume(setup, tmp_path: Path) -> None:
    model, x, y = setup
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=x, y=y)
    script = textwrap.dedent(f"""
        import numpy as np
        from harden.fi import CampaignConfig, run_campaign
        d = np.load({str(tmp_path / 'd.npz')!r})
        run_campaign({str(tmp_path / 'm.onnx')!r}, d["x"], d["y"], CampaignConfig(injections=400, batch=2),
                     {str(tmp_path / 'k.jsonl')!r}, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    out = tmp_path / "k.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not out.exists() or out.read_bytes().count(b'"type":"shard"') < 20):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = JournalContents(out)
    assert 20 <= len(killed.shards) < killed.header["total_shards"], "the kill should land mid-campaign"
    cfg = CampaignConfig(injections=400, batch=2)
    run_campaign(tmp_path / "m.onnx", x, y, cfg, out, progress=False)
    run_campaign(tmp_path / "m.onnx", x, y, cfg, tmp_path / "ref.jsonl", progress=False)
    assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()


def test_shards_merge_to_the_unsharded_file(setup, tmp_path: Path) -> None:
    full = tmp_path / "full.jsonl"
    _run(setup, full)
    parts = [tmp_path / f"p{i}.jsonl" for i in range(3)]
    for i, part in enumerate(parts):
        summary = _run(setup, part, shard=(i, 3))
        assert not summary.complete
    with pytest.raises(HardenError, match="lack"):
        merge_shards([str(p) for p in parts[:2]], str(tmp_path / "bad.jsonl"))
    merged = merge_shards([str(p) for p in parts], str(tmp_path / "merged.jsonl"))
    assert merged.complete
    assert (tmp_path / "merged.jsonl").read_bytes() == full.read_bytes()


def test_resume_refuses_a_different_campaign(setup, tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    _run(setup, path)
    with pytest.raises(HardenError, match="different campaign"):
        _run(setup, path, seed=7)
    model, x, y = setup
    run_campaign(model, x, y, CampaignConfig(injections=30, batch=8, seed=7), path, progress=False, fresh=True)
    assert JournalContents(path).header["config"]["seed"] == 7


def test_a_second_writer_is_refused_and_the_file_left_intact(setup, tmp_path: Path) -> None:
    from harden.fi.journal import Journal

    path = tmp_path / "a.jsonl"
    _run(setup, path)
    before = path.read_bytes()
    header = JournalContents(path).header
    first = Journal(path, header)
    try:
        with pytest.raises(HardenError, match="another running campaign"):
            Journal(path, header, fresh=True)
    finally:
        first.close()
    assert path.read_bytes() == before
    Journal(path, header).close()  # free again once the first writer closed


def test_margin_chooses_leveugle_sample_size(setup, tmp_path: Path) -> None:
    from harden.fi.stats import leveugle_sample_size

    summary = _run(setup, tmp_path / "m.jsonl", margin=0.2, layers="last", kinds=("activation",))
    (layer,) = summary.layers
    kept = summary.evaluation["kept"]
    assert layer.injections == leveugle_sample_size(layer.elements * 32 * kept, 0.2)


def test_clamp_range_bounds_faulty_values(setup, tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    _run(setup, path, clamp="range", layers="c1,c2", fault=FaultModel("flip", "fp32", bits=(30,)))
    contents = JournalContents(path)
    ev = contents.evaluation
    assert ev.to_dict() == contents.header["eval"] and ev.ranges.keys() == {"c1", "c2"}
    ranges = ev.ranges
    for r in contents.records():
        assert abs(float(r["faulty"])) <= ranges[r["site"]]
    summary = summarise_jsonl(path)
    assert all(layer.nonfinite.k == 0 for layer in summary.layers)


def test_opt_level_all_takes_goldens_from_null_suffix_runs(setup, tmp_path: Path) -> None:
    model, x, y = setup
    path = tmp_path / "all.jsonl"
    summary = _run(setup, path, opt_level="all", layers="c2,wf", engine="suffix")
    assert summary.opt_level == "all" and summary.complete
    assert summary.to_dict()["session_levels"] == {"prefix": "extended", "suffix": "all",
                                                   "golden": "fault-free run of each site's suffix"}
    for r in JournalContents(path).records():
        assert r["golden_class"] == y[r["image"]]


def test_cone_engine_is_the_default_and_recorded(setup, tmp_path: Path) -> None:
    summary = _run(setup, tmp_path / "cone.jsonl", layers="c1,w1")
    levels = summary.to_dict()["session_levels"]
    assert summary.config.engine == "cone" and "cone engine" in levels["activations"]
    assert levels["suffix"] == "disable"  # the weight site still takes the suffix path
    old = summary.config.to_dict()
    del old["engine"]  # a file written before the engine existed resumes as the suffix engine it was
    assert CampaignConfig.from_dict(old).engine == "suffix"


def test_probability_outputs_use_probabilities_directly(setup, tmp_path: Path) -> None:
    from onnx import helper

    from harden.fi.prepare import prepare_eval, softmax_top2diff

    model, x, y = setup
    soft = onnx.ModelProto()
    soft.CopyFrom(model)
    soft.graph.node[-1].output[0] = "z"
    soft.graph.node.append(helper.make_node("Softmax", ["z"], ["logits"], name="softmax", axis=1))
    ev = prepare_eval(soft, x, y)
    assert ev.probabilities and ev.header()["scores"] == "probabilities"
    logits_ev = prepare_eval(model, x, y)
    assert not logits_ev.probabilities
    np.testing.assert_allclose(ev.top2diff, logits_ev.top2diff, rtol=1e-4)  # same quantity either way
    assert not np.allclose(softmax_top2diff(np.log(np.full((1, 3), 1 / 3) + [[0.2, 0, -0.2]]), True),
                           softmax_top2diff(np.log(np.full((1, 3), 1 / 3) + [[0.2, 0, -0.2]])))
    path = tmp_path / "p.jsonl"
    run_campaign(soft, x, y, CampaignConfig(injections=20, batch=8, layers="last"), path, progress=False)
    records = list(JournalContents(path).records())
    assert records and all(r["dloss"] == 0.0 for r in records if r["faulty"] == r["golden"])


def test_small_cache_budget_still_runs_every_injection(setup, tmp_path: Path) -> None:
    from harden.fi.engine import cache_block_images
    from harden.fi.graphinfo import GraphInfo
    from harden.fi.sites import list_sites

    model, x, y = setup
    tight = CampaignConfig(cache_mb=0.02)
    info = GraphInfo(model, example=x[:1])
    assert 1 <= cache_block_images(info, list_sites(info), tight) < 8 <= cache_block_images(info, list_sites(info),
                                                                                           CampaignConfig())
    summary = _run(setup, tmp_path / "t.jsonl", cache_mb=0.02)
    assert summary.complete and all(layer.injections == 30 for layer in summary.layers)
    images = {r["image"] for r in JournalContents(tmp_path / "t.jsonl").records()}
    assert images == set(range(len(x)))


@pytest.mark.parametrize("level", ["disable", "all"])
@pytest.mark.parametrize("make, whole, others", [
    (tied_cnn, ("w", "bb"), ("c1", "c2", "logits", "wf", "bf")),
    (folded_batch_mlp, ("h", "w", "b"), ("logits", "wf", "bf"))], ids=["shared", "folded-batch"])
def test_sites_that_rerun_the_whole_model_run_in_a_campaign(tmp_path: Path, level: str, make, whole,
                                                            others) -> None:
    """Shared and folded weights used to stop the whole campaign (a refusal, or a shape error from ORT), and a
    folded activation was left out of the sites without a word."""
    model = make()
    x, y = labelled_inputs(model, 12)
    cfg = CampaignConfig(injections=24, batch=8, opt_level=level)
    summary = run_campaign(model, x, y, cfg, tmp_path / "c.jsonl", progress=False)
    assert {layer.site: layer.injections for layer in summary.layers} == {n: 24 for n in (*whole, *others)}
    records = [r for r in JournalContents(tmp_path / "c.jsonl").records() if r["site"] in whole]
    assert any(r["dloss"] != 0 for r in records)  # the faults reached the scores
    assert all(r["golden_class"] == y[r["image"]] for r in records)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_fixed_batch_model_walks_one_image_at_a_time(tmp_path: Path, threads: int) -> None:
    """A graph exported for one image (the zoo's Inception v1: a Reshape to a fixed [1, 1024]) cannot take
    several images in a node. The cone engine joined consecutive shards of a site into one walk of up to
    --batch rows, and ONNX Runtime failed in that Reshape; each walk now carries the model's own batch."""
    from tests.fi.test_cone import assert_engines_agree, campaigns_by_engine

    x, y = labelled_inputs(residual_cnn(), 12)  # fixed_batch_cnn is residual_cnn for one image at a time
    contents = campaigns_by_engine(fixed_batch_cnn(), x, y, tmp_path, injections=48, threads=threads)
    assert_engines_agree(contents)
