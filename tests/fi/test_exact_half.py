"""The exact analysis of float16 graphs equals brute-force ONNX Runtime injection of every one of their faults.

Brute force here shares nothing with harden.fi.exact_half but the reference it is exact to: each node of the
head in its own ONNX Runtime session at level 'disable', all the images in one batch. A weight fault rewrites
the stored initializer with the flipped float16 value; an activation fault overwrites that element of the
tensor for every image and runs the nodes after it. Every element × each of the 16 bits × every image.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from harden.errors import HardenError
from harden.fi.bitflip import flip
from harden.fi.exact_half import HalfChain, is_half
from harden.fi.exact_onnx import analyse_model, head_tensors, locate_head
from harden.fi.outcome import fault_outcome, top1_class
from harden.fi.profile import clamp_to_range, profile_ranges
from harden.graph.ort import expose, make_session
from harden.graph.text_head import TextHeadPass
from harden.head import HeadParams
from tests.fi.test_exact_onnx import _pooled_conv_model, scores_model

float16 = pytest.importorskip("onnxconverter_common.float16")

C, D, E = 6, 8, 5


def _linear(seed: int, head: str = "gemm", softmax: str = "", gain: float = 1.0) -> onnx.ModelProto:
    """x (N×1×3×3) → Flatten → Gemm → Relu → classifier (Gemm, or MatMul + Add) (→ Softmax or LogSoftmax).
    `gain` scales the classifier: large scores have coarse float16 steps, so ties are common."""
    rng = np.random.default_rng(seed)
    w = (gain * rng.normal(size=(C, D))).astype(np.float32)
    inits = [numpy_helper.from_array(rng.normal(size=(D, 9)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.normal(size=D).astype(np.float32), "b0"),
             numpy_helper.from_array(rng.normal(size=C).astype(np.float32), "fc.bias")]
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], name="flatten"),
             helper.make_node("Gemm", ["flat", "w0", "b0"], ["h"], name="fc0", transB=1),
             helper.make_node("Relu", ["h"], ["feat"], name="relu")]
    if head == "gemm":
        inits.append(numpy_helper.from_array(w, "fc.weight"))
        nodes.append(helper.make_node("Gemm", ["feat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    else:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), "fc.weight"))
        nodes += [helper.make_node("MatMul", ["feat", "fc.weight"], ["mm"], name="fc"),
                  helper.make_node("Add", ["mm", "fc.bias"], ["logits"], name="fc_add")]
    return scores_model(nodes, inits, C, softmax)


def _text(seed: int, softmax: str = "") -> onnx.ModelProto:
    rng = np.random.default_rng(seed + 100)
    emb = rng.normal(size=(C, E)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    head = HeadParams(rng.normal(size=(E, D)).astype(np.float32), (0.1 * rng.normal(size=E)).astype(np.float32),
                      emb, 2.0, [str(c) for c in range(C)])
    return TextHeadPass(head).run(_linear(seed, softmax=softmax))


def _half(model: onnx.ModelProto, keep_io_types: bool) -> onnx.ModelProto:
    return float16.convert_float_to_float16(model, keep_io_types=keep_io_types)


def _images(seed: int, model: onnx.ModelProto, n: int = 10) -> np.ndarray:
    x = np.random.default_rng(seed + 7).normal(size=(n, 1, 3, 3))
    return x.astype(np.float16 if model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
                    else np.float32)


class _Brute:
    """The head's nodes one by one, each in a session of its own built here (weights rewritten per fault)."""

    def __init__(self, model: onnx.ModelProto, start: str, x: np.ndarray) -> None:
        self.model = onnx.shape_inference.infer_shapes(model)
        self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.types = {v.name: v.type.tensor_type.elem_type for v in (
            *self.model.graph.value_info, *self.model.graph.input, *self.model.graph.output)}
        reached, self.nodes = {start}, []
        for node in model.graph.node:
            if any(t in reached for t in node.input):
                self.nodes.append(node)
                reached.update(node.output)
        self.output = model.graph.output[0].name
        self._stored: dict[int, tuple[object, list[str]]] = {}  # sessions of the nodes as stored, by position
        (feats,) = make_session(expose(model, [start]), opt_level="disable").run([start], {model.graph.input[0].name: x})
        self.golden = self.forward({start: feats})

    def _session(self, node: onnx.NodeProto, inits: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
        fed = [t for t in node.input if t and t not in inits]
        graph = helper.make_graph([node], "one", [helper.make_tensor_value_info(t, self.types[t], None) for t in fed],
                                  [helper.make_tensor_value_info(node.output[0], self.types[node.output[0]], None)],
                                  [numpy_helper.from_array(inits[t], t) for t in node.input if t in inits])
        model = helper.make_model(graph, opset_imports=list(self.model.opset_import))
        model.ir_version = self.model.ir_version
        return make_session(model, opt_level="disable"), fed

    def forward(self, values: dict[str, np.ndarray], inits: dict[str, np.ndarray] | None = None,
                ) -> dict[str, np.ndarray]:
        values = dict(values)
        for i, node in enumerate(self.nodes):
            if node.output[0] in values:
                continue
            if inits and any(t in inits for t in node.input):  # a rewritten weight: a session of its own
                session, fed = self._session(node, {**self.inits, **inits})
            else:
                if i not in self._stored:
                    self._stored[i] = self._session(node, self.inits)
                session, fed = self._stored[i]
            values[node.output[0]] = session.run(None, {t: values[t] for t in fed})[0]
        return values

    def weight(self, name: str, k: int, bit: int, peak: float | None = None) -> np.ndarray:
        w = self.inits[name].copy()
        w.reshape(-1)[k] = _clamped(flip(w.reshape(-1)[k:k + 1], np.array([bit]), "fp16"), peak)[0]
        start = {t: v for t, v in self.golden.items() if not any(t in n.output for n in self.nodes)}
        return self.forward(start, {name: w})[self.output]

    def activation(self, tensor: str, k: int, bit: int, peak: float | None = None) -> np.ndarray:
        values = self.golden[tensor].copy()
        flat = values.reshape(len(values), -1)
        flat[:, k] = _clamped(flip(flat[:, k], np.full(len(flat), bit), "fp16"), peak)
        keep = {t: v for t, v in self.golden.items() if t == tensor or not self._after(tensor, t)}
        return self.forward({**keep, tensor: values})[self.output]

    def _after(self, tensor: str, name: str) -> bool:
        """Whether `name` is computed from `tensor`."""
        reached = {tensor}
        for node in self.nodes:
            if any(t in reached for t in node.input):
                reached.update(node.output)
        return name in reached and name != tensor


def _clamped(values: np.ndarray, peak: float | None) -> np.ndarray:
    """--clamp range on faulty float16 values, as the engine applies it (harden.fi.runner)."""
    return values if peak is None else clamp_to_range(values, peak)


def _brute_counts(brute: _Brute, tensor: str, top1: np.ndarray,
                  peaks: dict[str, float] | None = None) -> tuple[list[int], list[int]]:
    """(SDC per bit, non-finite per bit) over every element × bit × image of one site; with `peaks` (the
    activations' profiled peaks), under --clamp range (a weight's own peak is max |W|)."""
    weight = tensor in brute.inits
    size = brute.inits[tensor].size if weight else brute.golden[tensor].reshape(len(top1), -1).shape[1]
    peak = None if peaks is None else float(np.abs(brute.inits[tensor]).max()) if weight else peaks[tensor]
    sdc, nonfinite = [0] * 16, [0] * 16
    with np.errstate(all="ignore"):
        for bit in range(16):
            for k in range(size):
                scores = brute.weight(tensor, k, bit, peak) if weight else brute.activation(tensor, k, bit, peak)
                s, d = fault_outcome(scores.reshape(len(top1), -1).astype(np.float32), top1)
                sdc[bit] += int(s.sum())
                nonfinite[bit] += int(d.sum())
    return sdc, nonfinite


MODELS = {"gemm": lambda s: _linear(s), "gemm-coarse": lambda s: _linear(s, gain=40.0),
          "matmul-add": lambda s: _linear(s, head="matmul"),
          "gemm-softmax": lambda s: _linear(s, softmax="Softmax", gain=4.0),
          "matmul-logsoftmax": lambda s: _linear(s, head="matmul", softmax="LogSoftmax", gain=4.0),
          "pooled-conv": lambda s: _pooled_conv_model(s),
          "text": lambda s: _text(s), "text-softmax": lambda s: _text(s, softmax="Softmax")}


@pytest.mark.parametrize("policy", ["none", "range"])
@pytest.mark.parametrize("keep_io_types", [False, True], ids=["fp16-io", "fp32-io"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_fault_of_a_float16_head_matches_brute_force(kind: str, keep_io_types: bool, policy: str) -> None:
    """Every site's SDC and non-finite counts per bit equal ONNX Runtime's, fault by fault, with and without
    --clamp range."""
    model = _half(MODELS[kind](1), keep_io_types)
    assert is_half(model)
    x = _images(1, model)
    result = analyse_model(model, x, policy=policy, fmt="fp16")
    head = locate_head(model)
    assert head.kind == ("text" if kind.startswith("text") else "linear")
    assert head.softmax == ("" if "softmax" not in kind else "LogSoftmax" if "log" in kind else "Softmax")
    brute = _Brute(model, head.input, x)
    top1 = top1_class(brute.golden[brute.output].reshape(len(x), -1).astype(np.float32))
    assert result.images == len(x) and result.rounding_ties == 0
    peaks = profile_ranges(model, x, head_tensors(head)) if policy == "range" else None
    for site in result.sites:
        assert site.fmt == "fp16" and len(site.sdc) == 16
        sdc, nonfinite = _brute_counts(brute, site.tensor, top1, peaks)
        assert (site.sdc, site.due) == (sdc, nonfinite), site.tensor
    assert sum(s.total_sdc for s in result.sites) > 0


def test_the_reference_is_the_same_in_any_even_batch_and_with_a_fed_weight() -> None:
    """What HalfChain rests on: a head node's rows do not depend on the even batch they run in, and at level
    'disable' a fed weight gives the stored one's bits."""
    model = _half(_text(2), False)
    x = _images(2, model, n=40)
    head = locate_head(model)
    (feats,) = make_session(expose(model, [head.input]), opt_level="disable").run(
        [head.input], {model.graph.input[0].name: x})
    chain = HalfChain(model, head.input)
    whole = chain.golden(feats)
    pairs = [chain.golden(feats[i:i + 2]) for i in range(0, len(x), 2)]
    for name, value in whole.items():
        assert np.array_equal(value, np.concatenate([p[name] for p in pairs])), name
    i = chain.index(head.proj_weight_name)
    stored = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == head.proj_weight_name))
    fed = chain.run_node(i, {head.input: feats}, {head.proj_weight_name: stored})
    assert np.array_equal(fed, whole[chain.nodes[i].output[0]])


def test_float16_graphs_the_analysis_does_not_cover_are_refused_in_one_line() -> None:
    model = _half(_linear(3), False)
    x = _images(3, model)
    with pytest.raises(HardenError, match="policy 'range-output' on a float16 graph is not covered"):
        analyse_model(model, x, policy="range-output", fmt="fp16")
    with pytest.raises(HardenError, match="stores fp16 values, not fp32"):
        analyse_model(model, x, fmt="fp32")
    mixed = _half(_linear(3), False)
    for init in mixed.graph.initializer:  # a classifier kept in float32 inside a float16 graph
        if init.name in ("fc.weight", "fc.bias"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    mixed.graph.node[-1].input[0] = "feat32"
    mixed.graph.node.insert(len(mixed.graph.node) - 1, helper.make_node("Cast", ["feat"], ["feat32"], to=1))
    mixed.graph.node.append(helper.make_node("Cast", ["logits32"], ["logits"], to=TensorProto.FLOAT16))
    mixed.graph.node[-2].output[0] = "logits32"
    with pytest.raises(HardenError, match="keeps its classifier's weights in float32") as err:
        analyse_model(mixed, x, fmt="fp16")
    assert len(str(err.value).splitlines()) == 1


@pytest.mark.parametrize("op", ["Add", "Mul", "Div"])
def test_a_float16_elementwise_node_is_correctly_rounded(op: str) -> None:
    """What a bias fault behind a MatMul rests on (its Add is decided from the float64 sum, exact for two
    float16 values): ONNX Runtime computes the node in float32 and rounds once to float16, which equals
    rounding the exact result, over float16's whole range, subnormals and overflow included."""
    f16 = TensorProto.FLOAT16
    graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"])], "one",
                              [helper.make_tensor_value_info(t, f16, ["N"]) for t in "ab"],
                              [helper.make_tensor_value_info("y", f16, ["N"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    rng = np.random.default_rng(4)
    a, b = (rng.integers(0, 0x7C00, 200000).astype(np.uint16).view(np.float16) * rng.choice([-1, 1], 200000)
            .astype(np.float16) for _ in range(2))
    (y,) = make_session(model, opt_level="disable").run(None, {"a": a, "b": b})
    with np.errstate(all="ignore"):
        exact = {"Add": np.add, "Mul": np.multiply, "Div": np.divide}[op](a.astype(np.float64), b.astype(np.float64))
        want = exact.astype(np.float16)
    assert np.array_equal(y, want, equal_nan=True)


def test_a_whole_graph_session_keeps_float32_between_float16_nodes() -> None:
    """Why the reference runs the head node by node: one ONNX Runtime session of the whole float16 graph drops
    the Casts between the nodes it computes in float32, so its scores differ from the nodes' own, rounded
    to float16 one by one; exposing a tensor rounds it."""
    model = _half(_text(5), False)
    x = _images(5, model, n=40)
    head = locate_head(model)
    brute = _Brute(model, head.input, x)
    (whole,) = make_session(model, opt_level="disable").run(None, {model.graph.input[0].name: x})
    assert not np.array_equal(whole, brute.golden[brute.output])
