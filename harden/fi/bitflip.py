"""Bit-level faults in fp32, fp16, bf16, fp8 and int8 values, emulated through integer views.

A value stored in format F is encoded to F's bit pattern, the chosen bits are
flipped (or forced to 0/1), and the pattern is decoded back to float32 for the
float32 model. Only the faulty element passes through F; the rest of the tensor
is untouched, so a null fault reproduces the golden output bit for bit.
A float16 model's own values (float16 arrays) go in and come out as float16,
and in fp16 their bits are flipped in place, NaN payloads included. So do a
quantised graph's stored integers (int8, uint8 and int32 arrays, formats int8, uint8
and int32): their two's-complement or unsigned bits are flipped as stored,
with no scale. uint8 and int32 exist only as such stored integers.

int8 is symmetric per-tensor quantisation: q = clip(round(v / scale), -127, 127)
with scale = max|tensor| / 127, the tensor's own scale being what a quantised
deployment would have stored. The fp8 formats (OCP's E4M3, finite-only with
max 448, and E5M2, max 57344, through ml_dtypes) are scaled the same way, as
FP8 inference stores them: v / scale with scale = max|tensor| / the format's
max, saturated at ± that max, rounded to nearest even.
"""

from __future__ import annotations

from typing import Literal

import ml_dtypes
import numpy as np

from harden.errors import HardenError

Format = Literal["fp32", "fp16", "bf16", "fp8-e4m3", "fp8-e5m2", "int8", "uint8", "int32"]
WIDTH: dict[str, int] = {"fp32": 32, "fp16": 16, "bf16": 16, "fp8-e4m3": 8, "fp8-e5m2": 8, "int8": 8, "uint8": 8,
                         "int32": 32}
_UINT = {"fp32": np.uint32, "fp16": np.uint16, "bf16": np.uint16, "fp8-e4m3": np.uint8, "fp8-e5m2": np.uint8,
         "int8": np.uint8, "uint8": np.uint8, "int32": np.uint32}
# The formats whose values some array type holds as they are: flipped on its own bits, never converted.
STORED = {"fp16": np.dtype(np.float16), "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8),
          "int32": np.dtype(np.int32)}
# The formats a float32 value can be stored in (emulated); uint8 and int32 are only ever stored integers.
EMULATED = tuple(f for f in WIDTH if f not in ("uint8", "int32"))
_FP8 = {"fp8-e4m3": ml_dtypes.float8_e4m3fn, "fp8-e5m2": ml_dtypes.float8_e5m2}
# The largest stored magnitude of each scaled format: a tensor's max |value| maps to it.
FULL_SCALE = {"int8": 127.0, "fp8-e4m3": 448.0, "fp8-e5m2": 57344.0}


def check_format(fmt: str) -> int:
    """The bit width of `fmt`, or a HardenError naming the supported formats."""
    if fmt not in WIDTH:
        raise HardenError(f"unknown number format {fmt!r}; use one of {sorted(WIDTH)}")
    return WIDTH[fmt]


def tensor_scale(tensor: np.ndarray, fmt: str) -> float:
    """The per-tensor scale `tensor` is stored with in `fmt`: max|tensor| / FULL_SCALE[fmt] (as float32),
    1.0 for the unscaled float formats and for an all-zero tensor, so that decoding stays finite."""
    if fmt not in FULL_SCALE:
        return 1.0
    peak = float(np.max(np.abs(tensor))) if tensor.size else 0.0
    scale = float(np.float32(peak / FULL_SCALE[fmt]))
    return scale if scale > 0 and np.isfinite(scale) else 1.0


def peak_scale(peak: float, fmt: str) -> float:
    """The scale of an activation whose profiled max |value| is `peak`: peak / FULL_SCALE[fmt], 1.0 for the
    unscaled formats or an unprofiled tensor."""
    if fmt not in FULL_SCALE or not peak > 0:
        return 1.0
    return peak / FULL_SCALE[fmt]


def encode(values: np.ndarray, fmt: str, scale: float = 1.0) -> np.ndarray:
    """float32 values to their bit patterns in `fmt` (unsigned integers of the format's width)."""
    check_format(fmt)
    if STORED.get(fmt) == np.asarray(values).dtype:
        return np.array(values).view(_UINT[fmt])
    if fmt not in EMULATED:
        raise HardenError(f"--format {fmt} is a quantised graph's stored integer; it cannot emulate float values")
    v = np.ascontiguousarray(values, dtype=np.float32)
    if fmt == "fp32":
        return v.view(np.uint32).copy()
    if fmt == "fp16":
        with np.errstate(over="ignore"):
            return v.astype(np.float16).view(np.uint16)
    if fmt == "bf16":
        u = v.view(np.uint32).astype(np.uint64)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16  # round to nearest, ties to even
        nan = np.isnan(v)
        out = rounded.astype(np.uint16)
        out[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)  # keep NaN a quiet NaN
        return out
    if fmt in _FP8:
        top = float(ml_dtypes.finfo(_FP8[fmt]).max)
        with np.errstate(over="ignore", invalid="ignore"):
            return np.clip(v / np.float32(scale), -top, top).astype(_FP8[fmt]).view(np.uint8)
    # Real values lie in ±127·scale; -128 is only reached by a fault and must round-trip.
    q = np.clip(np.rint(v / np.float32(scale)), -128, 127).astype(np.int8)
    return q.view(np.uint8)


def decode(codes: np.ndarray, fmt: str, scale: float = 1.0, dtype: type = np.float32) -> np.ndarray:
    """Bit patterns in `fmt` back to float32 values, or to the type that stores them as they are (`dtype`:
    a float16 model's float16, a quantised graph's integers)."""
    check_format(fmt)
    c = np.ascontiguousarray(codes, dtype=_UINT[fmt])
    if STORED.get(fmt) == np.dtype(dtype):
        return c.view(dtype).copy()
    if np.dtype(dtype) == np.float16:
        return _decode32(c, fmt, scale).astype(np.float16)
    return _decode32(c, fmt, scale)


def _decode32(c: np.ndarray, fmt: str, scale: float) -> np.ndarray:
    """Codes of `fmt` (already of its unsigned type) to float32."""
    if fmt == "fp32":
        return c.view(np.float32).copy()
    if fmt == "fp16":
        return c.view(np.float16).astype(np.float32)
    if fmt == "bf16":
        return (c.astype(np.uint32) << 16).view(np.float32)
    stored = c.view(_FP8[fmt]) if fmt in _FP8 else c.view(np.int8)
    with np.errstate(over="ignore", invalid="ignore"):
        return stored.astype(np.float32) * np.float32(scale)


def _masks(bits: np.ndarray, fmt: str) -> np.ndarray:
    """OR of 1 << bit over the last axis (k bits per value), validated against the width."""
    width = check_format(fmt)
    b = np.asarray(bits, dtype=np.int64)
    if b.size and (b.min() < 0 or b.max() >= width):
        raise HardenError(f"bit positions must be in 0..{width - 1} for {fmt}")
    if b.ndim == 0 or (b.ndim == 1):
        b = b.reshape(-1, 1) if b.ndim == 1 else b.reshape(1, 1)
    masks = np.zeros(b.shape[0], dtype=np.uint64)
    for j in range(b.shape[1]):
        masks |= np.uint64(1) << b[:, j].astype(np.uint64)
    return masks.astype(_UINT[fmt])


def _kind(values: np.ndarray) -> type:
    """The type faulty values are returned in: the values' own when a format stores them as they are (float16,
    a quantised graph's integers), else float32."""
    dtype = np.asarray(values).dtype
    return dtype.type if dtype in STORED.values() else np.float32


def flip(values: np.ndarray, bits: np.ndarray, fmt: str = "fp32", scale: float = 1.0) -> np.ndarray:
    """Flip bits: `bits` is (n,) for one bit per value or (n, k) for k-bit faults."""
    return decode(encode(values, fmt, scale) ^ _masks(bits, fmt), fmt, scale, _kind(values))


def stuck_at(values: np.ndarray, bits: np.ndarray, level: int, fmt: str = "fp32", scale: float = 1.0) -> np.ndarray:
    """Force bits to `level` (0 or 1); a bit already at that level leaves the value unchanged."""
    if level not in (0, 1):
        raise HardenError(f"stuck-at level must be 0 or 1, got {level}")
    codes, masks = encode(values, fmt, scale), _masks(bits, fmt)
    return decode(codes | masks if level else codes & ~masks, fmt, scale, _kind(values))


def quantise(values: np.ndarray, fmt: str = "fp32", scale: float = 1.0) -> np.ndarray:
    """The value as stored in `fmt` with no fault: what a flip is measured against."""
    return decode(encode(values, fmt, scale), fmt, scale, _kind(values))
