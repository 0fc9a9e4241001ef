"""One value-neuron edit for all memorized prompts, chosen by loss attribution (issues: localize, lab locality)

`lab_locality.py --ranking taylor-iter` showed that each memorized prompt of the lab stops with about a
fifth of every value layer chosen by loss attribution, a set that random neurons of the same count
never match, but that the union of per-prompt sets wrecks the model. This asks whether a *joint*
selection does better: one greedy set over all value layers, scored by the mean normalized
attribution over the memorized prompts minus `lam` times the mean over hold-out prompts (each
normalized to unit L1, so that every prompt counts equally and neurons that every prompt needs are
held back), with the scores recomputed every `--every` neurons with the chosen set zeroed. At each
budget: memorized prompts still reproducing (majority of seeds >= SSIM 0.7 to the training image),
the same count of random value neurons, and preservation SSIM on non-memorized prompts.

`--target self` (default) attributes toward the model's own first-seed generation of each prompt,
which needs no training image (a product could do this); `--target train` uses the training images.
`--fill mean` replaces each zeroed neuron by its mean over the hold-out prompts instead of zero: a
constant value channel leaves the attention output constant in that channel whatever the weights,
so the row is zeroed and `to_out.0.weight[:, j] * mean_j` is added to the output bias, an exact weight
edit (mean ablation) that keeps what every prompt gets from the neuron and removes only what varies.

    python benchmarks/attribution_edit.py [--budgets 27,54,109,218] [--lams 0,1] [--target self|train]
                                          [--fill zero|mean]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from memedit._quiet import quiet_libraries


def main() -> None:
    quiet_libraries()

    import numpy as np
    import torch

    from memedit.ablate import ablated
    from memedit.generate import GenSettings, generate, load_image, reproduction, ssim
    from memedit.lab.check import lab_root, load_lab_pipeline, read_prompts
    from memedit.localize.attribution import Target, greedy_order, rows_of
    from memedit.model.cond import encode
    from memedit.trace import value_layer_names

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="27,54,109,218", help="value neurons zeroed, comma-separated")
    ap.add_argument("--lams", default="0,1", help="weights of the hold-out penalty, comma-separated")
    ap.add_argument("--target", default="self", choices=["self", "train"])
    ap.add_argument("--fill", default="zero", choices=["zero", "mean"], help="what a removed neuron outputs")
    ap.add_argument("--every", type=int, default=27, help="neurons added between score recomputations")
    ap.add_argument("--holdout-n", type=int, default=16, help="hold-out prompts in the penalty")
    ap.add_argument("--preserve-n", type=int, default=25, help="non-memorized prompts for preservation")
    ap.add_argument("--samples", type=int, default=32, help="noise/timestep draws per attribution")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--model", type=Path, default=None, help="a lab model folder (default: the bundled lab)")
    ap.add_argument("--name", default="attribution_edit", help="results/NAME.json")
    args = ap.parse_args()
    budgets = sorted(int(b) for b in args.budgets.split(","))
    lams = [float(x) for x in args.lams.split(",")]

    settings = GenSettings(seeds=tuple(range(1000, 1000 + args.seeds)), steps=args.steps)
    root = lab_root(args.model)
    pipe = load_lab_pipeline(args.model)
    unet = pipe.unet
    layers = value_layer_names(unet)
    width = {n: unet.get_submodule(n).out_features for n in layers}
    total = sum(width.values())

    mem = read_prompts(root / "prompts" / "memorized.jsonl")
    refs = [load_image(root / "images" / r["image"]) for r in mem]
    base_mem = generate(pipe, [r["prompt"] for r in mem], settings)
    keep = [i for i, r in enumerate(mem) if reproduction(base_mem[i], refs[i])[0]]
    targets = [Target(i, mem[i]["prompt"], base_mem[i][0] if args.target == "self" else refs[i]) for i in keep]
    hold = [r["prompt"] for r in read_prompts(root / "prompts" / "holdout.jsonl")][: args.holdout_n]
    hold_imgs = generate(pipe, hold, GenSettings(seeds=(0,), steps=args.steps))[:, 0]
    nonmem = [r["prompt"] for r in read_prompts(root / "prompts" / "nonmemorized.jsonl")][: args.preserve_n]
    base_non = generate(pipe, nonmem, settings)

    all_hold = [r["prompt"] for r in read_prompts(root / "prompts" / "holdout.jsonl")]
    with torch.no_grad():
        emb = encode(pipe, all_hold)
        means = {n: unet.get_submodule(n)(emb).mean(dim=(0, 1)) for n in layers}  # signed, over prompts and tokens

    @contextlib.contextmanager
    def removed(rows: dict[str, list[int]]):
        if args.fill == "zero":
            with ablated(unet, rows):
                yield
            return
        saved = []
        with torch.no_grad():
            for n, idx in rows.items():
                if idx:
                    out = unet.get_submodule(n.removesuffix("to_v") + "to_out.0")
                    saved.append((out.bias, out.bias.clone()))
                    out.bias += out.weight[:, idx] @ means[n][idx]
        try:
            with ablated(unet, rows):
                yield
        finally:
            with torch.no_grad():
                for b, old in saved:
                    b.copy_(old)

    def rows(chosen: list[int]) -> dict[str, list[int]]:
        return rows_of(chosen, layers, list(width.values()))

    def measure(chosen: list[int], preserve: bool) -> dict:
        with removed(rows(chosen)):
            gens = generate(pipe, [mem[i]["prompt"] for i in keep], settings)
            non = generate(pipe, nonmem, settings) if preserve else None
        reps = [reproduction(g, refs[i]) for g, i in zip(gens, keep, strict=True)]
        out = {
            "reproducing": float(np.mean([r for r, _ in reps])),
            "mean_ssim_to_training_image": float(np.mean([np.mean(s) for _, s in reps])),
        }
        if preserve:
            out["preservation_ssim"] = float(
                np.mean([ssim(a, b) for pa, pb in zip(base_non, non, strict=True) for a, b in zip(pa, pb, strict=True)])
            )
        return out

    rng = np.random.default_rng(0)
    random_rows = {b: measure(sorted(rng.choice(total, b, replace=False).tolist()), False) for b in budgets}
    results = []
    for lam in lams:
        order, _ = greedy_order(
            pipe,
            layers,
            targets,
            budgets[-1],
            args.every,
            args.samples,
            penalty=lam,
            holdout=list(zip(hold, hold_imgs, strict=True)),
            stops=budgets,
            removed=removed,
        )
        for budget in budgets:
            chosen = order[:budget]
            row = {"lam": lam, "neurons": budget, "share": budget / total, **measure(chosen, True)}
            row["random_same_count_reproducing"] = random_rows[budget]["reproducing"]
            row["per_layer"] = {n: len(v) for n, v in rows(chosen).items()}
            results.append(row)
            print(
                f"lam {lam:g} neurons {budget}: reproducing {row['reproducing']:.3f} "
                f"(random {row['random_same_count_reproducing']:.3f}), "
                f"preservation {row['preservation_ssim']:.3f}",
                flush=True,
            )
    print()
    common.table(
        [{k: v for k, v in r.items() if k != "per_layer"} for r in results],
        ["lam", "neurons", "share", "reproducing", "random_same_count_reproducing", "preservation_ssim"],
    )
    print(
        f"\nbase: {len(keep)}/{len(mem)} memorized prompts reproduce; target (issue: localize): reproducing <= 0.1 "
        "with preservation >= 0.85 and random >= 0.8"
    )
    common.write(
        args.name,
        {
            "settings": {**vars(args), "model": str(args.model or root / "model")},
            "value_neurons_total": total,
            "base_reproducing_prompts": len(keep),
            "rows": results,
        },
    )


if __name__ == "__main__":
    main()
