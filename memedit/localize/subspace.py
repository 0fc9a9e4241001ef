"""Shared FFN subspace pruning (Chavhan et al. 2024; reference code ruchikachavhan/concept-prune).

One edit for all memorized prompts: for every `ff.net.2` (weight W, C x 4C), score each weight by
|W[i, j]| x U_M[j] (Wanda-style magnitude x input usage on the memorized group M), keep the top
floor(rho * 4C) per output row among units used more than on the empty reference prompt (U_M > U_B,
strict), and take the union of these masks over the first T_u UNet calls. Usage U[tau, j] is the
square root of the summed squares of unit-norm GEGLU rows (both CFG halves), recorded by calibrate.

The faithful edit is element-wise (recipe op `mask`, masks in the sidecar file). The structured
variant zeroes whole neurons (`zero_cols`): units selected in at least `min_rows` rows of the mask.

Example recipe block::

    - method: subspace
      target: unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2
      op: mask
      mask: {key: down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight, density: 0.0093}
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NAME, PRETTY, URL = "subspace", "Shared FFN subspace pruning", "https://arxiv.org/abs/2406.18566"


@dataclass(frozen=True)
class SubspaceSettings:
    rho: float = 0.01  # top fraction per output row
    steps: int = 10  # T_u: UNet calls unioned (at most what calibrate traced)
    vote: float = 0.0  # keep an entry flagged in more than vote * T_u steps (0 = any step)
    structured: bool = False
    min_rows: int = 1  # structured: a unit is cut when selected in at least this many rows


def usage(sums: torch.Tensor) -> torch.Tensor:
    return sums.double().clamp_min(0).sqrt()


def layer_mask(
    weight: torch.Tensor, u_mem: torch.Tensor, u_ref: torch.Tensor, settings: SubspaceSettings
) -> torch.Tensor:
    """weight: (C, 4C); u_mem, u_ref: (T, 4C) usage per call. Returns a bool mask of weight's shape."""
    w = weight.double().abs()
    k = math.floor(settings.rho * w.shape[1])
    steps = min(settings.steps, u_mem.shape[0])
    votes = torch.zeros(w.shape, dtype=torch.int32)
    if k == 0:
        return votes.bool()
    for tau in range(steps):
        s_m = w * u_mem[tau][None, :]
        s_b = w * u_ref[tau][None, :]
        top = torch.zeros_like(w, dtype=torch.bool)
        top.scatter_(1, torch.topk(s_m, k, dim=1).indices, True)
        votes += (top & (s_m > s_b)).int()
    return votes > settings.vote * steps


def select(
    weights: dict[str, torch.Tensor],
    prompt_sums: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    group: list[int],
    settings: SubspaceSettings,
) -> dict[str, torch.Tensor]:
    """Masks per layer from per-prompt usage sums (P, T, 4C) of the prompts in `group`.

    The empty reference is replayed once per prompt of the group, as in the reference code."""
    masks = {}
    for name, w in weights.items():
        u_m = usage(prompt_sums[name][group].double().sum(0))
        u_b = usage(reference[name].double() * len(group))
        masks[name] = layer_mask(w, u_m, u_b, settings)
    return masks


def structured_columns(mask: torch.Tensor, min_rows: int) -> list[int]:
    return (mask.sum(0) >= min_rows).nonzero().flatten().tolist()
