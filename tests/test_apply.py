from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from memedit.calibrate import model_digests
from memedit.cli import main
from memedit.edit import apply
from memedit.io import save_tensors
from memedit.manifest import verify
from memedit.model.keymap import unet_diffusers_to_ldm_map
from memedit.model.ref import resolve
from memedit.recipe import Edit, Recipe, dump
from tests.conftest import tree_digest

VALUE = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
FFN = "mid_block.attentions.0.transformer_blocks.0.ff.net.2"
FFN_UP = "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"


def make_recipe(model_dir: Path, path: Path) -> Path:
    mask = torch.zeros(64, 256, dtype=torch.bool)
    mask[3, 7] = mask[10, 200] = True
    r = Recipe(
        model={"ref": str(model_dir), "files": model_digests(resolve(str(model_dir)))},
        edits=(
            Edit("nemo", f"unet.{VALUE}", "zero_rows", (1, 5, 30), caused_by=((1, (0,)),)),
            Edit("subspace-structured", f"unet.{FFN}", "zero_cols", (0, 255)),
            Edit("manual", f"unet.{FFN_UP}", "scale", (2,), factor=0.5),
            Edit("subspace", f"unet.{FFN}", "mask", mask_key=f"{FFN}.weight", mask_density=2 / (64 * 256)),
        ),
        prompts=("a red cat",),
    )
    return dump(r, path, {f"{FFN}.weight": mask})


@pytest.fixture(scope="module")
def edited(tiny_pipeline_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("apply")
    recipe = make_recipe(tiny_pipeline_dir, d / "recipe.yaml")
    before = tree_digest(tiny_pipeline_dir)
    apply(recipe, d / "out")
    assert tree_digest(tiny_pipeline_dir) == before  # the input is never written
    return recipe, d / "out"


def test_edits_exact_and_everything_else_bit_identical(edited, tiny_pipeline_dir):
    _, out = edited
    a = load_file(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert set(a) == set(b)
    assert torch.all(b[f"{VALUE}.weight"][[1, 5, 30]] == 0)
    assert torch.all(b[f"{FFN}.weight"][:, [0, 255]] == 0)
    assert b[f"{FFN}.weight"][3, 7] == 0 and b[f"{FFN}.weight"][10, 200] == 0
    torch.testing.assert_close(b[f"{FFN_UP}.weight"][2], a[f"{FFN_UP}.weight"][2] * 0.5)
    torch.testing.assert_close(b[f"{FFN_UP}.bias"][2], a[f"{FFN_UP}.bias"][2] * 0.5)
    changed = {f"{VALUE}.weight", f"{FFN}.weight", f"{FFN_UP}.weight", f"{FFN_UP}.bias"}
    for k in set(a) - changed:
        assert torch.equal(a[k], b[k]), k
    untouched_rows = [i for i in range(a[f"{VALUE}.weight"].shape[0]) if i not in (1, 5, 30)]
    assert torch.equal(a[f"{VALUE}.weight"][untouched_rows], b[f"{VALUE}.weight"][untouched_rows])
    for f in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors", "model_index.json"):
        assert (tiny_pipeline_dir / f).read_bytes() == (out / f).read_bytes()
    with safe_open(out / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and len(meta["memedit.recipe_sha256"]) == 64


def test_output_loads_and_generates(edited):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(edited[1], local_files_only=True)
    img = pipe("a red cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 16, 16, 3) and not torch.isnan(torch.from_numpy(img)).any()


def test_same_recipe_twice_is_byte_identical(edited, tmp_path):
    recipe, out = edited
    apply(recipe, tmp_path / "again")
    assert tree_digest(tmp_path / "again") == tree_digest(out)


def test_verify_ok_and_cli_exit_codes(edited, capsys):
    assert verify(edited[1]).ok
    assert main(["verify", str(edited[1])]) == 0


@pytest.mark.parametrize(
    "victim",
    [
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "recipe.yaml",
        "memedit.provenance.json",
        "model_index.json",
    ],
)
def test_tamper_one_byte_is_caught(edited, tmp_path, capsys, victim):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(edited[1], copy)
    p = copy / victim
    data = bytearray(p.read_bytes())
    pos = random.Random(victim).randrange(len(data) // 2, len(data))
    data[pos] ^= 0x01
    p.write_bytes(bytes(data))
    rep = verify(copy)
    assert not rep.ok, victim
    assert main(["verify", str(copy)]) == 1
    assert capsys.readouterr().out.strip()


def test_refuses_existing_output_and_recipe_of_another_model(edited, tiny_pipeline_dir, tmp_path, capsys):
    recipe, out = edited
    before = tree_digest(out)
    rc = main(["apply", str(recipe), "-o", str(out)])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert tree_digest(out) == before
    # the same architecture with other weights: digests differ
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_pipeline_dir, other)
    f = other / "unet" / "diffusion_pytorch_model.safetensors"
    t = load_file(f)
    t[f"{VALUE}.weight"] += 1
    save_tensors(f, t, {"format": "pt"})
    rc = main(["apply", str(recipe), "--model", str(other), "-o", str(tmp_path / "o")])
    assert rc == 2 and "another model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))
    rc = main(["apply", str(recipe), "--model", str(other), "-o", str(tmp_path / "o"), "--allow-model-mismatch"])
    assert rc == 0
    st = (tmp_path / "o" / "memedit.provenance.json").read_text()
    assert '"allow_model_mismatch": true' in st and verify(tmp_path / "o").ok


def test_single_file_in_single_file_out(edited, tiny_pipeline_dir, tmp_path):
    sd = load_file(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    ldm = unet_diffusers_to_ldm_map(sd)
    single = tmp_path / "tiny.safetensors"
    save_tensors(single, {ldm[k]: v for k, v in sd.items()}, {"format": "pt"})
    recipe = make_recipe(tiny_pipeline_dir, tmp_path / "r.yaml")
    apply(recipe, tmp_path / "out", model=str(single), allow_model_mismatch=True)
    out = load_file(tmp_path / "out" / "tiny.safetensors")
    assert set(out) == set(ldm.values())
    assert torch.all(out[ldm[f"{VALUE}.weight"]][[1, 5, 30]] == 0)
    reference = load_file(edited[1] / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(out[ldm[k]], reference[k]) for k in reference)
    assert verify(tmp_path / "out").ok


def test_a_text_encoder_edit_applies_to_a_single_file_checkpoint_and_diffs_clean(tiny_pipeline_dir, tmp_path):
    """An SD 1.x single file stores the text encoder under cond_stage_model.: a recipe addresses it as
    text_encoder.<name without that prefix>, and apply, verify and diff find the same tensor."""
    unet = load_file(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    text = load_file(tiny_pipeline_dir / "text_encoder" / "model.safetensors")
    ldm = unet_diffusers_to_ldm_map(unet)
    single = tmp_path / "tiny.safetensors"
    tensors = {ldm[k]: v for k, v in unet.items()} | {f"cond_stage_model.transformer.{k}": v for k, v in text.items()}
    save_tensors(single, tensors, {"format": "pt"})
    name = next(k for k in text if k.endswith("mlp.fc2.weight")).removesuffix(".weight")
    delta = torch.full_like(text[name + ".weight"], 0.25)
    target = f"text_encoder.transformer.{name}"
    r = Recipe(
        model={"ref": str(single), "files": model_digests(resolve(str(single)))},
        edits=(Edit("encoder", target, "add", delta_key=target, delta_norm=float(delta.norm())),),
        prompts=("a red cat",),
    )
    recipe = dump(r, tmp_path / "r.yaml", deltas={target: delta})
    before = tree_digest(tmp_path)
    apply(recipe, tmp_path / "out")
    out = load_file(tmp_path / "out" / "tiny.safetensors")
    changed = sorted(k for k in tensors if not torch.equal(tensors[k], out[k]))
    assert changed == [f"cond_stage_model.transformer.{name}.weight"]
    torch.testing.assert_close(out[changed[0]], tensors[changed[0]] + 0.25, rtol=0, atol=0)
    assert verify(tmp_path / "out").ok
    assert main(["diff", str(single), str(tmp_path / "out" / "tiny.safetensors"), "--recipe", str(recipe)]) == 0
    assert {k: v for k, v in tree_digest(tmp_path).items() if not k.startswith("out")} == before


def test_kill_9_at_random_points_leaves_nothing_or_a_complete_result(edited, tmp_path):
    recipe, _ = edited
    rng = random.Random(0)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for i in range(10):
        out = tmp_path / f"k{i}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "memedit.cli", "apply", str(recipe), "-o", str(out)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.3, 3.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            assert verify(out).ok, f"kill {i}: a partial output is visible"
    # a later run clears the temp folders of killed runs and completes
    apply(recipe, tmp_path / "k0", overwrite=True)
    assert verify(tmp_path / "k0").ok
    assert not list(tmp_path.glob(".k0.tmp-*"))


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_edits_on_raw_bits_equal_torch_arithmetic_in_every_float_dtype(tiny_pipeline_dir, tmp_path, dtype):
    """apply zeroes on raw bits (numpy) and scales through torch; the result must be what torch
    indexing and `(w.double() * f).to(dtype)` give, for half, bfloat16 and double weights."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model)
    wfile = model / "unet" / "diffusion_pytorch_model.safetensors"
    sd = {k: v.to(dtype) for k, v in load_file(wfile).items()}
    sd[f"{FFN}.weight"][4, 9] = -0.0  # a negative zero that a mask zeroes: not a changed value
    save_tensors(wfile, sd, {"format": "pt"})
    mask = torch.zeros(64, 256, dtype=torch.bool)
    mask[3, 7] = mask[4, 9] = True
    r = Recipe(
        model={"ref": str(model), "files": model_digests(resolve(str(model)))},
        edits=(
            Edit("nemo", f"unet.{VALUE}", "zero_rows", (1, 5)),
            Edit("manual", f"unet.{FFN_UP}", "scale", (2, 7), factor=0.3),
            Edit("subspace", f"unet.{FFN}", "mask", mask_key=f"{FFN}.weight", mask_density=2 / (64 * 256)),
            Edit("subspace-structured", f"unet.{FFN}", "zero_cols", (0, 9)),
        ),
    )
    recipe = dump(r, tmp_path / "recipe.yaml", {f"{FFN}.weight": mask})
    statement = apply(recipe, tmp_path / "out")
    got = load_file(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    want = {k: v.clone() for k, v in sd.items()}
    want[f"{VALUE}.weight"][[1, 5]] = 0
    for k in (f"{FFN_UP}.weight", f"{FFN_UP}.bias"):
        want[k][[2, 7]] = (sd[k][[2, 7]].double() * 0.3).to(dtype)
    want[f"{FFN}.weight"][mask] = 0
    want[f"{FFN}.weight"][:, [0, 9]] = 0
    for k in sd:
        assert got[k].dtype == dtype and torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k
    recs = {
        t["key"]: t["changed_elements"]
        for t in statement["predicate"]["buildDefinition"]["internalParameters"]["edited_tensors"]
    }
    ffn = sd[f"{FFN}.weight"]
    expected = int((want[f"{FFN}.weight"] != ffn).sum())  # float compare: -0.0 -> 0.0 is no change
    assert recs[f"{FFN}.weight"] == expected
    assert verify(tmp_path / "out").ok


@pytest.fixture(scope="module")
def noise_edited(tiny_pipeline_dir, tmp_path_factory):
    from memedit.fill import Fill

    d = tmp_path_factory.mktemp("noise")
    recipe = make_recipe(tiny_pipeline_dir, d / "recipe.yaml")
    apply(recipe, d / "out", fill=Fill("noise", 7))
    return recipe, d / "out"


def test_noise_fill_is_seeded_noise_of_the_tensor_scale(noise_edited, tiny_pipeline_dir, tmp_path):
    from memedit.fill import Fill

    recipe, out = noise_edited
    a = load_file(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    w = b[f"{VALUE}.weight"]
    pruned = w[[1, 5, 30]]
    assert bool((pruned != 0).all())  # no zero rows left to find
    keep = [i for i in range(w.shape[0]) if i not in (1, 5, 30)]
    assert torch.equal(w[keep], a[f"{VALUE}.weight"][keep])
    sigma = float(a[f"{VALUE}.weight"][keep].double().std())
    assert 0.5 * sigma < float(pruned.double().std()) < 1.5 * sigma
    assert float(pruned.double().mean()) == pytest.approx(0.0, abs=3 * sigma / pruned.numel() ** 0.5)
    assert verify(out).ok
    # deterministic in the seed; another seed gives other values
    apply(recipe, tmp_path / "again", fill=Fill("noise", 7))
    assert tree_digest(tmp_path / "again") == tree_digest(out)
    apply(recipe, tmp_path / "other", fill=Fill("noise", 8))
    c = load_file(tmp_path / "other" / "unet" / "diffusion_pytorch_model.safetensors")
    assert not torch.equal(c[f"{VALUE}.weight"][[1, 5, 30]], pruned)
    st = json.loads((out / "memedit.provenance.json").read_text())
    assert st["predicate"]["buildDefinition"]["internalParameters"]["fill"] == {"mode": "noise", "seed": 7}


def test_noise_fill_is_audited_by_diff_and_verify(noise_edited, tiny_pipeline_dir, tmp_path, capsys):
    import shutil

    recipe, out = noise_edited
    assert main(["diff", str(tiny_pipeline_dir), str(out), "--recipe", str(recipe), "--summary"]) == 0
    capsys.readouterr()
    # one noise value changed (and the digests re-signed would still not match the seed's values)
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    f = bad / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    sd[f"{VALUE}.weight"][5, 3] += 0.5
    save_tensors(f, sd, {"format": "pt"})
    assert main(["diff", str(tiny_pipeline_dir), str(bad), "--recipe", str(recipe), "--summary"]) == 1
    assert main(["verify", str(bad)]) == 1
    err = capsys.readouterr()
    assert "noise fill" in err.out + err.err or "sha256 differs" in err.out + err.err
