"""How many autoencoder steps the lab needs: reconstruction quality and cost by step count.

The autoencoder stage is a third of a from-scratch `memedit lab train` on 2 CPU cores (LAB.md,
Training), and the lab must train within 90 minutes. This trains the lab's autoencoder with the real
training code and config at each step count asked for (the learning-rate schedule follows the count,
as a config with that `vae_steps` would) and measures what the rest of the lab depends on: the SSIM of
a round trip (encode, decode the mean) on the memorized photos (the ceiling of any generation's
similarity to its training image, which `memedit lab check` reports), on training scenes and on the
other photos' crops. The bundled lab's own autoencoder is the reference row.

    python benchmarks/lab_autoencoder.py [--steps 1000,2500] [--batch 64] [--config memedit/lab/train.yaml]
                                         [--name NAME]

--batch trains every row at that batch size instead of the config's (a step's cost scales with it).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from memedit._quiet import quiet_libraries

SAMPLES = 200  # scenes and photo crops measured per row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="1000,2500", help="Comma-separated autoencoder step counts.")
    ap.add_argument("--batch", type=int, default=None, help="Batch size of every row (default: the config's).")
    ap.add_argument("--config", type=Path, default=common.ROOT / "memedit/lab/train.yaml")
    ap.add_argument("--name", default="lab_autoencoder", help="results/NAME.json")
    args = ap.parse_args()
    try:
        counts = [int(x) for x in args.steps.split(",")]
    except ValueError:
        ap.error(f"--steps takes comma-separated whole numbers, not {args.steps!r}")
    if min(counts) < 1:
        ap.error("--steps: every count must be at least 1")
    if args.batch is not None and args.batch < 4:
        ap.error("--batch must be at least 4 (a batch holds memorized photos, scenes and crops)")
    quiet_libraries()

    from memedit.generate import ssim
    from memedit.lab import train as lab
    from memedit.lab.check import load_lab_pipeline, to_uint8, vae_roundtrip

    cfg = lab.LabConfig.load(args.config)
    if args.batch is not None:
        cfg = dataclasses.replace(cfg, vae_batch=args.batch)
    d = lab.build_data(cfg)
    sets = {"memorized": d.mem_images, "scenes": d.scene_images[:SAMPLES], "photos": d.extra_photos[:SAMPLES]}

    def row(label: str, vae, seconds: float | None, rate: float | None) -> dict:
        vae = vae.float().eval()
        r: dict = {"autoencoder": label, "minutes": seconds and seconds / 60, "s/step": rate}
        for name, images in sets.items():
            scores = [ssim(vae_roundtrip(vae, im), im) for im in map(to_uint8, images)]
            r[f"{name} mean"] = float(np.mean(scores))
            r[f"{name} min"] = float(np.min(scores))
        print(f"{label}: {', '.join(f'{k} {v:.3f}' for k, v in r.items() if isinstance(v, float))}", flush=True)
        return r

    rows = [row("bundled lab (shipped)", load_lab_pipeline().vae, None, None)]
    for n in counts:
        clock = lab.StepClock()
        t = time.perf_counter()
        vae = lab.train_vae(dataclasses.replace(cfg, vae_steps=n), d, True, clock=clock)
        seconds = time.perf_counter() - t
        rates = clock.rates("autoencoder")
        rows.append(row(f"{n} steps, batch {cfg.vae_batch}", vae, seconds, rates and rates.median))
    cols = ["autoencoder", "minutes", "s/step"] + [f"{s} {m}" for s in sets for m in ("mean", "min")]
    common.table(rows, cols)
    common.write(args.name, {"config": str(args.config), "batch": cfg.vae_batch, "samples": SAMPLES, "rows": rows})


if __name__ == "__main__":
    main()
