"""Detection and explanation on the lab model (Wen et al. 2024), next to the published SD 1.4 figures.

1. AUROC and TPR@1%FPR (official rule: last ROC point with FPR strictly below 1%) of memorized vs
   non-memorized + novel prompts at K=1 step, n=1 generation; verbatim and template separately.
   Where the signal lives: AUROC of the first-K mean and of single steps along one 50-step path, and
   of the one-call score taken at the first timestep of shorter schedules (higher t = noisier).
2. Faithfulness of `explain` (both methods, gradient and occlusion): deleting the top-ranked token
   lowers the score more than deleting a random token in what share of memorized prompts. Deletions
   are scored on held-out latents (not those the explanation saw), each variant on its prompt's
   latents; a random token's drop is its expectation, the mean over deleting each other token in
   turn (one random draw per prompt is also printed).
3. Speed: prompts/s of `score_prompts` against bare UNet calls of the same batch and dtype, timed in
   the same run, and UNet sample-forwards per prompt against the official procedure (4 x 50 x 2).

    python benchmarks/detect.py [--generations 1] [--k 1] [--model DIR/model] [--name detect]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from memedit._quiet import quiet_libraries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generations", type=int, default=1)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--model", type=Path, default=None, help="a lab model folder (default: the bundled lab)")
    ap.add_argument("--name", default="detect", help="results/NAME.json")
    args = ap.parse_args()
    quiet_libraries()
    from memedit.cli import explain_cmd
    from memedit.detect import (
        EXPLAIN_METHODS,
        PAPER_FIGURES,
        DetectSettings,
        auroc_tpr,
        deletion_variants,
        encode,
        explain,
        score_all,
    )
    from memedit.lab.check import lab_root, read_prompts
    from memedit.model.load import load_pipeline
    from memedit.model.ref import resolve

    lab = lab_root(args.model)
    pipe = load_pipeline(resolve(str(args.model) if args.model else "lab"))
    settings = DetectSettings(k=args.k, generations=args.generations, batch_size=32)
    mem = read_prompts(lab / "prompts" / "memorized.jsonl")
    neg = read_prompts(lab / "prompts" / "nonmemorized.jsonl") + read_prompts(lab / "prompts" / "novel.jsonl")
    s_mem = score_all(pipe, [r["prompt"] for r in mem], settings).scores
    s_neg = score_all(pipe, [r["prompt"] for r in neg], settings).scores
    rows = []
    for kind in ("all", "verbatim", "template"):
        pos = [s for s, r in zip(s_mem, mem, strict=True) if kind == "all" or r["kind"] == kind]
        auroc, tpr = auroc_tpr([1] * len(pos) + [0] * len(s_neg), list(pos) + list(s_neg))
        rows.append(
            {
                "set": f"lab {kind} ({len(pos)} vs {len(s_neg)})",
                "K": args.k,
                "n": args.generations,
                "auroc": auroc,
                "tpr_at_1fpr": tpr,
            }
        )
    for src, model, k, n, auroc, tpr in PAPER_FIGURES:
        rows.append({"set": f"{src}, {model}", "K": k, "n": n, "auroc": auroc, "tpr_at_1fpr": tpr})
    common.table(rows, ["set", "K", "n", "auroc", "tpr_at_1fpr"])

    # where in the sampler the signal lives: one 50-step run, AUROC of the first-K mean and of single steps
    deep = DetectSettings(k=50, generations=args.generations, batch_size=32)
    a = score_all(pipe, [r["prompt"] for r in mem], deep).per_step
    b = score_all(pipe, [r["prompt"] for r in neg], deep).per_step
    labels = [1] * len(a) + [0] * len(b)
    by_k = {
        k: auroc_tpr(labels, list(a[:, :, :k].mean(axis=(1, 2))) + list(b[:, :, :k].mean(axis=(1, 2))))
        for k in (1, 2, 3, 5, 10, 20, 50)
    }
    by_step = {
        k: auroc_tpr(labels, list(a[:, :, k].mean(1)) + list(b[:, :, k].mean(1)))[0]
        for k in (0, 2, 4, 5, 6, 8, 10, 20, 49)
    }
    print("\nfirst-K mean:  " + "  ".join(f"K={k}: AUROC {v[0]:.3f} TPR {v[1]:.3f}" for k, v in by_k.items()))
    print("single step:   " + "  ".join(f"#{k}: {v:.3f}" for k, v in by_step.items()))

    # where in noise level the one-call signal lives: the K=1, n=1 score taken at the first timestep of
    # shorter DDIM schedules (50 steps: t=981 ... 2 steps: t=501), still one UNet call from pure noise
    by_first_t = {}
    for steps in (50, 10, 5, 4, 3, 2):
        short = DetectSettings(k=1, generations=args.generations, schedule_steps=steps, batch_size=32)
        sm, sn = score_all(pipe, [r["prompt"] for r in mem], short), score_all(pipe, [r["prompt"] for r in neg], short)
        by_first_t[sm.timesteps[0]] = auroc_tpr(labels, list(sm.scores) + list(sn.scores))
    print("first timestep:" + "  ".join(f"t={t}: AUROC {v[0]:.3f} TPR {v[1]:.3f}" for t, v in by_first_t.items()))

    # explanation faithfulness: deletion test, per explanation method. The explanation is made on the
    # latents of seed 0; the deletions are scored on held-out latents (seed 1), every variant of a
    # prompt on the same latents as the prompt, so that a drop is the token's effect and not new noise.
    rng = np.random.default_rng(0)
    ex_settings = DetectSettings(k=1, generations=4)
    held_out = DetectSettings(k=1, generations=4, seed=1, batch_size=32)
    drops_by_prompt = []
    for r in mem:
        variants = deletion_variants(pipe.tokenizer, r["prompt"])
        s = score_all(pipe, variants, held_out, latent_keys=[r["prompt"]] * len(variants)).scores
        drops_by_prompt.append([float(s[0] - x) for x in s[1:]])
    faithfulness = {}
    details = {}
    for method in EXPLAIN_METHODS:
        wins, wins_draw, rows_m = 0, 0, []
        for r, drops in zip(mem, drops_by_prompt, strict=True):
            ex = explain(pipe, r["prompt"], ex_settings, method)
            top = int(np.argmax(ex.significance))
            others = [d for i, d in enumerate(drops) if i != top]
            draw = int(rng.integers(len(others)))
            expected = float(np.mean(others))
            wins += drops[top] > expected
            wins_draw += drops[top] > others[draw]
            rows_m.append(
                {
                    "prompt": r["prompt"],
                    "top_token": ex.tokens[top],
                    "drop_top": drops[top],
                    "drop_random_expected": expected,
                    "drop_random_draw": others[draw],
                    "top_rank_among_drops": 1 + sum(d > drops[top] for d in drops),
                }
            )
        faithfulness[method] = {"win_rate": wins / len(mem), "win_rate_one_draw": wins_draw / len(mem)}
        details[method] = rows_m
        print(
            f"\nexplain --method {method}: deleting the top token lowers the score (held-out latents) more than "
            f"deleting a random token (expected drop over all other tokens) in {wins}/{len(mem)} = "
            f"{wins / len(mem):.2f} of memorized prompts (target >= 0.80); "
            f"against one random draw: {wins_draw}/{len(mem)}"
        )
    default = next(p.default for p in explain_cmd.params if p.name == "method")  # what `memedit explain` runs
    faithful = faithfulness[default]["win_rate"]

    # speed: the detection call against bare UNet calls on the same inputs
    prompts = [r["prompt"] for r in neg[:64]]
    sched_t = 981
    empty = encode(pipe, [""])

    def bare() -> None:
        with torch.no_grad():
            for i in range(0, len(prompts), settings.batch_size):
                chunk = prompts[i : i + settings.batch_size]
                e = encode(pipe, chunk).repeat_interleave(settings.generations, 0)
                x = torch.randn(
                    len(chunk) * settings.generations, 4, pipe.unet.config.sample_size, pipe.unet.config.sample_size
                )
                pipe.unet(torch.cat([x, x]), sched_t, encoder_hidden_states=torch.cat([empty.expand_as(e), e]))

    def ours() -> None:
        score_all(pipe, prompts, settings)

    timings = {}
    for name, fn in (("bare", bare), ("memedit", ours)):
        fn()  # warm-up
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        timings[name] = float(np.median(ts))
    ratio = timings["bare"] / timings["memedit"]
    per_prompt = 2 * settings.generations * settings.k
    print(
        f"speed: {len(prompts) / timings['memedit']:.1f} prompts/s; ratio to bare UNet calls {ratio:.3f} "
        f"(target >= 0.9); UNet sample-forwards per prompt {per_prompt} vs 400 official (4 gens x 50 steps x 2)"
    )
    common.write(
        args.name,
        {
            "rows": rows,
            "first_k_mean": {k: {"auroc": v[0], "tpr_at_1fpr": v[1]} for k, v in by_k.items()},
            "single_step_auroc": by_step,
            "one_call_by_first_timestep": {t: {"auroc": v[0], "tpr_at_1fpr": v[1]} for t, v in by_first_t.items()},
            "model": str(args.model or "lab"),
            "explain_deletion_win_rate": faithful,
            "explain_faithfulness": faithfulness,
            "explain_details": details,
            "speed": {
                "seconds": timings,
                "ratio_bare_over_memedit": ratio,
                "prompts_per_s": len(prompts) / timings["memedit"],
                "unet_sample_forwards_per_prompt": per_prompt,
                "official": 400,
            },
        },
    )


if __name__ == "__main__":
    main()
