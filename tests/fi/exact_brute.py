"""Brute-force references for the exact analysis: every fault evaluated by a full float32 forward pass.

Each fault (element, bit) is applied to the whole batch at once — every image
gets the same corrupted weight, or its own corrupted activation at the same
element — so the fault-free rows are computed exactly as in the golden run.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from harden.fi.bitflip import WIDTH, flip, tensor_scale
from harden.fi.dynamic_head import dynamic_classifier
from harden.fi.exact_linear import LinearHead
from harden.fi.exact_site import RangePolicy, clamp32, flip_bit, softmax32
from harden.fi.exact_text import TextHead
from harden.fi.outcome import fault_outcome
from harden.graph.ort import expose, make_session


def _wflip(values: np.ndarray, k: int, bit: int, fmt: str, policy: RangePolicy) -> np.ndarray:
    out = values.copy()
    scale = tensor_scale(values, fmt)
    out.ravel()[k] = flip_bit(values.ravel()[k:k + 1], bit, fmt, scale, policy.weight_peak(values))[0]
    return out


def _aflip(values: np.ndarray, base: np.ndarray, k: int, bit: int, fmt: str, policy: RangePolicy,
           name: str) -> np.ndarray:
    out = base.copy()
    out[:, k] = flip_bit(values[:, k], bit, fmt, policy.act_scale(name, fmt), policy.element_peak(name))
    return out


def _count_faults(width: int, size: int, forward, top1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """(SDC per bit, non-finite per bit) over every element k and bit of one site, by full forward passes."""
    sdc, nf = np.zeros(width, np.int64), np.zeros(width, np.int64)
    with np.errstate(all="ignore"):
        for bit in range(width):
            for k in range(size):
                s, d = fault_outcome(forward(k, bit), top1)
                sdc[bit] += s.sum()
                nf[bit] += d.sum()
    return sdc, nf


def brute_linear(h: LinearHead, f: np.ndarray, fmt: str, policy: RangePolicy,
                 softmax: str = "") -> dict[str, tuple[np.ndarray, ...]]:
    """{role: (sdc per bit, non-finite per bit)} by full forward passes, then a `softmax` ("Softmax" or
    "LogSoftmax") if named."""
    tp = policy.tensor_peak
    golden = h.logits(f)
    top1 = golden.argmax(1)
    width = WIDTH[fmt]
    b = h.bias if h.bias is not None else np.zeros(len(h.weight), np.float32)
    out: dict[str, tuple[np.ndarray, ...]] = {}

    def count(role: str, size: int, forward) -> None:  # type: ignore[no-untyped-def]
        finish = (lambda k, bit: softmax32(forward(k, bit), softmax == "LogSoftmax")) if softmax else forward
        out[role] = _count_faults(width, size, finish, top1)

    count("weight", h.weight.size, lambda k, bit: clamp32(f @ _wflip(h.weight, k, bit, fmt, policy).T + b,
                                                           tp(h.output)))
    if h.bias is not None:
        count("bias", b.size, lambda k, bit: clamp32(f @ h.weight.T + _wflip(b, k, bit, fmt, policy), tp(h.output)))
    fb = clamp32(f, tp(h.input))
    count("input", f.shape[1], lambda k, bit: _aflip(f, fb, k, bit, fmt, policy, h.input) @ h.weight.T + b)
    lb = clamp32(golden, tp(h.output))
    count("output", golden.shape[1], lambda k, bit: _aflip(golden, lb, k, bit, fmt, policy, h.output))
    return out


def text_tensors(h: TextHead, f: np.ndarray) -> dict[str, np.ndarray]:
    """Golden z, cosines and logits of the numpy float32 forward pass."""
    z = f @ h.proj_weight.T + h.proj_bias
    cos = h.normalise(z) @ h.weight.T
    return {h.proj_output: z, h.cosine: cos, h.output: h.from_z(z)}


def brute_text(h: TextHead, f: np.ndarray, fmt: str, policy: RangePolicy) -> dict[str, tuple[np.ndarray, ...]]:
    """{role: (sdc per bit, non-finite per bit)} by full forward passes of the text head."""
    top1 = text_tensors(h, f)[h.output].argmax(1)
    return {role: _count_faults(WIDTH[fmt], size, forward, top1)
            for role, (size, forward) in text_forwards(h, f, fmt, policy).items()}


def text_forwards(h: TextHead, f: np.ndarray, fmt: str, policy: RangePolicy) -> dict[str, tuple[int, object]]:
    """{role: (elements, forward(k, bit) → the faulty float32 scores of every image)} for the text head."""
    tp = policy.tensor_peak
    t = text_tensors(h, f)
    z, cos, golden = t[h.proj_output], t[h.cosine], t[h.output]
    out: dict[str, tuple[int, object]] = {}

    def head(ff: np.ndarray, p: np.ndarray, b: np.ndarray, w: np.ndarray, clamp_z: bool, clamp_cos: bool) -> np.ndarray:
        zz = ff @ p.T + b
        zz = clamp32(zz, tp(h.proj_output)) if clamp_z else zz
        cc = h.normalise(zz) @ w.T
        cc = clamp32(cc, tp(h.cosine)) if clamp_cos else cc
        return cc if h.scale is None else (cc * np.float32(h.scale)).astype(np.float32)

    def count(role: str, size: int, forward) -> None:  # type: ignore[no-untyped-def]
        out[role] = (size, forward)

    P, b, W = h.proj_weight, h.proj_bias, h.weight
    count("proj_weight", P.size, lambda k, bit: head(f, _wflip(P, k, bit, fmt, policy), b, W, True, False))
    count("proj_bias", b.size, lambda k, bit: head(f, P, _wflip(b, k, bit, fmt, policy), W, True, False))
    fb = clamp32(f, tp(h.input))
    count("input", f.shape[1], lambda k, bit: head(_aflip(f, fb, k, bit, fmt, policy, h.input), P, b, W, False, False))
    zb = clamp32(z, tp(h.proj_output))
    count("proj_output", z.shape[1], lambda k, bit: h.from_z(_aflip(z, zb, k, bit, fmt, policy, h.proj_output)))
    count("weight", W.size, lambda k, bit: head(f, P, b, _wflip(W, k, bit, fmt, policy), False, True))
    if h.scale is not None:
        cb = clamp32(cos, tp(h.cosine))
        count("cosine", cos.shape[1], lambda k, bit: (_aflip(cos, cb, k, bit, fmt, policy, h.cosine)
                                                      * np.float32(h.scale)).astype(np.float32))
    lb = clamp32(golden, tp(h.output))
    count("output", golden.shape[1], lambda k, bit: _aflip(golden, lb, k, bit, fmt, policy, h.output))
    return out


def brute_dynamic(model: onnx.ModelProto, x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{role: (SDC per bit, non-finite per bit)} of a dynamically quantised classifier: each image run alone (a
    batch would share one dynamic scale) through the graph cut at the classifier's features, with each fault:
    the stored weight or the bias fed in as an input, or a flipped feature or layer output fed in."""
    head = dynamic_classifier(model)
    assert head is not None
    inp, out = model.graph.input[0].name, model.graph.output[0].name
    alone = make_session(expose(model, [head.features, head.output]), opt_level="disable")
    golden = [alone.run([out, head.features, head.output], {inp: x[i:i + 1]}) for i in range(len(x))]
    top1 = [np.array([np.argmax(run[0])]) for run in golden]
    inferred = onnx.shape_inference.infer_shapes(model)

    def cut(start: str, fed: str = ""):  # type: ignore[no-untyped-def]
        sub = onnx.utils.Extractor(inferred).extract_model([start], [out])
        if fed:
            init = next(t for t in sub.graph.initializer if t.name == fed)
            sub.graph.initializer.remove(init)
            sub.graph.input.append(helper.make_tensor_value_info(fed, init.data_type, list(init.dims)))
        return make_session(sub, opt_level="disable")

    def flipped(values: np.ndarray, k: int, bit: int) -> np.ndarray:
        v = values.copy()
        v.reshape(-1)[k] = flip(values.reshape(-1)[k:k + 1], np.array([bit]),
                                values.dtype.name if values.dtype.kind in "iu" else "fp32")[0]
        return v

    result: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def count(role: str, width: int, size: int, scores) -> None:  # type: ignore[no-untyped-def]
        sdc, due = np.zeros(width, np.int64), np.zeros(width, np.int64)
        for bit in range(width):
            for k in range(size):
                for i in range(len(x)):
                    s, d = fault_outcome(scores(i, k, bit).reshape(1, -1), top1[i])
                    sdc[bit] += int(s[0])
                    due[bit] += int(d[0])
        result[role] = (sdc, due)

    initial = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for role, name, stored in [("weight", head.weight_name, initial[head.weight_name]),
                               ("bias", head.bias_name, initial.get(head.bias_name))]:
        if stored is not None:
            session = cut(head.features, name)
            count(role, 8 * stored.dtype.itemsize, stored.size,
                  lambda i, k, bit, s=session, n=name, v=stored: s.run(None, {head.features: golden[i][1],
                                                                            n: flipped(v, k, bit)})[0])
    tail = cut(head.features)
    count("input", 32, head.weight.shape[0],
          lambda i, k, bit: tail.run(None, {head.features: flipped(golden[i][1], k, bit)})[0])
    after = cut(head.output)
    count("output", 32, head.classes, lambda i, k, bit: after.run(None, {head.output: flipped(golden[i][2], k, bit)})[0])
    return result
