"""How local is the lab's memorization? (issues: lab, lab locality)

Zeroes the top value neurons of every layer by |z| against the hold-out prompts (NeMo's initial
selection, no refinement) at growing fractions until each memorized prompt stops reproducing, with
the same count of random neurons as the control; then the fixed 5% per layer: stop rates of top
vs random, and preservation of the union of all prompts' 5% sets on non-memorized prompts.

    python benchmarks/lab_locality.py [--seeds 4] [--steps 50] [--model DIR] [--holdout FILE] [--name NAME]
                                      [--ranking z|taylor|taylor-self|taylor-iter]

--model takes a trained lab (the model/ folder of `memedit lab train --out DIR`; its prompts and
images are read from DIR); --name keeps the results of several variants apart. --ranking taylor ranks
neurons by how much zeroing them raises the denoising loss toward the training image (first order),
an oracle for "does any small set of value neurons carry the image?"; taylor-self uses the model's
own first-seed generation instead of the training image; taylor-iter recomputes the scores after
each step with the neurons chosen so far zeroed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from memedit._quiet import quiet_libraries


def main() -> None:
    quiet_libraries()
    from memedit.generate import GenSettings
    from memedit.lab.locality import RANKINGS, locality_study

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--model", type=Path, default=None, help="a lab model folder (default: the bundled lab)")
    ap.add_argument("--holdout", type=Path, default=None, help="hold-out prompts for mu/sigma (default: the lab's)")
    ap.add_argument("--name", default="lab_locality", help="results/NAME.json")
    ap.add_argument("--ranking", default="z", choices=list(RANKINGS), help="how value neurons are ranked")
    args = ap.parse_args()
    res = locality_study(
        model_dir=args.model,
        settings=GenSettings(seeds=tuple(range(1000, 1000 + args.seeds)), steps=args.steps),
        holdout_file=args.holdout,
        ranking=args.ranking,
    )
    rows = [
        {
            "image": p["image"],
            "kind": p["kind"],
            "base_ssim": p["base_ssim"],
            "reproduces": p["base_reproduces"],
            "top_fraction_needed": p.get("top_fraction_needed"),
            "neurons_needed": p.get("neurons_needed"),
            "random_same_count_stops": p.get("random_same_count_stops"),
            "top5_stops": p.get("top5_stops"),
            "random5_stops": p.get("random5_stops"),
        }
        for p in res["prompts"]
    ]
    common.table(rows, list(rows[0]))
    print(f"\nvalue layers: {res['layers']} ({res['value_neurons_total']} neurons)")
    for k, v in res["summary"].items():
        print(f"{k}: {v}")
    s = res["summary"]
    print(
        f"\ntarget (SD-like locality): top 5% stops >= 0.80 -> {s['top5_stop_rate']}; random 5% stops <= 0.20 -> "
        f"{s['random5_stop_rate']}; union preservation >= 0.85 -> {s['union5_preservation_ssim']:.3f}"
    )
    common.write(args.name, res)


if __name__ == "__main__":
    main()
