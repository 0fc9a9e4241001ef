"""Shared by apply_speed.py and diff_speed.py: a random-weight UNet with the SD 1.5 config (fp16,
~1.7 GB) in its diffusers-folder and original single-file forms, a recipe for it, and timing of
child processes (wall time and peak RSS via GNU time)."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

MEMEDIT = [sys.executable, "-m", "memedit.cli"]


def setup(doc: str, prefix: str) -> tuple[argparse.Namespace, Path, list[tuple[str, Path]]]:
    """The speed benchmarks' shared start: --work/--repeats, the work folder, and both model forms."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="keeps the 1.7 GB models between runs")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    folder, single = make_models(work)
    return args, work, [("diffusers folder", folder), ("single file", single)]


def make_models(work: Path) -> tuple[Path, Path]:
    """A diffusers UNet folder and the same weights as an original single file (reused when present)."""
    import torch
    from diffusers import UNet2DConditionModel

    from memedit.io import save_tensors
    from memedit.model.keymap import unet_diffusers_to_ldm_map

    folder = work / "sd15-unet"
    single = work / "sd15-unet.safetensors"
    if (folder / "diffusion_pytorch_model.safetensors").is_file() and single.is_file():
        return folder, single
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(common.sd15_unet_config()).half()
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder, safe_serialization=True)
    sd = unet.state_dict()
    ldm = unet_diffusers_to_ldm_map(sd)
    save_tensors(single, {ldm[k]: v for k, v in sd.items()}, {"format": "pt"})
    return folder, single


def make_recipe(model: Path, path: Path) -> Path:
    """Zero 43 rows of the six down-block value layers and 466 columns of the mid-block FFN output."""
    from memedit.calibrate import model_digests
    from memedit.model.ref import resolve
    from memedit.recipe import Edit, Recipe, dump

    targets = [
        f"unet.down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2.to_v" for b in range(3) for a in range(2)
    ]
    edits = [Edit("manual", t, "zero_rows", tuple(range(0, 300, 7))) for t in targets]
    edits.append(
        Edit(
            "manual",
            "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2",
            "zero_cols",
            tuple(range(0, 5120, 11)),
        )
    )
    r = Recipe(model={"ref": str(model), "files": model_digests(resolve(str(model)))}, edits=tuple(edits))
    return dump(r, path)


def weights_file(model: Path) -> Path:
    return model / "diffusion_pytorch_model.safetensors" if model.is_dir() else model


def edited(model: Path, work: Path) -> tuple[Path, Path]:
    """(recipe, applied output) for a model, applying once when the output is missing."""
    recipe = make_recipe(model, work / f"recipe-{model.name}.yaml")
    out = work / f"out-{model.name}"
    if not (out / "memedit.provenance.json").is_file():
        subprocess.run([*MEMEDIT, "apply", str(recipe), "-o", str(out), "--overwrite"], check=True, capture_output=True)
    return recipe, out


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB of the child) via GNU time when present, else wall only."""
    t0 = time.perf_counter()
    if shutil.which("/usr/bin/time"):
        p = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, check=True)
        rss = float(p.stderr.strip().splitlines()[-1]) / 1024
    else:
        subprocess.run(cmd, capture_output=True, check=True)
        rss = float("nan")
    return time.perf_counter() - t0, rss


def interleaved(cmds: dict[str, list[str]], repeats: int) -> dict[str, tuple[float, float]]:
    """Best wall time and worst peak RSS of each command, the commands taking turns in every round so
    that a slow spell of a shared machine hits all of them alike."""
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
    for _ in range(repeats):
        for k, cmd in cmds.items():
            runs[k].append(timed(cmd))
    return {k: (min(r[0] for r in v), max(r[1] for r in v)) for k, v in runs.items()}
