"""Streaming apply and diff on a full-size model: a random-weight UNet with the SD 1.5 config (fp16,
~1.7 GB), in its diffusers folder and single-file forms, made by this script.

Times `memedit apply` (including every digest) against `cp` and `sha256sum` of the same file in the
same run (target: apply <= 1.0 x (cp + sha256sum)), `memedit diff` of base vs edited against
`sha256sum` of both files (target <= 1.0 x), and the peak RSS of each command (target <= 512 MB).

    python benchmarks/apply_speed.py [--work DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def make_models(work: Path) -> tuple[Path, Path]:
    """A diffusers UNet folder and the same weights as an original single file."""
    import torch
    from diffusers import UNet2DConditionModel

    from memedit.io import save_tensors
    from memedit.model.keymap import unet_diffusers_to_ldm_map

    folder = work / "sd15-unet"
    single = work / "sd15-unet.safetensors"
    if (folder / "diffusion_pytorch_model.safetensors").is_file() and single.is_file():
        return folder, single
    cfg = json.loads((Path(__file__).resolve().parent.parent / "memedit/model/configs/sd15_unet.json").read_text())
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(cfg).half()
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder, safe_serialization=True)
    sd = unet.state_dict()
    ldm = unet_diffusers_to_ldm_map(sd)
    save_tensors(single, {ldm[k]: v for k, v in sd.items()}, {"format": "pt"})
    return folder, single


def make_recipe(model: Path, path: Path) -> Path:
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


def best(cmd: list[str], repeats: int, before=None) -> tuple[float, float]:
    runs = []
    for _ in range(repeats):
        if before:
            before()
        runs.append(timed(cmd))
    return min(r[0] for r in runs), max(r[1] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="memedit-apply-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    folder, single = make_models(work)
    memedit = [sys.executable, "-m", "memedit.cli"]
    rows = []
    for label, model, weights in (
        ("diffusers folder", folder, folder / "diffusion_pytorch_model.safetensors"),
        ("single file", single, single),
    ):
        recipe = make_recipe(model, work / f"recipe-{model.name}.yaml")
        out = work / f"out-{model.name}"
        cp_s, _ = best(["cp", str(weights), str(work / "copy.bin")], args.repeats)
        sha_s, _ = best(["sha256sum", str(weights)], args.repeats)
        apply_s, apply_rss = best([*memedit, "apply", str(recipe), "-o", str(out), "--overwrite"], args.repeats)
        edited = out / weights.name
        sha2_s, _ = best(["sha256sum", str(weights), str(edited)], args.repeats)
        diff_s, diff_rss = best(
            [
                *memedit,
                "diff",
                str(model),
                str(out if model.is_dir() else edited),
                "--recipe",
                str(recipe),
                "--summary",
            ],
            args.repeats,
        )
        size_gb = weights.stat().st_size / 1e9
        rows.append(
            {
                "input": label,
                "GB": size_gb,
                "apply_s": apply_s,
                "cp_s": cp_s,
                "sha256_s": sha_s,
                "apply_ratio": apply_s / (cp_s + sha_s),
                "apply_rss_mb": apply_rss,
                "diff_s": diff_s,
                "sha256_both_s": sha2_s,
                "diff_ratio": diff_s / sha2_s,
                "diff_rss_mb": diff_rss,
            }
        )
        (work / "copy.bin").unlink(missing_ok=True)
    common.table(rows, list(rows[0]))
    print("targets: apply_ratio <= 1.0, diff_ratio <= 1.0, RSS <= 512 MB")
    common.write("apply_speed", {"rows": rows})


if __name__ == "__main__":
    main()
