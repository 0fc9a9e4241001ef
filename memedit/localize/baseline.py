"""The control every efficacy number needs: the same number of random neurons in the same layers."""

from __future__ import annotations

import numpy as np
import torch

from memedit.model.index import ModelIndex
from memedit.recipe import Edit, Recipe


def random_baseline(recipe: Recipe, index: ModelIndex, seed: int = 0) -> Recipe:
    """Same targets and per-layer counts as `recipe`'s row/column edits, indices drawn at random.

    Mask edits are left out (zero-rows cannot match them): `random_mask_baseline` is their control.
    So are weight deltas (`add`): they change every element, so no random choice of positions matches
    them; `random_delta_baseline` is theirs."""
    rng = np.random.default_rng(seed)
    tensors = index.tensors()
    edits = []
    for e in recipe.edits:
        shape = tensors[e.tensor(".weight")].shape
        if e.op in ("mask", "add"):
            continue
        size = shape[1] if e.op == "zero_cols" else shape[0]
        idx = sorted(rng.choice(size, len(e.indices), replace=False).tolist())
        edits.append(Edit("random", e.target, e.op, tuple(int(i) for i in idx), e.factor))
    return _baseline(recipe, edits, seed, "the same size as the recipe's row/column edits")


def random_mask_baseline(
    recipe: Recipe, masks: dict[str, np.ndarray], seed: int = 0
) -> tuple[Recipe, dict[str, torch.Tensor]]:
    """For every mask edit, a mask with as many entries in each row as the recipe's, at random columns.

    Per row rather than per layer because the subspace method selects a fixed share of every output
    row: a per-layer draw would spread the same count differently and test something else."""
    rng = np.random.default_rng(seed)
    edits, out = [], {}
    for e in recipe.edits:
        if e.op != "mask":
            continue
        m = np.asarray(masks[e.mask_key], dtype=bool)
        # a random permutation of each row's columns, of which the first `count` are taken
        order = np.argsort(rng.random(m.shape), axis=1)
        r = np.zeros_like(m)
        take = np.arange(m.shape[1])[None, :] < m.sum(axis=1, keepdims=True)
        np.put_along_axis(r, order, take, axis=1)
        out[e.mask_key] = torch.from_numpy(r)
        edits.append(Edit("random", e.target, "mask", mask_key=e.mask_key, mask_density=round(float(r.mean()), 6)))
    return _baseline(recipe, edits, seed, "the recipe's element masks: the same count per row"), out


def random_delta_baseline(
    recipe: Recipe, deltas: dict[str, np.ndarray], seed: int = 0
) -> tuple[Recipe, dict[str, torch.Tensor]]:
    """For every weight delta (`add` edit), a Gaussian delta of the same shape and Frobenius norm on
    the same tensor: an edit as large as the recipe's, pointing nowhere in particular. (A delta
    changes every element, so "same count, other positions" has no meaning for it; its other control,
    the same fit aimed at non-memorized prompts, lives in the benchmarks.)"""
    rng = np.random.default_rng(seed)
    edits, out = [], {}
    for e in recipe.edits:
        if e.op != "add":
            continue
        d = np.asarray(deltas[e.delta_key], dtype=np.float64)
        r = rng.standard_normal(d.shape)
        r *= np.linalg.norm(d) / np.linalg.norm(r)
        out[e.delta_key] = torch.from_numpy(r.astype(np.float32))
        edits.append(
            Edit("random", e.target, "add", delta_key=e.delta_key, delta_norm=round(float(out[e.delta_key].norm()), 6))
        )
    return _baseline(recipe, edits, seed, "the recipe's weight deltas: the same norm on the same tensors"), out


def _baseline(recipe: Recipe, edits: list[Edit], seed: int, what: str) -> Recipe:
    return Recipe(
        model=recipe.model,
        edits=tuple(edits),
        calibration=recipe.calibration,
        seed=seed,
        notes=f"random baseline of {what} (seed {seed})",
    )
