"""Hardening by iterated localization (`memedit harden`): attack the edit, prune what the attack used.

The embedding attack (`memedit.attack`) finds, for each memorized image, a text embedding that brings
it back through the edited model. Those embeddings reach the image through value neurons the recipe
left alone: memedit ranks every searched value neuron by |z| of its activation on each recovered
embedding against the hold-out statistics (NeMo's initial selection, applied to the adversarial
embedding instead of the prompt's; to the prompt's own where only that brought the image back), adds
the top `fraction` of each layer per recovered embedding to the recipe, applies, and attacks again,
for up to `rounds` rounds or until the recovery rate is at or below `goal`.

The result is an ordinary explicit recipe: the added neurons are `nemo-adversarial` edits whose
`caused_by` names the prompts whose adversarial embeddings selected them, and `calibration.harden`
records the settings and every round's recovery rate. Applying it stays data-free.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memedit.attack import AttackSettings, Target, attack, load_targets
from memedit.errors import MemeditError
from memedit.generate import GenSettings
from memedit.recipe import Edit, Recipe, dump_atomic, load, load_deltas, load_masks

METHOD = "nemo-adversarial"


@dataclass(frozen=True)
class HardenSettings:
    rounds: int = 3
    fraction: float = 0.02  # share of each searched value layer added per recovered embedding and round
    goal: float = 0.05  # stop when the attack's recovery rate is at or below this
    layers: str = "down+mid"  # as NeMo's search: "down+mid" or "all"


@dataclass(frozen=True)
class HardenRound:
    round: int
    neurons: int  # row edits of the recipe attacked in this round
    recovery_rate: float
    recovered: tuple[str, ...]  # prompts whose image came back
    added: int  # neurons added after this round's attack (0 in the last round)


@dataclass(frozen=True)
class HardenResult:
    recipe_path: Path
    recipe: Recipe
    rounds: tuple[HardenRound, ...]


def adversarial_neurons(
    unet: torch.nn.Module,
    embeddings: torch.Tensor,
    layers: list[str],
    mu: dict[str, torch.Tensor],
    sigma: dict[str, torch.Tensor],
    fraction: float,
    pruned: dict[str, set[int]],
) -> dict[str, dict[int, list[int]]]:
    """layer -> new row -> indices (into `embeddings`) of the embeddings that selected it.

    Per embedding and layer: the ceil(fraction x width) rows of largest |z| that are not pruned yet."""
    from memedit.model.cond import cross_tokens
    from memedit.trace import value_activations

    act = value_activations(unet, cross_tokens(unet, embeddings.to(next(unet.parameters()).dtype)), layers)
    out: dict[str, dict[int, list[int]]] = {}
    for n in layers:
        z = ((act[n].float() - mu[n]) / sigma[n]).abs()
        if pruned.get(n):
            z[:, sorted(pruned[n])] = -1.0
        k = max(1, math.ceil(fraction * z.shape[1]))
        for i in range(z.shape[0]):
            # a stable sort: on ties the lower row comes first, so that the result is deterministic
            order = torch.argsort(z[i], descending=True, stable=True).tolist()
            for r in [r for r in order if z[i, r] >= 0][:k]:
                out.setdefault(n, {}).setdefault(r, []).append(i)
    return out


def _pruned_rows(recipe: Recipe) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for e in recipe.edits:
        if e.op == "zero_rows" and e.component == "unet":
            out.setdefault(e.module, set()).update(e.indices)
    return out


def _with_neurons(recipe: Recipe, new: dict[str, dict[int, list[int]]], cited: list[str], order: list[str]) -> Recipe:
    prompts = list(recipe.prompts)
    pid = {}
    for p in cited:
        if p not in prompts:
            prompts.append(p)
        pid[p] = prompts.index(p)
    edits = list(recipe.edits)
    for n in sorted(new, key=order.index):
        causes = {r: {pid[cited[i]] for i in who} for r, who in new[n].items()}
        target = f"unet.{n}"
        # a later round extends the layer's earlier nemo-adversarial edit: one edit per (target, op, method)
        j = next((k for k, e in enumerate(edits) if (e.target, e.op, e.method) == (target, "zero_rows", METHOD)), None)
        if j is not None:
            for r, ps in edits[j].caused_by:
                causes.setdefault(r, set()).update(ps)
        edit = Edit(
            METHOD,
            target,
            "zero_rows",
            tuple(sorted(causes)),
            caused_by=tuple((r, tuple(sorted(causes[r]))) for r in sorted(causes)),
        )
        if j is None:
            edits.append(edit)
        else:
            edits[j] = edit
    return dataclasses.replace(recipe, edits=tuple(edits), prompts=tuple(prompts))


def harden_inputs(recipe_path: Path, out: Path, prompts: str | Path, references: str | Path):
    """(recipe, masks, deltas, memorized targets, references folder) after the checks both hardening
    strategies share; masks and deltas as torch tensors, or None."""
    from memedit.model.ref import require_dir

    if out.resolve() == recipe_path.resolve():
        raise MemeditError("the output would overwrite the input recipe", "pass another -o")
    if out.is_dir():
        raise MemeditError(f"{out} is a folder, the output must be a recipe file path", "e.g. -o hardened.yaml")
    recipe = load(recipe_path)
    masks = {k: torch.from_numpy(v) for k, v in load_masks(recipe, recipe_path).items()} or None
    deltas = {k: torch.from_numpy(v) for k, v in load_deltas(recipe, recipe_path).items()} or None
    references = require_dir(Path(references), "references folder")
    targets: list[Target] = [t for t in load_targets(Path(prompts), references) if t.memorized]
    if not targets:
        raise MemeditError(f"{prompts} holds no memorized prompt with an image", "see memedit attack --help")
    return recipe, masks, deltas, targets, references


def attack_recipe(
    recipe: Recipe,
    masks: dict | None,
    deltas: dict | None,
    work: Path,
    targets: list[Target],
    references: Path,
    attack_settings: AttackSettings | None,
    gen: GenSettings | None,
    dtype: torch.dtype,
    device: torch.device,
):
    """Apply `recipe` (in a scratch folder named after `work`) and attack the result; returns (the
    loaded edited pipeline, the attack result)."""
    from memedit.edit import edited_pipeline

    pipe = edited_pipeline(recipe, masks, deltas, work, dtype, device)
    return pipe, attack(pipe, targets, references, attack_settings, gen)


def harden(
    recipe_path: str | Path,
    stats_dir: str | Path,
    prompts: str | Path,
    references: str | Path,
    out: str | Path,
    settings: HardenSettings = HardenSettings(),
    attack_settings: AttackSettings | None = None,
    gen: GenSettings | None = None,
    device: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> HardenResult:
    """Harden `recipe_path` against the embedding attack; writes the hardened recipe to `out`."""
    from memedit.calibrate import holdout_mean_std, load_stats
    from memedit.localize.nemo import searched_layers
    from memedit.model.load import load_pipeline, pick_device, pick_dtype
    from memedit.model.ref import resolve

    if settings.rounds < 1:
        raise MemeditError("--rounds must be at least 1", "e.g. --rounds 3")
    if not 0 < settings.fraction <= 1:
        raise MemeditError("--fraction must be in (0, 1]", "e.g. --fraction 0.02 (2% of each layer)")
    recipe_path, out = Path(recipe_path), Path(out)
    recipe, masks, deltas, targets, references = harden_inputs(recipe_path, out, prompts, references)
    info, tensors = load_stats(stats_dir)
    if info["model"]["files"] != recipe.model.get("files"):
        raise MemeditError(
            "the statistics and the recipe are for different models (weight digests differ)",
            "pass the statistics the recipe was localized from",
        )
    layers = searched_layers(info["layers"]["value"], settings.layers)
    mu, sigma = {}, {}
    for n in layers:
        m, s = holdout_mean_std(tensors, n)
        mu[n], sigma[n] = m.float(), s.float().clamp_min(1e-8)
    dev = pick_device(device)
    dtype = pick_dtype(info["settings"].get("dtype"), dev)
    base = load_pipeline(resolve(recipe.model["ref"]), dtype, dev)
    say = progress or (lambda _msg: None)
    rounds: list[HardenRound] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".memedit-harden-", dir=out.parent) as tmp:
        work = Path(tmp)
        current = recipe
        for r in range(settings.rounds + 1):
            _, res = attack_recipe(
                current, masks, deltas, work / f"round{r}", targets, references, attack_settings, gen, dtype, dev
            )
            rows = res["targets"]
            rate = float(np.mean([t["recovered"] for t in rows]))
            back = [i for i, t in enumerate(rows) if t["recovered"]]
            done = rate <= settings.goal or r == settings.rounds
            added: dict[str, dict[int, list[int]]] = {}
            if not done:
                added = adversarial_neurons(
                    base.unet, res["recovering"][back], layers, mu, sigma, settings.fraction, _pruned_rows(current)
                )
            n_added = sum(len(v) for v in added.values())
            rounds.append(HardenRound(r, current.neuron_count(), rate, tuple(rows[i]["prompt"] for i in back), n_added))
            say(f"round {r}: {current.neuron_count()} neurons, recovery {rate:.2f}, adding {n_added}")
            if done:
                break
            current = _with_neurons(current, added, [targets[i].prompt for i in back], info["layers"]["value"])
        current = dataclasses.replace(
            current,
            calibration={
                **current.calibration,
                "harden": {
                    **dataclasses.asdict(settings),
                    "attack": dataclasses.asdict(attack_settings or AttackSettings()),
                    "prompts": str(prompts),
                    "rounds": [dataclasses.asdict(x) for x in rounds],
                },
            },
        )
    dump_atomic(current, out, masks, deltas)
    return HardenResult(out, load(out), tuple(rounds))
