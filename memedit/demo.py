"""`memedit demo`: the whole pipeline on the bundled lab model, stage by stage, timed.

calibrate -> detect -> localize -> apply -> verify -> diff -> eval, plus the random baseline of the
same size, ending in one summary table. Every number comes from the stage that computed it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from memedit.errors import MemeditError


@dataclass
class DemoResult:
    out_dir: Path
    stage_seconds: dict[str, float] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)  # for people
    numbers: dict = field(default_factory=dict)  # for benchmarks and tests


def run_demo(
    out_dir: str | Path = "memedit-demo",
    method: str = "encoder",
    targets: str = "auto",
    seeds: int = 4,
    steps: int = 50,
    overwrite: bool = True,
    stage: Callable[[str], None] | None = None,
) -> DemoResult:
    from memedit.calibrate import CalibSettings, calibrate, load_stats
    from memedit.detect import auroc_tpr
    from memedit.diff import diff_models
    from memedit.edit import apply
    from memedit.evaluate import evaluate
    from memedit.generate import GenSettings, generate, load_image, reproduction
    from memedit.lab.check import lab_dir
    from memedit.localize import LocalizeSettings, localize, resolve_targets
    from memedit.localize.baseline import random_baseline, random_delta_baseline
    from memedit.localize.confirm import ConfirmSettings
    from memedit.manifest import verify
    from memedit.model.index import index_model
    from memedit.model.load import load_pipeline
    from memedit.model.ref import resolve
    from memedit.recipe import dump, load_deltas

    out = Path(out_dir)
    if out.exists():
        if not overwrite:
            raise MemeditError(f"{out} already exists", "pass --overwrite or another -o")
        if not (out / "memedit-demo.txt").is_file() and any(out.iterdir()):
            raise MemeditError(f"{out} exists and was not written by memedit demo", "choose another -o")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "memedit-demo.txt").write_text("Output of memedit demo; safe to delete.\n")
    lab = lab_dir()
    res = DemoResult(out)
    t0 = time.perf_counter()

    def timed(name: str):
        now = time.perf_counter()
        res.stage_seconds[name] = now - timed.last
        timed.last = now
        if stage:
            stage(f"{name} done in {res.stage_seconds[name]:.1f} s")

    timed.last = t0
    if stage:
        stage("calibrate: activation statistics and detection scores on the lab's calibration prompts")
    cal = calibrate("lab", lab / "prompts" / "calibration.jsonl", None, out / "stats", CalibSettings())
    timed("calibrate")
    info, tensors = load_stats(out / "stats")
    labels = info["labels"]
    auroc, tpr = auroc_tpr(labels, tensors["detect/scores"].tolist())
    flagged = set(info["detection"]["flagged"])
    true_pos = sum(1 for i in flagged if labels[i])
    timed("detect")
    used = resolve_targets(info, targets)
    aimed = len(flagged) if used == "flagged" else sum(1 for x in labels if x)
    which = "flagged" if used == "flagged" else "labelled memorized"
    if stage:
        stage(f"localize ({method}) on the {aimed} {which} prompts")
    gen = GenSettings(seeds=tuple(range(1000, 1000 + seeds)), steps=steps)
    settings = LocalizeSettings(method=method, targets=targets)
    # a refined encoder fit already asked an image oracle of every target under the final edit (does it
    # still draw its base image at the oracle's seeds?); the seed-variation check would generate the
    # targets once more and cannot tell "one new image at every seed" from "its training image"
    refined = method == "encoder" and settings.encoder.rounds > 0
    check = None if refined else ConfirmSettings(seeds=gen.seeds, steps=gen.steps, guidance=gen.guidance)
    loc = localize(out / "stats", out / "recipe.yaml", settings, confirm=check)
    timed("localize")
    apply(loc.recipe_path, out / "edited")
    timed("apply")
    ver = verify(out / "edited")
    if not ver.ok:
        raise RuntimeError("verify failed on a fresh apply: " + "; ".join(ver.problems))
    timed("verify")
    d = diff_models("lab", str(out / "edited"), loc.recipe_path)
    timed("diff")
    if stage:
        stage("eval: base vs edited, same seeds, memorized and non-memorized prompts")
    metrics = evaluate(
        "lab", str(out / "edited"), lab / "prompts" / "eval.jsonl", lab / "images", out / "report", settings=gen
    )
    timed("eval")
    if loc.recipe.delta_count():
        base_recipe, rnd_deltas = random_delta_baseline(loc.recipe, load_deltas(loc.recipe, loc.recipe_path), seed=0)
    else:
        base_recipe, rnd_deltas = random_baseline(loc.recipe, index_model(resolve("lab")), seed=0), None
    rnd_rate = None
    if base_recipe.edits:
        dump(base_recipe, out / "random-recipe.yaml", deltas=rnd_deltas)
        apply(out / "random-recipe.yaml", out / "random")
        pipe = load_pipeline(resolve(str(out / "random")))
        mem = [r for r in metrics["per_prompt"] if r["reference"]]
        imgs = generate(pipe, [r["prompt"] for r in mem], gen)
        rnd_rate = sum(
            reproduction(im, load_image(lab / "images" / r["reference"]))[0] for im, r in zip(imgs, mem, strict=True)
        ) / len(mem)
    timed("random baseline")
    s = metrics["summary"]
    if refined:
        stopped = len(loc.targets) - sum(loc.refinement[-1].still)
        first, last_seed = settings.encoder.oracle_seeds[0], settings.encoder.oracle_seeds[-1]
        check_key = f"stopped by the refinement's image oracle (seeds {first}-{last_seed}, no training image)"
        check_value = f"{stopped} of {len(loc.targets)}"
    else:
        stopped = sum(loc.confirmation.confirmed)
        check_key = "confirmed by images at localize (no training image)"
        check_value = f"{stopped} of {len(loc.confirmation.prompts)}"
    res.summary = {
        "calibration prompts": cal.prompts,
        "flagged (true memorized)": f"{cal.flagged} ({true_pos})",
        "detection AUROC / TPR@1%FPR": f"{auroc:.3f} / {tpr:.3f}",
        "localized on": f"{len(loc.targets)} {which} prompts",
        "neurons pruned": loc.neurons + loc.mask_entries,
        "layers with a weight delta": loc.recipe.delta_count(),
        check_key: check_value,
        "reproduction rate before -> after": "{:.2f} -> {:.2f}".format(
            s["reproduction_rate_base"], s["reproduction_rate_edited"]
        ),
        "random baseline (same size) reproduction": "n/a" if rnd_rate is None else f"{rnd_rate:.2f}",
        "preservation SSIM (non-memorized)": f"{s['preservation_ssim']:.3f}",
        "diff against recipe": "clean" if d.clean else "NOT clean",
        "verify": "OK" if ver.ok else "FAILED",
        "edited model": str(out / "edited"),
        "report": str(out / "report" / "report.html"),
        "total time": f"{time.perf_counter() - t0:.0f} s",
    }
    res.numbers = {
        "reproduction_rate_base": s["reproduction_rate_base"],
        "reproduction_rate_edited": s["reproduction_rate_edited"],
        "random_reproduction_rate": rnd_rate,
        "preservation_ssim": s["preservation_ssim"],
        "neurons": loc.neurons,
        ("stopped_at_oracle" if refined else "confirmed_at_localize"): stopped,
        "auroc": auroc,
        "tpr_at_1fpr": tpr,
    }
    # for benchmarks/efficacy.py --demo, which checks that it measures the same numbers
    (out / "demo.json").write_text(
        json.dumps(
            {"numbers": res.numbers, "summary": res.summary, "stage_seconds": res.stage_seconds},
            indent=2,
            sort_keys=True,
        )
    )
    return res
