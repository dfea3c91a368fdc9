"""Known bit flips give known values in every format; null faults are exact."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harden.errors import HardenError
from harden.fi import bitflip


def test_fp32_sign_and_exponent_flips() -> None:
    v = np.array([1.0, -2.5, 0.0], dtype=np.float32)
    np.testing.assert_array_equal(bitflip.flip(v, np.array([31, 31, 30])), [-1.0, 2.5, 2.0])
    # Bit 30 of 1.0 (exponent MSB) gives 2**128 → +inf.
    assert bitflip.flip(np.float32([1.0]), np.array([30]))[0] == np.inf


def test_fp16_bf16_int8_known_values() -> None:
    one = np.float32([1.0])
    assert bitflip.flip(one, np.array([15]), "fp16")[0] == -1.0
    assert bitflip.flip(one, np.array([14]), "fp16")[0] == np.inf  # 0x3C00 ^ 0x4000 = 0x7C00
    assert bitflip.flip(one, np.array([15]), "bf16")[0] == -1.0
    assert bitflip.flip(np.float32([2.0]), np.array([6]), "bf16")[0] == 3.0  # mantissa MSB
    assert bitflip.flip(np.float32([2.0]), np.array([7]), "bf16")[0] == 4.0  # exponent LSB
    # int8 with scale 1: 3 = 0b00000011; flipping bit 7 gives -125.
    assert bitflip.flip(np.float32([3.0]), np.array([7]), "int8", scale=1.0)[0] == -125.0
    assert bitflip.flip(np.float32([3.0]), np.array([2]), "int8", scale=0.5)[0] == 1.0  # q = 6 ^ 4 = 2

def test_fp8_known_values_saturation_and_scale() -> None:
    one = np.float32([1.0])
    # E4M3: 1.0 = 0x38. Bit 6 (exponent MSB) gives 0x78 = 256; bit 7 the sign; 0x7F is its only NaN.
    assert bitflip.encode(one, "fp8-e4m3")[0] == 0x38
    assert bitflip.flip(one, np.array([6]), "fp8-e4m3")[0] == 256.0
    assert bitflip.flip(one, np.array([7]), "fp8-e4m3")[0] == -1.0
    assert np.isnan(bitflip.flip(np.float32([448.0]), np.array([0]), "fp8-e4m3")[0])  # 0x7E ^ 1 = 0x7F
    # E5M2: 1.0 = 0x3C. Bit 6 gives 0x7C = +inf, as in fp16, whose top byte E5M2 is.
    assert bitflip.flip(one, np.array([6]), "fp8-e5m2")[0] == np.inf
    assert bitflip.flip(one, np.array([1]), "fp8-e5m2")[0] == 1.5
    # Out of range saturates at the format's max instead of becoming NaN; a scale maps max|tensor| to it.
    assert bitflip.quantise(np.float32([1000.0]), "fp8-e4m3")[0] == 448.0
    w = np.float32([0.02, -0.5, 0.001])
    scale = bitflip.tensor_scale(w, "fp8-e4m3")
    assert scale == np.float32(0.5 / 448) and bitflip.quantise(w, "fp8-e4m3", scale)[1] == np.float32(-0.5)
    assert bitflip.tensor_scale(w, "fp16") == 1.0 and bitflip.peak_scale(2.0, "fp8-e5m2") == 2.0 / 57344


def test_multi_bit_and_stuck_at() -> None:
    v = np.float32([1.0, 1.0])
    np.testing.assert_array_equal(bitflip.flip(v, np.array([[31, 22], [31, 31 - 9]])), [-1.5, -1.5])
    assert bitflip.stuck_at(np.float32([1.0]), np.array([31]), 1)[0] == -1.0
    assert bitflip.stuck_at(np.float32([1.0]), np.array([31]), 0)[0] == 1.0  # already 0: masked


def test_bad_bits_and_formats_are_refused() -> None:
    with pytest.raises(HardenError):
        bitflip.flip(np.float32([1.0]), np.array([16]), "fp16")
    with pytest.raises(HardenError):
        bitflip.flip(np.float32([1.0]), np.array([0]), "fp8")


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(-2**31, 2**31 - 1), st.sampled_from(["int8", "uint8", "int32"]), st.data())
def test_a_stored_integer_flipped_twice_is_itself(x: int, fmt: str, data: st.DataObject) -> None:
    """A QDQ graph's stored integers: their own bits, in their own type, and no scale."""
    dtype = bitflip.STORED[fmt]
    v = np.array([x % 2**bitflip.WIDTH[fmt]], dtype=np.uint64).astype(bitflip._UINT[fmt]).view(dtype)
    bit = np.array([data.draw(st.integers(0, bitflip.WIDTH[fmt] - 1))])
    once = bitflip.flip(v, bit, fmt, 123.0)
    assert once.dtype == dtype and int(once.view(bitflip._UINT[fmt])[0]) == int(v.view(bitflip._UINT[fmt])[0]) ^ (
        1 << int(bit[0]))
    assert np.array_equal(bitflip.flip(once, bit, fmt), v)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.floats(width=32, allow_nan=False), st.sampled_from(sorted(bitflip.EMULATED)), st.data())
def test_flipping_twice_restores_the_stored_bits(x: float, fmt: str, data: st.DataObject) -> None:
    bit = data.draw(st.integers(0, bitflip.WIDTH[fmt] - 1))
    v = np.float32([x])
    scale = bitflip.tensor_scale(v, fmt)
    once = bitflip.flip(v, np.array([bit]), fmt, scale)
    if not np.isfinite(once).all():
        return  # NaN payloads, and int8's -128 × a huge scale, do not survive float32
    twice = bitflip.flip(once, np.array([bit]), fmt, scale)
    if not np.isfinite(twice).all():
        return  # int8 codes times a scale near FLT_MAX/127 can round past float32's range
    np.testing.assert_array_equal(bitflip.encode(twice, fmt, scale), bitflip.encode(v, fmt, scale))


def test_vectorised_matches_scalar_loop() -> None:
    rng = np.random.default_rng(0)
    v = rng.standard_normal(1000).astype(np.float32)
    bits = rng.integers(0, 32, 1000)
    fast = bitflip.flip(v, bits)
    slow = np.array([np.frombuffer((np.float32(x).view(np.uint32) ^ np.uint32(1 << int(b))).tobytes(), np.float32)[0]
                     for x, b in zip(v, bits)], dtype=np.float32)
    np.testing.assert_array_equal(fast.view(np.uint32), slow.view(np.uint32))
