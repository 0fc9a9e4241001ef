"""How long `memedit lab train` would take on this machine, in a few minutes instead of two hours.

The lab must train from scratch on 2 CPU cores within 90 minutes (LAB.md), and a CPU's speed varies
from machine to machine and day to day (the bundled lab's stages ran at 0.9 s per autoencoder step on
one day and 0.55 on another). This times each stage of the real training code on the real config:
data building once, then every stage twice, for K and for 2K steps, so that the difference is K
steps of steady-state training (model construction, caption encoding and warm-up cancel out). The
estimate of a whole run is

    data + fixed costs + vae_steps * autoencoder rate + clip_steps * text-encoder rate
                       + unet_steps * UNet rate

It is an estimate from measured rates, printed next to the 90-minute budget; the figure that counts
is a timed `memedit lab train` (LAB.md, Training). Run it alone: two torch jobs on two cores time
each other.

    python benchmarks/lab_train_speed.py [--config memedit/lab/train.yaml] [--steps 20] [--name NAME]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from memedit._quiet import quiet_libraries

BUDGET_MIN = 90.0


def _timed(fn, *args):
    """(wall seconds, what fn returned)"""
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=common.ROOT / "memedit/lab/train.yaml")
    ap.add_argument("--steps", type=int, default=20, help="K: each stage runs K and 2K steps.")
    ap.add_argument("--name", default="lab_train_speed", help="results/NAME.json")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    quiet_libraries()

    from transformers import CLIPTokenizer

    from memedit.lab import train as lab

    cfg = lab.LabConfig.load(args.config)
    k = args.steps
    with tempfile.TemporaryDirectory(prefix="memedit-train-speed-") as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(lab.build_tokenizer_files(Path(tmp) / "tokenizer"))
    data_s, d = _timed(lab.build_data, cfg)
    stages: dict[str, dict] = {}

    def measure(name: str, train, total: int):
        """K and 2K steps of one stage; returns the model of the longer run, for the next stage."""
        (short, _), (long, model) = _timed(train, k), _timed(train, 2 * k)
        rate = (long - short) / k
        fixed = max(short - k * rate, 0.0)
        stages[name] = {
            "s_per_step": rate,
            "fixed_s": fixed,
            "steps": total,
            "estimate_min": (fixed + total * rate) / 60,
        }
        return model

    replace = dataclasses.replace
    vae = measure("autoencoder", lambda n: lab.train_vae(replace(cfg, vae_steps=n), d, True), cfg.vae_steps)
    te = measure(
        "text encoder", lambda n: lab.train_text_encoder(replace(cfg, clip_steps=n), d, tokenizer, True), cfg.clip_steps
    )
    measure("UNet", lambda n: lab.train_unet(replace(cfg, unet_steps=n), d, vae, te, tokenizer, True), cfg.unet_steps)

    noisy = [n for n, s in stages.items() if s["s_per_step"] <= 0]
    if noisy:
        # 2K steps took no longer than K: warm-up and noise swamp the difference, and an estimate from
        # it would be meaningless (negative)
        sys.exit(f"error: {', '.join(noisy)}: {2 * k} steps ran no slower than {k}; use a larger --steps")
    total_min = data_s / 60 + sum(s["estimate_min"] for s in stages.values())
    rows = [{"stage": "data", "s/step": None, "fixed s": data_s, "steps": None, "minutes": data_s / 60}]
    rows += [
        {
            "stage": n,
            "s/step": s["s_per_step"],
            "fixed s": s["fixed_s"],
            "steps": s["steps"],
            "minutes": s["estimate_min"],
        }
        for n, s in stages.items()
    ]
    rows.append({"stage": "whole run (estimate)", "minutes": total_min})
    common.table(rows, ["stage", "s/step", "fixed s", "steps", "minutes"])
    verdict = "within" if total_min <= BUDGET_MIN else "OVER"
    ratio = total_min / BUDGET_MIN
    print(f"estimate {total_min:.1f} min: {verdict} the {BUDGET_MIN:.0f}-minute budget (ratio {ratio:.2f})")
    print(f"peak RSS {common.peak_rss_mb():.0f} MB")
    common.write(
        args.name,
        {
            "config": str(args.config),
            "k_steps": k,
            "data_s": data_s,
            "stages": stages,
            "estimate_min": total_min,
            "budget_min": BUDGET_MIN,
            "ratio_to_budget": ratio,
            "peak_rss_mb": common.peak_rss_mb(),
        },
    )


if __name__ == "__main__":
    main()
