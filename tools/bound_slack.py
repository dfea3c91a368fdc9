"""Could the injector declare a fault harmless without computing it? A check of the rigorous bound, which says no.

A fault that survives into the last stage of a ResNet costs a dense recomputation of that stage, which caps the
cone engine's speed-up (tools/cone_profile.py). The only exact way around it would be a proof that the fault
cannot change the top-1 class: the change of the faulty tensor t times a Lipschitz bound L(t) of the rest of the
network, plus what floating-point rounding can add, must stay under the golden margin (top-1 minus top-2 score).

This script computes both terms for a model of tools/bench_inject.py, in float64:
- L(t): spectral norms of every Conv and Gemm (power iteration at the tensor's real size), 1 for Relu and Add
  operands, 2 for a 3×3/2 MaxPool (each input is read by up to 4 windows), 1/√(HW) for a global average pool,
  summed over paths to the scores, times √2 for a difference of two scores;
- the rounding slack: for every op after t, the standard bound γ_n·‖|W|·|x|‖ of a float32 dot product of n terms
  (Higham, Accuracy and Stability of Numerical Algorithms, §3.1), counted twice (golden and faulty run) and
  carried to the scores by the op's L. It uses the golden activations only, so it understates the true slack.

If the slack alone exceeds the margin, no fault at t can be shown harmless this way, whatever its size.

    .venv/bin/python tools/bound_slack.py [--model resnet18-224] [--images 16] [--work /tmp/harden-bench-inject]
"""

from __future__ import annotations

import argparse
import numpy as np

UNIT_ROUNDOFF = 2.0**-24  # float32


def gamma(n: int) -> float:
    """γ_n = n·u / (1 − n·u): the relative error bound of an n-term float32 sum of products."""
    return n * UNIT_ROUNDOFF / (1 - n * UNIT_ROUNDOFF)


def spectral_norm(op, shape: tuple[int, ...], iterations: int = 30) -> float:  # type: ignore[no-untyped-def]
    """‖op‖₂ of a linear map on tensors of `shape`, by power iteration on opᵀop (autograd gives opᵀ)."""
    import torch

    v = torch.randn(1, *shape[1:], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = 0.0
    for _ in range(iterations):
        v = (v / v.norm()).requires_grad_()
        y = op(v)
        (y * y).sum().backward()
        sigma = float(y.detach().norm())
        v = v.grad.detach()
    return sigma


def spatial_mean(attrs: dict, inputs: list) -> bool:  # type: ignore[type-arg]
    """Whether a ReduceMean averages exactly the two spatial axes of an NCHW tensor (a global average pool)."""
    axes = attrs.get("axes", inputs[1].tolist() if len(inputs) > 1 else None)
    return axes is not None and sorted(int(a) % 4 for a in axes) == [2, 3] and inputs[0].ndim == 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18-224")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--work", default="/tmp/harden-bench-inject")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F
    from onnx import helper

    from bench_inject import trained_model

    info, x = trained_model(args.work, args.model, args.images)
    n = len(x)
    values = {info.input_name: torch.from_numpy(x).double()}
    lipschitz: dict[int, float] = {}  # per node: bound of its output change per unit change of one input
    rounding: dict[int, torch.Tensor] = {}  # per node and image: bound of its own float32 rounding error
    const = {k: torch.from_numpy(np.array(v)).double() for k, v in info.constants.items()}
    for i, node in enumerate(info.nodes):
        a = {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}
        ins = [values.get(t, const.get(t)) for t in node.input if t]
        op = node.op_type
        if op == "Conv":
            w, b = ins[1], ins[2] if len(ins) > 2 else None
            kw = dict(stride=a.get("strides", [1, 1]), padding=tuple(a.get("pads", [0, 0, 0, 0])[:2]),
                      dilation=a.get("dilations", [1, 1]), groups=a.get("group", 1))
            y = F.conv2d(ins[0], w, b, **kw)
            bound = F.conv2d(ins[0].abs(), w.abs(), None if b is None else b.abs(), **kw)
            rounding[i] = gamma(int(np.prod(w.shape[1:])) + 1) * bound.flatten(1).norm(dim=1)
            lipschitz[i] = spectral_norm(lambda v, w=w, kw=kw: F.conv2d(v, w, None, **kw), tuple(ins[0].shape))
        elif op == "Gemm":
            w = ins[1] if a.get("transB", 0) else ins[1].T
            y = ins[0] @ w.T + ins[2]
            rounding[i] = gamma(w.shape[1] + 1) * (ins[0].abs() @ w.abs().T + ins[2].abs()).norm(dim=1)
            lipschitz[i] = float(torch.linalg.matrix_norm(w, 2))
        elif op == "Relu":
            y, lipschitz[i] = ins[0].clamp_min(0), 1.0
        elif op == "Add":
            y, lipschitz[i] = ins[0] + ins[1], 1.0
            rounding[i] = UNIT_ROUNDOFF * y.flatten(1).norm(dim=1)
        elif op == "MaxPool" and a.get("kernel_shape") == [3, 3] and a.get("strides") == [2, 2]:
            y = F.max_pool2d(ins[0], 3, 2, tuple(a.get("pads", [0, 0, 0, 0])[:2]))
            lipschitz[i] = 2.0
        elif op == "GlobalAveragePool" or (op == "ReduceMean" and spatial_mean(a, ins)):
            hw = ins[0].shape[2] * ins[0].shape[3]
            y = ins[0].mean(dim=(2, 3), keepdim=op == "GlobalAveragePool" or bool(a.get("keepdims", 1)))
            lipschitz[i] = 1 / np.sqrt(hw)
            rounding[i] = gamma(hw) * ins[0].abs().mean(dim=(2, 3)).flatten(1).norm(dim=1)
        elif op == "Flatten":
            y, lipschitz[i] = ins[0].flatten(1), 1.0
        else:
            raise SystemExit(f"{node.name}: {op} is not covered by this script")
        values[node.output[0]] = y
    top2 = values[info.scores].topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1]).numpy()
    # L(t) and the slack S(t) from each tensor to the scores, walking the graph backwards
    L: dict[str, float] = {info.scores: float(np.sqrt(2))}
    S: dict[str, torch.Tensor] = {info.scores: torch.zeros(n, dtype=torch.float64)}
    for i in reversed(range(len(info.nodes))):
        node = info.nodes[i]
        out = node.output[0]
        slack = S[out] + 2 * L[out] * rounding.get(i, torch.zeros(n, dtype=torch.float64))
        for t in [t for t in node.input if t and t not in info.constants]:
            L[t] = L.get(t, 0.0) + lipschitz[i] * L[out]
            S[t] = S.get(t, 0.0) + slack
    print(f"{args.model}: {n} images; golden margins (top-1 − top-2 score): median {np.median(margin):.3g}, "
          f"min {margin.min():.3g}")
    print(f"{'tensor (a Relu output)':48s} {'L(t)':>10s} {'slack/margin: median':>21s} {'min':>8s}")
    relus = [node.output[0] for node in info.nodes if node.op_type == "Relu"]
    for t in relus:
        ratio = (S[t].numpy() / margin)
        print(f"{t[-48:]:48s} {L[t]:10.3g} {np.median(ratio):21.3g} {ratio.min():8.3g}")
    last = [t for t in relus if (S[t].numpy() > margin).all()]
    print(f"\nthe rounding slack alone exceeds every image's margin at {len(last)} of {len(relus)} Relu outputs"
          + (f", down to {last[-1]}" if last else ""))


if __name__ == "__main__":
    main()
