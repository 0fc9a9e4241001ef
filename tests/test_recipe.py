from __future__ import annotations

import pytest
import yaml

from memedit.cli import main
from memedit.errors import RecipeInvalid
from memedit.recipe import dumps, loads
from tests.test_apply import VALUE, make_recipe


@pytest.fixture()
def recipe_text(tiny_pipeline_dir, tmp_path):
    return make_recipe(tiny_pipeline_dir, tmp_path / "recipe.yaml").read_text()


def test_round_trip_and_byte_stable_dump(recipe_text):
    r = loads(recipe_text)
    assert loads(dumps(r)) == r
    assert dumps(loads(dumps(r))) == dumps(r)
    assert dumps(r) == recipe_text


def mutate(text: str, fn) -> str:
    d = yaml.safe_load(text)
    fn(d)
    return yaml.safe_dump(d, sort_keys=False)


BAD = {
    "unknown schema version": (lambda d: d.__setitem__("schema", "memedit.recipe/v9"), "schema"),
    "unknown top-level key": (lambda d: d.__setitem__("extra", 1), "unknown key"),
    "unknown edit key": (lambda d: d["edits"][0].__setitem__("colour", "red"), "unknown key"),
    "duplicate indices": (lambda d: d["edits"][0].__setitem__("indices", [1, 1]), "duplicate"),
    "non-integer index": (lambda d: d["edits"][0].__setitem__("indices", [1, "x"]), "not an integer"),
    "float index": (lambda d: d["edits"][0].__setitem__("indices", [1.5]), "not an integer"),
    "negative index": (lambda d: d["edits"][0].__setitem__("indices", [-1]), "negative"),
    "unknown op": (lambda d: d["edits"][0].__setitem__("op", "delete"), "unknown operation"),
    "unknown method": (lambda d: d["edits"][0].__setitem__("method", "magic"), "unknown method"),
    "target outside the editable components": (
        lambda d: d["edits"][0].__setitem__("target", "vae.x"),
        "must name a module as unet.<path> or text_encoder.<path> or text_encoder_2.<path>",
    ),
    "component without a module path": (lambda d: d["edits"][0].__setitem__("target", "unet"), "must name a module"),
    "scale without factor": (lambda d: d["edits"][0].__setitem__("op", "scale"), "factor"),
    "no edits": (lambda d: d.__setitem__("edits", []), "non-empty"),
    "caused_by past prompts": (lambda d: d["edits"][0].__setitem__("caused_by", {1: [5]}), "prompt id"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_validation_errors_name_the_field(recipe_text, case):
    fn, words = BAD[case]
    with pytest.raises(RecipeInvalid) as e:
        loads(mutate(recipe_text, fn), "r.yaml")
    assert words in e.value.one_line()


def test_not_yaml_and_not_a_mapping():
    with pytest.raises(RecipeInvalid, match="line"):
        loads("a: [1, 2\nb: 3\n")
    with pytest.raises(RecipeInvalid):
        loads("- 1\n- 2\n")


@pytest.mark.parametrize(
    "change,words",
    [
        (lambda d: d["edits"][0].__setitem__("target", "unet.down_blocks.0.attentions.0.nope"), "matches no module"),
        (lambda d: d["edits"][0].__setitem__("indices", [64]), "out of range"),
    ],
)
def test_model_checks_at_apply(capsys, recipe_text, tmp_path, change, words):
    p = tmp_path / "bad.yaml"
    p.write_text(mutate(recipe_text, change))
    rc = main(["apply", str(p), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and words in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_mask_sidecar_digest_is_checked(capsys, recipe_text, tmp_path):
    masks = tmp_path / "recipe.masks.safetensors"
    data = bytearray(masks.read_bytes())
    data[-1] ^= 1
    masks.write_bytes(bytes(data))
    rc = main(["apply", str(tmp_path / "recipe.yaml"), "-o", str(tmp_path / "out")])
    assert rc == 2 and "does not match the digest" in capsys.readouterr().err


def test_loaded_recipe_keeps_provenance(recipe_text):
    r = loads(recipe_text)
    assert r.edits[0].target == f"unet.{VALUE}" and r.edits[0].caused_by == ((1, (0,)),)
