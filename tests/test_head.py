"""The text-guided head: torch vs the numpy reference, the logit-scale clamp, init modes, head.npz."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harden.errors import HardenError
from harden.head import LOGIT_SCALE_INIT, LOGIT_SCALE_MAX, HeadParams, TextGuidedHead


def _embeddings(c: int = 5, e: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(c, e)).astype(np.float32) * 3.0


def test_torch_head_matches_numpy_reference() -> None:
    torch.manual_seed(0)
    head = TextGuidedHead(12, _embeddings())
    with torch.no_grad():
        head.logit_scale.fill_(2.5)
    feats = np.random.default_rng(1).normal(size=(7, 12)).astype(np.float32)
    with torch.no_grad():
        got = head(torch.from_numpy(feats)).numpy()
    want = head.to_params([f"c{i}" for i in range(5)]).logits(feats)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    # each logit is exp(s)·cos, so it is bounded by exp(s)
    assert np.abs(got).max() <= math.exp(2.5) + 1e-4


def test_text_init_uses_unit_embedding_rows_and_clip_scale() -> None:
    emb = _embeddings()
    head = TextGuidedHead(4, emb, init="text")
    want = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    np.testing.assert_allclose(head.weight.detach().numpy(), want, atol=1e-6)
    assert float(head.logit_scale.detach()) == pytest.approx(LOGIT_SCALE_INIT)
    assert float(head.logit_scale.detach()) == pytest.approx(math.log(1 / 0.07))


def test_random_init_is_seeded_unit_rows_unrelated_to_text() -> None:
    emb = _embeddings()
    a = TextGuidedHead(4, emb, init="random", generator=torch.Generator().manual_seed(3)).weight.detach()
    b = TextGuidedHead(4, emb, init="random", generator=torch.Generator().manual_seed(3)).weight.detach()
    c = TextGuidedHead(4, emb, init="random", generator=torch.Generator().manual_seed(4)).weight.detach()
    assert torch.equal(a, b) and not torch.equal(a, c)
    np.testing.assert_allclose(a.norm(dim=1).numpy(), 1.0, atol=1e-6)
    text = TextGuidedHead(4, emb, init="text").weight.detach()
    assert not torch.allclose(a, text)


def test_logit_scale_is_clamped_at_log_100() -> None:
    head = TextGuidedHead(3, _embeddings(c=2, e=3))
    with torch.no_grad():
        head.logit_scale.fill_(10.0)  # exp(10) ≫ 100
        head.proj.weight.copy_(torch.eye(3))
        head.proj.bias.zero_()
        head.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]))
        out = head(torch.tensor([[5.0, 0.0, 0.0]]))
    np.testing.assert_allclose(out.numpy(), [[100.0, 0.0]], atol=1e-4)
    assert head.to_params(["a", "b"]).logit_scale == pytest.approx(LOGIT_SCALE_MAX)
    # the numpy reference clamps too, even for an unclamped head.npz
    params = head.to_params(["a", "b"])
    params.logit_scale = 10.0
    np.testing.assert_allclose(params.logits(np.array([[5.0, 0, 0]], np.float32)), [[100.0, 0.0]], atol=1e-4)


def test_unknown_init_and_bad_embeddings_are_refused() -> None:
    with pytest.raises(HardenError):
        TextGuidedHead(4, _embeddings(), init="zeros")
    with pytest.raises(HardenError):
        TextGuidedHead(4, np.zeros(8, np.float32))


def test_params_round_trip_through_head_npz(tmp_path) -> None:
    torch.manual_seed(0)
    head = TextGuidedHead(6, _embeddings())
    params = head.to_params([f"c{i}" for i in range(5)], embeddings_sha256="abc")
    params.save(tmp_path / "head.npz")
    back = HeadParams.load(tmp_path / "head.npz")
    assert back.classes == params.classes and back.embeddings_sha256 == "abc"
    rebuilt = TextGuidedHead.from_params(back)
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), head(x), atol=1e-6)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(HardenError):
        HeadParams.load(tmp_path / "bad.npz")
