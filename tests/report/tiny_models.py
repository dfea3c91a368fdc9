"""Tiny digits classifiers for certification tests: a logistic-regression Gemm and its text-head twin.

The text head reuses the Gemm's weights as its projection and the identity as
class embeddings, so both models make the same predictions while their final
layers differ, which is what certify compares.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from harden.data import load_dataset
from harden.graph.text_head import TextHeadPass
from harden.head import HeadParams


def _fit(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Softmax regression on digits by plain gradient descent (numpy, seeded, about a second)."""
    ds = load_dataset("digits")
    x = ds.images.reshape(len(ds), -1).astype(np.float64)
    y = np.eye(10)[ds.labels]
    rng = np.random.default_rng(seed)
    w = 0.01 * rng.normal(size=(64, 10))
    b = np.zeros(10)
    for _ in range(300):
        s = x @ w + b
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = (p - y) / len(x)
        w -= 2.0 * x.T @ g
        b -= 2.0 * g.sum(0)
    return w.T.astype(np.float32), b.astype(np.float32)


def write_softmax_model(folder: Path, ops: tuple[str, ...] = ("Softmax",)) -> Path:
    """The baseline with a Softmax (or the chain of `ops`) after its classifier."""
    w, b = _fit()
    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "W", "b"], ["t0"], name="fc", transB=1)]
    nodes += [helper.make_node(op, [f"t{i}"], [f"t{i + 1}"], name=f"norm{i}", axis=1) for i, op in enumerate(ops)]
    model = _model(nodes, f"t{len(ops)}", w, b)
    folder.mkdir(parents=True, exist_ok=True)
    name = "-".join(op.lower() for op in ops) + ".onnx"
    onnx.save(model, str(folder / name))
    return folder / name


def _model(nodes: list[onnx.NodeProto], out: str, w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "digits", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 10])],
                              [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def write_models(folder: Path) -> tuple[Path, Path]:
    """(hardened, baseline) ONNX files in `folder`."""
    w, b = _fit()
    base = _model([helper.make_node("Flatten", ["x"], ["f"], name="flatten"),
                   helper.make_node("Gemm", ["f", "W", "b"], ["logits"], name="fc", transB=1)], "logits", w, b)
    head = HeadParams(w, b, np.eye(10, dtype=np.float32), float(np.log(100)), [str(i) for i in range(10)])
    hard = TextHeadPass(head).run(base)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(base, str(folder / "base.onnx"))
    onnx.save(hard, str(folder / "hard.onnx"))
    return folder / "hard.onnx", folder / "base.onnx"
