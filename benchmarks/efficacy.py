"""Efficacy of memedit's edits on the bundled lab model (issue: localization to a prune recipe).

For nemo, subspace, both, attribution (memedit's loss attribution, on the prompts labelled memorized),
encoder (memedit's default: the text-encoder edit at its default strength and refinement rounds, on the
targets `--targets auto` picks: the labelled memorized prompts) and four random baselines (NeMo's and
attribution's neurons: as many random rows of the same value layers; the subspace masks: as many random entries in every
row of the same FFN layers; the encoder delta: a random delta of the same norm on the same tensor),
plus the encoder edit aimed at as many non-memorized calibration prompts:
neurons pruned; memorized reproduction rate (share of memorized prompt x seed generations with SSIM
>= 0.7 to the training image, and share of prompts reproducing on the majority of seeds); mean SSIM
to the training image; detection score; preservation on non-memorized and novel prompts (SSIM
between base and edited generations with the same seeds) and the denoising loss on non-memorized
training images. A 2-fold split by image reports memorized prompts not used for selection.
Next to each row, the rule of `localize --confirm` checked against the training images: the share of
memorized prompts it confirms (seed-to-seed SSIM under the edit below mean + 1 std of the novel
prompts' on the base model) and the share where that verdict agrees with "does not reproduce".

The default method's row uses the same calibration, recipe and evaluation prompts and seeds as
`memedit demo`, so the two print the same numbers.

    python benchmarks/efficacy.py [--out DIR] [--steps 50] [--seeds 4] [--first-seed 1000] [--no-folds]
                                  [--demo memedit-demo] [--methods nemo,subspace,both,attribution,encoder]

--demo DIR compares the default method's row with the numbers `memedit demo` wrote to DIR/demo.json.
--methods runs a subset (each with its controls): `--methods encoder` measures the default method, its
random delta and its non-memorized control, the rows the targets are checked on, in a fraction of the time.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from memedit._quiet import quiet_libraries

METHODS = ("nemo", "subspace", "both", "attribution", "encoder")


def denoising_loss(pipe, prompts: list[str], images: list[np.ndarray], seed: int = 0, draws: int = 8) -> float:
    """Mean epsilon-prediction MSE on (image, caption) pairs at fixed timesteps and noise."""
    from memedit.model.cond import encode

    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        lat = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        emb = encode(pipe, prompts)
        total = 0.0
        for _ in range(draws):
            noise = torch.randn(lat.shape, generator=g)
            t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (len(prompts),), generator=g)
            noisy = pipe.scheduler.add_noise(lat, noise, t)
            total += float(torch.nn.functional.mse_loss(pipe.unet(noisy, t, encoder_hidden_states=emb).sample, noise))
    return total / draws


def nonmemorized_training_pairs(n: int) -> tuple[list[str], list[np.ndarray]]:
    from memedit.lab import data as labdata
    from memedit.lab.check import lab_dir, read_prompts
    from memedit.lab.train import DEFAULT_CONFIG, LabConfig, scene_for_caption

    by_caption = scene_for_caption(LabConfig.load(DEFAULT_CONFIG))
    rows = read_prompts(lab_dir() / "prompts" / "nonmemorized.jsonl")[:n]
    return [r["prompt"] for r in rows], [np.asarray(labdata.render_scene(by_caption[r["prompt"]])) for r in rows]


@dataclasses.dataclass(frozen=True)
class LabSetup:
    """What the lab benchmarks share: the demo's calibration, evaluation prompts, references, settings."""

    stats: Path
    info: dict
    prompts: dict  # memorized / nonmemorized / novel rows of eval.jsonl
    refs: dict
    gen: object  # GenSettings
    detect: object  # DetectSettings
    loss_pairs: tuple
    reworded: tuple = ()  # rows of prompts/reworded.jsonl: the memorized images asked for in other words


def seed_arguments(ap: argparse.ArgumentParser) -> None:
    """--seeds and --first-seed: the generation seeds of every lab benchmark that generates (lab_setup)."""
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument(
        "--first-seed",
        type=int,
        default=1000,
        help="Generation seeds are FIRST..FIRST+SEEDS-1 (the demo's: 1000); others re-check a result from them.",
    )


def lab_arguments(ap: argparse.ArgumentParser) -> None:
    """The options every lab efficacy benchmark takes (this one and the sweeps)."""
    ap.add_argument("--out", type=Path, default=None, help="Keep the calibration, recipes and edited models here.")
    seed_arguments(ap)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--no-folds", action="store_true", help="Skip the 2-fold held-out evaluation.")


def lab_setup(work: Path, seeds: int, steps: int = 50, first_seed: int = 1000) -> LabSetup:
    """Calibrate the lab on the demo's prompts (once per work folder) and gather the evaluation inputs."""
    from memedit.calibrate import CalibSettings, calibrate, load_stats
    from memedit.detect import DetectSettings
    from memedit.generate import GenSettings, load_image
    from memedit.lab.check import lab_dir, read_prompts

    lab = lab_dir()
    stats = work / "stats"
    if not (stats / "stats.json").is_file():
        calibrate("lab", lab / "prompts" / "calibration.jsonl", None, stats, CalibSettings())
    info, _ = load_stats(stats)
    eval_rows = read_prompts(lab / "prompts" / "eval.jsonl")
    prompts = {
        "memorized": [r for r in eval_rows if r["memorized"]],
        "nonmemorized": [r for r in eval_rows if not r["memorized"]][:25],
        "novel": [r for r in eval_rows if not r["memorized"]][25:],
    }
    return LabSetup(
        stats,
        info,
        prompts,
        {p.name: load_image(p) for p in (lab / "images").glob("*.png")},
        GenSettings(seeds=tuple(range(first_seed, first_seed + seeds)), steps=steps),
        DetectSettings(**info["settings"]["detect"]),
        nonmemorized_training_pairs(32),
        tuple(read_prompts(lab / "prompts" / "reworded.jsonl")),
    )


def control_group(setup: LabSetup, n: int) -> tuple[int, ...]:
    """The first `n` non-memorized calibration prompts: where a fit's control is aimed."""
    return tuple([i for i, x in enumerate(setup.info["labels"]) if not x][:n])


def measure(pipe, base_imgs: dict, prompts: dict, refs: dict, gen, detect, loss_pairs) -> dict:
    from memedit.detect import score_all
    from memedit.generate import COPY_SSIM, diversity, generate, reproduction, ssim

    out = {}
    mem = prompts["memorized"]
    imgs = generate(pipe, [r["prompt"] for r in mem], gen)
    per_gen, per_prompt, mean_ssim = [], [], []
    for im, r in zip(imgs, mem, strict=True):
        rep, sc = reproduction(im, refs[r["image"]])
        per_prompt.append(rep)
        per_gen += [s >= COPY_SSIM for s in sc]
        mean_ssim.append(float(np.mean(sc)))
    out["reproduction_rate"] = float(np.mean(per_gen))
    out["prompts_reproducing"] = float(np.mean(per_prompt))
    out["mean_ssim_to_training"] = float(np.mean(mean_ssim))
    out["per_prompt_reproduces"] = per_prompt
    out["seed_consistency"] = [diversity(im) for im in imgs]  # what `localize --confirm` measures
    out["detection_score"] = float(np.mean(score_all(pipe, [r["prompt"] for r in mem], detect).scores))
    for name in ("nonmemorized", "novel"):
        e = generate(pipe, [r["prompt"] for r in prompts[name]], gen)
        out[f"preservation_{name}"] = float(
            np.mean(
                [ssim(a, b) for pa, pb in zip(base_imgs[name], e, strict=True) for a, b in zip(pa, pb, strict=True)]
            )
        )
    out["denoising_loss"] = denoising_loss(pipe, *loss_pairs)
    return out


def reworded_reproducing(pipe, setup: LabSetup) -> float:
    """Share of the reworded prompts (memorized images asked for in words no edit was fitted on) whose
    generations reproduce their image, by the same rule as the memorized prompts."""
    from memedit.generate import generate, reproduction

    rows = list(setup.reworded)
    imgs = generate(pipe, [r["prompt"] for r in rows], setup.gen)
    return float(np.mean([reproduction(im, setup.refs[r["image"]])[0] for im, r in zip(imgs, rows, strict=True)]))


def _row(pipe, setup: LabSetup, base_imgs: dict, reworded: bool) -> dict:
    row = measure(pipe, base_imgs, setup.prompts, setup.refs, setup.gen, setup.detect, setup.loss_pairs)
    return {**row, **({"reworded_reproducing": reworded_reproducing(pipe, setup)} if reworded else {})}


def base_row(setup: LabSetup, reworded: bool = False) -> tuple[dict, dict]:
    """The unedited lab's generations of the preservation prompts (what every edit is compared with)
    and its own row (with `reworded`, also `reworded_reproducing`)."""
    from memedit.generate import generate
    from memedit.model.load import load_pipeline
    from memedit.model.ref import resolve

    pipe = load_pipeline(resolve("lab"))
    imgs = {n: generate(pipe, [r["prompt"] for r in setup.prompts[n]], setup.gen) for n in ("nonmemorized", "novel")}
    return imgs, _row(pipe, setup, imgs, reworded)


def measure_recipe(setup: LabSetup, base_imgs: dict, recipe: Path, out: Path, reworded: bool = False) -> dict:
    """`measure` on the model `memedit apply RECIPE` writes to OUT (replaced if it exists); with
    `reworded`, also `reworded_reproducing`."""
    from memedit.edit import apply
    from memedit.model.load import load_pipeline
    from memedit.model.ref import resolve

    apply(recipe, out, overwrite=True)
    return _row(load_pipeline(resolve(str(out))), setup, base_imgs, reworded)


FOLD_COLUMNS = [
    "fold",
    "method",
    "selected_prompts",
    "seen_prompts_reproducing",
    "heldout_prompts_reproducing",
    "preservation_nonmemorized",
]


def held_out_folds(setup: LabSetup, work: Path, base_imgs: dict, methods, prefix: str = "fold") -> list[dict]:
    """2 folds by image: select on the memorized prompts of half the images, measure all of them, and
    report the prompts used for selection apart from those held out. `methods`: names, or (label,
    LocalizeSettings) pairs. Template variants of one image never straddle selection and evaluation."""
    from memedit.errors import MemeditError
    from memedit.localize import LocalizeSettings, localize

    prompts, info = setup.prompts, setup.info
    images = sorted({r["image"] for r in prompts["memorized"]})
    cal_prompts = info["prompts"]
    folds = []
    for k in range(2):
        held_images = set(images[k::2])
        select = [
            i
            for i, p in enumerate(cal_prompts)
            if info["labels"][i]
            and not any(r["prompt"] == p and r["image"] in held_images for r in prompts["memorized"])
        ]
        for method in methods:
            label, settings = (method, LocalizeSettings(method=method)) if isinstance(method, str) else method
            settings = dataclasses.replace(settings, targets="labels", group=tuple(select))
            name = f"{prefix}{k}-{label}"
            try:
                res = localize(setup.stats, work / f"{name}.yaml", settings)
            except MemeditError as e:  # finding nothing is a result to report, not a crash
                folds.append({"fold": k, "method": label, "selected_prompts": len(select), "note": e.message})
                continue
            m = measure_recipe(setup, base_imgs, res.recipe_path, work / name)
            reps = list(zip(m["per_prompt_reproduces"], prompts["memorized"], strict=True))
            folds.append(
                {
                    "fold": k,
                    "method": label,
                    "selected_prompts": len(select),
                    "seen_prompts_reproducing": float(np.mean([x for x, r in reps if r["image"] not in held_images])),
                    "heldout_prompts_reproducing": float(np.mean([x for x, r in reps if r["image"] in held_images])),
                    "preservation_nonmemorized": m["preservation_nonmemorized"],
                }
            )
    return folds


def compare_with_demo(demo_dir: Path, base: dict, default: dict, rand: dict | None) -> dict:
    """The demo's summary numbers next to this benchmark's for the default method (same calibration,
    recipe, prompts and seeds): the demo's preservation is the mean over its 25 non-memorized and 25
    novel prompts, i.e. the mean of this benchmark's two preservation columns."""
    import json

    demo = json.loads((demo_dir / "demo.json").read_text())["numbers"]
    pairs = {
        "neurons": (demo["neurons"], default["neurons"]),
        "reproduction_rate_base": (demo["reproduction_rate_base"], base["prompts_reproducing"]),
        "reproduction_rate_edited": (demo["reproduction_rate_edited"], default["prompts_reproducing"]),
        "random_reproduction_rate": (demo["random_reproduction_rate"], rand and rand["prompts_reproducing"]),
        "preservation_ssim": (
            demo["preservation_ssim"],
            (default["preservation_nonmemorized"] + default["preservation_novel"]) / 2,
        ),
    }
    out = {}
    for k, (d, e) in pairs.items():
        same = e is not None and d is not None and abs(d - e) < 5e-4
        out[k] = {"demo": d, "efficacy": e, "equal": same}
        print(f"{'EQUAL' if same else 'DIFFER'}  {k}: demo {d}  efficacy {e}")
    return out


def encoder_rows(setup: LabSetup, base_imgs: dict, work: Path, enc, rows: list[dict]) -> None:
    """The default method's row and its two controls, appended to `rows`."""
    from memedit.localize import localize
    from memedit.localize.baseline import random_delta_baseline
    from memedit.recipe import dump, load_deltas

    res = localize(setup.stats, work / "recipe-encoder.yaml", enc)
    m = measure_recipe(setup, base_imgs, res.recipe_path, work / "edited-encoder")
    rows.append({"method": "encoder", "neurons": 0, "weight_deltas": res.recipe.delta_count(), **m})
    rnd_enc, rnd_deltas = random_delta_baseline(res.recipe, load_deltas(res.recipe, res.recipe_path), seed=0)
    dump(rnd_enc, work / "recipe-random-encoder.yaml", deltas=rnd_deltas)
    m = measure_recipe(setup, base_imgs, work / "recipe-random-encoder.yaml", work / "edited-random-encoder")
    rows.append({"method": "random (encoder size)", "neurons": 0, "weight_deltas": rnd_enc.delta_count(), **m})
    control = control_group(setup, len(res.targets))
    ctl = localize(
        setup.stats, work / "recipe-control-encoder.yaml", dataclasses.replace(enc, targets="all", group=control)
    )
    m = measure_recipe(setup, base_imgs, ctl.recipe_path, work / "edited-control-encoder")
    rows.append(
        {"method": "encoder aimed at non-memorized", "neurons": 0, "weight_deltas": ctl.recipe.delta_count(), **m}
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    lab_arguments(ap)
    ap.add_argument("--demo", type=Path, default=None, help="A memedit demo output folder to compare with.")
    ap.add_argument(
        "--methods", default=",".join(METHODS), help=f"Comma-separated subset of {','.join(METHODS)} (and controls)."
    )
    args = ap.parse_args()
    wanted = args.methods.split(",")
    if set(wanted) - set(METHODS):
        ap.error(f"unknown methods: {', '.join(sorted(set(wanted) - set(METHODS)))}; choose from {', '.join(METHODS)}")
    quiet_libraries()

    from memedit.localize import LocalizeSettings, localize
    from memedit.localize.baseline import random_baseline, random_mask_baseline
    from memedit.model.index import index_model
    from memedit.model.ref import resolve
    from memedit.recipe import dump, load_masks

    work = args.out or Path(tempfile.mkdtemp(prefix="memedit-efficacy-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    setup = lab_setup(work, args.seeds, args.steps, args.first_seed)
    stats, gen = setup.stats, setup.gen
    base_imgs, base = base_row(setup)
    rows = []
    rows.append({"method": "none (base)", "neurons": 0, **base})
    index = index_model(resolve("lab"))
    recipes = {}
    for method in [m for m in ("nemo", "subspace", "both", "attribution") if m in wanted]:
        # attribution has no detection step of its own: it localizes the prompts labelled memorized
        settings = LocalizeSettings(method=method, targets="labels" if method == "attribution" else "flagged")
        res = localize(stats, work / f"recipe-{method}.yaml", settings)
        recipes[method] = res
        m = measure_recipe(setup, base_imgs, res.recipe_path, work / f"edited-{method}")
        rows.append({"method": method, "neurons": res.neurons, "mask_entries": res.mask_entries, **m})
    # memedit's default: the text-encoder edit at its default strength and refinement rounds, on the
    # targets `auto` picks (the labels of the demo's calibration); its two controls: a random delta of
    # the same norm on the same tensor, and the same procedure aimed at as many non-memorized
    # calibration prompts
    enc = LocalizeSettings(method="encoder", targets="auto")
    if "encoder" in wanted:
        encoder_rows(setup, base_imgs, work, enc, rows)
    for method in [m for m in ("nemo", "attribution") if m in recipes]:
        rnd = random_baseline(recipes[method].recipe, index, seed=0)
        if rnd.edits:
            dump(rnd, work / f"recipe-random-{method}.yaml")
            edited = work / f"edited-random-{method}"
            m = measure_recipe(setup, base_imgs, work / f"recipe-random-{method}.yaml", edited)
            rows.append({"method": f"random ({method} size)", "neurons": rnd.neuron_count(), **m})
    # the subspace edit's control: as many random mask entries in every row of the same layers
    if sub := recipes.get("subspace"):
        rnd_sub, rnd_masks = random_mask_baseline(sub.recipe, load_masks(sub.recipe, sub.recipe_path), seed=0)
        if rnd_sub.edits:
            dump(rnd_sub, work / "recipe-random-masks.yaml", rnd_masks)
            m = measure_recipe(setup, base_imgs, work / "recipe-random-masks.yaml", work / "edited-random-masks")
            rows.append({"method": "random (subspace size)", "neurons": 0, "mask_entries": sub.mask_entries, **m})
    # the rule of `localize --confirm` (reference-free) against the training images, on every memorized
    # prompt: confirmed (seed-to-seed SSIM below mean + 1 std of ordinary prompts' on the base model; here
    # the 25 novel prompts' images) should mean "does not reproduce its training image"
    from memedit.generate import diversity
    from memedit.localize.confirm import threshold

    confirm_threshold = threshold([diversity(x) for x in base_imgs["novel"]])
    for r in rows:
        r["denoising_loss_change"] = r["denoising_loss"] / base["denoising_loss"] - 1
        confirmed = [c < confirm_threshold for c in r["seed_consistency"]]
        r["confirmed"] = float(np.mean(confirmed))
        r["confirm_agrees"] = float(
            np.mean([c == (not rep) for c, rep in zip(confirmed, r["per_prompt_reproduces"], strict=True)])
        )

    cols = [
        "method",
        "neurons",
        "weight_deltas",
        "reproduction_rate",
        "prompts_reproducing",
        "mean_ssim_to_training",
        "detection_score",
        "preservation_nonmemorized",
        "preservation_novel",
        "denoising_loss_change",
        "confirmed",
        "confirm_agrees",
    ]
    common.table(rows, cols)
    print(f"confirmation threshold (seed-to-seed SSIM, novel prompts on the base model): {confirm_threshold:.3f}")
    methods = [m for m in ("nemo", "subspace", "attribution") if m in wanted] + (
        [("encoder", enc)] if "encoder" in wanted else []
    )
    folds = [] if args.no_folds else held_out_folds(setup, work, base_imgs, methods)
    if folds:
        print()
        common.table(folds, FOLD_COLUMNS)
    default_method = LocalizeSettings().method
    default = next((r for r in rows if r["method"] == default_method), None)
    rand = next((r for r in rows if r["method"] == f"random ({default_method} size)"), None)
    targets, demo_check = {}, None
    if default is None:
        print(f"default method ({default_method}) not in --methods: no targets checked")
    else:
        print(f"default method: {default_method}")
        targets = {
            "default method: reproduction from >= 0.9 to <= 0.1": base["prompts_reproducing"] >= 0.9
            and default["prompts_reproducing"] <= 0.1,
            "random baseline keeps >= 0.8": rand is not None and rand["prompts_reproducing"] >= 0.8,
            "preservation SSIM >= 0.85": default["preservation_nonmemorized"] >= 0.85,
            "denoising loss up <= 5%": default["denoising_loss_change"] <= 0.05,
        }
        for k, v in targets.items():
            print(f"{'PASS' if v else 'FAIL'}  {k}")
        demo_check = compare_with_demo(args.demo, base, default, rand) if args.demo else None
    common.write(
        "efficacy",
        {
            "rows": rows,
            "folds": folds,
            "targets": targets,
            "confirm_threshold": confirm_threshold,
            "demo_check": demo_check,
            "seconds": time.perf_counter() - t0,
            "settings": {"seeds": list(gen.seeds), "steps": gen.steps, "methods": wanted},
        },
    )


if __name__ == "__main__":
    main()
