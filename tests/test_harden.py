"""Hardening by iterated localization (robustness issue, (a)) on a tiny pipeline: attack, select the
neurons the recovered embeddings use, write them as explicit edits, and leave every input alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from memedit.calibrate import calibrate
from memedit.cli import main
from memedit.generate import GenSettings, generate
from memedit.harden import METHOD, adversarial_neurons
from memedit.model.load import load_pipeline
from memedit.model.ref import resolve
from memedit.recipe import load
from tests.conftest import tree_digest
from tests.test_apply import make_recipe
from tests.test_calibrate import SETTINGS

GEN = GenSettings(seeds=(1000,))  # what the CLI samples with --seeds 1


@pytest.fixture(scope="module")
def setup(tiny_pipeline_dir, tmp_path_factory):
    """Statistics and a recipe for the tiny pipeline, and references the tiny model reproduces: its
    own generations for the two prompts, so that the attack has something to recover."""
    d = tmp_path_factory.mktemp("harden")
    (d / "cal.jsonl").write_text(
        "".join(f'{{"prompt": "a red cat {i}", "memorized": {str(i < 2).lower()}}}\n' for i in range(4))
    )
    (d / "hold.txt").write_text("\n".join(f"a blue dog in a field {i}" for i in range(9)) + "\n")
    calibrate(str(tiny_pipeline_dir), d / "cal.jsonl", d / "hold.txt", d / "stats", SETTINGS)
    recipe = make_recipe(tiny_pipeline_dir, d / "recipe.yaml")
    pipe = load_pipeline(resolve(str(tiny_pipeline_dir)))
    refs = d / "refs"
    refs.mkdir()
    prompts = ["a red cat 0", "a red cat 1"]
    for i, imgs in enumerate(generate(pipe, prompts, GEN)):
        Image.fromarray(imgs[0]).save(refs / f"m{i}.png")
    (d / "targets.jsonl").write_text(
        "".join(
            json.dumps({"prompt": p, "image": f"m{i}.png", "memorized": True}) + "\n" for i, p in enumerate(prompts)
        )
    )
    return d, recipe, pipe


def harden_cli(d, recipe, out, *extra):
    return main(
        [
            "harden", str(recipe), "--stats", str(d / "stats"), "--prompts", str(d / "targets.jsonl"),
            "--references", str(d / "refs"), "-o", str(out), "--steps", "3", "--seeds", "1", "--rounds", "1",
            "--fraction", "0.05", "--layers", "all", "--device", "cpu", "--json", "--quiet", *extra,
        ]
    )  # fmt: skip


def test_harden_adds_explicit_neurons_deterministically_and_changes_no_input(setup, tmp_path, capsys):
    d, recipe, _ = setup
    before = tree_digest(d)
    assert harden_cli(d, recipe, tmp_path / "h1.yaml", "--goal", "0") == 0
    rep = json.loads(capsys.readouterr().out)
    assert tree_digest(d) == before  # recipe, stats, references untouched
    rounds = rep["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    assert rounds[0]["recovery_rate"] > 0  # the references are the model's own images
    h = load(tmp_path / "h1.yaml")
    base = load(recipe)
    new = [e for e in h.edits if e.method == METHOD]
    assert rounds[0]["added"] == sum(len(e.indices) for e in new) > 0
    assert h.edits[: len(base.edits)] == base.edits  # the input recipe's edits come first, unchanged
    assert rounds[1]["neurons"] == base.neuron_count() + rounds[0]["added"] == h.neuron_count()
    for e in new:  # every added neuron cites a prompt whose image came back
        assert {p for _, ps in e.caused_by for p in ps} <= {h.prompts.index(p) for p in rounds[0]["recovered"]}
    assert h.calibration["harden"]["rounds"] == rounds
    # the sidecar masks travel with the hardened recipe, and it applies and verifies
    assert (tmp_path / "h1.masks.safetensors").is_file()
    assert main(["apply", str(tmp_path / "h1.yaml"), "-o", str(tmp_path / "out")]) == 0
    assert main(["verify", str(tmp_path / "out")]) == 0
    capsys.readouterr()
    (tmp_path / "again").mkdir()
    assert harden_cli(d, recipe, tmp_path / "again" / "h1.yaml", "--goal", "0") == 0
    for f in ("h1.yaml", "h1.masks.safetensors"):
        assert (tmp_path / f).read_bytes() == (tmp_path / "again" / f).read_bytes()
    assert not list(tmp_path.glob(".memedit-harden-*"))  # no work folder left behind


def test_selection_is_top_z_per_embedding_and_skips_pruned_rows(setup):
    _, _, pipe = setup
    from memedit.trace import value_activations, value_layer_names

    layers = value_layer_names(pipe.unet)[:2]
    emb = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(0))
    act = value_activations(pipe.unet, emb, layers)
    mu = {n: torch.zeros(act[n].shape[1]) for n in layers}
    sigma = {n: torch.ones(act[n].shape[1]) for n in layers}
    got = adversarial_neurons(pipe.unet, emb, layers, mu, sigma, 0.1, {layers[0]: {0, 1, 2}})
    for n in layers:
        width = act[n].shape[1]
        k = int(np.ceil(0.1 * width))
        for i in range(2):
            z = act[n][i].abs().float().clone()
            if n == layers[0]:
                z[[0, 1, 2]] = -1
            want = set(torch.argsort(z, descending=True, stable=True)[:k].tolist())
            assert {r for r, who in got[n].items() if i in who} == want
    assert not {0, 1, 2} & set(got[layers[0]])


def test_harden_refuses_mismatched_stats_and_overwriting_its_input(setup, tmp_path, capsys, tiny_pipeline_dir):
    d, recipe, _ = setup
    assert harden_cli(d, recipe, recipe) == 2
    assert "overwrite the input recipe" in capsys.readouterr().err
    other = tmp_path / "other.yaml"
    text = recipe.read_text().replace(next(iter(load(recipe).model["files"].values())), "0" * 64)
    other.write_text(text)
    side = recipe.with_name("recipe.masks.safetensors")
    (tmp_path / side.name).write_bytes(side.read_bytes())
    assert harden_cli(d, other, tmp_path / "h.yaml") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different models" in err
    assert not (tmp_path / "h.yaml").exists()


def test_a_later_round_extends_the_layers_adversarial_edit(setup):
    """Round 2 adds rows to layers that round 1 already extended: one edit per (target, op, method),
    rows and causes merged, and the recipe stays loadable."""
    from memedit.harden import _with_neurons
    from memedit.recipe import dumps, loads

    _, recipe, pipe = setup
    from memedit.trace import value_layer_names

    layers = value_layer_names(pipe.unet)
    base = load(recipe)
    r1 = _with_neurons(base, {layers[1]: {3: [0], 7: [0, 1]}}, ["p0", "p1"], layers)
    r2 = _with_neurons(r1, {layers[1]: {3: [0], 9: [0]}, layers[2]: {1: [0]}}, ["p2"], layers)
    adv = {e.target: e for e in loads(dumps(r2)).edits if e.method == METHOD}
    assert set(adv) == {f"unet.{layers[1]}", f"unet.{layers[2]}"}
    e = adv[f"unet.{layers[1]}"]
    pid = {p: r2.prompts.index(p) for p in ("p0", "p1", "p2")}
    assert e.indices == (3, 7, 9)
    assert dict(e.caused_by) == {
        3: tuple(sorted({pid["p0"], pid["p2"]})),
        7: tuple(sorted({pid["p0"], pid["p1"]})),
        9: (pid["p2"],),
    }
