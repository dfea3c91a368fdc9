"""`harden certify` as a CI step: exit 0 when the gates pass, 3 when one fails (and says which), 1 on errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from harden.cli import main
from tests.report.tiny_models import write_models

FAST = ["--data", "digits", "--limit", "100", "--injections", "100", "--latency-runs", "2", "--no-progress",
        "--no-exact"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_models(tmp_path_factory.mktemp("models"))


def test_exit_0_when_every_gate_passes(models: tuple[Path, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    hard, base = models
    code = main(["certify", str(hard), "--baseline", str(base), *FAST, "--max-sdc", "0.9",
                 "--min-improvement", "0.01", "-o", str(tmp_path / "r")])
    assert code == 0
    assert "PASSED" in capsys.readouterr().out
    assert (tmp_path / "r" / "report.json").is_file() and (tmp_path / "r" / "report.html").is_file()


def test_exit_3_lists_the_failing_gates(models: tuple[Path, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    hard, base = models
    code = main(["certify", str(hard), "--baseline", str(base), *FAST, "--max-sdc", "0.0001",
                 "--sdc-scope", "overall", "--min-improvement", "1000", "-o", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert code == 3
    assert "FAIL max-sdc[overall]" in out and "FAIL min-improvement[overall]" in out and "FAILED (2 gate(s))" in out


def test_exit_1_on_errors(models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hard, _ = models
    assert main(["certify", str(tmp_path / "missing.onnx"), *FAST, "-o", str(tmp_path / "r")]) == 1
    assert main(["certify", str(hard), *FAST, "--min-improvement", "2", "-o", str(tmp_path / "r")]) == 1
    assert main(["certify", str(hard), *FAST, "--max-sdc", "7", "-o", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "no such file" in err and "--baseline" in err and "--max-sdc" in err
    assert "Traceback" not in err


def test_threads_change_no_byte_of_the_evidence(models: tuple[Path, Path], tmp_path: Path) -> None:
    """--threads 1 and 2: the same campaign files and the same exact counts; the setting is recorded."""
    import json

    hard, _ = models
    for n in (1, 2):
        args = [a for a in FAST if a != "--no-exact"]
        assert main(["certify", str(hard), *args, "--threads", str(n), "-o", str(tmp_path / f"t{n}")]) == 0
    reports = [json.loads((tmp_path / f"t{n}" / "report.json").read_text()) for n in (1, 2)]
    assert [r["config"]["threads"] for r in reports] == [1, 2]
    exact = [{k: v for k, v in r["models"][0]["exact"].items() if k != "seconds"} for r in reports]
    assert exact[0] == exact[1] and exact[0]["total_faults"] > 0
    campaign = Path("campaigns") / "model.jsonl"
    assert (tmp_path / "t1" / campaign).read_bytes() == (tmp_path / "t2" / campaign).read_bytes()


def test_a_zoo_style_1x1_conv_classifier_is_rewritten_and_certified(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """N×C×1×1 scores, as the model zoo's SqueezeNet and DenseNet-121 write them: the injector refused such a
    model (baseline or hardened, since the rewrite keeps the output's shape), so neither could be certified."""
    import json

    import onnx

    from harden.graph.locate import locate_classifier
    from tests.fi.tiny_models import conv_classifier_cnn
    from tests.graph.tiny_models import random_head_npz_params

    base = conv_classifier_cnn(classes=10, channels=1)
    onnx.save(base, tmp_path / "base.onnx")
    info = locate_classifier(base)
    random_head_npz_params(info.in_features, info.num_classes).save(tmp_path / "head.npz")
    assert main(["rewrite", str(tmp_path / "base.onnx"), "--head", str(tmp_path / "head.npz"),
                 "-o", str(tmp_path / "hard.onnx")]) == 0
    assert [d.dim_value for d in onnx.load(tmp_path / "hard.onnx").graph.output[0].type.tensor_type.shape.dim[1:]] \
        == [10, 1, 1]
    args = [a for a in FAST if a != "--no-exact"]
    assert main(["certify", str(tmp_path / "hard.onnx"), "--baseline", str(tmp_path / "base.onnx"), *args,
                 "-o", str(tmp_path / "r")]) == 0
    assert "PASSED" in capsys.readouterr().out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    hardened = report["models"][0]
    assert hardened["exact"]["total_faults"] > 0  # the text head's exact analysis reads the 4-D scores too
    for campaign in ("model.jsonl", "baseline.jsonl"):
        assert sum(1 for _ in (tmp_path / "r" / "campaigns" / campaign).open()) > 100


@pytest.mark.parametrize("keep_io_types", [False, True], ids=["fp16-io", "fp32-io"])
def test_float16_models_get_the_exact_column(models: tuple[Path, Path], tmp_path: Path, keep_io_types: bool,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """onnxconverter-common's float16 conversions of both models: certify runs the exact final-layer analysis
    on each (16 bits per stored value) where it used to refuse float16 graphs."""
    import json

    import onnx

    float16 = pytest.importorskip("onnxconverter_common.float16")
    paths = []
    for path in models:
        half = float16.convert_float_to_float16(onnx.load(str(path)), keep_io_types=keep_io_types)
        paths.append(tmp_path / f"{path.stem}.fp16.onnx")
        onnx.save(half, str(paths[-1]))
    args = [a for a in FAST if a != "--no-exact"]
    assert main(["certify", str(paths[0]), "--baseline", str(paths[1]), *args, "-o", str(tmp_path / "r")]) == 0
    assert "computes in float16" not in capsys.readouterr().out
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    for record, head in zip(report["models"], ("text", "linear")):
        exact = record["exact"]
        assert record["exact_skipped"] is None and exact["head"] == head and exact["fmt"] == "fp16"
        assert all(len(s["sdc"]) == 16 for s in exact["sites"]) and exact["total_faults"] > 0
        assert 0 < exact["total_sdc"] < exact["total_faults"]


def test_a_dynamically_quantised_model_is_noted_as_run_one_image_at_a_time(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Its campaign is slower than a batched one; certify says why in one line on stderr, for each such model."""
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    from tests.fi.tiny_models import linear_mlp

    onnx.save(linear_mlp(0), tmp_path / "f.onnx")
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "d.onnx"))
    data = tmp_path / "data.npz"
    import numpy as np

    from harden.graph.ort import make_session

    session = make_session(onnx.load(tmp_path / "d.onnx"), opt_level="disable")
    x = np.random.default_rng(0).normal(size=(40, 1, 2, 3)).astype(np.float32)
    np.savez(data, x=x, y=np.array([session.run(None, {"x": x[i:i + 1]})[0].argmax() for i in range(len(x))]))
    code = main(["certify", str(tmp_path / "d.onnx"), "--baseline", str(tmp_path / "f.onnx"), "--data",
                 f"npz:{data}", "--preprocess", "identity", "--injections", "20", "--latency-runs", "2",
                 "--no-progress", "-o", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code in (0, 3)
    notes = [line for line in err.splitlines() if line.startswith("note:") and "runs alone" in line]
    assert len(notes) == 1 and "d.onnx: each image runs alone" in notes[0]
