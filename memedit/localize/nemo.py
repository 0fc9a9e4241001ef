"""NeMo (Hintersdorf et al., NeurIPS 2024): per-prompt memorization neurons in cross-attention values.

Initial selection: per layer, neurons whose activation on the prompt is abnormal against the hold-out
statistics, |z| = |a - mu| / sigma > theta, plus the k largest |a| (for neurons with naturally large
variance); theta falls from 5.0 by 0.25 and k rises by 1 per round until the prompt is mitigated.
Refinement: greedy backward elimination, whole layers first (last to first), then single neurons,
keeping the prompt mitigated. Defaults follow the official code (methods/nemo.md).

memedit's oracle for the search is the Wen et al. first-step score on the prompt's fixed latents,
with both CFG branches through the edited UNet: mitigated = score below the detection threshold
calibrated on hold-out prompts. It replaces NeMo's first-step residual SSIM (one batched UNet call
either way); a drop in this score alone never counts as mitigation in memedit's reports, where
image similarity across seeds confirms it (see evaluate / the efficacy benchmark).

Example recipe block::

    - method: nemo
      target: unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v
      op: zero_rows
      indices: [25, 221]
      caused_by: {25: [0, 3], 221: [3]}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from memedit.ablate import ablated
from memedit.detect import DetectSettings, score_prompts
from memedit.model.cond import unconditional
from memedit.trace import prompt_value_activations

NAME, PRETTY, URL = "nemo", "NeMo", "https://arxiv.org/abs/2406.02366"


@dataclass(frozen=True)
class NemoSettings:
    theta_start: float = 5.0
    theta_step: float = 0.25
    theta_floor: float = 1.0
    k_step: int = 1
    layers: str = "down+mid"  # "down+mid" (the paper's 7 SD layers) or "all"
    refine: bool = True


@dataclass(frozen=True)
class PromptNeurons:
    prompt: str
    prompt_id: int
    neurons: dict[str, tuple[int, ...]]  # layer -> rows
    candidates: int
    theta: float
    k: int
    fallback: bool  # the search never reached the threshold
    score_before: float
    score_after: float
    oracle_calls: int
    unet_sample_forwards: int = field(default=0)


def searched_layers(layers: list[str], which: str) -> list[str]:
    if which == "all":
        return list(layers)
    return [n for n in layers if n.startswith(("down_blocks.", "mid_block."))]


def _accept(score: float, target: float, fallback: bool) -> bool:
    """Below the threshold; in fallback mode, no worse than the best score the search reached."""
    return score < target or (fallback and score <= target)


def _total(sets: dict[str, set[int]]) -> int:
    return sum(len(v) for v in sets.values())


def localize_prompt(
    pipe,
    prompt: str,
    prompt_id: int,
    layers: list[str],
    mu: dict[str, torch.Tensor],
    sigma: dict[str, torch.Tensor],
    threshold: float,
    detect: DetectSettings,
    settings: NemoSettings,
    empty: torch.Tensor | None = None,
) -> PromptNeurons:
    act = prompt_value_activations(pipe, [prompt], layers)
    z = {n: ((act[n][0] - mu[n]) / sigma[n]).abs() for n in layers}
    mag = {n: act[n][0].abs() for n in layers}
    calls = 0

    def score(sets: dict[str, set[int]]) -> float:
        nonlocal calls
        calls += 1
        with ablated(pipe.unet, {n: sorted(v) for n, v in sets.items() if v}):
            return float(score_prompts(pipe, [prompt], detect, empty).scores[0])

    before = score({})
    theta, k = settings.theta_start, 0
    cand: dict[str, set[int]] = {}
    s = before
    fallback = False
    while True:
        cand = {
            n: set((z[n] > theta).nonzero().flatten().tolist())
            | set(torch.argsort(mag[n], descending=True)[:k].tolist())
            for n in layers
        }
        s = score(cand)
        if s < threshold:
            target = threshold
            break
        if theta - settings.theta_step < settings.theta_floor:
            fallback, target = True, s  # NeMo's fallback: refine against the best score reached
            break
        theta -= settings.theta_step
        k += settings.k_step
    refined = {n: set(v) for n, v in cand.items()}
    if settings.refine:
        for n in reversed(layers):  # official order: last layer first
            if refined[n]:
                trial = {**refined, n: set()}
                if _accept(score(trial), target, fallback):
                    refined = trial
        for n in reversed(layers):
            for j in sorted(refined[n]):
                trial = {**refined, n: refined[n] - {j}}
                if _accept(score(trial), target, fallback):
                    refined = trial
    after = score(refined)
    return PromptNeurons(
        prompt,
        prompt_id,
        {n: tuple(sorted(v)) for n, v in refined.items() if v},
        _total(cand),
        theta,
        k,
        fallback,
        before,
        after,
        calls,
        calls * 2 * detect.generations,
    )


def localize(
    pipe,
    prompts: list[tuple[int, str]],
    layers: list[str],
    mu,
    sigma,
    threshold: float,
    detect: DetectSettings,
    settings: NemoSettings,
    progress: Callable[[int, int], None] | None = None,
) -> list[PromptNeurons]:
    empty = unconditional(pipe)
    out = []
    for i, (pid, p) in enumerate(prompts):
        out.append(localize_prompt(pipe, p, pid, layers, mu, sigma, threshold, detect, settings, empty))
        if progress:
            progress(i + 1, len(prompts))
    return out


def merge(found: list[PromptNeurons]) -> dict[str, dict[int, list[int]]]:
    """One model-wide edit: layer -> neuron -> prompt ids that selected it."""
    merged: dict[str, dict[int, list[int]]] = {}
    for f in found:
        for n, rows in f.neurons.items():
            for r in rows:
                merged.setdefault(n, {}).setdefault(r, []).append(f.prompt_id)
    return merged


def joint_refine(
    pipe, found: list[PromptNeurons], merged: dict[str, dict[int, list[int]]], threshold: float, detect: DetectSettings
) -> dict[str, dict[int, list[int]]]:
    """Shrink the union while every prompt stays below the threshold under the merged edit.

    Neurons cited by fewer prompts are tried first: they are the most likely to be redundant once
    other prompts' neurons are also zeroed. One batched UNet call per trial scores all prompts."""
    prompts = [f.prompt for f in found if f.score_after < threshold]
    if not prompts:
        return merged
    empty = unconditional(pipe)
    current = {n: dict(v) for n, v in merged.items()}

    def ok(sets: dict[str, dict[int, list[int]]]) -> bool:
        with ablated(pipe.unet, {n: sorted(v) for n, v in sets.items() if v}):
            return bool((score_prompts(pipe, prompts, detect, empty).scores < threshold).all())

    if not ok(current):
        return current
    order = sorted(
        ((len(ps), n, r) for n, v in current.items() for r, ps in v.items()), key=lambda x: (x[0], x[1], x[2])
    )
    for _, n, r in order:
        trial = {**current, n: {k: v for k, v in current[n].items() if k != r}}
        if ok(trial):
            current = trial
    return {n: v for n, v in current.items() if v}
