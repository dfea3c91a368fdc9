"""The text-head pass: swap the final classifier for a text-guided head.

    f  = features (N×d; GlobalAveragePool and/or Flatten first for Conv classifiers)
    z  = Gemm(f, P, b, transB=1)                 projection, N×E
    u  = z / Max(ReduceL2(z, axis=1), eps)       L2 normalisation as torch F.normalize
    s  = MatMul(u, Wᵀ)                           cosine with the C×E class rows
    y  = Mul(s, exp(min(logit_scale, log 100)))  the scores, reshaped to the original scores' shape

Everything downstream of the original scores (Softmax, Flatten, Reshape...) is
kept, as are the output names and shapes, so the model's consumers do not
change. The output is checked with ONNX Runtime against `HeadParams.logits`
on the features of a seeded random input.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from harden.errors import HardenError
from harden.graph.locate import Located, import_graph, locate_in_graph
from harden.graph.opset import const, default_opset, ensure_min_opset, reduce_l2
from harden.graph.passes import copy_model, finish, random_inputs, run_exposed, update_config
from harden.head import LOGIT_SCALE_MAX, HeadParams

PREFIX = "harden/text_head"
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-5


class TextHeadPass:
    """Replace the classifier behind `output` with the text-guided head in `head`."""

    name = "text-head"

    def __init__(self, head: HeadParams, output: str | None = None, parity_seed: int = 0) -> None:
        self.head = head
        self.output = output
        self.parity_seed = parity_seed
        self.parity_max_abs: float | None = None
        self.upgraded_from: int | None = None
        self.classifier: str = ""
        self.notes: list[str] = []

    def config(self) -> dict[str, Any]:
        return {"output": self.output, "in_features": self.head.in_features, "num_classes": self.head.num_classes,
                "embed_dim": int(self.head.embeddings.shape[1]), "logit_scale": float(self.head.logit_scale),
                "eps": float(self.head.eps), "classifier": self.classifier, "upgraded_from_opset": self.upgraded_from,
                "parity_max_abs": self.parity_max_abs, "notes": self.notes}

    def check(self, model: onnx.ModelProto) -> str | None:
        try:
            upgraded, _ = ensure_min_opset(model)
            self._locate(import_graph(upgraded))
        except HardenError as err:
            return str(err)
        return None

    def _locate(self, graph: gs.Graph) -> Located:
        located = locate_in_graph(graph, self.output)
        info = located.info
        if info.in_features != self.head.in_features:
            raise HardenError(f"the head projects {self.head.in_features} features but the model's classifier "
                              f"reads {info.in_features} ({info.features!r})")
        if info.num_classes != self.head.num_classes:
            raise HardenError(f"the head has {self.head.num_classes} classes but the model's classifier has "
                              f"{info.num_classes}")
        return located

    def run(self, model: onnx.ModelProto) -> onnx.ModelProto:
        source, self.upgraded_from = ensure_min_opset(copy_model(model))
        graph = import_graph(source)
        located = self._locate(graph)
        self.classifier = located.info.describe()
        self.notes = list(located.info.notes)
        head_input = head_input_tensor(graph, located)
        build_head(graph, default_opset(source), head_input, located, self.head)
        extra = {"harden.embeddings_sha256": self.head.embeddings_sha256} if self.head.embeddings_sha256 else {}
        result = finish(graph, source, self.name, self.config(), extra)
        self.parity_max_abs = check_parity(result, head_input.name, located.info.scores, self.head,
                                           self.parity_seed)
        update_config(result, self.config())
        return result


def head_input_tensor(graph: gs.Graph, located: Located) -> gs.Variable:
    """The N×d tensor the head reads: the features, pooled and flattened where the classifier was a Conv."""
    features = located.features
    if located.pool:
        pooled = gs.Variable(f"{PREFIX}/pooled", dtype=np.float32)
        graph.layer(op="GlobalAveragePool", name=f"{PREFIX}/pool", inputs=[features], outputs=[pooled])
        features = pooled
    if located.info.kind.startswith("conv"):
        flat = gs.Variable(f"{PREFIX}/features", dtype=np.float32)
        graph.layer(op="Flatten", name=f"{PREFIX}/flatten", inputs=[features], outputs=[flat], attrs={"axis": 1})
        features = flat
    return features


def build_head(graph: gs.Graph, opset: int, features: gs.Variable, located: Located, head: HeadParams) -> None:
    """Append the head after `features` and make it the producer of the original scores tensor."""
    scores = located.scores
    for node in list(scores.inputs):
        node.outputs.remove(scores)  # detach the old classifier; cleanup() removes it and its weights
    z = gs.Variable(f"{PREFIX}/z", dtype=np.float32)
    graph.layer(op="Gemm", name=f"{PREFIX}/proj", outputs=[z], attrs={"transB": 1},
                inputs=[features, const(f"{PREFIX}/proj_weight", head.proj_weight),
                        const(f"{PREFIX}/proj_bias", head.proj_bias)])
    norm = gs.Variable(f"{PREFIX}/norm", dtype=np.float32)
    reduce_l2(graph, opset, z, norm, axis=1, prefix=PREFIX)
    safe = gs.Variable(f"{PREFIX}/norm_eps", dtype=np.float32)
    graph.layer(op="Max", name=f"{PREFIX}/max_eps", inputs=[norm, const(f"{PREFIX}/eps", [head.eps])],
                outputs=[safe])
    unit = gs.Variable(f"{PREFIX}/unit", dtype=np.float32)
    graph.layer(op="Div", name=f"{PREFIX}/normalize", inputs=[z, safe], outputs=[unit])
    cosine = gs.Variable(f"{PREFIX}/cosine", dtype=np.float32)
    graph.layer(op="MatMul", name=f"{PREFIX}/cosine", outputs=[cosine],
                inputs=[unit, const(f"{PREFIX}/class_embeddings_t", np.ascontiguousarray(head.embeddings.T))])
    scale = math.exp(min(head.logit_scale, LOGIT_SCALE_MAX))
    spatial = located.info.kind.startswith("conv")
    logits = gs.Variable(f"{PREFIX}/logits", dtype=np.float32) if spatial else scores
    graph.layer(op="Mul", name=f"{PREFIX}/scale", inputs=[cosine, const(f"{PREFIX}/logit_scale_exp", [scale])],
                outputs=[logits])
    if spatial:
        shape = const(f"{PREFIX}/scores_shape", [0, head.num_classes, 1, 1], np.int64)
        graph.layer(op="Reshape", name=f"{PREFIX}/to_scores", inputs=[logits, shape], outputs=[scores])


def check_parity(model: onnx.ModelProto, features: str, scores: str, head: HeadParams, seed: int) -> float:
    """max |ORT scores − HeadParams.logits(ORT features)| on a seeded random input; refuses a mismatch."""
    feeds = random_inputs(model, batch=2, seed=seed)
    feats, got = run_exposed(model, [features, scores], feeds)
    with np.errstate(over="ignore", invalid="ignore"):  # placeholder-weight zoo graphs have huge features
        want = head.logits(feats.reshape(len(feats), -1))
    got = got.reshape(want.shape)
    if not np.allclose(got, want, atol=PARITY_ATOL, rtol=PARITY_RTOL):
        worst = float(np.max(np.abs(got - want)))
        raise RuntimeError(f"text-head pass: ONNX Runtime scores differ from the reference head by {worst:.3g}")
    return float(np.max(np.abs(got - want)))


def feature_model(model: onnx.ModelProto, output: str | None = None) -> tuple[onnx.ModelProto, str, str, str]:
    """The model cut at the head's input, also returning the original scores and output.

    Returns (model, features, scores, output) names. The features tensor is the
    one the text-head pass feeds its head (pooled and flattened the same way),
    so a head trained on these features sees exactly what it will see grafted.
    """
    source, _ = ensure_min_opset(copy_model(model))
    graph = import_graph(source)
    located = locate_in_graph(graph, output)
    features = head_input_tensor(graph, located)
    features.dtype = np.float32
    wanted = [features, located.scores, graph.tensors()[located.info.output]]
    graph.outputs = list({id(t): t for t in wanted}.values())
    graph.cleanup().toposort()
    cut = gs.export_onnx(graph)
    cut.ir_version = max(source.ir_version, 4)
    return cut, features.name, located.info.scores, located.info.output
