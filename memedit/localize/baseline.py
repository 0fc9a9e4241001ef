"""The control every efficacy number needs: the same number of random neurons in the same layers."""

from __future__ import annotations

import numpy as np

from memedit.model.index import ModelIndex
from memedit.recipe import Edit, Recipe


def random_baseline(recipe: Recipe, index: ModelIndex, seed: int = 0) -> Recipe:
    """Same targets and per-layer counts as `recipe`'s row/column edits, indices drawn at random.

    Mask edits become the same number of random elements per layer, as zero-rows cannot match them."""
    rng = np.random.default_rng(seed)
    unet = index.component("unet").by_name()
    edits = []
    for e in recipe.edits:
        shape = unet[e.module + ".weight"].shape
        if e.op == "mask":
            continue  # element masks: see random_mask_baseline in the efficacy benchmark
        size = shape[1] if e.op == "zero_cols" else shape[0]
        idx = sorted(rng.choice(size, len(e.indices), replace=False).tolist())
        edits.append(Edit("random", e.target, e.op, tuple(int(i) for i in idx), e.factor))
    return Recipe(
        model=recipe.model,
        edits=tuple(edits),
        calibration=recipe.calibration,
        seed=seed,
        notes=f"random baseline of the same size as the recipe's row/column edits (seed {seed})",
    )
