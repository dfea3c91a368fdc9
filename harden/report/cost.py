"""What hardening costs at deployment: parameters, FLOPs per image and ONNX Runtime latency.

FLOPs count 2 per multiply-add of the compute nodes (Conv, ConvTranspose,
Gemm, MatMul and their integer forms, GraphInfo.multiply_adds) at their
probed batch-1 shapes; element-wise nodes are not
counted, so the text head's normalisation appears only through its Gemm and
MatMul. Latency is the median of timed batch runs at the deployment
optimisation level ("all"), on whatever CPU the certification ran on.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import onnx

from harden.fi.graphinfo import GraphInfo
from harden.fi.quantised import DYNAMIC_LAYERS, QOPERATOR_BIAS_ADD, QOPERATOR_LAYERS
from harden.graph.ort import make_session
from harden.report.schema import Cost


def parameter_count(model: onnx.ModelProto) -> int:
    """Elements of the stored parameters: the float constants, and in a quantised graph the stored integer
    weights and biases (what a QDQ graph's DequantizeLinear decodes, what a QOperator layer or a dynamically
    quantised one reads); their scales and zero points are not counted (a handful per tensor), except a
    dynamic layer's weight scale, which a plain Mul reads and so counts as a float."""
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
    stored: set[str] = set()
    qparams: set[str] = set()
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear":
            stored.add(n.input[0])
        # a binary QLinear op's constant operand (a bias, a scale) is stored like a weight
        binary = n.op_type in (QOPERATOR_BIAS_ADD[0], "QLinearMul")
        params = QOPERATOR_LAYERS.get(n.op_type, QOPERATOR_BIAS_ADD[1] if binary else ())
        stored.update(n.input[j] for j in params if j < len(n.input))
        if n.op_type in DYNAMIC_LAYERS:  # quantize_dynamic's stored int8 weights; their zero points are qparams
            stored.update(n.input[j] for j in DYNAMIC_LAYERS[n.op_type] if j < len(n.input))
            qparams.update(n.input[2:4])
        if n.op_type in ("QuantizeLinear", "DequantizeLinear", "QGemm") or n.op_type.startswith("QLinear"):
            qparams.update(t for j, t in enumerate(n.input) if j and j not in params)  # 0: the data (or a weight)
    named = [(t.name, t) for t in model.graph.initializer]
    named += [(n.output[0], a.t) for n in model.graph.node if n.op_type == "Constant" for a in n.attribute
              if a.name == "value"]
    return sum(int(np.prod(t.dims, dtype=np.int64)) for name, t in named
               if name in stored or (t.data_type in floats and name not in qparams))


def flop_count(info: GraphInfo) -> int:
    """2 × multiply-adds per image of the compute nodes (an integer layer's multiply-adds count the same)."""
    return 2 * info.multiply_adds


def latency_ms(model: onnx.ModelProto, example: np.ndarray, runs: int = 30, batch: int = 1,
               providers: Sequence[str] = ("CPUExecutionProvider",)) -> float:
    """Median milliseconds per batch of `batch` images over `runs` timed runs (after 3 warm-ups)."""
    session = make_session(model, providers=providers, opt_level="all", threads=1)
    name = session.get_inputs()[0].name
    x = np.ascontiguousarray(np.repeat(example[:1], batch, axis=0))
    for _ in range(3):
        session.run(None, {name: x})
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000.0)


def measure_cost(model: onnx.ModelProto, example: np.ndarray, runs: int = 30, batch: int = 1,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> Cost:
    """Parameters, FLOPs and latency of `model` on model-ready `example` images."""
    info = GraphInfo(model, example=example[:1], providers=providers)
    fixed = info.fixed_batch or batch
    return Cost(parameter_count(model), flop_count(info), latency_ms(model, example, runs, fixed, providers),
                fixed, runs)
