"""Localization: calibration statistics -> neuron sets -> an explicit recipe.

`localize(stats_dir, out, method=...)` picks the target prompts (flagged by detection, or labelled
memorized), runs NeMo and/or the shared FFN subspace, or one of memedit's own methods (loss attribution
over all value layers; a closed-form remap of every cross-attention key and value map), and writes
`recipe.yaml` (+ masks or deltas sidecar).
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memedit.calibrate import holdout_mean_std, load_stats, model_digests
from memedit.detect import DetectSettings
from memedit.errors import MemeditError
from memedit.io import sha256_file, write_errors
from memedit.localize import attribution, encoder, nemo, oracle, remap, subspace
from memedit.localize import confirm as confirming
from memedit.recipe import Edit, Recipe, dump_atomic

METHOD_CHOICES = ("nemo", "subspace", "both", "attribution", "remap", "encoder")
TARGET_CHOICES = ("flagged", "labels", "all", "auto")


@dataclass(frozen=True)
class LocalizeSettings:
    # the text-encoder edit: the one method that stops the lab's memorized prompts at the preservation
    # target (benchmarks/efficacy.py); NeMo stops none of them there (presets sd1/sd2/sdxl keep NeMo,
    # the setting the paper measured on Stable Diffusion)
    method: str = "encoder"
    targets: str = "auto"  # flagged | labels | all | auto (labels when every prompt has one)
    nemo: nemo.NemoSettings = field(default_factory=nemo.NemoSettings)
    joint_refine: bool = True
    subspace: subspace.SubspaceSettings = field(default_factory=subspace.SubspaceSettings)
    attribution: attribution.AttributionSettings = field(default_factory=attribution.AttributionSettings)
    remap: remap.RemapSettings = field(default_factory=remap.RemapSettings)
    encoder: encoder.EncoderSettings = field(default_factory=encoder.EncoderSettings)
    group: tuple[int, ...] | None = None  # prompt ids used for selection (default: all targets)


@dataclass(frozen=True)
class LocalizeResult:
    recipe_path: Path
    recipe: Recipe
    targets: tuple[int, ...]
    per_prompt: tuple[nemo.PromptNeurons, ...]
    neurons: int
    mask_entries: int
    confirmation: confirming.Confirmation | None = None
    refinement: tuple[encoder.Round, ...] = ()  # the encoder fit's rounds and the image oracle's verdicts


def resolve_targets(info: dict, which: str) -> str:
    """`auto`: the labels when every calibration prompt carries one (the user's own list of what to
    remove, as NeMo starts from the known memorized prompts), else what detection flags."""
    if which == "auto":
        return "labels" if info["labels"] and all(x is not None for x in info["labels"]) else "flagged"
    return which


def target_prompts(info: dict, tensors: dict[str, torch.Tensor], which: str) -> list[int]:
    n = len(info["prompts"])
    which = resolve_targets(info, which)
    if which == "all":
        return list(range(n))
    if which == "labels":
        if any(x is None for x in info["labels"]):
            raise MemeditError(
                "--targets labels needs a 'memorized' field on every calibration prompt",
                "use --targets flagged, or calibrate with a labelled .jsonl",
            )
        return [i for i, x in enumerate(info["labels"]) if x]
    return list(info["detection"]["flagged"])


def _reference_prompts(
    info: dict, given: str | Path | None, fix: str = "pass --holdout FILE with non-memorized prompts for --confirm"
) -> list[str]:
    """Non-memorized prompts: `given`, else the hold-out file the statistics were calibrated with,
    unchanged since (its digest is in the statistics)."""
    from memedit.prompts import load_prompts

    if given is not None:
        return list(load_prompts(given).prompts)
    rec = info["prompt_files"]["holdout"]
    if not Path(rec["path"]).is_file():
        raise MemeditError(f"the hold-out prompts of these statistics ({rec['path']}) are not there", fix)
    held = load_prompts(rec["path"])
    if held.sha256 != rec["sha256"]:
        raise MemeditError(f"the hold-out prompts {rec['path']} changed since calibration", fix)
    return list(held.prompts)


def row_edits(method: str, rows: dict[str, dict[int, list[int]]], order: list[str]) -> list[Edit]:
    """{layer: {row: prompt ids}} -> one zero_rows edit per layer, in forward order, each row citing
    the prompts that selected it."""
    return [
        Edit(
            method,
            f"unet.{n}",
            "zero_rows",
            tuple(sorted(rows[n])),
            caused_by=tuple((r, tuple(sorted(ps))) for r, ps in sorted(rows[n].items())),
        )
        for n in sorted(rows, key=order.index)
    ]


def check_model(info: dict, model: str | None, allow_mismatch: bool):
    from memedit.model.ref import resolve

    ref = resolve(model or info["model"]["path"])
    digests = model_digests(ref)
    if digests != info["model"]["files"] and not allow_mismatch:
        raise MemeditError(
            f"{ref} is not the model these statistics were collected on (weight digests differ)",
            "pass the calibrated model, or --allow-model-mismatch to proceed (recorded in the recipe)",
        )
    return ref, digests


def _ffn_weights(ref, layers: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    from memedit.model.index import index_model

    unet = index_model(ref).component("unet").by_name()
    out = {}
    for n in layers:
        t = unet[n + ".weight"]
        with safe_open(t.file, "pt") as f:
            out[n] = f.get_tensor(t.key)
    return out


def _encoder_edits(found: dict[str, torch.Tensor]) -> list[Edit]:
    # sidecar keys are the component-qualified targets: two encoders may name their layers alike
    return [Edit("encoder", t, "add", delta_key=t, delta_norm=round(float(d.norm()), 6)) for t, d in found.items()]


def _encoder_record(settings: encoder.EncoderSettings, refinement: tuple[encoder.Round, ...]) -> dict:
    rec = {**dataclasses.asdict(settings), "oracle_seeds": list(settings.oracle_seeds)}
    if refinement:
        rec["refinement"] = [r.to_json() for r in refinement]
    return rec


def _refined_encoder(
    pipe, names, texts, held, settings: encoder.EncoderSettings, info, digests, scratch: Path, model, mismatch
):
    """The encoder fit refined by the image oracle (localize/oracle.py) at the settings' own seeds;
    each round's edit is measured as `memedit apply` writes it."""
    from memedit.edit import edited_pipeline
    from memedit.generate import GenSettings

    gen = GenSettings(seeds=settings.oracle_seeds, steps=settings.oracle_steps)
    base = oracle.base_draws(pipe, texts, gen)
    model_ref = {"ref": info["model"]["ref"], "files": digests, **({"allow_model_mismatch": True} if mismatch else {})}

    def still(found: dict[str, torch.Tensor]) -> list[bool]:
        trial = Recipe(model=model_ref, edits=tuple(_encoder_edits(found)))
        with write_errors(scratch), tempfile.TemporaryDirectory(prefix=".memedit-oracle-", dir=scratch) as tmp:
            edited = edited_pipeline(
                trial,
                None,
                found,
                Path(tmp) / "oracle",
                pipe.unet.dtype,
                pipe.unet.device,
                model or info["model"]["path"],
                mismatch,
            )
        return oracle.still_drawing(edited, texts, base, gen)

    return encoder.refine(pipe, names, texts, held, settings, still)


def localize(
    stats_dir: str | Path,
    out: str | Path,
    settings: LocalizeSettings = LocalizeSettings(),
    model: str | None = None,
    allow_model_mismatch: bool = False,
    device: str = "auto",
    progress=None,
    preset: str | None = None,
    explicit: frozenset[str] = frozenset(),
    confirm: confirming.ConfirmSettings | None = None,
    holdout: str | Path | None = None,
) -> LocalizeResult:
    """Localize and write the recipe. `preset` (a name in memedit/recipes or a path) sets the method
    defaults, except the settings named in `explicit` (given by the user: "method", "nemo.layers", ...).
    `confirm` generates the target prompts from the edited model and records in the recipe whether
    their images now vary across seeds (see localize/confirm.py), against the hold-out prompts
    recorded in the statistics or `holdout`."""
    from memedit.model.load import load_pipeline, pick_device, pick_dtype

    stats_dir = Path(stats_dir)
    info, tensors = load_stats(stats_dir)
    preset_info = None
    if preset is not None:
        from memedit.presets import apply_preset, load_preset

        raw, ppath = load_preset(preset)
        settings = apply_preset(settings, raw, ppath, set(explicit), len(info["layers"]["value"]))
        preset_info = {"name": ppath.stem, "sha256": sha256_file(ppath)}
    if settings.method not in METHOD_CHOICES:
        raise MemeditError(f"unknown method {settings.method!r}", f"use one of {', '.join(METHOD_CHOICES)}")
    ref, digests = check_model(info, model, allow_model_mismatch)
    targets = target_prompts(info, tensors, settings.targets)
    if not targets:
        raise MemeditError(
            "no target prompts: detection flagged none of the calibration prompts",
            "use --targets labels or --targets all, or calibrate with more memorized prompts",
        )
    references = _reference_prompts(info, holdout) if confirm is not None else None
    group = list(settings.group) if settings.group is not None else targets
    prompts = info["prompts"]
    cal_settings = info["settings"]
    det = DetectSettings(**cal_settings["detect"])
    threshold = float(info["detection"]["threshold"])
    edits: list[Edit] = []
    per_prompt: list[nemo.PromptNeurons] = []
    masks: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    cited = sorted(set(group))
    pid = {p: i for i, p in enumerate(cited)}  # recipe prompt ids index the recipe's own prompts list
    dev = pick_device(device)
    dtype = pick_dtype(cal_settings.get("dtype"), dev)
    pipe = None
    refinement: tuple[encoder.Round, ...] = ()

    if settings.method in ("nemo", "both"):
        pipe = load_pipeline(ref, dtype, dev)
        layers = nemo.searched_layers(info["layers"]["value"], settings.nemo.layers)
        mu, sigma = {}, {}
        for n in layers:
            m, s = holdout_mean_std(tensors, n)
            mu[n], sigma[n] = m.float(), s.float().clamp_min(1e-8)
        per_prompt = nemo.localize(
            pipe,
            [(pid[i], prompts[i]) for i in group],
            layers,
            mu,
            sigma,
            threshold,
            dataclasses.replace(det, batch_size=len(group)),
            settings.nemo,
            progress,
        )
        merged = nemo.merge(per_prompt)
        if settings.joint_refine:
            merged = nemo.joint_refine(pipe, per_prompt, merged, threshold, det)
        edits += row_edits("nemo", merged, info["layers"]["value"])

    if settings.method == "attribution":
        pipe = load_pipeline(ref, dtype, dev)
        layers = list(info["layers"]["value"])
        texts = [prompts[i] for i in group]
        images = attribution.self_images(pipe, texts, det.seed, det.schedule_steps, det.guidance)
        chosen = attribution.select(
            pipe,
            layers,
            [attribution.Target(pid[i], t, img) for i, t, img in zip(group, texts, images, strict=True)],
            settings.attribution,
            progress,
        )
        edits += row_edits("attribution", chosen, layers)

    if settings.method == "remap":
        pipe = load_pipeline(ref, dtype, dev)
        held = _reference_prompts(
            info, None, "calibrate again with --holdout FILE of non-memorized prompts: remap keeps them as they are"
        )
        deltas = remap.deltas(pipe, info["layers"]["value"], [prompts[i] for i in group], held, settings.remap)
        edits += [
            Edit("remap", f"unet.{n}", "add", delta_key=n, delta_norm=round(float(d.norm()), 6))
            for n, d in deltas.items()
        ]

    if settings.method == "encoder":
        pipe = load_pipeline(ref, dtype, dev)
        held = _reference_prompts(
            info, None, "calibrate again with --holdout FILE of non-memorized prompts: encoder keeps them as they are"
        )
        from memedit.model.index import index_model

        index = index_model(ref)
        names = {c.name: [t.name for t in c.tensors] for c in index.components if c.name.startswith("text_encoder")}
        texts = [prompts[i] for i in group]
        if settings.encoder.rounds > 0:
            found, refinement = _refined_encoder(
                pipe, names, texts, held, settings.encoder, info, digests, Path(out).parent, model, allow_model_mismatch
            )
        else:
            found = encoder.deltas(pipe, names, texts, held, settings.encoder)
        deltas.update(found)
        edits += _encoder_edits(found)

    if settings.method in ("subspace", "both"):
        ffns = info["layers"]["ffn"]
        if not ffns or f"prompts/ffn/{ffns[0]}" not in tensors:
            raise MemeditError("these statistics hold no FFN usage", "calibrate again with --ffn-steps 10")
        weights = _ffn_weights(ref, ffns)
        sums = {n: tensors[f"prompts/ffn/{n}"] for n in ffns}
        refs = {n: tensors[f"ffn_reference/{n}"] for n in ffns}
        sel = subspace.select(weights, sums, refs, group, settings.subspace)
        for n in ffns:
            if settings.subspace.structured:
                cols = subspace.structured_columns(sel[n], settings.subspace.min_rows)
                if cols:
                    edits.append(Edit("subspace-structured", f"unet.{n}", "zero_cols", tuple(cols)))
            elif sel[n].any():
                key = f"{n}.weight"
                masks[key] = sel[n]
                edits.append(
                    Edit(
                        "subspace",
                        f"unet.{n}",
                        "mask",
                        mask_key=key,
                        mask_density=round(float(sel[n].float().mean()), 6),
                    )
                )
    if not edits:
        raise MemeditError(
            "localization found no neurons to edit",
            "check the target prompts (memedit detect) or relax the method settings",
        )
    stats_digest = hashlib.sha256(
        (sha256_file(stats_dir / "stats.safetensors") + sha256_file(stats_dir / "stats.json")).encode()
    ).hexdigest()
    recipe = Recipe(
        model={
            "ref": info["model"]["ref"],
            "files": digests,
            **({"allow_model_mismatch": True} if allow_model_mismatch else {}),
        },
        edits=tuple(edits),
        calibration={
            "stats_sha256": stats_digest,
            "settings": cal_settings,
            "prompt_files": info["prompt_files"],
            "threshold": threshold,
            "localize": {
                "method": settings.method,
                "targets": settings.targets,
                **({"targets_used": resolve_targets(info, "auto")} if settings.targets == "auto" else {}),
                "nemo": dataclasses.asdict(settings.nemo),
                "joint_refine": settings.joint_refine,
                "subspace": dataclasses.asdict(settings.subspace),
                **(
                    {"attribution": dataclasses.asdict(settings.attribution)}
                    if settings.method == "attribution"
                    else {}
                ),
                **({"remap": dataclasses.asdict(settings.remap)} if settings.method == "remap" else {}),
                **({"encoder": _encoder_record(settings.encoder, refinement)} if settings.method == "encoder" else {}),
                **({"preset": preset_info} if preset_info else {}),
            },
        },
        seed=det.seed,
        prompts=tuple(prompts[i] for i in cited),
    )
    out = Path(out)
    if out.is_dir():
        raise MemeditError(f"{out} is a folder, the recipe output must be a file path", "e.g. -o recipe.yaml")
    confirmation = None
    if confirm is not None:
        from memedit.edit import edited_pipeline

        base = pipe if pipe is not None else load_pipeline(ref, dtype, dev)
        with write_errors(out), tempfile.TemporaryDirectory(prefix=".memedit-confirm-", dir=out.parent) as tmp:
            model_arg = model or info["model"]["path"]
            edited = edited_pipeline(
                recipe,
                masks or None,
                deltas or None,
                Path(tmp) / "confirm",
                dtype,
                dev,
                model_arg,
                allow_model_mismatch,
            )
        confirmation = confirming.confirm(base, edited, [prompts[i] for i in targets], references, confirm)
        recipe = dataclasses.replace(recipe, calibration={**recipe.calibration, "confirmation": confirmation.to_json()})
    with write_errors(out):
        path = dump_atomic(recipe, out, masks or None, deltas or None)
    from memedit.recipe import load

    final = load(path)
    return LocalizeResult(
        path,
        final,
        tuple(group),
        tuple(per_prompt),
        final.neuron_count(),
        int(sum(int(m.sum()) for m in masks.values())),
        confirmation,
        refinement,
    )
