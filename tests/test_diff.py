from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from memedit.cli import main
from memedit.edit import apply
from memedit.io import save_tensors
from memedit.model.keymap import unet_diffusers_to_ldm_map
from tests.test_apply import FFN, VALUE, make_recipe

UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def pair(tiny_pipeline_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("diff")
    recipe = make_recipe(tiny_pipeline_dir, d / "recipe.yaml")
    apply(recipe, d / "edited")
    return tiny_pipeline_dir, d / "edited", recipe


def run(capsys, *args):
    rc = main(["diff", *map(str, args)])
    return rc, capsys.readouterr()


def test_edit_with_its_recipe_is_clean(capsys, pair):
    base, edited, recipe = pair
    rc, c = run(capsys, base, edited, "--recipe", recipe, "--json")
    rep = json.loads(c.out)
    assert rc == 0 and rep["clean"] and not rep["unexplained"] and not rep["missing"]
    value = next(x for x in rep["changed"] if x["name"] == f"{VALUE}.weight")
    assert value["rows_zeroed"] == [1, 5, 30] and value["kind"] == "value"
    rc, c = run(capsys, base, edited, "--provenance", edited / "memedit.provenance.json", "--summary")
    assert rc == 0 and c.out.startswith("clean")


def test_no_recipe_recognizes_a_memedit_edit(capsys, pair):
    base, edited, _ = pair
    rc, c = run(capsys, base, edited)
    assert rc == 1 and "memedit provenance" in c.out


def _tampered(src, dst, fn):
    shutil.copytree(src, dst)
    t = {k: v.clone() for k, v in load_file(dst / UNET).items()}
    fn(t)
    save_tensors(dst / UNET, t, {"format": "pt"})
    return dst


def test_one_extra_changed_element_is_named(capsys, pair, tmp_path):
    base, edited, recipe = pair
    key = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    bad = _tampered(edited, tmp_path / "bad", lambda t: t[key].__setitem__((4, 9), t[key][4, 9] + 1))
    rc, c = run(capsys, base, bad, "--recipe", recipe)
    assert rc == 1
    assert f"unet/{key}" in c.out and "no edit explains it" in c.out
    # an extra change inside an edited tensor, outside the edited rows
    bad2 = _tampered(edited, tmp_path / "bad2", lambda t: t[f"{VALUE}.weight"].__setitem__((2, 3), 7.0))
    rc, c = run(capsys, base, bad2, "--recipe", recipe, "--json")
    rep = json.loads(c.out)
    assert rc == 1 and any(f"{VALUE}.weight" in u and "[2, 3]" in u for u in rep["unexplained"])


def test_a_missing_edit_is_reported(capsys, pair, tmp_path):
    base, edited, recipe = pair
    orig = load_file(base / UNET)
    bad = _tampered(edited, tmp_path / "undo", lambda t: t.__setitem__(f"{FFN}.weight", orig[f"{FFN}.weight"].clone()))
    rc, c = run(capsys, base, bad, "--recipe", recipe, "--json")
    rep = json.loads(c.out)
    assert rc == 1 and any(FFN in m for m in rep["missing"])


def test_folder_and_single_file_of_the_same_weights_are_identical(capsys, pair, tmp_path):
    base = pair[0]
    sd = load_file(base / UNET)
    ldm = unet_diffusers_to_ldm_map(sd)
    save_tensors(tmp_path / "u.safetensors", {ldm[k]: v for k, v in sd.items()}, {"format": "pt"})
    rc, c = run(capsys, base / "unet", tmp_path / "u.safetensors", "--summary")
    assert rc == 0 and c.out.startswith("identical")


def test_mismatched_architectures_are_a_clear_error(capsys, pair, sd_layouts):
    rc, c = run(capsys, pair[0] / "unet", sd_layouts["sd15"][0])
    assert rc == 2 and "different UNet architectures" in c.err and c.err.count("\n") == 1
