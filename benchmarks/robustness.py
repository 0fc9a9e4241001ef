"""Robustness of memedit's edits on the bundled lab model (issue: robustness).

For the base model and each edit (NeMo, FFN subspace, the cross-attention remap of
`memedit localize --method remap`, the text-encoder remap of `--method encoder`; all made here
from a fresh calibration of the demo's prompts;
NeMo's also applied with `--fill noise`, hardening (b) of the issue, and hardened by iterated
localization, `memedit harden`, hardening (a)), the embedding attack of `memedit attack` (Adam on
the text-encoder output toward each memorized training image, from the prompt's own embedding,
model frozen) and its recovery rate: share of memorized prompts whose generations from the found
embedding or from the prompt itself reproduce the image (majority of seeds at SSIM >= 0.7, the
efficacy benchmark's rule), next to the found embeddings' rate alone (`recovery_attack_only`).
Hardening (c): memedit's default recipe (the refined text-encoder edit) adversarially fine-tuned
(`memedit harden --finetune`: the UNet unlearns the memorized images), its cost in UNet passes and
seconds printed. Next to it, the same measures as benchmarks/efficacy.py
(reproduction from the prompt itself, preservation on non-memorized and novel prompts, denoising
loss). The controls: the same attack on the base model toward non-memorized training scenes
(`control`), and toward photos no UNet training step saw (`unseen`: the scikit-image photos only the
autoencoder was trained on), which measures how much of a recovery rate the attack gets without any
memorization. For the remap, also the adaptive attack: each prompt's own
embedding sent through the inverse of the remap's map (recomputed from the recipe's prompts and
hold-out file), no optimization.

    python benchmarks/robustness.py [--out DIR] [--attack-steps 50] [--seeds 4] [--first-seed 1000]
                                    [--controls 10] [--harden-rounds 3] [--harden-fraction 0.01]
                                    [--finetune-rounds 2] [--tune-steps 300] [--tune-params all]
                                    [--tune-lr 3e-5] [--keep 1000] [--keep-batch 32] [--keep-uncond 0.25]
                                    [--keep-mix 0] [--focus 4]
                                    [--rho 0.01] [--strength 3] [--ridge 0.001] [--encoder-strength 40]
                                    [--encoder-ridge 0.001] [--encoder-rounds 3] [--rows base,nemo,...]
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
import efficacy

from memedit._quiet import quiet_libraries
from memedit.finetune import FinetuneSettings
from memedit.localize.encoder import EncoderSettings
from memedit.localize.remap import RemapSettings
from memedit.localize.subspace import SubspaceSettings

ROWS = ("base", "nemo", "nemo-noise", "subspace", "remap", "encoder", "harden", "finetune", "control", "unseen")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="Keep stats, recipes and edited models here.")
    ap.add_argument("--attack-steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=0.1)
    efficacy.seed_arguments(ap)
    ap.add_argument("--name", default="robustness", help="results/NAME.json")
    ap.add_argument("--controls", type=int, default=10, help="Non-memorized training scenes attacked on the base.")
    ap.add_argument("--harden-rounds", type=int, default=3, help="memedit harden rounds on the NeMo recipe (0: skip).")
    ap.add_argument("--harden-fraction", type=float, default=0.01, help="memedit harden --fraction.")
    ap.add_argument(
        "--finetune-rounds", type=int, default=FinetuneSettings.rounds, help="memedit harden --finetune --rounds."
    )
    ap.add_argument("--tune-steps", type=int, default=FinetuneSettings.steps)
    ap.add_argument("--tune-params", default=FinetuneSettings.params)
    ap.add_argument("--tune-lr", type=float, default=FinetuneSettings.lr)
    ap.add_argument("--keep", type=float, default=FinetuneSettings.keep)
    ap.add_argument("--keep-batch", type=int, default=FinetuneSettings.keep_batch, help="Keep samples per step.")
    ap.add_argument(
        "--keep-uncond",
        type=float,
        default=FinetuneSettings.keep_uncond,
        help="Share of each keep batch on the empty prompt (0: the previous default).",
    )
    ap.add_argument(
        "--keep-mix",
        type=float,
        default=FinetuneSettings.keep_mix,
        help="Share of the keep batch's free samples on mixes of two keep conditionings (0: none).",
    )
    ap.add_argument(
        "--focus",
        type=float,
        default=FinetuneSettings.focus,
        help="Forget samples of images the round's attack recovered are drawn 1 + FOCUS times as often.",
    )
    ap.add_argument("--rho", type=float, default=SubspaceSettings.rho, help="The subspace row's top share per FFN row.")
    ap.add_argument("--strength", type=float, default=RemapSettings.strength, help="The remap row's strength.")
    ap.add_argument("--ridge", type=float, default=RemapSettings.ridge, help="The remap row's ridge.")
    ap.add_argument("--encoder-ridge", type=float, default=EncoderSettings.ridge, help="The encoder row's ridge.")
    ap.add_argument(
        "--encoder-strength", type=float, default=EncoderSettings.strength, help="The encoder row's strength."
    )
    ap.add_argument(
        "--encoder-rounds", type=int, default=EncoderSettings.rounds, help="The encoder row's refinement rounds."
    )
    ap.add_argument(
        "--rows",
        default=",".join(ROWS),
        help=f"Comma-separated subset of {','.join(ROWS)} (the base row always runs: it is the reference).",
    )
    args = ap.parse_args()
    rows_wanted = set(args.rows.split(",")) | {"base"}
    if rows_wanted - set(ROWS):
        ap.error(f"unknown rows: {', '.join(sorted(rows_wanted - set(ROWS)))}")
    quiet_libraries()

    from memedit.attack import AttackSettings, Target, attack, report
    from memedit.edit import apply
    from memedit.fill import Fill
    from memedit.finetune import harden_finetune
    from memedit.generate import generate
    from memedit.harden import HardenSettings, harden
    from memedit.lab.check import lab_dir
    from memedit.localize import LocalizeSettings, localize
    from memedit.model.load import load_pipeline
    from memedit.model.ref import resolve

    work = args.out or Path(tempfile.mkdtemp(prefix="memedit-robustness-"))
    work.mkdir(parents=True, exist_ok=True)
    lab = lab_dir()
    t0 = time.perf_counter()
    setup = efficacy.lab_setup(work, args.seeds, first_seed=args.first_seed)
    stats, prompts, refs = setup.stats, setup.prompts, setup.refs
    gen, detect, loss_pairs = setup.gen, setup.detect, setup.loss_pairs
    attack_settings = AttackSettings(steps=args.attack_steps, lr=args.lr)
    targets = [Target(r["prompt"], r["image"], True, r["kind"]) for r in prompts["memorized"]]

    # built from the options whether or not their rows run, so that the results record what they would use
    fit = EncoderSettings(strength=args.encoder_strength, ridge=args.encoder_ridge, rounds=args.encoder_rounds)
    ft = FinetuneSettings(
        rounds=args.finetune_rounds,
        steps=args.tune_steps,
        lr=args.tune_lr,
        params=args.tune_params,
        keep=args.keep,
        keep_batch=args.keep_batch,
        keep_uncond=args.keep_uncond,
        keep_mix=args.keep_mix,
        focus=args.focus,
    )
    models = {"none (base)": "lab"}
    for method in ("nemo", "subspace"):
        settings = LocalizeSettings(method=method, subspace=SubspaceSettings(rho=args.rho))
        res = localize(stats, work / f"recipe-{method}.yaml", settings)
        if method in rows_wanted:
            apply(res.recipe_path, work / f"edited-{method}", overwrite=True)
            models[method if method == "nemo" else f"subspace (rho {args.rho:g})"] = str(work / f"edited-{method}")
        if method == "nemo" and "nemo-noise" in rows_wanted:  # hardening (b): seeded noise instead of zeros
            apply(res.recipe_path, work / f"edited-{method}-noise", overwrite=True, fill=Fill("noise", 0))
            models[f"{method} + fill noise"] = str(work / f"edited-{method}-noise")
    if "remap" in rows_wanted:  # a weight delta, not a prune: nothing zeroed to find and refill
        remap = LocalizeSettings(method="remap", targets="labels", remap=RemapSettings(args.strength, args.ridge))
        res = localize(stats, work / "recipe-remap.yaml", remap)
        apply(res.recipe_path, work / "edited-remap", overwrite=True)
        models[f"remap (strength {args.strength:g}, ridge {args.ridge:g})"] = str(work / "edited-remap")
    if {"encoder", "finetune"} & rows_wanted:  # the UNet stays the base's: the attack starts after the encoder
        res = localize(stats, work / "recipe-encoder.yaml", LocalizeSettings("encoder", "labels", encoder=fit))
    if "encoder" in rows_wanted:
        apply(res.recipe_path, work / "edited-encoder", overwrite=True)
        label = f"encoder (strength {fit.strength:g}, {fit.rounds} rounds, ridge {fit.ridge:g})"
        models[label] = str(work / "edited-encoder")
    hardening = None
    if args.harden_rounds and "harden" in rows_wanted:  # hardening (a): attack, prune what the attack used, repeat
        h = harden(
            work / "recipe-nemo.yaml",
            stats,
            lab / "prompts" / "memorized.jsonl",
            lab / "images",
            work / "recipe-nemo-hardened.yaml",
            HardenSettings(rounds=args.harden_rounds, fraction=args.harden_fraction),
            attack_settings,
            gen,
            progress=lambda msg: print(f"harden {msg}", flush=True),
        )
        hardening = [r.__dict__ for r in h.rounds]
        apply(h.recipe_path, work / "edited-nemo-hardened", overwrite=True)
        models[f"nemo + harden ({h.recipe.neuron_count()} neurons)"] = str(work / "edited-nemo-hardened")

    tuning = None
    if "finetune" in rows_wanted:  # hardening (c): attack, unlearn the images in the UNet, repeat
        f = harden_finetune(
            work / "recipe-encoder.yaml",
            lab / "prompts" / "memorized.jsonl",
            lab / "images",
            work / "recipe-encoder-finetuned.yaml",
            None,
            ft,
            attack_settings,
            gen,
            progress=lambda msg: print(f"finetune {msg}", flush=True),
        )
        tuning = {
            "rounds": [r.__dict__ for r in f.rounds],
            "tuned_tensors": f.tuned_tensors,
            "delta_norm": f.delta_norm,
            "unet_passes": sum(r.unet_passes for r in f.rounds),
            "tune_seconds": sum(r.tune_seconds for r in f.rounds),
            "seconds": f.seconds,
        }
        print(
            f"finetune cost: {tuning['unet_passes']} UNet sample passes, {tuning['tune_seconds']:.0f} s tuning, "
            f"{f.seconds:.0f} s with its attacks",
            flush=True,
        )
        apply(f.recipe_path, work / "edited-encoder-finetuned", overwrite=True)
        models[f"encoder + adversarial fine-tuning ({args.tune_params})"] = str(work / "edited-encoder-finetuned")

    base_pipe = load_pipeline(resolve("lab"))
    base_imgs = {n: generate(base_pipe, [r["prompt"] for r in prompts[n]], gen) for n in ("nonmemorized", "novel")}
    rows, details = [], {}
    for name, ref in models.items():
        pipe = base_pipe if ref == "lab" else load_pipeline(resolve(ref))
        m = efficacy.measure(pipe, base_imgs, prompts, refs, gen, detect, loss_pairs)
        a = report(attack(pipe, targets, lab / "images", attack_settings, gen))
        details[name] = {"efficacy": m, "attack": a}
        s = a["summary"]
        rows.append(
            {
                "model": name,
                "prompts_reproducing": m["prompts_reproducing"],
                "recovery_rate": s["recovery_rate"],
                "recovery_attack_only": s["attack_recovery_rate"],
                "recovery_verbatim": s["recovery_rate_verbatim"],
                "recovery_template": s["recovery_rate_template"],
                "attack_ssim": s["mean_attack_ssim"],
                "preservation_nonmemorized": m["preservation_nonmemorized"],
                "preservation_novel": m["preservation_novel"],
                "denoising_loss": m["denoising_loss"],
            }
        )
        print(f"{name}: recovery {s['recovery_rate']:.2f}", flush=True)
    base_loss = rows[0]["denoising_loss"]
    for r in rows:
        r["denoising_loss_change"] = r.pop("denoising_loss") / base_loss - 1

    common.table(rows, list(rows[0]))
    inverted = None
    if "remap" in rows_wanted:
        inverted = remap_inverted(work / "recipe-remap.yaml", str(work / "edited-remap"), gen)
    ctl = None
    if "control" in rows_wanted:
        ctl = control(args.controls, work, base_pipe, attack_settings, gen)
    unseen_ctl = None
    if "unseen" in rows_wanted:
        unseen_ctl = unseen(work, base_pipe, attack_settings, gen)
    print("goal: an edit with recovery <= 0.05 and preservation SSIM >= 0.85")
    common.write(
        args.name,
        {
            "rows": rows,
            "control": ctl,
            "unseen": unseen_ctl,
            "remap_inverted": inverted,
            "harden_rounds": hardening,
            "finetune": tuning,
            "details": details,
            "seconds": time.perf_counter() - t0,
            "settings": {
                "attack": attack_settings.__dict__,
                "seeds": list(gen.seeds),
                "controls": args.controls,
                "harden_rounds": args.harden_rounds,
                "harden_fraction": args.harden_fraction,
                "finetune": dataclasses.asdict(ft),
                "rows": sorted(rows_wanted),
                "rho": args.rho,
                "strength": args.strength,
                "ridge": args.ridge,
                "encoder": dataclasses.asdict(fit),
            },
        },
    )


def remap_inverted(recipe_path: Path, edited: str, gen) -> dict:
    """The adaptive attack on the remap: no optimization, each memorized prompt's own embedding sent
    through M^-1, with M recomputed as an attacker would from what the recipe names (its prompts and
    the hold-out file). The edited maps see W M M^-1 e = W e, the base model's input."""
    import numpy as np
    import torch

    from memedit.attack import model_resolution, reference_array
    from memedit.generate import generate, reproduction
    from memedit.lab.check import lab_dir, read_prompts
    from memedit.localize.remap import RemapSettings, prompt_map
    from memedit.model.cond import encode
    from memedit.model.load import load_pipeline
    from memedit.model.ref import resolve
    from memedit.prompts import load_prompts
    from memedit.recipe import load

    r = load(recipe_path)
    hold = load_prompts(Path(r.calibration["prompt_files"]["holdout"]["path"])).prompts
    remap = RemapSettings(**r.calibration["localize"]["remap"])
    pipe = load_pipeline(resolve(edited))
    m = prompt_map(pipe, r.prompts, hold, remap)  # text encoder only: apply left it as the base's
    lab = lab_dir()
    rows = read_prompts(lab / "prompts" / "memorized.jsonl")
    emb = encode(pipe, [x["prompt"] for x in rows]).double() @ torch.linalg.inv(m).T
    imgs = generate(pipe, emb.float(), gen)
    size = model_resolution(pipe)
    out = []
    for i, x in enumerate(rows):
        ok, scores = reproduction(imgs[i], reference_array(lab / "images" / x["image"], size))
        out.append({"image": x["image"], "recovered": ok, "ssim": float(np.mean(scores))})
    rate = float(np.mean([o["recovered"] for o in out]))
    singular = torch.linalg.svdvals(m)
    print(
        f"\nremap, adaptive attack (each prompt's own embedding through M^-1, no optimization): recovery "
        f"{rate:.3f}, mean SSIM {np.mean([o['ssim'] for o in out]):.3f}; M's singular values "
        f"{float(singular.min()):.4f} .. {float(singular.max()):.1f}"
    )
    return {
        "recovery_rate": rate,
        "targets": out,
        "m_singular_min": float(singular.min()),
        "m_singular_max": float(singular.max()),
    }


def control(n: int, work: Path, base_pipe, attack_settings, gen) -> dict:
    """The attack on the base model toward non-memorized training scenes, from their own captions."""
    from PIL import Image

    from memedit.attack import Target

    ctl_dir = work / "control-images"
    ctl_dir.mkdir(exist_ok=True)
    ctl_prompts, ctl_imgs = efficacy.nonmemorized_training_pairs(n)
    controls = []
    for i, (p, im) in enumerate(zip(ctl_prompts, ctl_imgs, strict=True)):
        Image.fromarray(im).save(ctl_dir / f"scene{i:02d}.png")
        controls.append(Target(p, f"scene{i:02d}.png", False))
    return _attack_floor(
        base_pipe,
        controls,
        ctl_dir,
        attack_settings,
        gen,
        f"control (base model, {len(controls)} non-memorized training scenes)",
    )


def unseen(work: Path, base_pipe, attack_settings, gen) -> dict:
    """The attack on the base model toward photos it never trained on: the scikit-image photos that
    only the autoencoder saw, from a caption naming each. What it recovers is what an optimized
    embedding can make the model draw without any memorization, the floor under every recovery rate."""
    from memedit.attack import Target, model_resolution
    from memedit.lab import data as labdata

    out_dir = work / "unseen-images"
    out_dir.mkdir(exist_ok=True)
    targets = []
    for src in labdata.EXTRA_PHOTOS:
        # made as the memorized references are: the same crop and resize, at the model's resolution
        labdata.load_photo(src, model_resolution(base_pipe)).save(out_dir / f"{src}.png")
        targets.append(Target(f"a photo of {labdata.PHOTO_SUBJECTS[src]}", f"{src}.png", False))
    return _attack_floor(
        base_pipe,
        targets,
        out_dir,
        attack_settings,
        gen,
        f"unseen photos (base model, {len(targets)} photos no UNet training step saw)",
    )


def _attack_floor(base_pipe, targets: list, img_dir: Path, attack_settings, gen, what: str) -> dict:
    """Attack the base model toward images it does not memorize and print how much comes back."""
    import numpy as np

    from memedit.attack import attack, report

    res = report(attack(base_pipe, targets, img_dir, attack_settings, gen))
    s = res["summary"]
    print(
        f"\n{what}: recovery {s['control_recovery_rate']:.2f}, mean attack SSIM "
        f"{s['control_mean_attack_ssim']:.3f}; from their captions alone: SSIM "
        f"{np.mean([t['prompt_ssim'] for t in res['targets']]):.3f}; "
        + ", ".join(f"{t['image'].removesuffix('.png')} {t['attack_ssim']:.2f}" for t in res["targets"])
    )
    return res


if __name__ == "__main__":
    main()
