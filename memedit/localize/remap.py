"""Cross-attention remap: one closed-form edit of every cross-attention key and value map (memedit's own).

Neuron pruning removes a neuron for every prompt. On the lab the neurons that carry a memorized
image also carry everything else (memedit/lab/LAB.md), so pruning enough of them to stop the images
wrecks the model. This edits where the prompt enters the UNet instead: every cross-attention `to_k`
and `to_v` reads the same text-encoder output, so composing each weight W with one map M (W' = W M)
changes what every layer sees of a token embedding e to M e. M is the least-squares map that sends
the target prompts' token embeddings to the hold-out prompts' mean token at the same position while
keeping the hold-out prompts' tokens where they are:

    M = argmin  strength * mean_hold ||M e - e||^2  +  mean_target ||M e - ebar_pos(e)||^2
      = (strength * G_hold + C) (strength * G_hold + G_target)^-1

with G the second moments of the token embeddings and C the cross moment of the targets with their
position's hold-out mean. The closed form is that of UCE (Gandikota et al. 2024), here aimed at
memorized prompts with a per-position neutral target, which keeps the start token, the same in every
prompt, where it is. It needs one text-encoder pass per prompt and no
UNet pass; applying stays data-free (one `add` delta per layer, digest-pinned). Higher `strength`
keeps more of the model and removes less; measured on the lab by benchmarks/remap_sweep.py.

The edited model is the base model behind a linear map of its conditioning, and M is invertible: an
embedding attacker who knows M (it follows from the recipe's prompts and a hold-out set) feeds
M^-1 e and gets the base model's behaviour back, which benchmarks/robustness.py measures. Against
that threat model the remap is no defence; it stops prompts, not embeddings. The ridge keeps M
well-conditioned: the plain fit amplifies directions no prompt uses (122x on the lab), which changes
no prompt's output but stalls gradient attacks, so that an attack would wrongly report the edit robust.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from memedit.errors import MemeditError
from memedit.model.cond import cross_tokens, encode
from memedit.trace import get_module


@dataclass(frozen=True)
class RemapSettings:
    # keeping hold-out tokens against moving target tokens (lab: at 3, 1 of 22 memorized prompts still reproduces)
    strength: float = 3.0
    # pull toward the identity, relative to the hold-out's token energy: keeps the directions no prompt
    # uses, where the plain fit amplified up to 122x on the lab and stalled the embedding attack
    ridge: float = 0.001


def key_value_layers(value_layers: Sequence[str]) -> list[str]:
    """The cross-attention key and value maps, in forward order (`attn2.to_k` before its `to_v`)."""
    return [n for v in value_layers for n in (v.removesuffix("to_v") + "to_k", v)]


@dataclass(frozen=True)
class Moments:
    """Token-embedding moments of a prompt set, summed so that they stream in batches."""

    gram: torch.Tensor  # (d, d) sum over prompts and positions of e e^T
    per_position: torch.Tensor  # (tokens, d) sum over prompts
    prompts: int

    @property
    def tokens(self) -> int:
        return self.prompts * self.per_position.shape[0]


@torch.no_grad()
def moments(pipe, prompts: Sequence[str], batch: int = 32) -> Moments:
    gram, pos, n = None, None, 0
    for i in range(0, len(prompts), batch):
        e = cross_tokens(pipe.unet, encode(pipe, list(prompts[i : i + batch]))).cpu().double()
        g, p = torch.einsum("ntd,nte->de", e, e), e.sum(0)
        gram, pos = (g, p) if gram is None else (gram + g, pos + p)
        n += e.shape[0]
    return Moments(gram, pos, n)


def embedding_map(targets: Moments, holdout: Moments, strength: float, ridge: float = 0.0) -> torch.Tensor:
    """(d, d) float64 M from the token-embedding moments of the target and hold-out prompts; `ridge`
    adds ridge * ||M - I||^2 (scaled by the hold-out's mean token energy per dimension), which keeps
    directions that neither prompt set uses where they are."""
    g_h = holdout.gram / holdout.tokens
    g_t = targets.gram / targets.tokens
    mean_h = holdout.per_position / holdout.prompts  # the hold-out's average token at each position
    cross = torch.einsum("td,te->de", mean_h, targets.per_position) / targets.tokens
    eye = torch.eye(g_h.shape[0], dtype=g_h.dtype) * (ridge * torch.trace(g_h) / g_h.shape[0])
    lhs = strength * g_h + g_t + eye  # symmetric: M lhs = rhs  <=>  lhs M^T = rhs^T
    return solve_fit(lhs, (strength * g_h + cross + eye).T).T


def solve_fit(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """lhs^-1 rhs for the closed-form fits (remap, encoder). lhs is a sum of second moments: without a
    ridge it is singular when the prompts span fewer directions than the keys have, which is a
    question of the inputs, not a crash."""
    try:
        out = torch.linalg.solve(lhs, rhs)
    except torch.linalg.LinAlgError:
        out = None
    if out is None or not bool(torch.isfinite(out).all()):
        raise MemeditError(
            "the closed-form fit is singular: the target and hold-out prompts do not span the "
            f"{lhs.shape[0]} directions it solves for",
            "keep --ridge above 0 (default 0.001), or give more hold-out prompts",
        )
    return out


def prompt_map(pipe, targets: Sequence[str], holdout: Sequence[str], settings: RemapSettings) -> torch.Tensor:
    """(d, d) float64 M for these prompts: what every key and value map's input goes through."""
    return embedding_map(moments(pipe, targets), moments(pipe, holdout), settings.strength, settings.ridge)


@torch.no_grad()
def deltas(
    pipe, value_layers: Sequence[str], targets: Sequence[str], holdout: Sequence[str], settings: RemapSettings
) -> dict[str, torch.Tensor]:
    """{layer: W (M - I) as float32} for every cross-attention key and value map."""
    m = prompt_map(pipe, targets, holdout, settings)
    eye = torch.eye(m.shape[0], dtype=torch.float64)
    out = {}
    for n in key_value_layers(value_layers):
        w = get_module(pipe.unet, n).weight.detach().cpu().double()
        out[n] = (w @ (m - eye)).float()
    return out
