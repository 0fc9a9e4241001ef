"""`memedit lab check`: does the lab memorize what it should, and only that?

Generates every lab prompt with several seeds (DDIM, classifier-free guidance 7.5 as in SD) and
measures SSIM (scikit-image) at the lab resolution:
- memorized prompts: SSIM of each generation to its training image, and the VAE reconstruction SSIM
  of that image (the ceiling any generation can reach through this autoencoder);
- every prompt: seed-to-seed similarity (mean pairwise SSIM; high = no diversity);
- non-memorized and novel prompts: the highest SSIM of each generation to any memorized image.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

COPY_SSIM = 0.7  # a generation at or above this SSIM to its training image counts as a reproduction
LEAK_SSIM = 0.5  # non-memorized generations must stay below this SSIM to every memorized image


@dataclass(frozen=True)
class GenSettings:
    seeds: tuple[int, ...] = (1000, 1001, 1002, 1003)
    steps: int = 50
    guidance: float = 7.5
    batch_size: int = 64


def lab_dir() -> Path:
    return Path(__file__).resolve().parent


def read_prompts(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_image(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    # 32 px images: a 7x7 window (the default) over RGB, uint8 range
    return float(structural_similarity(a, b, channel_axis=2, data_range=255))


def load_pipeline(model_dir: Path, dtype: torch.dtype = torch.float32):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate(pipe, prompts: list[str], settings: GenSettings, progress=None) -> np.ndarray:
    """uint8 images of shape (len(prompts), len(seeds), H, W, 3); seed s of a prompt is the same noise
    for every prompt and every model, so base and edited models can be compared image by image."""
    jobs = list(itertools.product(range(len(prompts)), range(len(settings.seeds))))
    out: list[np.ndarray | None] = [None] * len(jobs)
    for start in range(0, len(jobs), settings.batch_size):
        chunk = jobs[start : start + settings.batch_size]
        gens = [torch.Generator("cpu").manual_seed(settings.seeds[s]) for _, s in chunk]
        imgs = pipe(
            prompt=[prompts[p] for p, _ in chunk],
            generator=gens,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            output_type="np",
        ).images
        for k, img in enumerate(imgs):
            out[start + k] = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
        if progress is not None:
            progress(len(chunk))
    arr = np.stack(out)
    return arr.reshape(len(prompts), len(settings.seeds), *arr.shape[1:])


@torch.no_grad()
def vae_roundtrip(pipe, img: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(img).permute(2, 0, 1)[None].to(pipe.vae.dtype) / 127.5 - 1
    rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample[0]
    return ((rec.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def diversity(images: np.ndarray) -> float:
    pairs = list(itertools.combinations(range(len(images)), 2))
    return float(np.mean([ssim(images[i], images[j]) for i, j in pairs])) if pairs else float("nan")


def check_lab(model_dir: Path | None = None, settings: GenSettings | None = None, quiet: bool = False) -> dict:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    settings = settings or GenSettings()
    root = lab_dir()
    model_dir = model_dir or root / "model"
    pipe = load_pipeline(model_dir)
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
        ref = refs[row["image"]]
        scores = [ssim(g, ref) for g in imgs]
        mem_rows.append(
            {
                "prompt": row["prompt"],
                "kind": row["kind"],
                "image": row["image"],
                "ssim": scores,
                "reproduces": sum(s >= COPY_SSIM for s in scores) > len(scores) / 2,
                "diversity": diversity(imgs),
            }
        )
    ceiling = {name: ssim(vae_roundtrip(pipe, img), img) for name, img in refs.items()}
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
