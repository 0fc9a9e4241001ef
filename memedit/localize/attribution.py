"""Value neurons by loss attribution: one joint set for all target prompts (memedit's own method).

NeMo ranks value neurons by how unusual their activation is. On the lab those outliers are not what
carries an image (memedit/lab/LAB.md: |z| needs 75% of every value layer for the median prompt, loss
attribution 20%). This asks the model instead: every value neuron's output is scaled by a gate g,
and a neuron's score for a prompt is -dL/dg at g = 1, the first-order rise of the prompt's denoising
loss when the neuron is zeroed. The loss is taken toward the image the model itself generates for
the prompt: a memorized prompt gives the same image at every seed, so no training image is needed.
Scores are normalized per prompt (unit L1, so every prompt counts equally), averaged over the target
prompts, and the top neurons over all value layers are taken `step` at a time, the scores recomputed
with the neurons chosen so far zeroed (first-order estimates go stale as neurons go), until `share`
of all value neurons are chosen. Measured on the lab by benchmarks/attribution_edit.py.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from memedit.ablate import ablated
from memedit.attack import denoising_target, reference_latent
from memedit.model.cond import encode, unet_kwargs
from memedit.trace import get_module


@dataclass(frozen=True)
class AttributionSettings:
    share: float = 0.1  # of all value neurons (lab: 109 of 1,088 stop 17 of 21 prompts)
    step: float = 0.025  # share added between two recomputations of the scores
    samples: int = 32  # noise/timestep draws per score


@dataclass(frozen=True)
class Target:
    id: int  # the prompt's id in the recipe
    prompt: str
    image: np.ndarray  # uint8 RGB at the model's resolution


def taylor_scores(
    pipe, layers: Sequence[str], prompt: str, image: np.ndarray, samples: int = 64, batch: int = 16, seed: int = 0
) -> dict[str, torch.Tensor]:
    """{layer: (neurons,) float64} = -dL/dg at g = 1, where g scales each value neuron's output and L
    is the prompt's denoising loss toward `image` (fresh timestep and noise per sample, seeded): the
    first-order change of L when the neuron is zeroed. Larger = the neuron matters more to the image."""
    unet, sched = pipe.unet, pipe.scheduler
    unet.requires_grad_(False)
    lat = reference_latent(pipe, image).float()
    emb = encode(pipe, [prompt]).detach()
    gates = {n: torch.ones(get_module(unet, n).out_features, requires_grad=True) for n in layers}
    handles = [
        get_module(unet, n).register_forward_hook(lambda _m, _i, out, g=gates[n]: out * g.to(out.device, out.dtype))
        for n in layers
    ]
    gen = torch.Generator("cpu").manual_seed(seed)
    alphas = sched.alphas_cumprod.float()
    try:
        for start in range(0, samples, batch):
            b = min(batch, samples - start)
            noise = torch.randn((b, *lat.shape[1:]), generator=gen)
            t = torch.randint(0, len(alphas), (b,), generator=gen)
            a = alphas[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * lat.cpu() + (1 - a).sqrt() * noise
            dev = unet.device
            xt = xt.to(dev, unet.dtype)
            pred = unet(xt, t.to(dev), **unet_kwargs(unet, emb.expand(b, -1, -1), xt, pipe.vae_scale_factor)).sample
            target = denoising_target(sched, lat.cpu(), noise, a).to(dev)
            # summed over batches, so the estimate does not depend on the batch split
            loss = torch.nn.functional.mse_loss(pred.float(), target) * b / samples
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    return {n: -g.grad.detach().double().cpu() for n, g in gates.items()}


def self_images(pipe, prompts: Sequence[str], seed: int, steps: int, guidance: float) -> list[np.ndarray]:
    """The model's own generation of each prompt at one seed: the attribution target."""
    from memedit.generate import GenSettings, generate

    return list(generate(pipe, list(prompts), GenSettings(seeds=(seed,), steps=steps, guidance=guidance))[:, 0])


def rows_of(order: Sequence[int], layers: Sequence[str], widths: Sequence[int]) -> dict[str, list[int]]:
    """Flat neuron indices (layers concatenated in `layers` order) -> {layer: rows}."""
    offsets = np.cumsum([0, *widths])
    out: dict[str, list[int]] = {n: [] for n in layers}
    for j in order:
        k = int(np.searchsorted(offsets, j, side="right")) - 1
        out[layers[k]].append(int(j - offsets[k]))
    return out


def greedy_order(
    pipe,
    layers: Sequence[str],
    targets: Sequence[Target],
    budget: int,
    step: int,
    samples: int = 32,
    penalty: float = 0.0,
    holdout: Sequence[tuple[str, np.ndarray]] = (),
    stops: Sequence[int] = (),
    removed: Callable[[dict[str, list[int]]], contextlib.AbstractContextManager] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[int], dict[int, list[int]]]:
    """(flat neuron indices in the order chosen, {index: ids of the target prompts whose own score for
    it was positive when it was chosen}). The scores are recomputed every `step` neurons, counted
    afresh from every budget in `stops`, so each prefix ending at a stop is the set that a run with that
    budget and no stops chooses.
    `removed(rows)` is how chosen neurons are taken out while scoring (default: zeroed)."""
    unet = pipe.unet
    widths = [get_module(unet, n).out_features for n in layers]
    removed = removed or (lambda rows: ablated(unet, rows))

    def flat(scores: dict[str, torch.Tensor]) -> np.ndarray:
        v = torch.cat([scores[n] for n in layers]).numpy()
        return v / max(float(np.abs(v).sum()), 1e-30)

    chosen: list[int] = []
    caused: dict[int, list[int]] = {}
    bounds, pos = [], 0
    for stop in sorted({*(s for s in stops if 0 < s < budget), budget}):
        while pos < stop:
            pos = min(pos + step, stop)
            bounds.append(pos)
    for b in bounds:
        with removed(rows_of(chosen, layers, widths)):
            per = np.stack([flat(taylor_scores(pipe, layers, t.prompt, t.image, samples)) for t in targets])
            score = per.mean(0)
            if penalty and holdout:
                held = np.mean([flat(taylor_scores(pipe, layers, p, img, samples)) for p, img in holdout], 0)
                score = score - penalty * held
        score[chosen] = -np.inf
        new = np.argsort(-score, kind="stable")[: b - len(chosen)].tolist()
        for j in new:
            caused[j] = [t.id for t, row in zip(targets, per, strict=True) if row[j] > 0]
        chosen += new
        if progress:
            progress(len(chosen), budget)
    return chosen, caused


def select(
    pipe, layers: Sequence[str], targets: Sequence[Target], settings: AttributionSettings, progress=None
) -> dict[str, dict[int, list[int]]]:
    """{layer: {row: prompt ids}}, the shape of nemo.merge: `settings.share` of all value neurons."""
    widths = [get_module(pipe.unet, n).out_features for n in layers]
    total = sum(widths)
    budget = max(1, math.ceil(settings.share * total))
    step = max(1, math.ceil(settings.step * total))
    order, caused = greedy_order(pipe, layers, targets, budget, step, settings.samples, progress=progress)
    offsets = np.cumsum([0, *widths])
    out: dict[str, dict[int, list[int]]] = {}
    for j in order:
        k = int(np.searchsorted(offsets, j, side="right")) - 1
        out.setdefault(layers[k], {})[int(j - offsets[k])] = caused[j]
    return out
