"""Tiny classifiers built in code for the fault-injection tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _init(name: str, rng: np.random.Generator, *shape: int, scale: float = 0.5) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def classifier(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], name: str, image: tuple[int, ...],
               classes: int, opset: int = 17, spatial: tuple[int, ...] = ()) -> onnx.ModelProto:
    """A checked model from nodes reading image 'x' (N × image) and writing class scores 'logits' (N × classes,
    followed by the `spatial` dims if any)."""
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *image])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes, *spatial])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def residual_cnn(seed: int = 0, classes: int = 4, group: int = 1, stride: int = 1, dilation: int = 1,
                 trans_b: int = 1, pad: int = 1, matmul: bool = False) -> onnx.ModelProto:
    """conv → relu → conv (+ skip) → relu → global pool → flatten → gemm (or, with `matmul`, MatMul + Add, which
    quantize_dynamic quantises); input 1×3×8×8 (dynamic batch)."""
    rng = np.random.default_rng(seed)
    c = 4
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", group=group, strides=[stride, stride],
                         dilations=[dilation, dilation], pads=[pad * dilation] * 4),
        helper.make_node("MaxPool", ["r1"], ["skip"], name="pool_skip", kernel_shape=[1, 1], strides=[stride, stride]),
        helper.make_node("Add", ["c2", "skip"], ["sum"], name="add"),
        helper.make_node("Relu", ["sum"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=trans_b, alpha=1.5, beta=0.5),
    ]
    if matmul:
        trans_b = 0
        nodes[-1:] = [helper.make_node("MatMul", ["flat", "wf"], ["fc"], name="fc"),
                      helper.make_node("Add", ["fc", "bf"], ["logits"], name="bias")]
    inits = [
        _init("w1", rng, c, 3, 3, 3), _init("b1", rng, c, scale=0.1),
        _init("w2", rng, c, c // group, 3, 3), _init("b2", rng, c, scale=0.1),
        _init("wf", rng, *((classes, c) if trans_b else (c, classes)), scale=1.0), _init("bf", rng, classes, scale=0.1),
    ]
    return classifier(nodes, inits, "tiny", (3, 8, 8), classes)


def matmul_mlp(seed: int = 0, classes: int = 5) -> onnx.ModelProto:
    """flatten → matmul + add → relu → matmul (weight as a Constant node) + add; input 1×1×4×4."""
    rng = np.random.default_rng(seed)
    const = helper.make_node("Constant", [], ["w2"], name="w2_const",
                             value=numpy_helper.from_array((rng.standard_normal((8, classes))).astype(np.float32)))
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        const,
        helper.make_node("MatMul", ["r", "w2"], ["o"], name="mm2"),
        helper.make_node("Add", ["o", "b2"], ["logits"], name="add2"),
    ]
    inits = [_init("w1", rng, 16, 8), _init("b1", rng, 8, scale=0.1), _init("b2", rng, classes, scale=0.1)]
    return classifier(nodes, inits, "mlp", (1, 4, 4), classes)


def labelled_inputs(model: onnx.ModelProto, n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Random inputs labelled with the model's own predictions (so all are 'correct')."""
    import onnxruntime as ort

    kind = model.graph.input[0].type.tensor_type
    dims = [d.dim_value for d in kind.shape.dim[1:]]
    x = np.random.default_rng(seed).standard_normal((n, *dims)).astype(helper.tensor_dtype_to_np_dtype(kind.elem_type))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = np.argmax(sess.run(None, {"x": x})[0].reshape(n, -1), axis=1).astype(np.int64)
    return x, y


def windowed_cnn(seed: int = 0, classes: int = 4, squeeze: bool = False) -> onnx.ModelProto:
    """A 16×16 net with every op the cone engine windows, so that windows stay smaller than the maps.

    conv (pad 1) → BatchNorm → Relu → MaxPool (3×3, stride 2, pad 1, ceil mode) → [dilated conv ‖ AveragePool
    (count_include_pad)] → Concat → Add (per-channel constant) → Clip → 1×1 conv (stride 2) → Relu → global
    pool → flatten → gemm. With `squeeze`, a squeeze-and-excitation gate (global pool → Sigmoid → Mul) after
    the Concat sends the fault through a whole-tensor op in the middle.
    """
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c0", "g", "beta", "mean", "var"], ["n0"], name="bn"),
        helper.make_node("Relu", ["n0"], ["r0"], name="relu0"),
        helper.make_node("MaxPool", ["r0"], ["m"], name="pool", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1], ceil_mode=1),
        helper.make_node("Conv", ["m", "w1"], ["c1"], name="conv1", dilations=[2, 2], pads=[2, 1, 2, 3],
                         kernel_shape=[3, 3]),
        helper.make_node("AveragePool", ["m"], ["a"], name="avg", kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                         count_include_pad=1),
        helper.make_node("Concat", ["c1", "a"], ["cat"], name="cat", axis=1),
    ]
    top = "cat"
    if squeeze:
        nodes += [helper.make_node("GlobalAveragePool", ["cat"], ["se_gap"], name="se_gap"),
                  helper.make_node("Sigmoid", ["se_gap"], ["se"], name="se_sigmoid"),
                  helper.make_node("Mul", ["cat", "se"], ["gated"], name="se_mul")]
        top = "gated"
    nodes += [
        helper.make_node("Add", [top, "shift"], ["shifted"], name="shift"),
        helper.make_node("Clip", ["shifted", "lo", "hi"], ["clipped"], name="clip"),
        helper.make_node("Conv", ["clipped", "w2", "b2"], ["c2"], name="conv2", strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    inits = [
        _init("w0", rng, 4, 2, 3, 3), _init("b0", rng, 4, scale=0.1),
        numpy_helper.from_array((1 + 0.1 * rng.standard_normal(4)).astype(np.float32), "g"),
        _init("beta", rng, 4, scale=0.1), _init("mean", rng, 4, scale=0.1),
        numpy_helper.from_array((1 + rng.random(4)).astype(np.float32), "var"),
        _init("w1", rng, 4, 4, 3, 3),
        _init("shift", rng, 1, 8, 1, 1, scale=0.3),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"), numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
        _init("w2", rng, 6, 8, 1, 1), _init("b2", rng, 6, scale=0.1),
        _init("wf", rng, classes, 6, scale=1.0), _init("bf", rng, classes, scale=0.1),
    ]
    return classifier(nodes, inits, "windowed", (2, 16, 16), classes)


def tied_cnn(seed: int = 0, classes: int = 3, rgb: bool = False) -> onnx.ModelProto:
    """Two convs reading one weight 'w', and one bias 'bb' that conv1's Add reads and conv2's reads through an
    Identity (as torch's exporter stores equal initializers once); input 1×4×6×6, or with `rgb` 1×3×6×6
    through a 3→4 stem conv 'stem' first."""
    rng = np.random.default_rng(seed)
    stem = [helper.make_node("Conv", ["x", "ws"], ["s"], name="stem", pads=[1, 1, 1, 1])] if rgb else []
    nodes = [
        *stem,
        helper.make_node("Conv", ["s" if rgb else "x", "w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c1", "bb"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Identity", ["bb"], ["bb2"], name="bb_copy"),
        helper.make_node("Add", ["c2", "bb2"], ["a2"], name="add2"),
        helper.make_node("Relu", ["a2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    inits = [_init("w", rng, 4, 4, 3, 3), _init("bb", rng, 4, 1, 1, scale=0.1),
             _init("wf", rng, classes, 4, scale=1.0), _init("bf", rng, classes, scale=0.1)]
    if rgb:
        inits.append(_init("ws", rng, 4, 3, 3, 3))
    return classifier(nodes, inits, "tied", (3 if rgb else 4, 6, 6), classes)


def shared_wide_cnn(seed: int = 0, classes: int = 3) -> onnx.ModelProto:
    """Two 128→32 3×3 convs on 8×8 maps reading one weight 'w', one on x and one on relu(x), added; input
    1×128×8×8. Run on one image, ORT's Conv of this shape gives other bits with 2 intra-op threads than with
    one, or than batched (ORT 1.32), which a campaign must not let through into its file."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["x"], ["rx"], name="relu_in"),
        helper.make_node("Conv", ["rx", "w"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c1", "c2"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    inits = [_init("w", rng, 32, 128, 3, 3, scale=0.1), _init("wf", rng, classes, 32, scale=1.0),
             _init("bf", rng, classes, scale=0.1)]
    return classifier(nodes, inits, "shared_wide", (128, 8, 8), classes)


def folded_batch_mlp(seed: int = 0, classes: int = 3) -> onnx.ModelProto:
    """reshape to (2N)×16 → matmul + add → relu → reshape back to N×16 → gemm; input 1×2×4×4. The matmul's
    output has images × 2 rows, as a Swin transformer's windows do, so no per-image suffix starts there."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Reshape", ["x", "rows"], ["tokens"], name="fold"),
        helper.make_node("MatMul", ["tokens", "w"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "b"], ["hb"], name="add"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "images"], ["flat"], name="unfold"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    inits = [numpy_helper.from_array(np.array([-1, 16], dtype=np.int64), "rows"), _init("w", rng, 16, 8),
             _init("b", rng, 8, scale=0.1), numpy_helper.from_array(np.array([-1, 16], dtype=np.int64), "images"),
             _init("wf", rng, classes, 16, scale=1.0), _init("bf", rng, classes, scale=0.1)]
    return classifier(nodes, inits, "folded", (2, 4, 4), classes)


def identity_weight_cnn(seed: int = 0, classes: int = 3) -> onnx.ModelProto:
    """conv → relu → global pool → flatten → gemm, whose conv weight 'w0' arrives only through an Identity and
    whose classifier weight 'wf0' through two; the graph's output is an Identity of the scores. Input 1×3×6×6."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Identity", ["w0"], ["w"], name="w_copy"),
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Identity", ["wf0"], ["wf1"], name="wf_copy1"),
        helper.make_node("Identity", ["wf1"], ["wf"], name="wf_copy2"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["scores"], name="fc", transB=1),
        helper.make_node("Identity", ["scores"], ["logits"], name="out"),
    ]
    inits = [_init("w0", rng, 4, 3, 3, 3), _init("b", rng, 4, scale=0.1), _init("wf0", rng, classes, 4, scale=1.0),
             _init("bf", rng, classes, scale=0.1)]
    return classifier(nodes, inits, "identity_weights", (3, 6, 6), classes)


def conv_classifier_cnn(seed: int = 0, classes: int = 4, channels: int = 3) -> onnx.ModelProto:
    """conv → relu → max pool → 1×1 conv (the classifier) → relu → global pool, with scores N×classes×1×1 as
    the model zoo's SqueezeNet and DenseNet-121 write them; input 1×channels×8×8."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "wc", "bc"], ["cls"], name="conv_cls"),
        helper.make_node("Relu", ["cls"], ["rc"], name="relu_cls"),
        helper.make_node("GlobalAveragePool", ["rc"], ["logits"], name="gap"),
    ]
    inits = [_init("w1", rng, 6, channels, 3, 3), _init("b1", rng, 6, scale=0.1), _init("wc", rng, classes, 6, 1, 1),
             numpy_helper.from_array(np.full(classes, 0.5, dtype=np.float32), "bc")]
    return classifier(nodes, inits, "conv_classifier", (channels, 8, 8), classes, spatial=(1, 1))


def reshaped_weight_mlp(seed: int = 0, classes: int = 3) -> onnx.ModelProto:
    """flatten → gemm → relu → gemm whose classifier weight is stored flat and reshaped on every run, as
    caffe2-era zoo graphs (GoogLeNet) keep it; input 1×2×3×3."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w0", "b0"], ["h"], name="fc0", transB=1),
        helper.make_node("Relu", ["h"], ["feat"], name="relu"),
        helper.make_node("Reshape", ["wf_flat", "wf_shape"], ["wf"], name="wf_reshape"),
        helper.make_node("Gemm", ["feat", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    inits = [_init("w0", rng, 6, 18), _init("b0", rng, 6, scale=0.1), _init("wf_flat", rng, classes * 6, scale=1.0),
             numpy_helper.from_array(np.array([classes, 6], dtype=np.int64), "wf_shape"),
             _init("bf", rng, classes, scale=0.1)]
    return classifier(nodes, inits, "reshaped_weight", (2, 3, 3), classes)


def stem_cnn(seed: int = 0, classes: int = 4, softmax: bool = False) -> onnx.ModelProto:
    """A ResNet stem and one block: conv → relu → 3×3 max pool (stride 2, pad 1) → conv → relu → global pool →
    gemm (→ softmax, as caffe2-era zoo graphs end); input 1×3×12×12. Quantised in QOperator format, its max
    pool reads integers with padding."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool", kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wf", "bf"], ["fc_out" if softmax else "logits"], name="fc", transB=1),
        *([helper.make_node("Softmax", ["fc_out"], ["logits"], name="softmax")] if softmax else []),
    ]
    inits = [_init("w1", rng, 6, 3, 3, 3), _init("b1", rng, 6, scale=0.1), _init("w2", rng, 6, 6, 3, 3),
             _init("b2", rng, 6, scale=0.1), _init("wf", rng, classes, 6, scale=1.0), _init("bf", rng, classes, scale=0.1)]
    return classifier(nodes, inits, "stem", (3, 12, 12), classes)


def fixed_batch_cnn(seed: int = 0, classes: int = 4) -> onnx.ModelProto:
    """residual_cnn exported for one image at a time, as caffe2-era zoo graphs are: input 1×3×8×8 (a fixed
    batch of 1) and a Reshape to a fixed [1, C] in place of the Flatten."""
    model = residual_cnn(seed, classes)
    graph = model.graph
    graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    flatten = next(n for n in graph.node if n.op_type == "Flatten")
    flatten.op_type = "Reshape"
    flatten.input.append("fixed_shape")
    graph.initializer.append(numpy_helper.from_array(np.array([1, 4], dtype=np.int64), "fixed_shape"))
    onnx.checker.check_model(model)
    return model


def scaled_mlp(seed: int = 0, classes: int = 5) -> onnx.ModelProto:
    """flatten → matmul → relu → matmul → mul by a constant scale, as the text head ends (W·z times exp(s));
    input 1×1×4×4. Quantised in QOperator format: QLinearMatMul, then QLinearMul by a stored constant."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["m"], name="mm2"),
        helper.make_node("Mul", ["m", "scale"], ["logits"], name="scale_mul"),
    ]
    inits = [_init("w1", rng, 16, 8), _init("w2", rng, 8, classes, scale=1.0),
             numpy_helper.from_array(np.array(2.5, dtype=np.float32), "scale")]
    return classifier(nodes, inits, "scaled_mlp", (1, 4, 4), classes)


def pointwise_cnn(seed: int = 0, classes: int = 5, pool_first: bool = False, softmax: bool = False) -> onnx.ModelProto:
    """A classifier that is a 1×1 convolution, as the model zoo's SqueezeNet and DenseNet-121 end: conv → relu
    → 1×1 conv over the 5×5 map → relu → global pool (SqueezeNet), or with `pool_first` conv → relu → global
    pool → 1×1 conv on the 1×1 map (DenseNet-121); then flatten (→ softmax). Input 1×3×5×5."""
    rng = np.random.default_rng(seed)
    out = "pre_softmax" if softmax else "logits"
    stem = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu1")]
    if pool_first:
        head = [helper.make_node("GlobalAveragePool", ["r1"], ["gap"], name="gap"),
                helper.make_node("Conv", ["gap", "wc", "bc"], ["cls"], name="classifier", kernel_shape=[1, 1])]
    else:
        head = [helper.make_node("Conv", ["r1", "wc", "bc"], ["c2"], name="classifier", kernel_shape=[1, 1]),
                helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
                helper.make_node("GlobalAveragePool", ["r2"], ["cls"], name="gap")]
    nodes = [*stem, *head, helper.make_node("Flatten", ["cls"], [out], name="flatten"),
             *([helper.make_node("Softmax", [out], ["logits"], name="softmax")] if softmax else [])]
    inits = [_init("w1", rng, 6, 3, 3, 3), _init("b1", rng, 6, scale=0.1),
             _init("wc", rng, classes, 6, 1, 1, scale=1.0), _init("bc", rng, classes, scale=0.3)]
    return classifier(nodes, inits, "pointwise", (3, 5, 5), classes)


def text_head_mlp(seed: int = 0, classes: int = 5, embed: int = 6) -> onnx.ModelProto:
    """The text-guided head on flattened pixels: z = P·f + b, ẑ = z / max(‖z‖, eps), logits = 2.5 · ẑ·Wᵀ, as
    `harden export` writes it (ReduceL2, Max, Div, MatMul, Mul); input 1×1×4×4. Quantised, the projection is a
    QGemm whose stored output is normalised in float and requantised for the classifier's QLinearMatMul."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Flatten", ["x"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "proj_w", "proj_b"], ["z"], name="proj", transB=1),
        helper.make_node("ReduceL2", ["z"], ["norm"], name="norm", axes=[1], keepdims=1),
        helper.make_node("Max", ["norm", "eps"], ["safe"], name="max"),
        helper.make_node("Div", ["z", "safe"], ["zhat"], name="div"),
        helper.make_node("MatMul", ["zhat", "w_t"], ["cos"], name="cosine"),
        helper.make_node("Mul", ["cos", "scale"], ["logits"], name="scale_mul"),
    ]
    inits = [_init("proj_w", rng, embed, 16), _init("proj_b", rng, embed, scale=0.1),
             numpy_helper.from_array(np.array(1e-6, dtype=np.float32), "eps"), _init("w_t", rng, embed, classes),
             numpy_helper.from_array(np.array(2.5, dtype=np.float32), "scale")]
    return classifier(nodes, inits, "text_head_mlp", (1, 4, 4), classes)


def linear_mlp(seed: int, bias: bool = True, softmax: str = "", tied: bool = False,
               scale: bool = False, gap: float = 0.0) -> onnx.ModelProto:
    """x (N×1×2×3) → Flatten → MatMul + Add → Relu → MatMul [+ Add] [× 2.5] → scores (N×4) → Identity or the
    op `softmax` names (Softmax, LogSoftmax),
    as quantize_dynamic quantises it: both MatMuls become MatMulInteger. `tied`: class 1 a copy of class 0, so
    that their scores are equal and argmax's first-index rule decides every fault near them (`gap`: class 1's
    bias that much higher). `scale`: a Mul by a constant after the layer, as the text head's exp(s)."""
    C, K = 5, 4
    rng = np.random.default_rng(seed)
    w2, b2 = rng.normal(size=(C, K)).astype(np.float32), rng.normal(size=K).astype(np.float32) * 0.1
    if tied:
        w2[:, 1], b2[1] = w2[:, 0], b2[0] + np.float32(gap)
        w2[:, 2:] -= 3  # classes 0 and 1 always lead
    inits = [numpy_helper.from_array(rng.normal(size=(6, C)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(size=C).astype(np.float32), "b1"),
             numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b2, "b2")]
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], name="flatten"),
             helper.make_node("MatMul", ["flat", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["o" if bias else "layer"], name="fc2")]
    if bias:
        nodes.append(helper.make_node("Add", ["o", "b2"], ["layer"], name="fc2_bias"))
    nodes.append(helper.make_node("Mul", ["layer", "s"], ["scores"], name="scale") if scale else
                 helper.make_node("Identity", ["layer"], ["scores"], name="layer_out"))
    if scale:
        inits.append(numpy_helper.from_array(np.array(2.5, np.float32), "s"))
    nodes.append(helper.make_node(softmax, ["scores"], ["logits"], name="softmax", axis=1) if softmax else
                 helper.make_node("Identity", ["scores"], ["logits"], name="out"))
    return classifier(nodes, inits, "linear_mlp", (1, 2, 3), K)


def saturating_head(seed: int = 3) -> onnx.ModelProto:
    """x (N×8) → MatMul → Add → logits N×3, made to reach int16's limits in pairs once quantised with uint8
    inputs: positive features near their row's maximum quantise near 255, and weights near ±max near ±127, so
    ONNX Runtime's AVX2 kernels saturate their pair sums (harden.fi.integer_kernel)."""
    rng = np.random.default_rng(seed)
    w = rng.choice(np.array([1.0, 0.98, 0.96, -0.2], np.float32), size=(8, 3))
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(3, np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="fc"), helper.make_node("Add", ["m", "b"], ["logits"])]
    return classifier(nodes, inits, "saturating", (8,), 3)
