"""Detection and explanation on the lab model (Wen et al. 2024), next to the published SD 1.4 figures.

1. AUROC and TPR@1%FPR (official rule: last ROC point with FPR strictly below 1%) of memorized vs
   non-memorized + novel prompts at K=1 step, n=1 generation; verbatim and template separately.
2. Faithfulness of `explain`: deleting the top-ranked token lowers the score more than deleting a
   random token in what share of memorized prompts. A random token's drop is its expectation, the
   mean over deleting each other token in turn (one random draw per prompt is also printed: a single
   draw makes the share a coin toss on prompts where all drops are small).
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


def delete_token(pipe, prompt: str, position: int) -> str:
    """The prompt with its position-th token (1-based, as explain reports) removed."""
    ids = pipe.tokenizer(prompt, truncation=True, max_length=pipe.tokenizer.model_max_length).input_ids[1:-1]
    kept = ids[: position - 1] + ids[position:]
    return pipe.tokenizer.decode(kept)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generations", type=int, default=1)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--model", type=Path, default=None, help="a lab model folder (default: the bundled lab)")
    ap.add_argument("--name", default="detect", help="results/NAME.json")
    args = ap.parse_args()
    quiet_libraries()
    from memedit.detect import (
        PAPER_FIGURES,
        DetectSettings,
        auroc_tpr,
        encode,
        explain_prompt,
        score_all,
        score_prompts,
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

    # explanation faithfulness: deletion test
    rng = np.random.default_rng(0)
    wins, wins_draw, details = 0, 0, []
    ex_settings = DetectSettings(k=1, generations=4)
    for r in mem:
        ex = explain_prompt(pipe, r["prompt"], ex_settings)
        top = int(np.argmax(ex.significance)) + 1
        others = [i + 1 for i in range(len(ex.tokens)) if i + 1 != top]
        rand = int(rng.choice(others))
        variants = [r["prompt"], delete_token(pipe, r["prompt"], top)]
        variants += [delete_token(pipe, r["prompt"], i) for i in others]
        s = score_prompts(pipe, variants, ex_settings).scores
        drops = {i: float(s[0] - s[j]) for j, i in enumerate(others, start=2)}
        drop_top, drop_expected = float(s[0] - s[1]), float(np.mean(list(drops.values())))
        wins += drop_top > drop_expected
        wins_draw += drop_top > drops[rand]
        details.append(
            {
                "prompt": r["prompt"],
                "top_token": ex.tokens[top - 1],
                "drop_top": drop_top,
                "drop_random_expected": drop_expected,
                "random_token": ex.tokens[rand - 1],
                "drop_random_draw": drops[rand],
                "top_rank_among_drops": 1 + sum(d > drop_top for d in drops.values()),
            }
        )
    faithful = wins / len(mem)
    print(
        f"\nexplain deletion test: deleting the top token lowers the score more than deleting a random token "
        f"(expected drop over all other tokens) in {wins}/{len(mem)} = {faithful:.2f} of memorized prompts "
        f"(target >= 0.80); against one random draw per prompt: {wins_draw}/{len(mem)}"
    )

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
            "model": str(args.model or "lab"),
            "explain_deletion_win_rate": faithful,
            "explain_deletion_win_rate_one_draw": wins_draw / len(mem),
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
