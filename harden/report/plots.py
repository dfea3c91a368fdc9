"""The report's figures, written as PNG files with matplotlib's non-interactive backend.

Three views answer three review questions: which layers fail (per-layer SDC
with intervals, both models), which bits matter (SDC by bit position, sampled
and exact), and how confident the fault-free predictions were (Top2Diff of all
evaluated images against those that a fault flipped).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from harden.files import atomic_path
from harden.report.schema import ModelRecord

COLOURS = {"model": "#1f77b4", "baseline": "#d62728"}


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:  # type: ignore[no-untyped-def]
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")


def per_layer_sdc(models: list[ModelRecord], path: Path) -> None:
    """Horizontal bars of each layer's SDC rate with its interval, one colour per model."""
    plt = _pyplot()
    rows = [(m.role, layer) for m in models for layer in m.campaign.layers]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.28 * len(rows) + 1)))
    y = np.arange(len(rows))
    for i, (role, layer) in enumerate(rows):
        r = layer.sdc
        ax.barh(i, 100 * r.value, color=COLOURS.get(role, "grey"), alpha=0.8)
        ax.errorbar(100 * r.value, i, xerr=[[100 * (r.value - r.low)], [100 * (r.high - r.value)]], fmt="none",
                    ecolor="black", capsize=2, lw=0.8)
    ax.set_yticks(y, [f"{role}: {layer.site}" for role, layer in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("SDC rate (%) with confidence interval")
    ax.set_title("Per-layer SDC")
    _save(fig, path)
    plt.close(fig)


def sdc_by_bit(models: list[ModelRecord], path: Path) -> None:
    """Sampled SDC rate per bit (pooled over layers) and exact final-layer fractions per bit."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for m in models:
        k: dict[int, int] = {}
        n: dict[int, int] = {}
        for layer in m.campaign.layers:
            for bit, (kb, nb) in layer.by_bit.items():
                k[bit] = k.get(bit, 0) + kb
                n[bit] = n.get(bit, 0) + nb
        bits = sorted(n)
        if bits:
            ax.plot(bits, [100 * k[b] / n[b] for b in bits], "o-", color=COLOURS.get(m.role, "grey"), ms=3,
                    label=f"{m.role}: sampled, all layers")
        if m.exact is not None and m.exact.sites:
            # an integer classifier's sites differ in width (int8 weights, int32 bias): pool each bit over the
            # sites that have it
            width = max(len(s.faults) for s in m.exact.sites)
            sdc = np.sum([np.pad(s.sdc, (0, width - len(s.sdc))) for s in m.exact.sites], axis=0)
            total = np.sum([np.pad(s.faults, (0, width - len(s.faults))) for s in m.exact.sites], axis=0)
            ax.plot(range(width), 100 * sdc / np.maximum(total, 1), "s--", color=COLOURS.get(m.role, "grey"),
                    ms=3, alpha=0.6, label=f"{m.role}: exact, final layer")
    ax.set_xlabel("bit position (0 = least significant)")
    ax.set_ylabel("SDC rate (%)")
    ax.set_title("SDC by bit position")
    ax.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)


def top2diff(models: list[ModelRecord], path: Path) -> None:
    """Histograms of fault-free Top2Diff: every evaluated image, and the images behind an SDC."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3), squeeze=False)
    bins = np.linspace(0, 100, 26)
    for ax, m in zip(axes[0], models):
        ax.hist(m.top2diff, bins=bins, density=True, alpha=0.5, color=COLOURS.get(m.role, "grey"),
                label="evaluated images")
        if m.sdc_top2diff:
            ax.hist(m.sdc_top2diff, bins=bins, density=True, histtype="step", color="black", label="SDC faults")
        ax.set_title(f"{m.role}: Top2Diff", fontsize=9)
        ax.set_xlabel("softmax top-1 − top-2 (× 100)")
        ax.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)


def write_plots(models: list[ModelRecord], folder: str | os.PathLike[str]) -> dict[str, str]:
    """All figures into `folder`; returns {figure: file name}."""
    out = Path(folder)
    names = {"per_layer_sdc": "per_layer_sdc.png", "sdc_by_bit": "sdc_by_bit.png", "top2diff": "top2diff.png"}
    per_layer_sdc(models, out / names["per_layer_sdc"])
    sdc_by_bit(models, out / names["sdc_by_bit"])
    top2diff(models, out / names["top2diff"])
    return names
