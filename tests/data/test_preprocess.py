"""The model's declared preprocessing: channels, resize, normalisation, and its JSON record."""

import numpy as np
import pytest

from harden.data.preprocess import IMAGENET, Preprocess
from harden.errors import HardenError


def test_grey_to_rgb_resize_and_normalise() -> None:
    x = np.full((2, 1, 8, 8), 0.5, np.float32)
    out = Preprocess(channels=3, size=16, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0)).apply(x)
    assert out.shape == (2, 3, 16, 16) and out.dtype == np.float32
    np.testing.assert_allclose(out[:, 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[:, 1], 1.0, atol=1e-6)
    np.testing.assert_allclose(out[:, 2], 0.5, atol=1e-6)


def test_rgb_to_grey_uses_luminance() -> None:
    x = np.zeros((1, 3, 4, 4), np.float32)
    x[:, 1] = 1.0
    out = Preprocess(channels=1).apply(x)
    np.testing.assert_allclose(out, 0.587, atol=1e-6)


def test_json_round_trip_and_shape() -> None:
    p = Preprocess.from_json(IMAGENET.to_json())
    assert p == IMAGENET and p.input_shape((28, 28)) == (3, 224, 224)
    assert Preprocess(channels=1).input_shape((28, 28)) == (1, 28, 28)


@pytest.mark.parametrize("kwargs", [{"channels": 2}, {"std": (0.0,)}, {"channels": 3, "mean": (0.1, 0.2)}])
def test_invalid_preprocess(kwargs: dict) -> None:
    with pytest.raises(HardenError):
        Preprocess(**kwargs)


def test_malformed_records() -> None:
    with pytest.raises(HardenError):
        Preprocess.from_json("{not json")
    with pytest.raises(HardenError):
        Preprocess.from_dict({"channels": 1})
