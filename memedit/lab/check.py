"""`memedit lab check`: does the lab memorize what it should, and only that?

Generates every lab prompt with several seeds (DDIM, classifier-free guidance 7.5 as in SD) and
measures SSIM (scikit-image) at the lab resolution:
- memorized prompts: SSIM of each generation to its training image, and the VAE reconstruction SSIM
  of that image (the ceiling any generation can reach through this autoencoder);
- every prompt: seed-to-seed similarity (mean pairwise SSIM; high = no diversity);
- non-memorized and novel prompts: the highest SSIM of each generation to any memorized image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from memedit.generate import (
    COPY_SSIM,
    LEAK_SSIM,
    GenSettings,
    diversity,
    generate,
    load_image,
    reproduction,
    ssim,
)


def lab_dir() -> Path:
    return Path(__file__).resolve().parent


def lab_root(model_dir: Path | None = None) -> Path:
    """The lab folder that holds a model's prompts/ and images/: the bundled one, or the folder that a
    `memedit lab train --out DIR` run wrote (DIR/model beside DIR/prompts and DIR/images)."""
    if model_dir is not None and (Path(model_dir).parent / "prompts" / "memorized.jsonl").is_file():
        return Path(model_dir).parent
    return lab_dir()


def read_prompts(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_lab_pipeline(model_dir: Path | None = None):
    from memedit.model.load import load_pipeline
    from memedit.model.ref import resolve

    return load_pipeline(resolve(str(model_dir or lab_dir() / "model")))


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, R, R) in [-1, 1] -> (R, R, 3) uint8, the form generated and training images are compared in."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


@torch.no_grad()
def vae_roundtrip(vae, img: np.ndarray) -> np.ndarray:
    """An (R, R, 3) uint8 image encoded by `vae` and decoded from the latent mean, as generation decodes."""
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].to(vae.dtype) / 127.5 - 1
    return to_uint8(vae.decode(vae.encode(x).latent_dist.mean).sample[0])


def check_lab(model_dir: Path | None = None, settings: GenSettings | None = None, quiet: bool = False) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    settings = settings or GenSettings()
    root = lab_root(model_dir)
    model_dir = model_dir or root / "model"
    pipe = load_lab_pipeline(model_dir)
    sets = {n: read_prompts(root / "prompts" / f"{n}.jsonl") for n in ("memorized", "nonmemorized", "novel")}
    refs = {p.name: load_image(p) for p in sorted((root / "images").glob("*.png"))}
    total = sum(len(v) for v in sets.values()) * len(settings.seeds)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=quiet,
    ) as prog:
        task = prog.add_task("lab check: generating", total=total)
        gens = {
            n: generate(pipe, [r["prompt"] for r in rows], settings, lambda k: prog.advance(task, k))
            for n, rows in sets.items()
        }

    mem_rows = []
    for row, imgs in zip(sets["memorized"], gens["memorized"], strict=True):
        reproduces, scores = reproduction(imgs, refs[row["image"]])
        mem_rows.append(
            {
                "prompt": row["prompt"],
                "kind": row["kind"],
                "image": row["image"],
                "ssim": scores,
                "reproduces": reproduces,
                "diversity": diversity(imgs),
            }
        )
    ceiling = {name: ssim(vae_roundtrip(pipe.vae, img), img) for name, img in refs.items()}
    for r in mem_rows:
        r["vae_ceiling"] = ceiling[r["image"]]
        r["ssim_vs_ceiling"] = float(np.mean(r["ssim"])) / ceiling[r["image"]]

    other = {}
    for name in ("nonmemorized", "novel"):
        best = [max(ssim(g, ref) for ref in refs.values()) for imgs in gens[name] for g in imgs]
        other[name] = {
            "generations": len(best),
            "max_ssim_to_memorized_mean": float(np.mean(best)),
            "share_below_leak_threshold": float(np.mean([b < LEAK_SSIM for b in best])),
            "diversity_mean": float(np.mean([diversity(imgs) for imgs in gens[name]])),
        }
    per_kind = {
        k: float(np.mean([r["reproduces"] for r in mem_rows if r["kind"] == k]))
        for k in sorted({r["kind"] for r in mem_rows})
    }
    summary = {
        "memorized_reproduction_rate": float(np.mean([r["reproduces"] for r in mem_rows])),
        "memorized_reproduction_rate_by_kind": per_kind,
        "memorized_mean_ssim": float(np.mean([np.mean(r["ssim"]) for r in mem_rows])),
        "memorized_diversity_mean": float(np.mean([r["diversity"] for r in mem_rows])),
        "vae_ceiling_mean": float(np.mean(list(ceiling.values()))),
        **{f"{n}_{k}": v for n, d in other.items() for k, v in d.items()},
    }
    targets = {
        "memorized >= 90% reproduce (SSIM >= 0.7, majority of seeds)": summary["memorized_reproduction_rate"] >= 0.9,
        "non-memorized: >= 95% of generations below 0.5 SSIM to every memorized image": other["nonmemorized"][
            "share_below_leak_threshold"
        ]
        >= 0.95,
        "novel: >= 95% of generations below 0.5 SSIM to every memorized image": other["novel"][
            "share_below_leak_threshold"
        ]
        >= 0.95,
    }
    return {
        "model": str(model_dir),
        "settings": {
            "seeds": list(settings.seeds),
            "steps": settings.steps,
            "guidance": settings.guidance,
            "scheduler": type(pipe.scheduler).__name__,
            "copy_ssim": COPY_SSIM,
            "leak_ssim": LEAK_SSIM,
        },
        "memorized": mem_rows,
        "vae_ceiling": ceiling,
        "summary": summary,
        "targets": targets,
        "passed": all(targets.values()),
    }
