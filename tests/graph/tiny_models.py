"""Tiny classifiers built with onnx.helper, one per classifier layout the passes support.

Each takes N×1×8×8 images (the `digits` dataset's shape), runs one 3×3 Conv +
ReLU feature stage, then ends in the classifier layout named by `kind`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

KINDS = ("gemm-transB1", "gemm-transB0", "matmul-add", "matmul", "conv1x1", "conv-relu-gap")
CHANNELS = 4
CLASSES = 10


def tiny_classifier(kind: str, softmax: bool, classes: int = CLASSES, seed: int = 0, opset: int = 17,
                    extra_output: bool = False) -> onnx.ModelProto:
    """A small float32 classifier whose final layer has layout `kind`."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (CHANNELS, 1, 3, 3)).astype(np.float32), "conv_w"),
             numpy_helper.from_array(rng.normal(0, 0.1, CHANNELS).astype(np.float32), "conv_b")]
    nodes = [helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c1"], pads=[1, 1, 1, 1], name="stem"),
             helper.make_node("Relu", ["c1"], ["r1"], name="stem_relu")]
    d = CHANNELS * 64
    scores_shape: list[int | str] = ["N", classes]
    if kind.startswith("gemm") or kind.startswith("matmul"):
        nodes.append(helper.make_node("Flatten", ["r1"], ["feat"], axis=1, name="flatten"))
        w = rng.normal(0, 0.05, (classes, d)).astype(np.float32)
        b = rng.normal(0, 0.1, classes).astype(np.float32)
        if kind == "gemm-transB1":
            inits += [numpy_helper.from_array(w, "fc_w"), numpy_helper.from_array(b, "fc_b")]
            nodes.append(helper.make_node("Gemm", ["feat", "fc_w", "fc_b"], ["scores"], transB=1, name="fc"))
        elif kind == "gemm-transB0":
            inits += [numpy_helper.from_array(w.T.copy(), "fc_w"), numpy_helper.from_array(b, "fc_b")]
            nodes.append(helper.make_node("Gemm", ["feat", "fc_w", "fc_b"], ["scores"], alpha=0.5, beta=2.0,
                                          name="fc"))
        else:
            inits.append(numpy_helper.from_array(w.T.copy(), "fc_w"))
            if kind == "matmul-add":
                inits.append(numpy_helper.from_array(b, "fc_b"))
                nodes += [helper.make_node("MatMul", ["feat", "fc_w"], ["mm"], name="fc"),
                          helper.make_node("Add", ["mm", "fc_b"], ["scores"], name="fc_bias")]
            else:
                nodes.append(helper.make_node("MatMul", ["feat", "fc_w"], ["scores"], name="fc"))
    elif kind in ("conv1x1", "conv-relu-gap"):
        w = rng.normal(0, 0.3, (classes, CHANNELS, 1, 1)).astype(np.float32)
        b = rng.normal(0, 0.1, classes).astype(np.float32)
        inits += [numpy_helper.from_array(w, "fc_w"), numpy_helper.from_array(b, "fc_b")]
        if kind == "conv1x1":
            nodes += [helper.make_node("GlobalAveragePool", ["r1"], ["feat"], name="pool"),
                      helper.make_node("Conv", ["feat", "fc_w", "fc_b"], ["scores4"], name="fc")]
        else:
            nodes += [helper.make_node("Conv", ["r1", "fc_w", "fc_b"], ["fc_out"], name="fc"),
                      helper.make_node("Relu", ["fc_out"], ["fc_relu"], name="fc_relu"),
                      helper.make_node("GlobalAveragePool", ["fc_relu"], ["scores4"], name="pool")]
        nodes.append(helper.make_node("Flatten", ["scores4"], ["scores"], axis=1, name="to_2d"))
    else:
        raise ValueError(kind)
    last = "scores"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["scores"], ["probs"], axis=1, name="softmax"))
        last = "probs"
    outputs = [helper.make_tensor_value_info(last, TensorProto.FLOAT, scores_shape)]
    if extra_output:
        outputs.append(helper.make_tensor_value_info("r1", TensorProto.FLOAT, ["N", CHANNELS, 8, 8]))
    graph = helper.make_graph(nodes, f"tiny_{kind}", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                    ["N", 1, 8, 8])],
                              outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def random_head_npz_params(in_features: int, classes: int, embed_dim: int = 6, seed: int = 1):  # noqa: ANN201
    """HeadParams with random weights of the given dimensions."""
    from harden.head import HeadParams

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((classes, embed_dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return HeadParams(proj_weight=rng.normal(0, 0.2, (embed_dim, in_features)).astype(np.float32),
                      proj_bias=rng.normal(0, 0.1, embed_dim).astype(np.float32), embeddings=emb,
                      logit_scale=2.5, classes=[f"class{i}" for i in range(classes)], embeddings_sha256="ab" * 32)


def fit_gemm_classifier(model: onnx.ModelProto, images: np.ndarray, labels: np.ndarray,
                        classes: int = CLASSES) -> onnx.ModelProto:
    """A copy of a 'gemm-transB1' model whose classifier is fitted by ridge regression to one-hot labels,
    so that the original model is a real (if simple) classifier."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(helper.make_tensor_value_info("feat", TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feats = session.run(["feat"], {"x": images})[0].astype(np.float64)
    design = np.hstack([feats, np.ones((len(feats), 1))])
    target = np.eye(classes)[labels] * 4.0
    solution = np.linalg.solve(design.T @ design + 1.0 * np.eye(design.shape[1]), design.T @ target)
    fitted = onnx.ModelProto()
    fitted.CopyFrom(model)
    for init in fitted.graph.initializer:
        if init.name == "fc_w":
            init.CopyFrom(numpy_helper.from_array(solution[:-1].T.astype(np.float32), "fc_w"))
        elif init.name == "fc_b":
            init.CopyFrom(numpy_helper.from_array(solution[-1].astype(np.float32), "fc_b"))
    return fitted
