"""The random controls of the efficacy benchmarks: same size, same layers, other positions."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file

from memedit.edit import apply
from memedit.localize.baseline import random_baseline, random_mask_baseline
from memedit.model.index import index_model
from memedit.model.ref import resolve
from memedit.recipe import dump, load, load_masks
from tests.test_apply import FFN, make_recipe


def test_random_baseline_keeps_layers_and_counts_and_draws_other_rows(tiny_pipeline_dir, tmp_path):
    recipe = load(make_recipe(tiny_pipeline_dir, tmp_path / "r.yaml"))
    index = index_model(resolve(str(tiny_pipeline_dir)))
    a, b = random_baseline(recipe, index, seed=0), random_baseline(recipe, index, seed=0)
    assert a == b  # seeded
    assert random_baseline(recipe, index, seed=1) != a
    kept = [e for e in recipe.edits if e.op in ("zero_rows", "zero_cols", "scale")]
    assert [(e.target, e.op, len(e.indices), e.factor) for e in a.edits] == [
        (e.target, e.op, len(e.indices), e.factor) for e in kept
    ]
    assert all(e.method == "random" and len(set(e.indices)) == len(e.indices) for e in a.edits)


def test_random_mask_baseline_same_count_in_every_row(tiny_pipeline_dir, tmp_path):
    # a denser mask than make_recipe's, so that a same-count draw at the same positions is implausible
    rng = np.random.default_rng(3)
    dense = torch.from_numpy(rng.random((64, 256)) < 0.05)
    dense[5] = False  # an empty row stays empty
    dense[9] = True  # a full row stays full
    path = make_recipe(tiny_pipeline_dir, tmp_path / "r.yaml")
    recipe = load(path)
    dump(recipe, path, {f"{FFN}.weight": dense})
    recipe = load(path)
    masks = load_masks(recipe, path)

    rnd, rmasks = random_mask_baseline(recipe, masks, seed=0)
    again, amasks = random_mask_baseline(recipe, masks, seed=0)
    assert rnd == again and all(torch.equal(rmasks[k], amasks[k]) for k in rmasks)
    assert [(e.target, e.op, e.mask_key) for e in rnd.edits] == [("unet." + FFN, "mask", f"{FFN}.weight")]
    r, m = rmasks[f"{FFN}.weight"].numpy(), masks[f"{FFN}.weight"]
    assert r.dtype == bool and r.shape == m.shape
    assert (r.sum(axis=1) == m.sum(axis=1)).all()
    assert (r[9] & m[9]).all() and not r[5].any()
    # elsewhere other positions: overlap near chance (5%), not the mask itself
    rest = np.ones(64, dtype=bool)
    rest[9] = False
    assert (r[rest] & m[rest]).sum() < 0.2 * m[rest].sum()
    assert rnd.edits[0].mask_density == round(float(m.mean()), 6)

    # the control is an ordinary recipe: it applies, and zeroes exactly its mask
    dump(rnd, tmp_path / "rnd.yaml", rmasks)
    apply(tmp_path / "rnd.yaml", tmp_path / "out")
    before = load_file(next((tiny_pipeline_dir / "unet").glob("*.safetensors")))[f"{FFN}.weight"]
    after = load_file(next((tmp_path / "out" / "unet").glob("*.safetensors")))[f"{FFN}.weight"]
    assert torch.equal(after == 0, (before == 0) | torch.from_numpy(r))


def test_random_delta_baseline_same_norm_same_tensor_other_direction(tiny_pipeline_dir, tmp_path):
    from memedit.localize.baseline import random_delta_baseline
    from memedit.manifest import verify
    from memedit.recipe import Edit, Recipe, load_deltas

    model = {
        "ref": str(tiny_pipeline_dir),
        "files": load(make_recipe(tiny_pipeline_dir, tmp_path / "m.yaml")).model["files"],
    }
    rng = np.random.default_rng(0)
    fit = torch.from_numpy(np.outer(rng.standard_normal(64), rng.standard_normal(256)).astype(np.float32))  # rank 1
    path = dump(
        Recipe(model=model, edits=(Edit("encoder", f"unet.{FFN}", "add", delta_key=FFN, delta_norm=1.0),)),
        tmp_path / "r.yaml",
        deltas={FFN: fit},
    )
    recipe = load(path)
    rnd, deltas = random_delta_baseline(recipe, load_deltas(recipe, path), seed=0)
    again, same = random_delta_baseline(recipe, load_deltas(recipe, path), seed=0)
    assert rnd == again and torch.equal(deltas[FFN], same[FFN])
    d = deltas[FFN]
    assert [(e.method, e.target, e.op, e.delta_key) for e in rnd.edits] == [("random", f"unet.{FFN}", "add", FFN)]
    assert d.shape == fit.shape and abs(float(d.norm()) / float(fit.norm()) - 1) < 1e-5
    assert abs(float((d * fit).sum()) / float(d.norm() * fit.norm())) < 0.05  # not the fit's direction
    assert torch.linalg.matrix_rank(d) > 32  # spread over the tensor, unlike the rank-1 fit
    out = tmp_path / "rnd.yaml"
    dump(rnd, out, deltas=deltas)
    apply(out, tmp_path / "edited")
    assert verify(tmp_path / "edited").ok
