"""Dynamically quantised graphs: their stored integer weights are sites, and their images run one at a time.

quantize_dynamic's DynamicQuantizeLinear takes one scale over the whole batch,
so a batched run would make each image's scores depend on its batch mates and
let one row's fault reach the others. Every record is checked here against
the slow reference path run on that image alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnxruntime.quantization import quantize_dynamic

from harden.fi import CampaignConfig, run_campaign
from harden.fi.cone import Cone
from harden.fi.engine import outcome
from harden.fi.graphinfo import GraphInfo
from harden.fi.profile import profile_ranges
from harden.fi.reference import activation_full, weight_full
from harden.fi import runner
from harden.fi.runner import walks_cone
from harden.fi.sites import list_sites
from harden.fi.whole_model import needs_whole_model
from harden.graph.ort import expose
from harden.report.cost import flop_count, parameter_count
from tests.fi.tiny_models import residual_cnn, scaled_mlp


def _dynamic(model: onnx.ModelProto, tmp_path: Path, ops: tuple[str, ...] = ("Conv", "MatMul")) -> onnx.ModelProto:
    onnx.save(model, tmp_path / "float.onnx")
    quantize_dynamic(str(tmp_path / "float.onnx"), str(tmp_path / "dynamic.onnx"), op_types_to_quantize=list(ops))
    return onnx.load(tmp_path / "dynamic.onnx")


def _alone(model: onnx.ModelProto, x: np.ndarray, names: list[str]) -> list[dict[str, np.ndarray]]:
    """Each image's tensors, from a run of that image alone."""
    session = ort.InferenceSession(expose(model, names).SerializeToString(), providers=["CPUExecutionProvider"])
    return [dict(zip(names, session.run(names, {"x": x[i:i + 1]}))) for i in range(len(x))]


@pytest.fixture(scope="module", params=["cnn", "mlp"])
def dynamic(request, tmp_path_factory) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    make = residual_cnn if request.param == "cnn" else scaled_mlp
    model = _dynamic(make(), tmp_path_factory.mktemp(request.param))
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(1).standard_normal((10, *shape)).astype(np.float32) * 2
    labels = np.array([np.argmax(s["logits"]) for s in _alone(model, x, ["logits"])])
    return model, x, labels


def test_the_integer_weights_are_sites_and_no_layer_reruns_the_whole_model(dynamic) -> None:
    model, x, _ = dynamic
    info = GraphInfo(model, example=x[:1])
    sites = list_sites(info)
    layers = {s.op_type for s in sites} & {"ConvInteger", "MatMulInteger"}
    assert layers and info.run_batch == 1 and "DynamicQuantizeLinear" in (info.coupling or "")
    stored = [s for s in sites if s.kind == "weight" and s.op_type in layers and s.dtype in ("int8", "uint8")]
    outputs = [s for s in sites if s.kind == "activation" and s.op_type in layers]
    assert len(stored) == len(outputs) >= 2 and all(s.dtype == "float32" for s in outputs)
    assert not any(needs_whole_model(info, s) for s in sites)


@pytest.mark.parametrize("engine", ["cone", "suffix"])
@pytest.mark.parametrize("all_tensors", [False, True])
def test_every_fault_matches_the_image_run_alone(dynamic, tmp_path: Path, engine: str, all_tensors: bool) -> None:
    model, x, labels = dynamic
    config = CampaignConfig(injections=12, batch=4, engine=engine, all_tensors=all_tensors, seed=5)
    run_campaign(model, x, labels, config, tmp_path / "c.jsonl", progress=False)
    records = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    faults = [r for r in records if r.get("type") == "fault"]
    tensors = sorted({r["site"] for r in faults if r["kind"] == "activation"})
    alone = _alone(model, x, tensors + ["logits"])
    for r in faults:
        i = r["image"]
        faulty = np.asarray(r["faulty"], dtype=np.float64)  # "nan" and "inf" parse too
        if r["kind"] == "activation":
            assert float(alone[i][r["site"]].reshape(-1)[r["element"]]) == r["golden"], r
            scores = activation_full(model, x[i:i + 1], r["site"], [r["element"]], [faulty])
        else:
            scores = weight_full(model, x[i:i + 1], r["site"], r["element"], faulty)
        assert r["golden_class"] == int(np.argmax(alone[i]["logits"]))
        assert outcome(scores, np.array([r["golden_class"]]))[0][0] == r["faulty_class"], r
    sites = {s.name for s in list_sites(GraphInfo(model, example=x[:1]), all_tensors)}
    assert {r["site"] for r in faults} == sites and len(sites) >= (8 if all_tensors else 4)


def test_the_campaign_does_not_depend_on_the_batch_size(dynamic, tmp_path: Path) -> None:
    """Batched, each image would be quantised with its batch mates: the file would change with --batch."""
    model, x, labels = dynamic
    files = [tmp_path / f"b{b}.jsonl" for b in (1, 7)]
    for b, path in zip((1, 7), files):
        run_campaign(model, x, labels, CampaignConfig(injections=10, batch=b, seed=2), path, progress=False)
    lines = [[line for line in p.read_text().splitlines() if '"type":"fault"' in line] for p in files]
    assert lines[0] == lines[1] and len(lines[0]) > 0


def test_ranges_are_profiled_on_each_image_alone(dynamic) -> None:
    model, x, _ = dynamic
    tensor = [s.tensor for s in list_sites(GraphInfo(model, example=x[:1])) if s.kind == "activation"][0]
    want = max(float(np.max(np.abs(v[tensor]))) for v in _alone(model, x, [tensor]))
    assert profile_ranges(model, x, [tensor], batch=5)[tensor] == want


def test_no_site_of_a_graph_quantised_throughout_walks_the_cone(dynamic, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Each dynamic quantiser takes its whole input, so no window from a site outlives the next layer: the cone
    engine runs these sites' suffixes, one call per fault, instead of one call per node (the records are the
    same, as the test above checks for every fault of both engines)."""
    model, x, labels = dynamic
    info = GraphInfo(model, example=x[:1])
    assert not any(walks_cone(info, s) for s in list_sites(info))

    def no_walk(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cone walk")

    monkeypatch.setattr(Cone, "walk", no_walk)
    summary = run_campaign(model, x, labels, CampaignConfig(injections=6, seed=1), tmp_path / "c.jsonl",
                           progress=False)
    assert summary.complete and summary.config.engine == "cone"
    # a graph whose nodes each carry much arithmetic keeps its walks, whose early ends then pay for their calls
    monkeypatch.setattr(runner, "SMALL_NODE_MACS", info.macs_per_node)
    assert all(walks_cone(info, s) for s in list_sites(info))


def test_a_float_conv_before_a_dynamic_classifier_keeps_its_walk(tmp_path: Path) -> None:
    """Quantised dynamically only in its classifier, a CNN keeps float Convs that a window can reach: the fault
    at conv1's output walks to conv2 on windows. Every other site runs its suffix, as the suffix engine does."""
    model = _dynamic(residual_cnn(matmul=True), tmp_path, ("MatMul",))
    x = np.random.default_rng(1).standard_normal((10, 3, 8, 8)).astype(np.float32) * 2
    labels = np.array([np.argmax(s["logits"]) for s in _alone(model, x, ["logits"])])
    info = GraphInfo(model, example=x[:1])
    sites = list_sites(info)
    assert info.coupling and {s.name for s in sites if walks_cone(info, s)} == {"c1"}
    records = {}
    for engine in ("cone", "suffix"):
        path = tmp_path / f"{engine}.jsonl"
        run_campaign(model, x, labels, CampaignConfig(injections=12, engine=engine, seed=3), path, progress=False)
        records[engine] = [json.loads(line) for line in path.read_text().splitlines() if '"type":"fault"' in line]
    # the same faults; bit for bit the same records wherever both run the suffix (c1's walk runs its float
    # Convs with the cone's own kernels, which may round an ulp apart from the suffix's)
    assert len(records["cone"]) == len(records["suffix"]) == 12 * len(sites)
    for a, b in zip(records["cone"], records["suffix"]):
        assert (a["site"], a["image"], a["element"], a["bits"]) == (b["site"], b["image"], b["element"], b["bits"])
        if a["site"] != "c1":
            assert a == b


def test_parameters_and_flops_count_the_stored_integers_as_in_the_float_graph(tmp_path: Path) -> None:
    """certify's cost of a dynamically quantised graph: its int8 weights are parameters and its ConvInteger and
    MatMulInteger multiply-adds count (they once counted 0 FLOPs); a per-tensor weight scale, which a plain Mul
    reads, counts as one float each."""
    float_model = residual_cnn(matmul=True)
    model = _dynamic(float_model, tmp_path)
    layers = [n for n in model.graph.node if n.op_type in ("ConvInteger", "MatMulInteger")]
    assert len(layers) == 3
    assert flop_count(GraphInfo(model)) == flop_count(GraphInfo(float_model)) > 0
    assert parameter_count(float_model) <= parameter_count(model) <= parameter_count(float_model) + len(layers)
