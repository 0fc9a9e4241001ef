"""How long `memedit lab train` would take on this machine, in a few minutes instead of two hours.

The lab must train from scratch on 2 CPU cores within 90 minutes (LAB.md), and a CPU's speed varies
from machine to machine and day to day. This runs every stage of the real training code on the real
config for K steps, timing each step (the interval between consecutive steps, so that model
construction, caption encoding and warm-up stay out of the rate), and estimates a whole run as

    data + sum over stages of (the K-step run's wall time + remaining steps * median s/step)

and, as a slower bound, the same with each stage's 90th-percentile step. Both are printed next to the
90-minute budget. They are estimates from a few minutes of steps: a long run can be slower than its
first steps (LAB.md, Training, measured both), so the figure that counts is a timed `memedit lab
train`, whose `work/timings.json` records the same per-step rates for the whole run. Run it alone: two
torch jobs on two cores time each other.

    python benchmarks/lab_train_speed.py [--config memedit/lab/train.yaml] [--steps 30] [--name NAME]
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
    ap.add_argument("--steps", type=int, default=30, help="K: each stage runs K steps (at least 3).")
    ap.add_argument("--name", default="lab_train_speed", help="results/NAME.json")
    args = ap.parse_args()
    if args.steps < 3:
        ap.error("--steps must be at least 3 (a rate needs 2 intervals between steps)")
    quiet_libraries()

    from transformers import CLIPTokenizer

    from memedit.lab import train as lab

    cfg = lab.LabConfig.load(args.config)
    k = args.steps
    with tempfile.TemporaryDirectory(prefix="memedit-train-speed-") as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(lab.build_tokenizer_files(Path(tmp) / "tokenizer"))
    data_s, d = _timed(lab.build_data, cfg)
    clock = lab.StepClock()
    stages: dict[str, dict] = {}

    def measure(name: str, train, total: int):
        """K steps of one stage; returns the trained model, for the next stage."""
        wall, model = _timed(train, k)
        r = clock.rates(name)
        left = max(total - k, 0)
        stages[name] = {
            **dataclasses.asdict(r),
            "k_wall_s": wall,
            "total_steps": total,
            "estimate_min": (wall + left * r.median) / 60,
            "slow_estimate_min": (wall + left * r.p90) / 60,
        }
        return model

    replace = dataclasses.replace
    vae = measure(
        "autoencoder", lambda n: lab.train_vae(replace(cfg, vae_steps=n), d, True, clock=clock), cfg.vae_steps
    )
    te = measure(
        "text_encoder",
        lambda n: lab.train_text_encoder(replace(cfg, clip_steps=n), d, tokenizer, True, clock=clock),
        cfg.clip_steps,
    )
    measure(
        "unet",
        lambda n: lab.train_unet(replace(cfg, unet_steps=n), d, vae, te, tokenizer, True, clock=clock),
        cfg.unet_steps,
    )

    total_min = data_s / 60 + sum(s["estimate_min"] for s in stages.values())
    slow_min = data_s / 60 + sum(s["slow_estimate_min"] for s in stages.values())
    rows = [{"stage": "data", "minutes": data_s / 60, "slow minutes": data_s / 60}]
    rows += [
        {
            "stage": n,
            "s/step": s["median"],
            "p90 s/step": s["p90"],
            f"{k} steps s": s["k_wall_s"],
            "steps": s["total_steps"],
            "minutes": s["estimate_min"],
            "slow minutes": s["slow_estimate_min"],
        }
        for n, s in stages.items()
    ]
    rows.append({"stage": "whole run (estimate)", "minutes": total_min, "slow minutes": slow_min})
    common.table(rows, ["stage", "s/step", "p90 s/step", f"{k} steps s", "steps", "minutes", "slow minutes"])
    for label, est in (("estimate", total_min), ("slow estimate", slow_min)):
        verdict = "within" if est <= BUDGET_MIN else "OVER"
        print(f"{label} {est:.1f} min: {verdict} the {BUDGET_MIN:.0f}-minute budget (ratio {est / BUDGET_MIN:.2f})")
    print(f"peak RSS {common.peak_rss_mb():.0f} MB")
    common.write(
        args.name,
        {
            "config": str(args.config),
            "k_steps": k,
            "data_s": data_s,
            "stages": stages,
            "estimate_min": total_min,
            "slow_estimate_min": slow_min,
            "budget_min": BUDGET_MIN,
            "ratio_to_budget": total_min / BUDGET_MIN,
            "peak_rss_mb": common.peak_rss_mb(),
        },
    )


if __name__ == "__main__":
    main()
