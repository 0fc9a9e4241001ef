"""Shared by the benchmarks: environment facts, JSON output, peak RSS. Each benchmark prints a table and
writes benchmarks/results/<name>.json so runs can be compared (as ratios where the machine is noisy)."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def environment() -> dict:
    from memedit import __version__

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "memedit": __version__,
        "commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "argv": sys.argv,
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(
        json.dumps(
            {"benchmark": name, "environment": environment(), **payload}, indent=2, sort_keys=True, default=float
        )
        + "\n"
    )
    print(f"wrote {path}")
    return path


def table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_cell(r.get(c)).ljust(widths[c]) for c in columns))


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "–" if v is None else str(v)


def sd15_unet_config() -> dict:
    return json.loads((ROOT / "memedit/model/configs/sd15_unet.json").read_text())


def sd15_text_encoder():
    """A CLIP ViT-L/14-shaped text encoder (SD 1.x's), random weights; build it under `torch.device`."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
        )
    )


def sd15_pipeline(dtype: torch.dtype, device: str):
    """A random-weight Stable Diffusion 1.5 pipeline of the real size: the UNet from its published
    config, the CLIP text encoder's shape with the real CLIP BPE vocabulary, the SD VAE, DDIM with
    SD 1.x's schedule. Random weights cost the same FLOPs and memory as trained ones."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from memedit.lab.train import make_scheduler_config

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(sd15_unet_config())
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=512,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=sd15_text_encoder(),
        tokenizer=CLIPTokenizer.from_pretrained(ROOT / "memedit/lab/model/tokenizer"),
        unet=unet,
        scheduler=DDIMScheduler.from_config(make_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
