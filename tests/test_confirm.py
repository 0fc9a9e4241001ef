"""Confirmation of a localization by images (localize --confirm): seed consistency of the target
prompts' generations under the edit, against a threshold from hold-out prompts on the base model."""

from __future__ import annotations

import json

import pytest
import yaml

from memedit.cli import main
from memedit.lab.check import lab_dir, read_prompts

LAB = lab_dir()


def _zero_rows_recipe(layers: dict[str, list[int]]):
    from memedit.recipe import Edit, Recipe

    edits = tuple(Edit("manual", f"unet.{n}", "zero_rows", tuple(rows)) for n, rows in layers.items())
    return Recipe(model={"ref": "lab", "files": {}}, edits=edits, calibration={}, seed=0, prompts=())


def test_confirmation_tells_an_edit_that_keeps_the_images_from_one_that_breaks_them(tmp_path):
    """On the lab: two verbatim-memorized prompts give alike images at every seed (above the hold-out
    threshold); zeroing one value neuron leaves them so (unconfirmed), zeroing every value neuron
    removes the text's pull and the seeds differ again (confirmed)."""
    import torch

    from memedit.edit import edited_pipeline
    from memedit.localize.confirm import ConfirmSettings, confirm
    from memedit.model.load import load_pipeline
    from memedit.model.ref import resolve
    from memedit.trace import value_layer_names

    base = load_pipeline(resolve("lab"))
    targets = [r["prompt"] for r in read_prompts(LAB / "prompts" / "memorized.jsonl") if r["kind"] == "verbatim"][:2]
    refs = [r["prompt"] for r in read_prompts(LAB / "prompts" / "holdout.jsonl")][:8]
    settings = ConfirmSettings(steps=20, reference_prompts=8)
    values = value_layer_names(base.unet)
    cpu = torch.device("cpu")
    one = _zero_rows_recipe({values[0]: [0]})
    every = _zero_rows_recipe({n: list(range(base.unet.get_submodule(n).out_features)) for n in values})
    kept = confirm(
        base, edited_pipeline(one, None, None, tmp_path / "one", torch.float32, cpu), targets, refs, settings
    )
    broken = confirm(
        base, edited_pipeline(every, None, None, tmp_path / "every", torch.float32, cpu), targets, refs, settings
    )
    assert kept.threshold == broken.threshold and 0 < kept.threshold < 1
    assert all(b > kept.threshold for b in kept.before), (kept.before, kept.threshold)
    assert not any(kept.confirmed), kept.after
    assert all(broken.confirmed), (broken.after, broken.threshold)
    assert broken.before == kept.before  # seeded: the base model's images are the same in both runs
    assert not any(p.name.endswith("-model") for p in tmp_path.iterdir())  # scratch models are removed


@pytest.fixture(scope="module")
def tiny_stats(tiny_pipeline_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("confirm")
    (d / "cal.jsonl").write_text(
        "".join(f'{{"prompt": "a red cat number {i}", "memorized": {str(i < 3).lower()}}}\n' for i in range(7))
    )
    (d / "hold.txt").write_text("\n".join(f"a blue dog in a field {i}" for i in range(11)) + "\n")
    argv = ["calibrate", str(tiny_pipeline_dir), "--prompts", str(d / "cal.jsonl"), "--holdout", str(d / "hold.txt")]
    assert main([*argv, "-o", str(d / "s"), "--ffn-steps", "2", "--quiet"]) == 0
    return d


def test_localize_confirm_records_the_check_in_the_recipe(tiny_stats, capsys):
    out = tiny_stats / "r.yaml"
    argv = ["localize", str(tiny_stats / "s"), "-o", str(out), "--method", "subspace", "--targets", "labels"]
    assert main([*argv, "--subspace-steps", "2", "--confirm", "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    conf = yaml.safe_load(out.read_text())["calibration"]["confirmation"]
    assert [p["prompt"] for p in conf["prompts"]] == [f"a red cat number {i}" for i in range(3)]
    assert summary["confirmed"] == conf["confirmed"] == sum(p["after"] < conf["threshold"] for p in conf["prompts"])
    assert conf["settings"]["seeds"] == [1000, 1001, 1002, 1003] and conf["settings"]["reference_prompts"] == 20
    assert all(0 <= p["before"] <= 1 and 0 <= p["after"] <= 1 for p in conf["prompts"])
    again = tiny_stats / "again.yaml"
    assert main([*argv[:3], str(again), *argv[4:], "--subspace-steps", "2", "--confirm", "--quiet"]) == 0
    assert again.read_bytes().replace(b"again.", b"r.") == out.read_bytes()  # deterministic, confirmation included


def test_confirm_needs_the_calibrated_holdout_prompts_unchanged(tiny_stats, tmp_path, capsys):
    out = tmp_path / "r.yaml"
    argv = ["localize", str(tiny_stats / "s"), "-o", str(out), "--method", "subspace", "--targets", "labels"]
    hold = tiny_stats / "hold.txt"
    text = hold.read_text()
    try:
        hold.write_text(text + "a green bird\n")
        assert main([*argv, "--confirm", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "changed since calibration" in err and "--holdout" in err and len(err.strip().splitlines()) == 1
    finally:
        hold.write_text(text)
    assert not out.exists()
    assert main([*argv, "--holdout", str(hold), "--quiet"]) == 2
    assert "only read by --confirm" in capsys.readouterr().err and not out.exists()
