"""How local is the lab's memorization? Value neurons needed to stop each memorized prompt.

For each memorized prompt that reproduces its image, rank the value neurons of every layer by
|z| = |a - mu| / sigma against the hold-out prompts (NeMo's initial selection, no refinement), zero
the top fraction f of every layer for increasing f, and record the smallest f that stops the
reproduction (majority of seeds below SSIM 0.7). The same count of random neurons per layer is the
control. At a fixed 5% per layer it also reports the stop rates and the preservation of the union
edit on non-memorized prompts (SSIM between base and edited generations with the same seeds).

`ranking="taylor"` ranks by a first-order estimate of how much zeroing each neuron raises the
prompt's denoising loss toward its training image instead (an oracle that needs the image): it asks
whether *some* small set of value neurons carries the memorization when |z| finds none.
`ranking="taylor-self"` uses the model's own generation at the first seed as the target, which
needs no training image. `ranking="taylor-iter"` grows the set greedily: after each step the scores
are recomputed with the neurons chosen so far zeroed (first-order estimates go stale as neurons go).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from memedit.ablate import ablated
from memedit.generate import GenSettings, generate, load_image, reproduction, ssim
from memedit.lab.check import lab_root, load_lab_pipeline, read_prompts
from memedit.localize.attribution import taylor_scores
from memedit.trace import prompt_value_activations, value_layer_names

FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
RANKINGS = ("z", "taylor", "taylor-self", "taylor-iter")
# where taylor-iter recomputes its scores: every fraction tested, and finer below the fixed 5%
ITER_STEPS = tuple(sorted({*FRACTIONS, 0.03, 0.04}))


def holdout_stats(pipe, layers: list[str], prompts: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    acts = prompt_value_activations(pipe, prompts, layers)
    return {n: (a.mean(0), a.std(0).clamp_min(1e-12)) for n, a in acts.items()}


def top_rows(z: dict[str, torch.Tensor], frac: float) -> dict[str, list[int]]:
    return {n: torch.argsort(v, descending=True)[: math.ceil(frac * len(v))].tolist() for n, v in z.items()}


def iterative_taylor_rows(
    pipe, layers: list[str], prompt: str, image: np.ndarray, steps=ITER_STEPS, seed: int = 0
) -> dict[float, dict[str, list[int]]]:
    """{fraction: rows} for every fraction of `steps`, each set the previous one plus the top of
    the scores recomputed with the previous set zeroed (nested, same count per layer as top_rows)."""
    chosen: dict[str, list[int]] = {n: [] for n in layers}
    out = {}
    for f in sorted(steps):
        with ablated(pipe.unet, chosen):
            scores = taylor_scores(pipe, layers, prompt, image, seed=seed)
        for n, v in scores.items():
            taken = set(chosen[n])
            order = [i for i in torch.argsort(v, descending=True).tolist() if i not in taken]
            chosen[n] = chosen[n] + order[: math.ceil(f * len(v)) - len(taken)]
        out[f] = {n: list(v) for n, v in chosen.items()}
    return out


def random_rows(z: dict[str, torch.Tensor], frac: float, rng: np.random.Generator) -> dict[str, list[int]]:
    return {n: sorted(rng.choice(len(v), math.ceil(frac * len(v)), replace=False).tolist()) for n, v in z.items()}


def reproduces(pipe, prompt: str, ref: np.ndarray, settings: GenSettings) -> tuple[bool, float]:
    rep, scores = reproduction(generate(pipe, [prompt], settings)[0], ref)
    return rep, float(np.mean(scores))


def locality_study(
    model_dir: Path | None = None,
    settings: GenSettings | None = None,
    fixed_frac: float = 0.05,
    n_preserve: int = 25,
    seed: int = 0,
    holdout_file: Path | None = None,
    ranking: str = "z",
    progress=print,
) -> dict:
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {RANKINGS}, not {ranking!r}")
    settings = settings or GenSettings()
    root = lab_root(model_dir)
    pipe = load_lab_pipeline(model_dir)
    unet = pipe.unet
    layers = value_layer_names(unet)
    holdout_file = holdout_file or root / "prompts" / "holdout.jsonl"
    holdout = [r["prompt"] for r in read_prompts(holdout_file)]
    stats = holdout_stats(pipe, layers, holdout)
    sizes = {n: mu for n, (mu, _) in stats.items()}  # what random_rows needs: each layer's width
    mem = read_prompts(root / "prompts" / "memorized.jsonl")
    rng = np.random.default_rng(seed)
    tested = {*FRACTIONS, fixed_frac}
    rows = []
    for i, row in enumerate(mem):
        ref = load_image(root / "images" / row["image"])
        base_imgs = generate(pipe, [row["prompt"]], settings)[0]
        base_rep, scores = reproduction(base_imgs, ref)
        base_ssim = float(np.mean(scores))
        entry = {
            "prompt": row["prompt"],
            "kind": row["kind"],
            "image": row["image"],
            "base_ssim": base_ssim,
            "base_reproduces": base_rep,
        }
        if base_rep:
            if ranking == "z":
                act = prompt_value_activations(pipe, [row["prompt"]], layers)
                z = {n: ((act[n][0] - stats[n][0]) / stats[n][1]).abs() for n in layers}
                rows_at = {f: top_rows(z, f) for f in tested}
            else:
                target = ref if ranking in ("taylor", "taylor-iter") else base_imgs[0]
                if ranking == "taylor-iter":
                    steps = {*ITER_STEPS, fixed_frac}
                    rows_at = iterative_taylor_rows(pipe, layers, row["prompt"], target, steps, seed=seed)
                else:
                    z = taylor_scores(pipe, layers, row["prompt"], target, seed=seed)
                    rows_at = {f: top_rows(z, f) for f in tested}
            needed = None
            for f in FRACTIONS:
                with ablated(unet, rows_at[f]):
                    still, _ = reproduces(pipe, row["prompt"], ref, settings)
                if not still:
                    needed = f
                    break
            entry["top_fraction_needed"] = needed
            entry["neurons_needed"] = sum(len(v) for v in rows_at[needed].values()) if needed else None
            if needed is not None:
                with ablated(unet, random_rows(sizes, needed, rng)):
                    entry["random_same_count_stops"] = not reproduces(pipe, row["prompt"], ref, settings)[0]
            top5 = rows_at[fixed_frac]
            with ablated(unet, top5):
                entry["top5_stops"] = not reproduces(pipe, row["prompt"], ref, settings)[0]
            with ablated(unet, random_rows(sizes, fixed_frac, rng)):
                entry["random5_stops"] = not reproduces(pipe, row["prompt"], ref, settings)[0]
            entry["top5_rows"] = top5
        rows.append(entry)
        progress(f"[{i + 1}/{len(mem)}] {row['image']}: {entry.get('top_fraction_needed')}")

    # union of the fixed-fraction sets: one model-wide edit, measured on non-memorized prompts
    union: dict[str, set[int]] = {n: set() for n in layers}
    for e in rows:
        for n, idx in e.get("top5_rows", {}).items():
            union[n].update(idx)
    nonmem = [r["prompt"] for r in read_prompts(root / "prompts" / "nonmemorized.jsonl")][:n_preserve]
    pres_settings = replace(settings, batch_size=64)
    base = generate(pipe, nonmem, pres_settings)
    with ablated(unet, {n: sorted(v) for n, v in union.items()}):
        edited = generate(pipe, nonmem, pres_settings)
    preservation = float(
        np.mean([ssim(a, b) for pa, pb in zip(base, edited, strict=True) for a, b in zip(pa, pb, strict=True)])
    )
    total = sum(len(mu) for mu, _ in stats.values())
    reproducing = [e for e in rows if e["base_reproduces"]]
    needed = [e["top_fraction_needed"] for e in reproducing if e["top_fraction_needed"] is not None]
    for e in rows:
        e.pop("top5_rows", None)
    return {
        "layers": {n: len(stats[n][0]) for n in layers},
        "value_neurons_total": total,
        "settings": {
            "seeds": list(settings.seeds),
            "steps": settings.steps,
            "guidance": settings.guidance,
            "fractions": list(FRACTIONS),
            "fixed_fraction": fixed_frac,
            "ranking": ranking,
            "holdout_prompts": len(holdout),
            "holdout_file": str(holdout_file),
            "model": str(model_dir or root / "model"),
        },
        "prompts": rows,
        "summary": {
            "reproducing_prompts": len(reproducing),
            "median_top_fraction_needed": float(np.median(needed)) if needed else None,
            "never_stopped": sum(e["top_fraction_needed"] is None for e in reproducing),
            "random_same_count_stop_rate": float(
                np.mean(
                    [e["random_same_count_stops"] for e in reproducing if "random_same_count_stops" in e]
                    or [float("nan")]
                )
            ),
            "top5_stop_rate": float(np.mean([e["top5_stops"] for e in reproducing])) if reproducing else None,
            "random5_stop_rate": float(np.mean([e["random5_stops"] for e in reproducing])) if reproducing else None,
            "union5_neurons": sum(len(v) for v in union.values()),
            "union5_share": sum(len(v) for v in union.values()) / total,
            "union5_preservation_ssim": preservation,
        },
    }
