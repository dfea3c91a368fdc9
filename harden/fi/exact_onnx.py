"""The exact final-layer analysis of an ONNX classifier: find its head (exact_locate), cut the graph there,
enumerate.

The head's weights come from the model's constants and its golden tensors from
one ONNX Runtime run with those tensors exposed, so the closed form starts from
exactly the float32 values the injection engine sees. Site names are the ONNX
tensor names, which are the engine's site names for the same tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import onnx

from harden.errors import HardenError
from harden.fi.exact import ExactResult, analyse_sites
from harden.fi.dynamic_head import dynamic_classifier
from harden.fi.exact_dynamic import analyse_dynamic_head
from harden.fi.exact_half import half_sites, is_half
from harden.fi.exact_linear import LinearHead
from harden.fi.exact_locate import Head, _Graph, locate_head
from harden.fi.exact_pooled import PooledConvHead
from harden.fi.exact_site import SOFTMAX_TIE, RangePolicy, Site, after_softmax, softmax32
from harden.fi.outcome import nonfinite_rows, top1_class
from harden.fi.profile import profile_ranges
from harden.fi.exact_integer import analyse_head
from harden.fi.integer_head import integer_classifier
from harden.fi.integer_projection import find_projection
from harden.fi.qdq_deployed import analyse_qdq_head, fused_classifier, is_qdq
from harden.fi.quantised import QOPERATOR_LAYERS, QOPERATOR_OPS
from harden.graph.ort import expose
from harden.graph.parallel import run_model


def stored_to_element(head: Head, tensor: str, stored: np.ndarray) -> np.ndarray:
    """Site element indices of flat indices into the weight as the model stores it.

    The analysis enumerates weights as C×d (or E×d, C×E) matrices; a Gemm with
    transB=0, a MatMul or the text head's Wᵀ store the transpose.
    """
    stored = np.asarray(stored, dtype=np.int64)
    if tensor not in head.transposed:
        return stored
    shapes = {"weight_name": "weight", "proj_weight_name": "proj_weight"}
    for name_attr, array_attr in shapes.items():
        if getattr(head, name_attr, None) == tensor:
            rows, cols = getattr(head, array_attr).shape
            i, j = np.divmod(stored, rows)  # stored is cols × rows
            return j * cols + i
    raise HardenError(f"exact analysis: {tensor!r} is not a weight matrix of the head")


def head_tensors(head: Head) -> list[str]:
    """The activations the analysis reads and may need ranges for."""
    if isinstance(head, LinearHead):
        return [head.input, head.output]
    if isinstance(head, PooledConvHead):
        return [head.input, head.output, head.pooled]
    return [head.input, head.proj_output, head.cosine, head.output]


def analyse_model(model: onnx.ModelProto, inputs: np.ndarray, policy: str = "none", fmt: str = "fp32",
                  ranges: dict[str, float] | None = None, profile_inputs: np.ndarray | None = None,
                  roles: Sequence[str] | None = None, batch: int = 64,
                  providers: Sequence[str] = ("CPUExecutionProvider",), threads: int = 0,
                  progress: bool = False) -> ExactResult:
    """Exact SDC counts of every single-bit fault in the final layer, over the model-ready `inputs`.

    `inputs` should be the campaign's kept images (EvalSet.inputs). `ranges`
    (EvalSet.ranges) are reused where they cover a tensor; the others are profiled
    on `profile_inputs` (default `inputs`) as the engine would. `roles` limits
    the float32 sites (weight, bias, input, output, proj_weight, proj_bias, proj_output, cosine); an integer
    classifier is analysed whole. `threads` (0: every
    CPU) changes speed only. `progress` shows a bar of faults decided on stderr. A QOperator graph's integer
    classifier is analysed in its stored integers (harden.fi.exact_integer), whatever `fmt`; so is a QDQ
    graph's, in the integer kernel ONNX Runtime fuses it into (harden.fi.qdq_deployed), and a dynamically
    quantised one (quantize_dynamic's MatMulInteger) in its int8 weight (harden.fi.exact_dynamic). A classifier left
    out of quantisation gets the float32 analysis. A float16 graph's (onnxconverter-common's conversion) is
    analysed in its stored fp16 values, relative to its nodes run one by one (harden.fi.exact_half), under
    policy 'none' or 'range'.
    """
    integer = integer_classifier(model) if any(n.op_type in QOPERATOR_LAYERS for n in model.graph.node) else None
    if integer is not None:
        if policy != "none":
            raise HardenError(f"exact analysis: policy {policy!r} clamps float values, and this model's "
                              "classifier computes on integers")
        return analyse_head(integer, find_projection(integer), inputs, batch, providers, threads)
    fused = fused_classifier(model, inputs, batch, providers, threads) if is_qdq(model) else None
    if fused is not None:
        if policy != "none":
            raise HardenError(f"exact analysis: policy {policy!r} clamps float values, and ONNX Runtime runs this "
                              "QDQ graph's classifier on integers")
        return analyse_qdq_head(model, fused, inputs, batch, providers, threads)
    dynamic_ops = {"MatMulInteger", "ConvInteger"}
    dynamic = dynamic_classifier(model) if any(n.op_type in dynamic_ops for n in model.graph.node) else None
    if dynamic is not None:
        if policy != "none":
            raise HardenError(f"exact analysis: policy {policy!r} clamps float values, and this model's classifier "
                              "is quantised dynamically (its weights are integers)")
        return analyse_dynamic_head(dynamic, inputs, providers)
    head, sites, top1, ties = model_sites(model, inputs, policy, fmt, ranges, profile_inputs, roles, batch,
                                          providers, threads)
    result = analyse_sites(sites, top1, fmt, head.kind + (f" + {head.softmax.lower()}" if head.softmax else ""),
                           policy, progress)
    result.rounding_ties = ties
    return result


class HeadSites(NamedTuple):
    """What the exact analysis enumerates: the head, its fault sites, the golden top-1 of each image analysed,
    and how many images were left out as rounding ties (see `model_sites`)."""

    head: Head
    sites: list[Site]
    top1: np.ndarray
    ties: int


def model_sites(model: onnx.ModelProto, inputs: np.ndarray, policy: str = "none", fmt: str = "fp32",
                ranges: dict[str, float] | None = None, profile_inputs: np.ndarray | None = None,
                roles: Sequence[str] | None = None, batch: int = 64,
                providers: Sequence[str] = ("CPUExecutionProvider",),
                threads: int = 0) -> HeadSites:
    """The head, its fault sites and the golden top-1 classes (arguments as `analyse_model`).

    Faults the closed form cannot settle are judged by numpy's float32 forward pass of the head against
    ONNX Runtime's golden top-1. An image on which the two passes already disagree fault-free has a top-1
    that is itself a rounding tie: every such fault would count as an SDC, so the image is left out, and
    counted in `ties`. A Conv → ReLU → pool classifier's faults are judged by ONNX Runtime's own nodes; it
    leaves out the images whose top-1 is within a Softmax's tie band (`_pooled_ties`). A float16 graph's faults are judged by ONNX Runtime's nodes themselves
    (harden.fi.exact_half), which also give its golden top-1, so no image is left out.
    """
    half = is_half(model)
    try:
        head = locate_head(model)
    except HardenError as err:
        integer_ops = sorted({n.op_type for n in model.graph.node if n.op_type in QOPERATOR_OPS})
        if integer_ops:
            raise HardenError(f"exact analysis: the model computes with {', '.join(integer_ops)}, and its "
                              "classifier is neither a float32 layer nor an integer one the analysis covers "
                              f"(QGemm, QLinearMatMul, a 1×1 QLinearConv): {err}") from err
        if not is_qdq(model):
            raise
        raise HardenError(f"{err} (ONNX Runtime does not fuse this QDQ graph's classifier into an integer "
                          "kernel either; the sampled campaign covers it)") from err
    g = _Graph(model)
    tensors = head_tensors(head)
    score_name = g.model.graph.output[0].name
    # the same features, so the same counts, on any machine (harden.graph.parallel)
    values = dict(zip([score_name, *tensors], run_model(expose(g.model, tensors), inputs, [score_name, *tensors],
                                                        "disable", batch, threads, providers)))
    scores = values[score_name].reshape(len(inputs), -1)
    if nonfinite_rows(scores).any():
        raise HardenError("exact analysis: the fault-free scores hold NaN or Inf for some images")
    if half and isinstance(head, PooledConvHead):
        raise HardenError("exact analysis: a float16 graph's Conv → ReLU → pool classifier is not covered; the "
                          "sampled campaign covers it")
    if half:
        rp = RangePolicy(policy, _peaks(g, tensors, ranges, inputs if profile_inputs is None else profile_inputs,
                                        batch, providers, threads), head.clips)
        sites, top1 = half_sites(g.model, head, values[head.input], rp, fmt, threads, providers)
        return HeadSites(head, _with_roles(sites, roles), top1, 0)
    top1 = np.argmax(scores, axis=1)
    if isinstance(head, PooledConvHead):
        pooled = values[head.pooled].reshape(len(inputs), -1)
        tied = _pooled_ties(pooled, top1, bool(head.softmax))
    else:
        feats = values[head.input].reshape(len(inputs), -1)
        mine = head.logits(feats)
        tied = top1_class(softmax32(mine, head.softmax == "LogSoftmax") if head.softmax else mine) != top1
    if tied.all():
        raise HardenError("exact analysis: on every image the fault-free top-1 is a rounding tie (for a linear or "
                          "text head, numpy's float32 pass of it and ONNX Runtime's disagree); nothing can be "
                          "judged exactly")
    if tied.any():
        values = {k: v[~tied] for k, v in values.items()}
        top1 = top1[~tied]
    rp = RangePolicy(policy, _peaks(g, tensors, ranges, inputs if profile_inputs is None else profile_inputs,
                                    batch, providers, threads), head.clips)
    n = len(top1)
    feats = values[head.input].reshape(n, -1)
    if isinstance(head, PooledConvHead):
        sites = head.sites(values, top1, fmt, rp, providers)
    elif isinstance(head, LinearHead):
        sites = head.sites(feats, values[head.output].reshape(n, -1), fmt, rp)
    else:
        sites = head.sites(feats, {t: values[t].reshape(n, -1) for t in tensors}, fmt, rp)
    if head.softmax:
        sites = [after_softmax(s, log=head.softmax == "LogSoftmax") for s in sites]
    return HeadSites(head, _with_roles(sites, roles), top1, int(tied.sum()))


def _pooled_ties(pooled: np.ndarray, top1: np.ndarray, softmax: bool) -> np.ndarray:
    """The images a Conv → ReLU → pool classifier leaves out as rounding ties: the pool's argmax is not the
    output's, or a Softmax follows and the two best pooled scores are within its tie band. Every fault on
    such an image would need the whole Conv recomputed (exact.unit_geometry analyses them one by one)."""
    rows = np.arange(len(top1))
    others = pooled.astype(np.float64)
    others[rows, top1] = -np.inf
    tied = np.argmax(pooled, axis=1) != top1
    if softmax:
        tied |= pooled[rows, top1] - others.max(axis=1) <= SOFTMAX_TIE
    return tied


def _peaks(g: _Graph, tensors: list[str], ranges: dict[str, float] | None, inputs: np.ndarray, batch: int,
           providers: Sequence[str], threads: int) -> dict[str, float]:
    """The activations' peaks: `ranges` where they cover a tensor, the others profiled on `inputs`."""
    peaks = dict(ranges or {})
    missing = [t for t in tensors if t not in peaks]
    if missing:
        peaks.update(profile_ranges(g.model, inputs, missing, batch, providers, threads))
    return peaks


def _with_roles(sites: list[Site], roles: Sequence[str] | None) -> list[Site]:
    """The sites whose role is in `roles` (all of them without)."""
    if roles is None:
        return sites
    unknown = sorted(set(roles) - {s.role for s in sites})
    if unknown:
        raise HardenError(f"exact analysis: no site with role {unknown}; have {sorted({s.role for s in sites})}")
    return [s for s in sites if s.role in roles]
