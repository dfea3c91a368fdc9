"""certify end to end on tiny digits models: report.json round-trips, plots and HTML are written,
exact fractions sit inside the sampled intervals of the same sites."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harden.errors import HardenError
from harden.report.certify import CertifyConfig, certify
from harden.report.schema import SCHEMA_VERSION, Report
from tests.report.tiny_models import write_models, write_softmax_model


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Report]:
    folder = tmp_path_factory.mktemp("certify")
    hard, base = write_models(folder / "models")
    out = folder / "report"
    config = CertifyConfig(model=str(hard), baseline=str(base), data="digits", output=str(out), limit=150,
                           injections=200, max_sdc=0.5, min_improvement=0.01, latency_runs=3, progress=False)
    return out, certify(config)


def test_report_json_round_trips_and_records_provenance(report_dir: tuple[Path, Report]) -> None:
    out, report = report_dir
    data = json.loads((out / "report.json").read_text())
    assert data["schema"] == SCHEMA_VERSION
    again = Report.load(out / "report.json")
    assert json.dumps(again.to_dict(), sort_keys=True) == json.dumps(data, sort_keys=True)
    model = again.model("model")
    assert len(model.sha256) == 64 and model.sha256 != again.model("baseline").sha256
    assert data["environment"]["packages"]["onnxruntime"]
    # an int8 model's integers depend on the CPU's kernels, so the report says which CPU and which arithmetic
    assert data["environment"]["cpu"]
    assert set(data["environment"]["uint8_int8_kernels"].values()) <= {"exact int32", "saturating int16 pairs"}
    assert "uint8 × int8 kernels here" in (out / "report.html").read_text()
    assert data["config"]["seed"] == 0 and data["config"]["injections"] == 200
    assert (out / model.campaign_file).is_file()
    assert 0.8 < model.accuracy.value <= 1.0
    assert model.cost.parameters > again.model("baseline").cost.parameters
    assert again.overhead["flops_added"] > 0


def test_plots_and_html_are_written(report_dir: tuple[Path, Report]) -> None:
    out, _ = report_dir
    for name in ("per_layer_sdc.png", "sdc_by_bit.png", "top2diff.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "PASSED" in page and "SDC (exact)" in page


def test_exact_sits_inside_the_sampled_intervals(report_dir: tuple[Path, Report]) -> None:
    _, report = report_dir
    checked = 0
    for model in report.models:
        assert model.exact is not None, model.exact_skipped
        exact = {s.tensor: s for s in model.exact.sites}
        for layer in model.campaign.layers:
            if layer.site in exact:
                # 95% intervals: a miss is possible but rare; allow a little slack around them
                assert layer.sdc.low - 0.01 <= exact[layer.site].sdc_fraction <= layer.sdc.high + 0.01
                checked += 1
    assert checked >= 6


def test_improvement_and_verdict(report_dir: tuple[Path, Report]) -> None:
    _, report = report_dir
    assert report.improvements[0].scope == "overall"
    assert bool(report.verdict) == all(g.passed for g in report.verdict.gates)
    assert any(g.name == "min-improvement[overall]" for g in report.verdict.gates)


def test_refuses_to_write_over_an_input(tmp_path: Path) -> None:
    hard, _ = write_models(tmp_path)
    with pytest.raises(HardenError):
        certify(CertifyConfig(model=str(hard), data="digits", output=str(hard)))
    with pytest.raises(HardenError, match="baseline"):
        certify(CertifyConfig(model=str(hard), data="digits", output=str(tmp_path / "r"), min_improvement=2.0))


def test_exact_is_skipped_with_its_reason_when_two_softmaxes_follow(tmp_path: Path) -> None:
    model = write_softmax_model(tmp_path, ("Softmax", "Softmax"))
    report = certify(CertifyConfig(model=str(model), data="digits", output=str(tmp_path / "r"), limit=60,
                                   injections=30, latency_runs=2, progress=False))
    record = report.model("model")
    assert record.exact is None and record.exact_skipped is not None and "another Softmax" in record.exact_skipped
    assert "another Softmax" in (tmp_path / "r" / "report.html").read_text()


def test_a_model_ending_in_softmax_gets_the_exact_analysis(tmp_path: Path) -> None:
    """Most model-zoo graphs end in a Softmax; the exact analysis skipped them until now."""
    model = write_softmax_model(tmp_path)
    report = certify(CertifyConfig(model=str(model), data="digits", output=str(tmp_path / "r"), limit=60,
                                   injections=30, latency_runs=2, progress=False))
    record = report.model("model")
    assert record.exact_skipped is None and record.exact is not None
    assert record.exact.total_faults > 0 and 0 < record.exact.total_sdc < record.exact.total_faults
    assert "Exact final-layer analysis (linear + softmax head" in (tmp_path / "r" / "report.html").read_text()


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_a_quantised_model_is_certified_on_its_stored_integers(tmp_path: Path, fmt: str) -> None:
    """Its campaign flips the int8 and int32 tensors it stores; the exact analysis runs on the stored integers
    of its classifier: in QDQ format, of the integer kernel ONNX Runtime runs in place of the declared float
    layer. Its cost counts the stored integers and, in QOperator format, the integer
    layer's FLOPs (they read 0)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from harden.data import load_dataset

    _, base = write_models(tmp_path / "models")
    images = load_dataset("digits", limit=64).images.astype("float32")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": images}])

        def get_next(self) -> dict | None:  # type: ignore[type-arg]
            return next(self.batches, None)

    quantize_static(str(base), str(tmp_path / "q.onnx"), Reader(), quant_format=getattr(QuantFormat, fmt))
    report = certify(CertifyConfig(model=str(tmp_path / "q.onnx"), baseline=str(base), data="digits",
                                   output=str(tmp_path / "r"), limit=60, injections=30, latency_runs=2,
                                   progress=False))
    model, baseline = report.model("model"), report.model("baseline")
    assert model.campaign.config.fault.fmt is None and baseline.campaign.config.fault.fmt == "fp32"
    # the QGemm classifier, analysed in its stored integers; in QDQ format, the QGemm ONNX Runtime runs for it
    kind = "integer linear (QGemm" + (", fused from QDQ by ONNX Runtime)" if fmt == "QDQ" else ")")
    assert model.exact is not None and model.exact.head == kind, model.exact_skipped
    assert {s.role: s.fmt for s in model.exact.sites} == {"weight": "int8", "bias": "int32", "input": "int8",
                                                           "output": "int8"}  # quantize_static's defaults
    assert f"{kind} head" in (tmp_path / "r" / "report.html").read_text()
    if fmt == "QDQ":  # each site under the name the campaign gives it
        sampled = {layer.site for layer in model.campaign.layers}
        assert {s.tensor for s in model.exact.sites if s.role != "input"} <= sampled
    assert baseline.exact is not None
    assert model.cost.parameters == baseline.cost.parameters == 64 * 10 + 10  # the stored integers count
    assert model.cost.flops == baseline.cost.flops > 0


def test_a_classifier_that_scores_a_map_gets_the_exact_analysis(tmp_path: Path) -> None:
    """SqueezeNet's tail (1×1 Conv → ReLU → GlobalAveragePool): the exact fractions of its weight, bias and Conv
    output sit inside the sampled campaign's intervals of the same sites."""
    import numpy as np
    import onnx

    from harden.graph.ort import make_session
    from tests.fi.tiny_models import pointwise_cnn

    model = pointwise_cnn(seed=3, softmax=True)
    onnx.save(model, tmp_path / "pointwise.onnx")
    x = np.random.default_rng(3).normal(size=(120, 3, 5, 5)).astype(np.float32)
    labels = make_session(model, opt_level="disable").run(None, {"x": x})[0].argmax(axis=1)
    exact, checked = _exact_within_sampled(tmp_path, tmp_path / "pointwise.onnx", x, labels)
    assert exact.head == "pooled-conv + softmax"
    assert {s.role for s in exact.sites} == {"weight", "bias", "output"} and checked == 3


def _exact_within_sampled(tmp_path: Path, model: Path, x, labels) -> tuple[object, int]:  # type: ignore[no-untyped-def]
    """Certify `model` on (x, labels) and check that each exact site's SDC fraction lies inside the sampled
    campaign's interval of the same site (±0.01); the exact result, and how many sites were compared."""
    import numpy as np

    np.savez(tmp_path / "data.npz", x=x, y=labels)
    report = certify(CertifyConfig(model=str(model), data=f"npz:{tmp_path / 'data.npz'}", output=str(tmp_path / "r"),
                                   preprocess="identity", injections=300, latency_runs=2, progress=False))
    record = report.model("model")
    assert record.exact is not None, record.exact_skipped
    exact = {s.tensor: s for s in record.exact.sites}
    checked = 0
    for layer in record.campaign.layers:
        if layer.site in exact:
            assert layer.sdc.low - 0.01 <= exact[layer.site].sdc_fraction <= layer.sdc.high + 0.01, layer.site
            checked += 1
    return record.exact, checked


def test_a_dynamically_quantised_classifier_gets_the_exact_analysis(tmp_path: Path) -> None:
    """quantize_dynamic's MatMulInteger head: the exact fractions of its stored weight, bias and output sit inside
    the sampled campaign's intervals of the same sites, which run one image at a time."""
    import numpy as np
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    from harden.graph.ort import make_session
    from tests.fi.tiny_models import linear_mlp

    onnx.save(linear_mlp(seed=2), tmp_path / "float.onnx")
    quantize_dynamic(str(tmp_path / "float.onnx"), str(tmp_path / "dynamic.onnx"))
    session = make_session(onnx.load(tmp_path / "dynamic.onnx"), opt_level="disable")
    x = np.random.default_rng(3).normal(size=(100, 1, 2, 3)).astype(np.float32)
    labels = np.array([session.run(None, {"x": x[i:i + 1]})[0].argmax() for i in range(len(x))])
    exact, checked = _exact_within_sampled(tmp_path, tmp_path / "dynamic.onnx", x, labels)
    assert exact.head.startswith("dynamic integer linear") and checked == 3  # weight, bias, output
