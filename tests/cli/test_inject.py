"""`harden inject`: list sites, run, resume, shard and merge, and one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from harden.cli import main
from harden.data import Preprocess
from harden.fi.journal import JournalContents
from harden.graph.onnx_io import set_metadata
from tests.fi.tiny_models import labelled_inputs, residual_cnn, tied_cnn


@pytest.fixture()
def files(tmp_path: Path) -> tuple[Path, Path]:
    model = residual_cnn()
    x, y = labelled_inputs(model, 24)
    lo, hi = x.min(), x.max()
    images = (x - lo) / (hi - lo)  # the dataset stores [0, 1] images; the model's preprocessing maps them back
    set_metadata(model, {"harden.preprocess": Preprocess(3, None, (float(-lo / (hi - lo)),),
                                                         (float(1 / (hi - lo)),)).to_json()})
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=images.astype(np.float32), y=y)
    return tmp_path / "m.onnx", tmp_path / "d.npz"


def test_list_sites(files, capsys) -> None:
    assert main(["inject", str(files[0]), "--list-sites"]) == 0
    out = capsys.readouterr().out
    assert "c1" in out and "4×3×3×3" in out and "108" in out


def test_campaign_summary_shard_and_merge(files, tmp_path: Path, capsys) -> None:
    model, data = files
    common = [str(model), "--data", f"npz:{data}", "--injections", "40", "--batch", "8", "--no-progress",
              "--layers", "conv2,last"]
    assert main(["inject", *common, "--out", str(tmp_path / "c.jsonl"), "--by-bit"]) == 0
    out = capsys.readouterr().out
    assert "images: " in out and "SDC %" in out and "w2" in out and "w2: " in out
    summary = json.loads((tmp_path / "c.summary.json").read_text())
    assert summary["complete"] and summary["opt_level"] == "disable"
    assert summary["evaluation"]["kept"] >= 20  # the preprocessing from metadata reproduced the labels
    for i in range(2):
        assert main(["inject", *common, "--shard", f"{i}/2", "--out", str(tmp_path / f"p{i}.jsonl")]) == 0
    assert main(["inject", "--merge", str(tmp_path / "p0.jsonl"), str(tmp_path / "p1.jsonl"),
                 "--out", str(tmp_path / "m.jsonl"), "--json"]) == 0
    assert (tmp_path / "m.jsonl").read_bytes() == (tmp_path / "c.jsonl").read_bytes()
    # The thread count is a speed knob only: one thread writes the same bytes.
    assert main(["inject", *common, "--threads", "1", "--out", str(tmp_path / "t1.jsonl")]) == 0
    assert (tmp_path / "t1.jsonl").read_bytes() == (tmp_path / "c.jsonl").read_bytes()
    # Both engines draw the same faults; the line says which one ran.
    capsys.readouterr()
    assert main(["inject", *common, "--engine", "suffix", "--out", str(tmp_path / "s.jsonl")]) == 0
    assert "suffix engine at level disable" in capsys.readouterr().out
    faults = [[(r["site"], r["image"], r["element"], r["bits"]) for r in JournalContents(p).records()]
              for p in (tmp_path / "c.jsonl", tmp_path / "s.jsonl")]
    assert faults[0] == faults[1]


def test_bad_inputs_give_one_line_errors(files, tmp_path: Path, capsys) -> None:
    model, data = files
    (tmp_path / "bad.onnx").write_text("not a model")
    assert main(["inject", str(tmp_path / "bad.onnx"), "--list-sites"]) == 1
    assert "not a readable ONNX model" in capsys.readouterr().err
    base = ["--data", f"npz:{data}", "--out", str(tmp_path / "o.jsonl"), "--no-progress"]
    assert main(["inject", str(model), *base, "--layers", "nosuch"]) == 1
    assert "unknown layer 'nosuch'" in capsys.readouterr().err
    np.savez(tmp_path / "small.npz", x=np.zeros((4, 3, 6, 6), np.float32), y=np.zeros(4, np.int64))
    assert main(["inject", str(model), "--data", f"npz:{tmp_path / 'small.npz'}", "--out",
                 str(tmp_path / "o2.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "(3, 6, 6)" in err and "(3, 8, 8)" in err and "Traceback" not in err
    assert main(["inject", str(model), *base, "--bits", "40"]) == 1
    assert "outside 0..31" in capsys.readouterr().err
    assert main(["inject", str(model), *base, "--preprocess", "colour=3"]) == 1
    err = capsys.readouterr().err
    assert "--preprocess: cannot read 'colour=3'" in err and len(err.strip().splitlines()) == 1
    assert main(["inject", str(model), "--data", f"npz:{data}", "--out", str(model)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    x = np.load(data)["x"]
    np.savez(tmp_path / "ten.npz", x=x, y=np.arange(len(x)) % 10)  # labels of 10 classes for a 4-class model
    out = tmp_path / "o3.jsonl"
    assert main(["inject", str(model), "--data", f"npz:{tmp_path / 'ten.npz'}", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "labels go up to 9 but the model scores 4 classes" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_list_sites_of_a_model_with_symbolic_image_size(tmp_path: Path, capsys) -> None:
    model = residual_cnn()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    onnx.save(model, tmp_path / "sym.onnx")
    assert main(["inject", str(tmp_path / "sym.onnx"), "--list-sites"]) == 1
    assert "symbolic image dimensions" in capsys.readouterr().err
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((2, 3, 10, 10), dtype=np.float32),
             y=np.zeros(2, np.int64))
    assert main(["inject", str(tmp_path / "sym.onnx"), "--list-sites", "--data", f"npz:{tmp_path / 'd.npz'}"]) == 0
    assert "4×10×10" in capsys.readouterr().out


def test_rgb_npz_with_identity_preprocessing_and_a_shared_weight(tmp_path: Path, capsys) -> None:
    """An RGB model fed RGB images as they are (identity once made them grey and the run was refused), with a
    weight two convs share (once a refusal that stopped the whole campaign)."""
    model = tied_cnn(rgb=True)
    onnx.save(model, tmp_path / "tied.onnx")
    x = np.random.default_rng(2).random((12, 3, 6, 6)).astype(np.float32)
    y = np.argmax(ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0], axis=1)
    np.savez(tmp_path / "rgb.npz", x=x, y=y)
    assert main(["inject", str(tmp_path / "tied.onnx"), "--data", f"npz:{tmp_path / 'rgb.npz'}", "--preprocess",
                 "identity", "--injections", "8", "--out", str(tmp_path / "c.jsonl"), "--json"]) == 0
    layers = {layer["site"]: layer for layer in json.loads(capsys.readouterr().out)["layers"]}
    assert layers["w"]["injections"] == 8 and layers["bb"]["injections"] == 8
    assert JournalContents(tmp_path / "c.jsonl").header["eval"]["kept"] == 12  # every image, unchanged, is correct


def test_a_channels_last_model_is_fed_nhwc_and_faulted_like_its_nchw_twin(tmp_path: Path, capsys) -> None:
    """A TensorFlow-style N×H×W×C input (refused before as a shape mismatch): the same net behind a Transpose
    sees the same images, and its campaign draws and judges the same faults as the N×C×H×W original."""
    from onnx import TensorProto, helper

    nchw = residual_cnn()
    nhwc = onnx.ModelProto()
    nhwc.CopyFrom(nchw)
    graph = nhwc.graph
    graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 3]))
    for node in graph.node:
        node.input[:] = ["x_nchw" if name == "x" else name for name in node.input]
    graph.node.insert(0, helper.make_node("Transpose", ["x"], ["x_nchw"], name="to_nchw", perm=[0, 3, 1, 2]))
    images = np.random.default_rng(5).random((24, 3, 8, 8), dtype=np.float32)
    labels = np.argmax(ort.InferenceSession(nchw.SerializeToString()).run(None, {"x": images})[0], axis=1)
    np.savez(tmp_path / "d.npz", x=images, y=labels)
    records = []
    for name, model in (("nchw", nchw), ("nhwc", nhwc)):
        onnx.save(model, tmp_path / f"{name}.onnx")
        out = tmp_path / f"{name}.jsonl"
        assert main(["inject", str(tmp_path / f"{name}.onnx"), "--data", f"npz:{tmp_path / 'd.npz'}", "--preprocess",
                     "identity", "--injections", "16", "--no-progress", "--out", str(out)]) == 0
        records.append(list(JournalContents(out).records()))
        assert JournalContents(out).header["eval"]["kept"] == 24
    assert records[0] == records[1] and len(records[0]) > 100


@pytest.mark.parametrize("keep_io_types", [False, True], ids=["fp16-io", "fp32-io"])
def test_a_float16_model_is_injected_and_certified(files, tmp_path: Path, capsys, keep_io_types: bool) -> None:
    """It used to be refused (float16 input) or to find no site at all (float32 input around a float16 graph),
    although onnxconverter-common's float16 converter is how such models are made."""
    from onnxconverter_common import float16

    model, data = files
    onnx.save(float16.convert_float_to_float16(onnx.load(model), keep_io_types=keep_io_types), tmp_path / "half.onnx")
    half = str(tmp_path / "half.onnx")
    assert main(["inject", half, "--list-sites"]) == 0
    assert "float16" in capsys.readouterr().out
    assert main(["inject", half, "--data", f"npz:{data}", "--injections", "20", "--out", str(tmp_path / "c.jsonl"),
                 "--no-progress"]) == 0
    assert "flip fp16" in capsys.readouterr().out
    header = JournalContents(tmp_path / "c.jsonl").header
    assert header["config"]["fault"]["fmt"] == "fp16" and header["eval"]["kept"] > 0
    assert main(["certify", half, "--baseline", str(model), "--data", f"npz:{data}", "--injections", "10",
                 "-o", str(tmp_path / "r"), "--no-progress"]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    model_record, baseline = report["models"]
    assert model_record["campaign"]["config"]["fault"]["fmt"] == "fp16"
    assert baseline["campaign"]["config"]["fault"]["fmt"] == "fp32"
    # no float16 refusal any more (harden.fi.exact_half); this classifier's alpha/beta is what keeps it out
    assert model_record["exact"] is None and "alpha/beta" in model_record["exact_skipped"]
    capsys.readouterr()
    # a format a float16 value cannot hold: one line, exit 1, no file
    assert main(["inject", half, "--data", f"npz:{data}", "--format", "int8", "--out", str(tmp_path / "i.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "--format int8 cannot be stored in float16 site" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "i.jsonl").exists()


def test_a_model_with_several_outputs_names_its_scores(files, tmp_path: Path, capsys) -> None:
    """The first output was taken as the class scores, silently: here a 4-wide pooled feature tensor, which
    passed every check as '4 classes'. Now the user names the scores, as rewrite and convert ask."""
    from onnx import TensorProto, helper

    model, data = files
    two = onnx.load(model)
    two.graph.output.insert(0, helper.make_tensor_value_info("flat", TensorProto.FLOAT, ["N", 4]))
    onnx.save(two, tmp_path / "two.onnx")
    base = ["--data", f"npz:{data}", "--injections", "8", "--no-progress"]
    assert main(["inject", str(tmp_path / "two.onnx"), *base, "--out", str(tmp_path / "x.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "2 outputs ['flat', 'logits']; say which holds the class scores with --output NAME" in err
    assert not (tmp_path / "x.jsonl").exists()
    assert main(["inject", str(tmp_path / "two.onnx"), "--list-sites", "--output", "logits"]) == 0
    assert "c1" in capsys.readouterr().out
    for name, path in (("two", tmp_path / "two.onnx"), ("one", model)):
        assert main(["inject", str(path), *base, "--output", "logits", "--out", str(tmp_path / f"{name}.jsonl")]) == 0
    records = [list(JournalContents(tmp_path / f"{name}.jsonl").records()) for name in ("two", "one")]
    assert records[0] == records[1] and len(records[0]) > 40
    assert main(["certify", str(tmp_path / "two.onnx"), "--data", f"npz:{data}", "--injections", "8", "--no-progress",
                 "--latency-runs", "2", "--scores", "logits", "-o", str(tmp_path / "r")]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["config"]["scores"] == "logits"
    assert "alpha" in report["models"][0]["exact_skipped"]  # this head's own limit, not the second output


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator", "dynamic"])
def test_a_quantised_model_is_injected_in_its_stored_integers(files, tmp_path: Path, capsys, fmt: str) -> None:
    """A statically quantised graph's sites are its stored int8 and int32 tensors, whether its layers are
    float ops between QuantizeLinear and DequantizeLinear (QDQ) or integer ops (QOperator, the model zoo's
    int8 format). A dynamically quantised one stores its weights alone in integers (uint8 here): those are
    sites, beside each layer's rescaled float output and float bias, and a note says that its images run one
    at a time."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    model, data = files
    x = labelled_inputs(onnx.load(model), 8)[0]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": x}])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    if fmt == "dynamic":
        quantize_dynamic(str(model), str(tmp_path / "q.onnx"), weight_type=QuantType.QUInt8)
    else:
        quantize_static(str(model), str(tmp_path / "q.onnx"), Reader(), quant_format=getattr(QuantFormat, fmt),
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    capsys.readouterr()
    argv = ["inject", str(tmp_path / "q.onnx"), "--data", f"npz:{data}", "--injections", "5",
            "--out", str(tmp_path / "c.jsonl"), "--no-progress"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    header = JournalContents(tmp_path / "c.jsonl").header
    sites = {s["name"]: s for s in header["sites"]}
    if fmt == "dynamic":
        notes = [line for line in err.strip().splitlines() if "saturating int16 pairs" not in line]  # AVX2 only
        assert "each image runs alone" in err and "DynamicQuantizeLinear" in err and len(notes) == 1
        assert header["config"]["fault"]["fmt"] is None
        assert {(s["op_type"], s.get("dtype", "float32")) for s in sites.values() if s["kind"] == "weight"} == {
            ("ConvInteger", "uint8"), ("ConvInteger", "float32"), ("Gemm", "float32")}
        assert len(sites) == 9  # each layer's output, weight and bias
        return
    assert "flip in each site’s own format" in out and "runs alone" not in err
    assert {s["dtype"] for s in sites.values()} == {"int8", "int32"} and header["config"]["fault"]["fmt"] is None
    assert len(sites) == 9  # each layer's output, weight and bias
    if fmt == "QOperator":
        assert {s["op_type"] for s in sites.values()} == {"QLinearConv", "QGemm"}
