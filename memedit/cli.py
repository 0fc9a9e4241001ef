"""The `memedit` command: thin verbs over the library. Results on stdout, everything else on stderr.

Every user mistake ends as one line, `error: <what>. <how to fix>`, and exit code 2; bugs keep their
traceback. `--debug` (or MEMEDIT_DEBUG=1) shows tracebacks for our own errors too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from memedit import __version__
from memedit.errors import MemeditError

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


def emit_json(obj: object) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


# Shared options, defined once and stacked on verbs.
model_argument = click.argument("model", metavar="MODEL")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
variant_option = click.option("--variant", default=None, help="Weight-file variant to read, e.g. fp16.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress display.")
preset_option = click.option(
    "--preset",
    default=None,
    metavar="NAME|FILE",
    help="Localization preset: sd1, sd2, sdxl, lab (memedit/recipes/) or a preset file; explicit options win.",
)
device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "cpu", "cuda", "mps"]),
    help="Where to run.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="memedit")
@click.option("--debug", is_flag=True, help="Show tracebacks for memedit's own errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Find and remove memorized training images from text-to-image diffusion models."""
    from memedit._quiet import quiet_libraries

    quiet_libraries()
    ctx.obj = {"debug": debug}


@cli.command("inspect")
@model_argument
@variant_option
@json_option
def inspect_cmd(model: str, variant: str | None, as_json: bool) -> None:
    """Components, files, dtypes, parameter counts and the editable layers of MODEL.

    Reads safetensors headers and configs only; no weights are loaded.

    \b
    Examples:
      memedit inspect lab
      memedit inspect ./stable-diffusion-v1-5 --json
      memedit inspect v1-5-pruned-emaonly.safetensors
    """
    from memedit.inspect import inspect_model

    report = inspect_model(model, variant=variant)
    if as_json:
        emit_json(report)
        return
    err.print(f"[dim]model:[/] {escape(report['resolved'])}")
    t = Table(title=f"{escape(report['model'])} — {report['architecture']}, {report['layout']} layout")
    for col in ("component", "tensors", "parameters", "dtypes"):
        t.add_column(col, justify="right" if col in ("tensors", "parameters") else "left")
    for c in report["components"]:
        dt = ", ".join(f"{k}×{v}" for k, v in c["dtypes"].items())
        t.add_row(escape(c["name"]), str(c["tensors"]), f"{c['parameters']:,}", dt)
    out.print(t)
    lt = Table(title=f"editable layers: {report['counts']['value']} value, {report['counts']['ffn']} ffn")
    for col in ("layer", "kind", "neurons", "in", "original key" if report["layout"] == "single_file" else "file"):
        lt.add_column(col)
    for layer in report["layers"]:
        last = layer["weight_keys"][0] if report["layout"] == "single_file" else Path(layer["file"]).name
        lt.add_row(escape(layer["name"]), layer["kind"], str(layer["neurons"]), str(layer["in_features"]), escape(last))
    out.print(lt)


def _progress_bar(quiet: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=quiet or not err.is_terminal,
    )


@cli.command("calibrate")
@model_argument
@click.option("--prompts", "prompts_file", required=True, help="Calibration prompts (.txt, .jsonl, .csv).")
@click.option(
    "--holdout",
    "holdout_file",
    default=None,
    help="Non-memorized prompts for hold-out statistics and the detection threshold "
    "(default for 'lab': its bundled hold-out set).",
)
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Stats folder to write.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 4096), help="Prompts per batch.")
@device_option
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "float32", "float16", "bfloat16"]),
    help="auto: float32 on CPU, else float16.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Base seed of the per-prompt latents.")
@click.option(
    "--steps",
    "k",
    default=1,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Detection: first K sampler steps averaged.",
)
@click.option(
    "--generations", default=4, show_default=True, type=click.IntRange(1, 256), help="Detection: latents per prompt."
)
@click.option(
    "--ffn-steps",
    default=10,
    show_default=True,
    type=click.IntRange(0, 1000),
    help="UNet calls traced for FFN usage (0 = value neurons and detection only).",
)
@click.option("--resolution", default=None, type=click.IntRange(8, 4096), help="Pixels (default: the model's).")
@click.option(
    "--fpr",
    default=0.01,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Target false-positive rate of the detection threshold.",
)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option(
    "--shard",
    default=None,
    metavar="I/N",
    help="Run only shard I of N (batches I, I+N, ...); combine with 'memedit stats merge'.",
)
@click.option(
    "--recipe-out",
    default=None,
    type=click.Path(path_type=Path),
    help="Localize right after calibration and write this recipe.yaml (method and settings from --preset).",
)
@preset_option
@json_option
@quiet_option
def calibrate_cmd(
    model,
    prompts_file,
    holdout_file,
    out_dir,
    batch_size,
    device,
    dtype,
    seed,
    k,
    generations,
    ffn_steps,
    resolution,
    fpr,
    overwrite,
    shard,
    recipe_out,
    preset,
    as_json,
    quiet,
) -> None:
    """Collect activation statistics and detection scores of MODEL on calibration prompts.

    Writes STATS_DIR/stats.safetensors + stats.json. An interrupted run continues from its last
    completed batch when the same command is run again.

    \b
    Examples:
      memedit calibrate lab --prompts memedit/lab/prompts/memorized.jsonl -o stats/
      memedit calibrate ./sd-v1-5 --prompts sdv1_500_memorized.jsonl --holdout coco.txt -o stats/ --dtype float16
      memedit calibrate lab --prompts memedit/lab/prompts/calibration.jsonl -o stats/ --recipe-out recipe.yaml
    """
    from memedit.calibrate import CalibSettings, calibrate
    from memedit.detect import DetectSettings

    if recipe_out is not None and shard:
        raise MemeditError("--recipe-out needs the whole calibration", "merge the shards, then run memedit localize")
    if preset is not None and recipe_out is None:
        raise MemeditError("--preset applies to the recipe", "add --recipe-out recipe.yaml, or use it with localize")

    settings = CalibSettings(
        detect=DetectSettings(k=k, generations=generations, seed=seed, resolution=resolution, batch_size=batch_size),
        ffn_steps=ffn_steps,
        fpr=fpr,
        dtype=dtype,
        device=device,
    )
    with _progress_bar(quiet) as prog:
        task = prog.add_task("calibrate", total=None)

        def progress(kind: str, done: int, total: int) -> None:
            prog.update(task, total=total, completed=done, description=f"calibrate ({kind})")

        result = calibrate(
            model,
            prompts_file,
            holdout_file,
            out_dir,
            settings,
            overwrite=overwrite,
            progress=progress,
            shard=_parse_shard(shard),
        )
    if shard:
        out.print(f"shard {shard} written to {escape(str(out_dir))}; merge all shards with: memedit stats merge")
        return
    summary = {
        "stats": str(result.out_dir),
        "prompts": result.prompts,
        "holdout": result.holdout,
        "flagged": result.flagged,
        "threshold": result.threshold,
    }
    if recipe_out is not None:
        from memedit.localize import LocalizeSettings, localize

        with _progress_bar(quiet) as prog:
            task = prog.add_task("localize", total=None)
            res = localize(
                result.out_dir,
                recipe_out,
                LocalizeSettings(),
                device=device,
                progress=lambda d, t: prog.update(task, completed=d, total=t),
                preset=preset,
            )
        summary.update(
            {
                "recipe": str(res.recipe_path),
                "neurons": res.neurons,
                "mask_entries": res.mask_entries,
                "weight_deltas": res.recipe.delta_count(),
                "edit": _edit_size(res),
            }
        )
    if as_json:
        emit_json(summary)
    else:
        out.print(
            f"calibrated {result.prompts} prompts against {result.holdout} hold-out prompts; "
            f"{result.flagged} flagged as memorized (threshold {result.threshold:.4g} at {fpr:.0%} FPR)"
        )
        out.print(f"stats: {escape(str(result.out_dir))}")
        if recipe_out is not None:
            out.print(f"recipe: {escape(summary['recipe'])} ({summary['edit']})")


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not I/N", param_hint="--shard") from None
    if not (n >= 1 and 0 <= i < n):
        raise click.BadParameter(f"{text!r}: need 0 <= I < N", param_hint="--shard")
    return i, n


@cli.group("stats")
def stats_group() -> None:
    """Calibration statistics: merge shards."""


@stats_group.command("merge")
@click.argument("shards", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True)
def stats_merge(shards, out_dir, overwrite) -> None:
    """Merge the shard folders of one `calibrate --shard i/n` run into one stats folder.

    \b
    Example:
      memedit stats merge s0/ s1/ -o stats/
    """
    from memedit.calibrate import merge_shards

    r = merge_shards(list(shards), out_dir, overwrite)
    out.print(
        f"merged {len(shards)} shards: {r.prompts} prompts, {r.holdout} hold-out, {r.flagged} flagged -> "
        f"{escape(str(out_dir))}"
    )


@cli.command("detect")
@model_argument
@click.option("--prompts", "prompts_file", required=True, help="Prompts to score (.txt, .jsonl, .csv).")
@click.option("--holdout", "holdout_file", default=None, help="Non-memorized prompts that set the threshold.")
@click.option("--threshold", type=float, default=None, help="Use this score threshold instead of a hold-out set.")
@click.option(
    "--fpr",
    default=0.01,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Target false-positive rate on the hold-out prompts.",
)
@click.option("--labels", "labels_file", default=None, help="A .jsonl with 'prompt' and 'memorized' ground truth.")
@click.option(
    "--steps", "k", default=1, show_default=True, type=click.IntRange(1, 1000), help="First K sampler steps averaged."
)
@click.option("--generations", default=4, show_default=True, type=click.IntRange(1, 256), help="Latents per prompt.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 4096))
@device_option
@click.option(
    "--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "float16", "bfloat16"])
)
@json_option
@quiet_option
def detect_cmd(
    model,
    prompts_file,
    holdout_file,
    threshold,
    fpr,
    labels_file,
    k,
    generations,
    seed,
    batch_size,
    device,
    dtype,
    as_json,
    quiet,
) -> None:
    """Score prompts for memorization (Wen et al. 2024) and flag those above a threshold.

    \b
    Examples:
      memedit detect lab --prompts memedit/lab/prompts/memorized.jsonl
      memedit detect ./sd-v1-5 --prompts mine.txt --holdout coco.txt --json
    """
    from memedit.detect import DetectSettings, detect

    if threshold is not None and holdout_file is not None:
        raise click.UsageError("give either --threshold or --holdout, not both")
    settings = DetectSettings(k=k, generations=generations, seed=seed, batch_size=batch_size)
    with _progress_bar(quiet) as prog:
        task = prog.add_task("detect", total=None)
        res = detect(
            model,
            prompts_file,
            holdout_file,
            settings,
            threshold,
            fpr,
            labels_file,
            device,
            dtype,
            progress=lambda d, t: prog.update(task, completed=d, total=t),
        )
    if as_json:
        emit_json(res.to_json())
        return
    t = Table(title=f"memorization scores (threshold {res.threshold:.4g}, {res.threshold_source})")
    for col in ("score", "flagged", "prompt"):
        t.add_column(col)
    for p, sc, f in zip(res.prompts, res.scores, res.flagged, strict=True):
        t.add_row(f"{sc:.4g}", "[bold red]yes[/]" if f else "no", escape(p))
    out.print(t)
    out.print(f"{sum(res.flagged)} of {len(res.prompts)} prompts flagged")
    if res.auroc is not None:
        out.print(f"AUROC {res.auroc:.4f}, TPR@1%FPR {res.tpr_at_1fpr:.4f}")


@cli.command("explain")
@model_argument
@click.argument("prompt")
@click.option(
    "--steps",
    "k",
    default=1,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="First K sampler steps the score (occlusion) or the gradients (gradient) average over.",
)
@click.option("--generations", default=4, show_default=True, type=click.IntRange(1, 256))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option(
    "--method",
    default="occlusion",
    show_default=True,
    type=click.Choice(["gradient", "occlusion"]),
    # occlusion is the default because it is the one measured faithful (benchmarks/detect.py: deleting
    # its top token lowers the score more than an average deletion in 22/22 lab prompts, gradient 7/22)
    help="occlusion: the score's drop when each token is deleted; gradient: Wen et al.'s significance.",
)
@device_option
@json_option
def explain_cmd(model, prompt, k, generations, seed, method, device, as_json) -> None:
    """Which tokens of PROMPT drive its memorization score.

    \b
    Examples:
      memedit explain lab "a photo of an orange cat with green eyes looking to the left"
      memedit explain lab "a photo of an orange cat with green eyes looking to the left" --method gradient
    """
    from memedit.detect import DetectSettings, explain
    from memedit.model.load import load_pipeline, pick_device
    from memedit.model.ref import resolve

    if not prompt.strip():
        raise MemeditError("the prompt is empty", "pass the prompt text in quotes")
    dev = pick_device(device)
    pipe = load_pipeline(resolve(model), torch_dtype_for(dev), dev)
    ex = explain(pipe, prompt, DetectSettings(k=k, generations=generations, seed=seed), method)
    if as_json:
        emit_json(ex.to_json())
        return
    top = max([0.0, *ex.significance])
    order = sorted(range(len(ex.tokens)), key=lambda i: -ex.significance[i])
    hot = set(order[: max(1, len(order) // 5)])
    what = "gradient significance" if ex.method == "gradient" else "score drop when deleted"
    t = Table(title=f"{what} per token (score {ex.score:.4g})")
    for col in ("#", "token", "significance", ""):
        t.add_column(col)
    for i, (tok, s) in enumerate(zip(ex.tokens, ex.significance, strict=True)):
        bar = "█" * max(1, round(30 * s / top)) if top > 0 and s > 0 else ""
        style = "bold red" if i in hot else ""
        t.add_row(str(i + 1), Text(tok, style=style), f"{s:.4g}", Text(bar, style=style or "cyan"))
    out.print(t)
    if ex.eos_padding is not None:
        out.print(f"EOS + padding positions together: {ex.eos_padding:.4g}")


# localize options that a preset may set, by the LocalizeSettings field they map to
_PRESET_FIELDS = {
    "method": "method",
    "targets": "targets",
    "layers": "nemo.layers",
    "no_joint_refine": "joint_refine",
    "rho": "subspace.rho",
    "subspace_steps": "subspace.steps",
    "structured": "subspace.structured",
    "strength": "encoder.strength",
    "ridge": "encoder.ridge",
    "refine_rounds": "encoder.rounds",
}


def _explicit(ctx: click.Context) -> frozenset[str]:
    """Settings the user gave on the command line: they win over a preset's values."""
    src = click.core.ParameterSource.COMMANDLINE
    return frozenset(f for p, f in _PRESET_FIELDS.items() if p in ctx.params and ctx.get_parameter_source(p) == src)


def torch_dtype_for(device):
    import torch

    return torch.float32 if device.type == "cpu" else torch.float16


def _edit_size(res) -> str:
    """What a localization wrote, in the units of its method: weight deltas (remap, encoder) or neurons."""
    added = res.recipe.delta_count()
    if added and added == len(res.recipe.edits):
        return f"weight deltas on {added} layer(s)"
    return (
        f"{res.neurons} neurons"
        + (f" and {res.mask_entries} masked weights" if res.mask_entries else "")
        + f" in {len(res.recipe.edits)} layers"
    )


@cli.command("localize")
@click.argument("stats_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_path", required=True, type=click.Path(path_type=Path), help="recipe.yaml to write.")
@click.option(
    "--method",
    default="encoder",
    show_default=True,
    type=click.Choice(["nemo", "subspace", "both", "attribution", "remap", "encoder"]),
    help="memedit's edit of the text encoder's last feed-forward output map (refined by an image oracle), "
    "NeMo value neurons, the shared FFN subspace, both, loss attribution over all value layers, or a "
    "closed-form remap of every cross-attention key and value map.",
)
@click.option(
    "--targets",
    default="auto",
    show_default=True,
    type=click.Choice(["flagged", "labels", "all", "auto"]),
    help="Which calibration prompts to localize: flagged by detection, labelled memorized, all, or auto "
    "(labelled memorized when every calibration prompt carries a label, else flagged).",
)
@click.option(
    "--layers",
    default="down+mid",
    show_default=True,
    type=click.Choice(["down+mid", "all"]),
    help="NeMo: value layers searched (the paper searches down and mid blocks).",
)
@click.option("--no-joint-refine", is_flag=True, help="NeMo: keep the plain union of per-prompt sets.")
@click.option(
    "--rho", default=0.01, show_default=True, type=click.FloatRange(0, 1), help="Subspace: top share per row."
)
@click.option(
    "--subspace-steps",
    default=10,
    show_default=True,
    type=click.IntRange(1, 1000),
    help="Subspace: UNet calls unioned.",
)
@click.option("--structured", is_flag=True, help="Subspace: zero whole neurons (zero_cols) instead of weights.")
@click.option(
    "--share",
    default=0.1,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="Attribution: share of all value neurons zeroed.",
)
@click.option(
    "--strength",
    default=None,
    type=click.FloatRange(0, min_open=True),
    help="Remap and encoder: weight of keeping hold-out prompts against removing the targets (higher keeps "
    "more). [default: remap 3, encoder 40]",
)
@click.option(
    "--ridge",
    default=0.001,
    show_default=True,
    type=click.FloatRange(0),
    help="Remap and encoder: pull toward no change, so that directions no prompt uses are kept (0: the plain fit).",
)
@click.option(
    "--refine-rounds",
    default=None,
    type=click.IntRange(0, 20),
    help="Encoder: refits after the first; each boosts the targets whose images still match the base "
    "model's at 4 oracle seeds (seeds 7000-7003, apart from evaluation seeds). [default: 3]",
)
@click.option("--model", default=None, help="Model to localize on (default: the one the stats came from).")
@click.option("--allow-model-mismatch", is_flag=True, help="Proceed when the model's digests differ (recorded).")
@click.option(
    "--confirm",
    is_flag=True,
    help="Generate the target prompts from the edited model at 4 seeds and record whether their images "
    "now vary across seeds like hold-out prompts' (no training images needed).",
)
@click.option("--holdout", default=None, help="Hold-out prompts for --confirm (default: those of the statistics).")
@preset_option
@device_option
@json_option
@quiet_option
@click.pass_context
def localize_cmd(
    ctx: click.Context,
    stats_dir,
    out_path,
    method,
    targets,
    layers,
    no_joint_refine,
    rho,
    subspace_steps,
    structured,
    share,
    strength,
    ridge,
    refine_rounds,
    model,
    allow_model_mismatch,
    confirm,
    holdout,
    preset,
    device,
    as_json,
    quiet,
) -> None:
    """Find the neurons that carry memorization and write them as an explicit recipe.

    \b
    Examples:
      memedit localize stats/ -o recipe.yaml
      memedit localize stats/ -o recipe.yaml --method both --targets labels
      memedit localize stats/ -o recipe.yaml --preset sd1
      memedit localize stats/ -o recipe.yaml --confirm
      memedit localize stats/ -o recipe.yaml --method attribution --share 0.1
      memedit localize stats/ -o recipe.yaml --method remap --strength 3
      memedit localize stats/ -o recipe.yaml --strength 15 --refine-rounds 0
    """
    from memedit.localize import LocalizeSettings, localize
    from memedit.localize.confirm import ConfirmSettings

    if holdout is not None and not confirm:
        raise MemeditError("--holdout is only read by --confirm", "add --confirm, or drop --holdout")
    cmdline = click.core.ParameterSource.COMMANDLINE
    given = {
        p for p in ("share", "strength", "ridge", "refine_rounds", "method") if ctx.get_parameter_source(p) == cmdline
    }
    for option, owners in (
        ("share", ("attribution",)),
        ("strength", ("remap", "encoder")),
        ("ridge", ("remap", "encoder")),
        ("refine_rounds", ("encoder",)),
    ):
        if option in given and method not in owners and (preset is None or "method" in given):
            which = " and ".join(f"--method {o}" for o in owners)
            flag = option.replace("_", "-")
            raise MemeditError(
                f"--{flag} is only read by {which}", f"add {which.replace(' and ', ' or ')}, or drop --{flag}"
            )
    from memedit.localize.attribution import AttributionSettings
    from memedit.localize.encoder import EncoderSettings
    from memedit.localize.nemo import NemoSettings
    from memedit.localize.remap import RemapSettings
    from memedit.localize.subspace import SubspaceSettings

    settings = LocalizeSettings(
        method=method,
        targets=targets,
        nemo=NemoSettings(layers=layers),
        joint_refine=not no_joint_refine,
        subspace=SubspaceSettings(rho=rho, steps=subspace_steps, structured=structured),
        attribution=AttributionSettings(share=share),
        remap=RemapSettings(ridge=ridge, **({"strength": strength} if strength is not None else {})),
        encoder=EncoderSettings(
            ridge=ridge,
            **({"strength": strength} if strength is not None else {}),
            **({"rounds": refine_rounds} if refine_rounds is not None else {}),
        ),
    )
    with _progress_bar(quiet) as prog:
        task = prog.add_task("localize", total=None)
        res = localize(
            stats_dir,
            out_path,
            settings,
            model,
            allow_model_mismatch,
            device,
            progress=lambda d, t: prog.update(task, completed=d, total=t),
            preset=preset,
            explicit=_explicit(ctx),
            confirm=ConfirmSettings() if confirm else None,
            holdout=holdout,
        )
    calls = [p.unet_sample_forwards for p in res.per_prompt]
    summary = {
        "recipe": str(res.recipe_path),
        "targets": len(res.targets),
        "neurons": res.neurons,
        "mask_entries": res.mask_entries,
        "edits": len(res.recipe.edits),
        "unet_sample_forwards_per_prompt": (sum(calls) / len(calls)) if calls else 0,
    }
    conf = res.confirmation
    if conf is not None:
        summary["confirmed"] = sum(conf.confirmed)
        summary["confirmation_threshold"] = conf.threshold
    if as_json:
        emit_json(summary)
        return
    out.print(f"{summary['targets']} target prompts -> {_edit_size(res)}")
    if calls:
        out.print(f"NeMo cost: {summary['unet_sample_forwards_per_prompt']:.0f} UNet sample-forwards per prompt")
    if conf is not None:
        out.print(
            f"confirmed by images: {sum(conf.confirmed)} of {len(conf.prompts)} target prompts vary across "
            f"seeds under the edit (seed-to-seed SSIM < {conf.threshold:.3f}, hold-out mean + 1 std)"
        )
        if not all(conf.confirmed):
            err.print(
                f"warning: unconfirmed: {len(conf.prompts) - sum(conf.confirmed)} of {len(conf.prompts)} target "
                "prompts give alike images at every seed under this edit (calibration.confirmation in the recipe)",
                soft_wrap=True,
            )
    out.print(f"recipe: {escape(str(res.recipe_path))}")


@cli.command("apply")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--model", default=None, help="Model to edit (default: the recipe's source).")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty output folder.")
@click.option("--allow-model-mismatch", is_flag=True, help="Apply to a model whose digests differ (recorded).")
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@click.option(
    "--fill",
    default="zeros",
    show_default=True,
    type=click.Choice(["zeros", "noise"]),
    help="Pruned positions: zeros, or seeded noise of the tensor's scale (harder to find and refill).",
)
@click.option("--fill-seed", default=0, show_default=True, type=int, help="Seed of --fill noise (recorded).")
@json_option
def apply_cmd(recipe, model, out_dir, overwrite, allow_model_mismatch, dry_run, fill, fill_seed, as_json) -> None:
    """Apply RECIPE to a model: an edited copy with the recipe and a provenance manifest.

    \b
    Examples:
      memedit apply recipe.yaml -o edited/
      memedit apply recipe.yaml --model ./sd-v1-5 -o sd-v1-5-edited/ --dry-run
      memedit apply recipe.yaml -o edited/ --fill noise --fill-seed 7
    """
    from memedit.edit import execute, plan
    from memedit.fill import Fill

    p = plan(recipe, model, allow_model_mismatch, Fill(fill, fill_seed))
    if dry_run:
        if as_json:
            emit_json({"model": str(p.ref), "out": str(out_dir), "plan": p.describe()})
        else:
            out.print(f"plan for {escape(str(p.ref))} -> {escape(str(out_dir))} (dry run, nothing written):")
            for line in p.describe():
                out.print("  " + escape(line))
        return
    statement = execute(p, out_dir, overwrite)
    tensors = statement["predicate"]["buildDefinition"]["internalParameters"]["edited_tensors"]
    summary = {
        "out": str(out_dir),
        "files": len(statement["subject"]),
        "edited_tensors": len(tensors),
        "changed_elements": sum(t["changed_elements"] for t in tensors),
    }
    if as_json:
        emit_json(summary)
    else:
        out.print(
            f"wrote {escape(str(out_dir))}: {summary['edited_tensors']} tensors edited "
            f"({summary['changed_elements']} elements changed), {summary['files']} files with provenance"
        )


@cli.command("verify")
@click.argument("folder", type=click.Path(path_type=Path))
@json_option
def verify_cmd(folder, as_json) -> None:
    """Recompute every digest of an edited model and check its edits. Exit 0 only if all match.

    \b
    Example:
      memedit verify edited/
    """
    from memedit.manifest import verify

    rep = verify(folder)
    if as_json:
        emit_json(
            {
                "folder": str(rep.folder),
                "ok": rep.ok,
                "problems": list(rep.problems),
                "files_checked": rep.files_checked,
                "tensors_checked": rep.tensors_checked,
            }
        )
    elif rep.ok:
        out.print(f"OK: {rep.files_checked} files and {rep.tensors_checked} edited tensors match the provenance")
    else:
        for line in rep.problems:
            out.print(escape(line))
    if not rep.ok:
        raise SystemExit(1)


@cli.command("diff")
@click.argument("a")
@click.argument("b")
@click.option(
    "--recipe",
    "recipe_path",
    default=None,
    type=click.Path(path_type=Path),
    help="Check every change against this recipe.",
)
@click.option(
    "--provenance",
    "provenance",
    default=None,
    type=click.Path(path_type=Path),
    help="Check against the recipe recorded with this provenance file.",
)
@click.option(
    "--tolerance",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Absolute differences at or below this count as unchanged.",
)
@click.option("--summary", is_flag=True, help="One line only.")
@json_option
def diff_cmd(a, b, recipe_path, provenance, tolerance, summary, as_json) -> None:
    """Compare checkpoints A and B tensor by tensor and neuron by neuron.

    Exit 0: identical (or, with a recipe, every change explained and every edit present);
    1: differences; 2: bad input.

    \b
    Examples:
      memedit diff lab edited/ --recipe recipe.yaml
      memedit diff ./sd-v1-5 sd-v1-5-edited/ --provenance sd-v1-5-edited/memedit.provenance.json --json
    """
    from memedit.diff import diff_models, recipe_for

    if recipe_path and provenance:
        raise click.UsageError("give either --recipe or --provenance, not both")
    if provenance:
        from memedit.model.ref import require_file

        recipe_path = recipe_for(require_file(provenance, "provenance"))
    rep = diff_models(a, b, recipe_path, tolerance)
    ok = rep.clean if rep.against else rep.identical
    if as_json:
        emit_json(rep.to_json())
    elif summary:
        verdict = (
            ("clean: every change is in the recipe" if ok else "NOT clean")
            if rep.against
            else ("identical" if ok else "different")
        )
        out.print(f"{verdict}: {len(rep.changed)} tensors changed of {rep.compared} compared")
    else:
        _render_diff(rep)
    if not ok:
        raise SystemExit(1)


def _render_diff(rep) -> None:
    t = Table(title=f"{escape(rep.a)} -> {escape(rep.b)}: {len(rep.changed)} of {rep.compared} tensors changed")
    for col in ("tensor", "layer kind", "changed", "max |d|", "rel", "rows changed (zeroed)", "cols changed (zeroed)"):
        t.add_column(col)
    for c in rep.changed:
        t.add_row(
            escape(f"{c.component}/{c.name}"),
            c.kind or "",
            str(c.changed_elements),
            f"{c.max_abs:.3g}",
            f"{c.relative:.3g}",
            f"{len(c.rows_changed)} ({len(c.rows_zeroed)})",
            f"{len(c.cols_changed)} ({len(c.cols_zeroed)})",
        )
    out.print(t)
    for line in rep.only_in_a:
        out.print(f"only in A: {escape(line)}")
    for line in rep.only_in_b:
        out.print(f"only in B: {escape(line)}")
    for line in rep.dtype_or_shape:
        out.print(f"dtype/shape: {escape(line)}")
    if rep.recognized_edit:
        out.print(
            f"B carries a memedit provenance; check it with: memedit diff A B --recipe {escape(rep.recognized_edit)}"
        )
    if rep.against:
        for line in rep.unexplained:
            out.print(f"unexplained: {escape(line)}")
        for line in rep.missing:
            out.print(f"missing: {escape(line)}")
        out.print(
            "clean: every change is explained by the recipe and every edit is present" if rep.clean else "NOT clean"
        )


@cli.command("eval")
@click.argument("base")
@click.argument("edited")
@click.option("--prompts", "prompts_file", required=True, help="Prompts (.jsonl may name an 'image' reference).")
@click.option("--references", default=None, type=click.Path(path_type=Path), help="Folder of reference images.")
@click.option("--seeds", default=4, show_default=True, type=click.IntRange(2, 64), help="Generations per prompt.")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(1, 1000), help="Sampler steps.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Report folder.")
@click.option("--overwrite", is_flag=True)
@json_option
@quiet_option
def eval_cmd(base, edited, prompts_file, references, seeds, steps, out_dir, overwrite, as_json, quiet) -> None:
    """Generate with fixed seeds on BASE and EDITED; metrics, report.html and grid.png.

    \b
    Example:
      memedit eval lab edited/ --prompts memedit/lab/prompts/eval.jsonl --references memedit/lab/images -o report/
    """
    from memedit.evaluate import SUMMARY_LABELS, evaluate
    from memedit.generate import GenSettings

    settings = GenSettings(seeds=tuple(range(1000, 1000 + seeds)), steps=steps)
    with _progress_bar(quiet) as prog:
        task = prog.add_task("eval: generating", total=None)
        m = evaluate(
            base,
            edited,
            prompts_file,
            references,
            out_dir,
            settings,
            overwrite=overwrite,
            progress=lambda d, t: prog.update(task, completed=d, total=t),
        )
    if as_json:
        emit_json(m["summary"])
        return
    t = Table(title="evaluation")
    t.add_column("measure")
    t.add_column("value", justify="right")
    for k, label in SUMMARY_LABELS.items():
        v = m["summary"][k]
        t.add_row(label, "–" if v is None else f"{v:.3f}")
    out.print(t)
    out.print(f"report: {escape(str(Path(out_dir) / 'report.html'))}")


@cli.command("attack")
@model_argument
@click.option("--prompts", "prompts_file", required=True, help="A .jsonl naming an 'image' reference per prompt.")
@click.option(
    "--references", required=True, type=click.Path(path_type=Path), help="Folder of the reference (training) images."
)
@click.option("--steps", default=50, show_default=True, type=click.IntRange(1, 10000), help="Adam steps per prompt.")
@click.option("--lr", default=0.1, show_default=True, type=click.FloatRange(0, min_open=True), help="Adam step size.")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(1, 256), help="Noise draws per step.")
@click.option(
    "--init",
    default="prompt",
    show_default=True,
    type=click.Choice(["prompt", "random", "other"]),
    help="Start from the prompt's embedding, from noise, or from another prompt's.",
)
@click.option("--seeds", default=4, show_default=True, type=click.IntRange(1, 64), help="Generations per prompt.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the attack's noise and timesteps.")
@click.option(
    "--save-embeddings",
    default=None,
    type=click.Path(path_type=Path),
    help="Write the found embeddings to this .safetensors file.",
)
@device_option
@json_option
@quiet_option
def attack_cmd(
    model, prompts_file, references, steps, lr, batch, init, seeds, seed, save_embeddings, device, as_json, quiet
) -> None:
    """Try to pull memorized images back out of MODEL with optimized text embeddings.

    For each prompt with a reference image, Adam optimizes the text-encoder output toward the image
    (the model frozen), then generates from it; an embedding reproduces the image when most seeds
    reach SSIM 0.7, and the image is recovered when the found embedding or the prompt itself
    reproduces it. Prompts marked "memorized": false are the control.

    \b
    Example:
      memedit attack edited/ --prompts memedit/lab/prompts/memorized.jsonl --references memedit/lab/images
    """
    from memedit.attack import AttackSettings, attack_model, report
    from memedit.generate import GenSettings

    if save_embeddings is not None and save_embeddings.suffix != ".safetensors":
        raise MemeditError(f"{save_embeddings} must end in .safetensors", "name the file e.g. embeddings.safetensors")
    settings = AttackSettings(steps=steps, lr=lr, batch=batch, init=init, seed=seed)
    with _progress_bar(quiet) as prog:
        task = prog.add_task("attack: optimizing embeddings", total=None)
        res = attack_model(
            model,
            prompts_file,
            references,
            settings,
            GenSettings(seeds=tuple(range(1000, 1000 + seeds))),
            device,
            progress=lambda d, t: prog.update(task, completed=d, total=t),
        )
    if save_embeddings is not None:
        from memedit.io import save_tensors, write_errors

        with write_errors(save_embeddings):
            save_tensors(save_embeddings, {f"{i:04d}": e for i, e in enumerate(res["embeddings"])})
    res = report(res)
    if as_json:
        emit_json(res)
        return
    t = Table(title=f"attack on {escape(model)}")
    for col in ("image", "kind", "prompt SSIM", "attack SSIM", "recovered"):
        t.add_column(col)
    for r in res["targets"]:
        kind = r["kind"] if r["memorized"] else "control"
        t.add_row(escape(r["image"]), kind, f"{r['prompt_ssim']:.3f}", f"{r['attack_ssim']:.3f}", str(r["recovered"]))
    out.print(t)
    s = res["summary"]
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    out.print(
        f"recovery rate {fmt(s['recovery_rate'])} of {s['memorized_targets']} memorized "
        f"(from the prompt alone: {fmt(s['prompt_reproduction_rate'])}, from the found embeddings alone: "
        f"{fmt(s['attack_recovery_rate'])}); "
        f"control {fmt(s['control_recovery_rate'])} of {s['control_targets']}"
    )


@cli.command("harden")
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option(
    "--stats", "stats_dir", default=None, type=click.Path(path_type=Path), help="The recipe's statistics (pruning)."
)
@click.option("--prompts", "prompts_file", required=True, help="A .jsonl naming an 'image' reference per prompt.")
@click.option(
    "--references", required=True, type=click.Path(path_type=Path), help="Folder of the reference (training) images."
)
@click.option("-o", "--out", "out_path", required=True, type=click.Path(path_type=Path), help="Hardened recipe.")
@click.option(
    "--rounds",
    default=None,
    type=click.IntRange(1, 20),
    help="Attack-and-harden rounds (at most).  [default: 3; with --finetune 2]",
)
@click.option(
    "--fraction",
    default=0.02,
    show_default=True,
    type=click.FloatRange(0, 1, min_open=True),
    help="Share of each value layer added per recovered embedding and round.",
)
@click.option(
    "--goal", default=0.05, show_default=True, type=click.FloatRange(0, 1), help="Stop at this recovery rate."
)
@click.option("--layers", default="down+mid", show_default=True, type=click.Choice(["down+mid", "all"]))
@click.option(
    "--finetune", is_flag=True, help="Adversarial fine-tuning (a weight delta) instead of pruning more neurons."
)
@click.option("--holdout", "holdout_file", default=None, help="Fine-tuning: prompts whose outputs must not change.")
@click.option(
    "--tune-params",
    default="all",
    show_default=True,
    type=click.Choice(["cross-kv", "cross", "transformer", "all"]),
    help="Fine-tuning: which UNet weights change.",
)
@click.option("--tune-steps", default=300, show_default=True, type=click.IntRange(1, 100000), help="Per round.")
@click.option("--tune-lr", default=3e-5, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--keep", default=1000.0, show_default=True, type=click.FloatRange(0), help="Weight of preservation.")
@click.option(
    "--keep-prompts", default=200, show_default=True, type=click.IntRange(1), help="Hold-out prompts used to preserve."
)
@click.option(
    "--keep-batch",
    default=32,
    show_default=True,
    type=click.IntRange(1, 4096),
    help="Fine-tuning: preservation samples per step, next to the forget samples (more: steadier, slower).",
)
@click.option(
    "--focus",
    default=4.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Fine-tuning: draw the forget samples of images the round's attack recovered 1 + FOCUS times as often.",
)
@click.option("--steps", default=50, show_default=True, type=click.IntRange(1, 10000), help="Adam steps per prompt.")
@click.option("--lr", default=0.1, show_default=True, type=click.FloatRange(0, min_open=True), help="Adam step size.")
@click.option("--seeds", default=4, show_default=True, type=click.IntRange(1, 64), help="Generations per prompt.")
@device_option
@json_option
@quiet_option
def harden_cmd(
    recipe,
    stats_dir,
    prompts_file,
    references,
    out_path,
    rounds,
    fraction,
    goal,
    layers,
    finetune,
    holdout_file,
    tune_params,
    tune_steps,
    tune_lr,
    keep,
    keep_prompts,
    keep_batch,
    focus,
    steps,
    lr,
    seeds,
    device,
    as_json,
    quiet,
) -> None:
    """Harden RECIPE against the embedding attack: iterated localization, or adversarial fine-tuning.

    Each round applies the recipe and runs `memedit attack`. By default it then adds the value
    neurons that the recovering embeddings use most (top |z| against the hold-out statistics of
    --stats) as `nemo-adversarial` edits. With --finetune it instead fine-tunes the UNet weights
    (--tune-params) so that the memorized images themselves, noised, denoise to a surrogate image under
    the prompts, every embedding found so far and noise around them, while outputs on hold-out prompts
    stay those of the original model; the change is a digest-pinned weight delta (`add` edits), kept
    next to any delta the recipe already has (the default text-encoder edit's). Rounds stop at --goal
    or after --rounds (--finetune: 2 unless given). The input recipe is never changed.

    \b
    Examples:
      memedit harden recipe.yaml --stats stats/ --prompts memedit/lab/prompts/memorized.jsonl \\
        --references memedit/lab/images -o hardened.yaml
      memedit harden recipe.yaml --finetune --prompts memedit/lab/prompts/memorized.jsonl \\
        --references memedit/lab/images -o tuned.yaml
    """
    from memedit.attack import AttackSettings
    from memedit.generate import GenSettings

    ctx = click.get_current_context()
    given = [
        (p.name, p.opts[0])
        for p in ctx.command.params
        if ctx.get_parameter_source(p.name) == click.core.ParameterSource.COMMANDLINE
    ]
    tune_only = {"holdout_file", "tune_params", "tune_steps", "tune_lr", "keep", "keep_prompts", "keep_batch", "focus"}
    wrong = [flag for name, flag in given if name in ({"fraction", "layers"} if finetune else tune_only)]
    if wrong:
        mode, other = ("--finetune", "pruning") if finetune else ("pruning", "--finetune")
        raise MemeditError(f"{wrong[0]} is an option of {other}, not of {mode}", f"drop {wrong[0]}")
    attack_settings = AttackSettings(steps=steps, lr=lr)
    gen = GenSettings(seeds=tuple(range(1000, 1000 + seeds)))
    if finetune:
        if stats_dir is not None:
            raise MemeditError("--stats is for pruning, --finetune does not read it", "drop one of the two")
        _harden_finetune(
            recipe, prompts_file, references, out_path, holdout_file, rounds, goal, tune_params, tune_steps,
            tune_lr, keep, keep_prompts, keep_batch, focus, attack_settings, gen, device, as_json, quiet,
        )  # fmt: skip
        return
    if stats_dir is None:
        raise MemeditError("hardening by pruning needs --stats (the recipe statistics)", "pass --stats, or --finetune")
    from memedit.harden import HardenSettings, harden

    with _progress_bar(quiet) as prog:
        task = prog.add_task("harden: attack and prune", total=None)
        res = harden(
            recipe,
            stats_dir,
            prompts_file,
            references,
            out_path,
            HardenSettings(rounds=rounds or HardenSettings.rounds, fraction=fraction, goal=goal, layers=layers),
            attack_settings,
            gen,
            device,
            progress=lambda msg: prog.update(task, description=f"harden: {msg}"),
        )
    rows = [dataclasses.asdict(r) for r in res.rounds]
    if as_json:
        emit_json({"recipe": str(res.recipe_path), "neurons": res.recipe.neuron_count(), "rounds": rows})
        return
    t = Table(title=f"hardening {escape(str(recipe))}")
    for col in ("round", "neurons attacked", "recovery rate", "neurons added"):
        t.add_column(col, justify="right")
    for r in res.rounds:
        t.add_row(str(r.round), str(r.neurons), f"{r.recovery_rate:.2f}", str(r.added))
    out.print(t)
    out.print(f"hardened recipe: {escape(str(res.recipe_path))} ({res.recipe.neuron_count()} neurons)")


def _harden_finetune(
    recipe, prompts_file, references, out_path, holdout_file, rounds, goal, params, steps, lr, keep, keep_prompts,
    keep_batch, focus, attack_settings, gen, device, as_json, quiet,
) -> None:  # fmt: skip
    from memedit.finetune import FinetuneSettings, harden_finetune

    settings = FinetuneSettings(
        rounds=rounds or FinetuneSettings.rounds,
        steps=steps,
        lr=lr,
        params=params,
        keep=keep,
        keep_prompts=keep_prompts,
        keep_batch=keep_batch,
        focus=focus,
        goal=goal,
    )
    with _progress_bar(quiet) as prog:
        task = prog.add_task("harden: attack and fine-tune", total=None)
        res = harden_finetune(
            recipe,
            prompts_file,
            references,
            out_path,
            holdout_file,
            settings,
            attack_settings,
            gen,
            device,
            progress=lambda msg: prog.update(task, description=f"harden: {msg}"),
        )
    rows = [dataclasses.asdict(r) for r in res.rounds]
    summary = {"tuned_tensors": res.tuned_tensors, "delta_norm": res.delta_norm, "seconds": round(res.seconds, 1)}
    if as_json:
        emit_json({"recipe": str(res.recipe_path), **summary, "rounds": rows})
        return
    t = Table(title=f"adversarial fine-tuning of {escape(str(recipe))}")
    for col in ("round", "recovery rate", "embeddings trained away", "UNet passes", "seconds"):
        t.add_column(col, justify="right")
    for r in res.rounds:
        rate = f"{r.recovery_rate:.2f}"
        t.add_row(str(r.round), rate, str(r.forget_embeddings), str(r.unet_passes), f"{r.tune_seconds:.0f}")
    out.print(t)
    out.print(
        f"hardened recipe: {escape(str(res.recipe_path))} ({res.recipe.neuron_count()} neurons, "
        f"{res.tuned_tensors} tuned weights, delta norm {res.delta_norm:.4f}; {res.seconds:.0f} s)"
    )


@cli.command("demo")
@click.option("-o", "--out", "out_dir", default="memedit-demo", show_default=True, type=click.Path(path_type=Path))
@click.option(
    "--method",
    default="encoder",
    show_default=True,
    type=click.Choice(["nemo", "subspace", "both", "remap", "encoder"]),
    help="Localization method (as in memedit localize).",
)
@click.option(
    "--targets",
    default="auto",
    show_default=True,
    type=click.Choice(["flagged", "labels", "auto"]),
    help="Localize the prompts detection flags, the calibration prompts labelled memorized, or auto (the "
    "labelled ones, as the lab's calibration prompts all carry labels).",
)
@json_option
def demo_cmd(out_dir, method, targets, as_json) -> None:
    """The whole pipeline on the bundled lab model: calibrate, detect, localize, apply, verify, diff, eval.

    \b
    Examples:
      memedit demo
      memedit demo --method nemo --targets flagged
    """
    from memedit.demo import run_demo

    res = run_demo(out_dir, method=method, targets=targets, stage=lambda msg: err.print(f"[dim]demo:[/] {escape(msg)}"))
    if as_json:
        emit_json({"summary": res.summary, "numbers": res.numbers, "stage_seconds": res.stage_seconds})
        return
    t = Table(title="memedit demo on the bundled lab model")
    t.add_column("")
    t.add_column("", justify="right")
    for k, v in res.summary.items():
        t.add_row(k, escape(str(v)))
    out.print(t)
    st = Table(title="time per stage (s)")
    for k in res.stage_seconds:
        st.add_column(k, justify="right")
    st.add_row(*(f"{v:.1f}" for v in res.stage_seconds.values()))
    out.print(st)


@cli.command("push")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--repo", "repo_id", required=True, help="Hub repository, OWNER/NAME.")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--revision", default=None, help="Push to this branch (created if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("--commit-message", default=None)
@click.option(
    "--report",
    default=None,
    type=click.Path(path_type=Path),
    help="A memedit eval report folder: its table and grid go into the model card.",
)
@click.option("--dry-run", is_flag=True, help="List what would be uploaded and print the card; send nothing.")
def push_cmd(folder, repo_id, private, revision, create_pr, commit_message, report, dry_run) -> None:
    """Publish a verified edited model to the Hugging Face Hub with a generated model card.

    \b
    Examples:
      memedit push edited/ --repo me/sd-v1-5-memedit --dry-run
      memedit push edited/ --repo me/sd-v1-5-memedit --report report/
    """
    from memedit.hub import plan_upload, push

    if dry_run:
        up = plan_upload(folder, repo_id, report)
        out.print(f"would upload to {escape(repo_id)}:")
        for f in [*up.files, "README.md (model card)", *(p for p, _ in up.extra)]:
            out.print(f"  {escape(f)}")
        out.print("\n" + escape(up.card))
        return
    res = push(folder, repo_id, private, revision, create_pr, commit_message, report)
    out.print(f"pushed {res['files']} files to {escape(repo_id)} ({escape(res['url'])})")


@cli.group("lab")
def lab_group() -> None:
    """The bundled memorization lab: train it, check it."""


@lab_group.command("train")
@click.option("--out", "-o", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Training configuration (default: the shipped memedit/lab/train.yaml).",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda", "mps", "auto"]),
    default="cpu",
    show_default=True,
    help="Where to train. Only a CPU run reproduces the shipped lab's weights; a GPU run is for studies.",
)
@quiet_option
def lab_train(out_dir: Path, config_path: Path | None, device: str, quiet: bool) -> None:
    """Train the memorization lab from scratch (seeded; CPU-feasible).

    \b
    Example:
      memedit lab train --out ./my-lab
    """
    from memedit.lab.train import DEFAULT_CONFIG, LabConfig, train_lab
    from memedit.model.load import pick_device
    from memedit.model.ref import require_file

    cfg = LabConfig.load(require_file(config_path or DEFAULT_CONFIG, "training config"))
    if out_dir.exists() and not out_dir.is_dir():
        raise MemeditError(f"{out_dir} is a file, a folder is required", "choose another --out")
    model_dir = train_lab(out_dir, cfg, quiet=quiet or not sys.stderr.isatty(), device=pick_device(device))
    click.echo(str(model_dir))


@lab_group.command("check")
@click.option(
    "--model",
    "model_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="A lab model folder (default: the bundled one).",
)
@click.option("--seeds", default=4, show_default=True, type=click.IntRange(2, 64), help="Generations per prompt.")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(1, 1000), help="DDIM steps.")
@click.option("--guidance", default=7.5, show_default=True, type=float, help="Classifier-free guidance scale.")
@json_option
@quiet_option
def lab_check(model_dir: Path | None, seeds: int, steps: int, guidance: float, as_json: bool, quiet: bool) -> None:
    """Measure what the lab memorizes: SSIM to training images, VAE ceiling, diversity, leakage.

    \b
    Examples:
      memedit lab check
      memedit lab check --seeds 8 --json
    """
    from memedit.lab.check import GenSettings, check_lab
    from memedit.model.ref import require_dir

    if model_dir is not None:
        require_dir(model_dir, "lab model folder")
    settings = GenSettings(seeds=tuple(range(1000, 1000 + seeds)), steps=steps, guidance=guidance)
    report = check_lab(model_dir, settings, quiet=quiet or not sys.stderr.isatty())
    if as_json:
        emit_json(report)
        return
    t = Table(title="memorized prompts (SSIM to the training image, per seed)")
    for col in ("image", "kind", "prompt", "mean SSIM", "VAE ceiling", "reproduces", "seed-to-seed"):
        t.add_column(col)
    for r in report["memorized"]:
        t.add_row(
            r["image"],
            r["kind"],
            escape(r["prompt"][:48]),
            f"{np.mean(r['ssim']):.3f}",
            f"{r['vae_ceiling']:.3f}",
            "yes" if r["reproduces"] else "no",
            f"{r['diversity']:.3f}",
        )
    out.print(t)
    s = Table(title="summary")
    s.add_column("measure")
    s.add_column("value", justify="right")
    for k, v in report["summary"].items():
        s.add_row(k, json.dumps(v) if isinstance(v, dict) else f"{v:.3f}")
    out.print(s)
    for name, ok in report["targets"].items():
        out.print(f"{'PASS' if ok else 'FAIL'}  {name}")


def main(argv: list[str] | None = None) -> int:
    debug = bool(os.environ.get("MEMEDIT_DEBUG")) or "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="memedit", standalone_mode=False)
    except MemeditError as e:
        if debug:
            raise
        err.print(escape(e.one_line()), soft_wrap=True)
        return e.exit_code
    except SystemExit as e:  # verify/diff: 1 = checked and found a difference
        return int(e.code or 0)
    except click.exceptions.Abort:
        err.print("error: interrupted. Run the same command again to continue.")
        return 130
    except click.UsageError as e:
        cmd = e.ctx.command_path if e.ctx else "memedit"
        msg = " ".join(e.format_message().split())
        err.print(escape(f"error: {msg.rstrip('.')}. See '{cmd} --help'."), soft_wrap=True)
        return 2
    except click.ClickException as e:
        err.print(escape(f"error: {' '.join(e.format_message().split())}"), soft_wrap=True)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
