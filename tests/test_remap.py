"""The closed-form cross-attention remap (localize --method remap): its algebra, on synthetic embeddings."""

from __future__ import annotations

import pytest
import torch

from memedit.errors import MemeditError
from memedit.localize.remap import Moments, embedding_map, key_value_layers


def _moments(e: torch.Tensor) -> Moments:
    return Moments(torch.einsum("ntd,nte->de", e, e), e.sum(0), e.shape[0])


@pytest.mark.parametrize("strength", [0.1, 1.0, 100.0])
def test_a_target_direction_apart_from_the_holdout_goes_to_the_holdout_mean_and_nothing_else_moves(strength):
    g = torch.Generator().manual_seed(0)
    hold = torch.zeros(30, 5, 4, dtype=torch.float64)
    hold[..., :3] = torch.randn(30, 5, 3, generator=g, dtype=torch.float64)  # spans the first 3 dimensions
    x = torch.tensor([0.0, 0.0, 0.0, 2.0], dtype=torch.float64)
    target = x.expand(3, 5, 4).clone()  # every token of every target prompt: the 4th dimension only
    m = embedding_map(_moments(target), _moments(hold), strength)
    torch.testing.assert_close(hold @ m.T, hold, rtol=0, atol=1e-10)
    torch.testing.assert_close(m @ x, hold.mean((0, 1)), rtol=0, atol=1e-10)


def test_targets_like_the_holdout_leave_the_map_near_identity_at_high_strength():
    g = torch.Generator().manual_seed(1)
    hold = torch.randn(50, 7, 6, generator=g, dtype=torch.float64)
    target = torch.randn(4, 7, 6, generator=g, dtype=torch.float64)
    eye = torch.eye(6, dtype=torch.float64)
    near = [(embedding_map(_moments(target), _moments(hold), s) - eye).norm() for s in (1.0, 10.0, 1000.0)]
    assert near[0] > near[1] > near[2] and near[2] < 1e-2


def test_key_value_layers_pair_each_value_map_with_its_key_map_in_order():
    names = ["down.0.attn2.to_v", "mid.attn2.to_v"]
    assert key_value_layers(names) == ["down.0.attn2.to_k", "down.0.attn2.to_v", "mid.attn2.to_k", "mid.attn2.to_v"]


def test_ridge_keeps_a_direction_no_prompt_uses_and_goes_to_the_identity():
    g = torch.Generator().manual_seed(2)
    hold = torch.zeros(40, 5, 4, dtype=torch.float64)
    hold[..., :3] = torch.randn(40, 5, 3, generator=g, dtype=torch.float64)
    target = torch.zeros(3, 5, 4, dtype=torch.float64)
    target[..., :3] = torch.randn(3, 5, 3, generator=g, dtype=torch.float64) + 2.0
    unused = torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)  # in no prompt: G is singular there
    m = embedding_map(_moments(target), _moments(hold), 3.0, ridge=1e-3)
    torch.testing.assert_close(m @ unused, unused, rtol=0, atol=1e-10)
    assert torch.linalg.svdvals(m).max() < 10
    far = embedding_map(_moments(target), _moments(hold), 3.0, ridge=1e6)
    torch.testing.assert_close(far, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-4)


def test_a_singular_fit_without_ridge_is_a_clear_error():
    hold = torch.zeros(10, 5, 4, dtype=torch.float64)
    hold[..., :2] = torch.randn(10, 5, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    target = hold[:2].clone()  # nothing uses dimensions 3 and 4: without a ridge they are undetermined
    with pytest.raises(MemeditError, match="singular") as e:
        embedding_map(_moments(target), _moments(hold), 3.0, ridge=0.0)
    assert "--ridge" in e.value.hint
    assert torch.isfinite(embedding_map(_moments(target), _moments(hold), 3.0, ridge=1e-3)).all()
