"""Fault models: which bits a fault touches and how a value is corrupted, drawn in bulk from a seeded Generator.

A fault is (element, bits, uniform draw). Drawing is separate from applying so
that a shard's faults are fixed by its seed alone, whatever the values are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from harden.errors import HardenError
from harden.fi.bitflip import STORED, check_format, flip, quantise, stuck_at
from harden.fi.sites import Site

MODELS = ("flip", "stuck-at-0", "stuck-at-1", "random")


# The storage format of each site type: a fault flips the bits the graph really stores.
NATIVE = {"float32": "fp32", **{dtype.name: fmt for fmt, dtype in STORED.items()}}


@dataclass(frozen=True)
class FaultModel:
    """`kind` of fault, the number format it corrupts, the bit positions it may touch (None: the format's
    whole width) and bits per fault.

    `fmt` None means each site's own storage (fp32, fp16 in a float16 graph,
    a quantised graph's stored integers). A campaign fixes it from its sites
    (`resolve_format`) where they all store one type, so its file records that
    format; null there means each site's own (`site_fault`).
    """

    kind: str = "flip"
    fmt: str | None = None
    bits: tuple[int, ...] | None = None
    k: int = 1

    def __post_init__(self) -> None:
        if self.fmt is None:  # not yet resolved: check what can be checked against the widest format
            FaultModel(self.kind, "fp32", self.bits, self.k)
            return
        width = check_format(self.fmt)
        if self.kind not in MODELS:
            raise HardenError(f"unknown fault model {self.kind!r}; use one of {list(MODELS)}")
        if self.bits is not None:
            if not self.bits:
                raise HardenError("the bit set is empty")
            bad = [b for b in self.bits if not 0 <= b < width]
            if bad:
                raise HardenError(f"bit positions {bad} are outside 0..{width - 1} for {self.fmt}")
            if len(set(self.bits)) != len(self.bits):
                raise HardenError(f"bit positions repeat: {list(self.bits)}")
        if self.kind != "random" and not 1 <= self.k <= len(self.choices()):
            raise HardenError(f"cannot flip {self.k} distinct bits out of {len(self.choices())} positions")

    @property
    def format(self) -> str:
        """The resolved number format (an unresolved model may not draw or corrupt anything)."""
        if self.fmt is None:
            raise HardenError("the fault model's number format is not resolved yet (resolve_format)")
        return self.fmt

    def choices(self) -> np.ndarray:
        """The bit positions a fault may touch."""
        return np.asarray(self.bits if self.bits is not None else range(check_format(self.format)), dtype=np.int64)

    def draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(bits (n, k), uniforms (n,)): k distinct positions per fault, and a U(-1, 1) draw for 'random'."""
        choices = self.choices()
        if self.kind == "random":
            return np.zeros((n, 0), dtype=np.int64), rng.uniform(-1.0, 1.0, n)
        if self.k == 1:
            return choices[rng.integers(0, len(choices), n)].reshape(n, 1), np.zeros(n)
        order = np.argsort(rng.random((n, len(choices))), axis=1)[:, : self.k]
        return np.sort(choices[order], axis=1), np.zeros(n)

    def apply(self, golden: np.ndarray, bits: np.ndarray, uniforms: np.ndarray, scale: float, peak: float) -> np.ndarray:
        """Faulty values for `golden` values (one per fault), of golden's type where the format stores it as
        it is (a float16 site's float16, a quantised graph's integers), else float32.

        Emulated int8 and fp8 use `scale`; 'random' draws a value uniformly in
        ±`peak` (the site's profiled range), stored in the format, and on a
        stored integer any of its codes with equal chance.
        """
        g = np.asarray(golden)
        stored = STORED.get(self.format) == g.dtype
        g = g if stored else g.astype(np.float32)
        if self.kind == "random":
            if g.dtype.kind in "iu":
                info = np.iinfo(g.dtype)
                span = float(info.max) - float(info.min) + 1
                codes = np.floor((uniforms + 1.0) / 2.0 * span) + float(info.min)
                return np.clip(codes, info.min, info.max).astype(g.dtype)
            return quantise((uniforms * peak).astype(g.dtype), self.format, scale)
        if self.kind == "flip":
            return flip(g, bits, self.format, scale)
        return stuck_at(g, bits, int(self.kind[-1]), self.format, scale)

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "fmt": self.fmt, "bits": None if self.bits is None else list(self.bits), "k": self.k}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> FaultModel:
        bits = data.get("bits")
        fmt = data.get("fmt")
        return cls(str(data["kind"]), None if fmt is None else str(fmt),
                   None if bits is None else tuple(int(b) for b in bits),  # type: ignore[union-attr]
                   int(data.get("k", 1)))  # type: ignore[arg-type]


def resolve_format(fault: FaultModel, sites: Sequence[Site]) -> FaultModel:
    """The fault model with its number format fixed for these sites, or a HardenError if one cannot take it.

    Unset, the format is what the graph stores (NATIVE): fp32 for float32
    sites, fp16 for a float16 graph's, int8/uint8/int32 for a quantised graph's stored
    integers. Where the sites store different types (a QDQ graph keeps some
    float tensors), it stays unset and each site's own applies (`site_fault`).
    A set format must suit every site (`site_fault`).
    """
    for site in sites:
        site_fault(fault, site)
    if fault.fmt is not None:
        return fault
    natives = {NATIVE[s.dtype] for s in sites}
    return replace(fault, fmt=natives.pop()) if len(natives) == 1 else fault


def check_clamp(clamp: str, sites: Sequence[Site]) -> None:
    """Refuse `--clamp range` on a stored integer: the clamp is a float rule (NaN, Inf, out of range), and a
    flipped integer is never NaN nor outside its type's range."""
    integer = [s.name for s in sites if s.dtype not in ("float32", "float16")]
    if clamp == "range" and integer:
        raise HardenError(f"--clamp range applies to float values, and {integer[0]!r} is a stored integer "
                          f"({len(integer)} such sites); select float sites, or leave the clamp out")


def site_fault(fault: FaultModel, site: Site) -> FaultModel:
    """The fault model as it applies to one site: its native format when unset, else the set one if the site
    can store it. A float16 site or a stored integer holds only its own bit patterns (any other format's
    faulty value would need rounding to be stored); a float32 site takes any format but the stored-integer
    ones, the others emulated."""
    native = NATIVE[site.dtype]
    fmt = fault.fmt or native
    if fmt != native and (site.dtype != "float32" or fmt in ("uint8", "int32")):
        raise HardenError(f"--format {fmt} cannot be stored in {site.dtype} site {site.name!r}; "
                          f"its own format is {native} (the default)")
    return fault if fault.fmt == fmt else replace(fault, fmt=fmt)


def parse_bits(text: str | None) -> tuple[int, ...] | None:
    """'all'/None, '30', '23-30' or '0,7,31' to a tuple of bit positions."""
    if text is None or text == "all":
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError as err:
        raise HardenError(f"bad --bits {text!r}; use e.g. 30, 23-30 or 0,7,31") from err
    return tuple(out)
