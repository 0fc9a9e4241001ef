"""Adversarial fine-tuning (robustness issue, (c)) on a tiny pipeline: the stage writes a digest-pinned
float32 delta as `add` edits, apply reproduces the tuned weights exactly, pruned positions stay pruned,
verify and diff accept the result, and bad deltas are refused with one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from memedit.cli import main
from memedit.finetune import METHOD, FinetuneSettings, ForgetSet, KeepSet, tune, tuned_modules
from memedit.recipe import load, load_deltas
from tests.conftest import tree_digest
from tests.test_apply import VALUE
from tests.test_harden import setup  # noqa: F401 - the shared fixture

UNET = "unet/diffusion_pytorch_model.safetensors"


def finetune_cli(d, recipe, out, *extra):
    return main(
        [
            "harden", str(recipe), "--finetune", "--prompts", str(d / "targets.jsonl"), "--references",
            str(d / "refs"), "--holdout", str(d / "hold.txt"), "-o", str(out), "--steps", "3", "--seeds", "1",
            "--rounds", "1", "--goal", "0", "--tune-steps", "4", "--tune-lr", "1e-3", "--device", "cpu", "--json",
            "--quiet", *extra,
        ]
    )  # fmt: skip


@pytest.fixture(scope="module")
def tuned(setup, tmp_path_factory):  # noqa: F811
    d, recipe, _ = setup
    out = tmp_path_factory.mktemp("tuned")
    before = tree_digest(d)
    assert finetune_cli(d, recipe, out / "t.yaml") == 0
    assert tree_digest(d) == before  # recipe, masks, references, hold-out untouched
    return d, recipe, out / "t.yaml"


def test_finetune_writes_pinned_deltas_next_to_the_pruning(tuned):
    _, recipe, path = tuned
    t, base = load(path), load(recipe)
    assert t.edits[: len(base.edits)] == base.edits
    adds = [e for e in t.edits if e.op == "add"]
    assert adds and all(e.method == METHOD for e in adds)
    deltas = load_deltas(t, path)
    assert {e.delta_key for e in adds} == set(deltas)
    for e in adds:
        assert abs(float(torch.from_numpy(deltas[e.delta_key]).norm()) - e.delta_norm) < 1e-5
    # the default set is every UNet weight; the pruned rows of VALUE stay pruned
    assert f"unet.{VALUE}" in {e.target for e in adds}
    dv = deltas[VALUE]
    assert not dv[[1, 5, 30]].any() and dv.any()
    info = t.calibration["finetune"]
    per_step = FinetuneSettings.batch + FinetuneSettings.keep_batch  # the defaults; --tune-steps 4
    assert info["rounds"][0]["round"] == 0 and info["rounds"][0]["unet_passes"] == 4 * per_step
    assert info["unet_passes"] == 4 * per_step and info["tuned_tensors"] == len(adds)
    assert (path.parent / "t.masks.safetensors").is_file()  # the input recipe's masks travel along


def test_apply_adds_the_delta_exactly_and_verify_and_diff_accept_it(tuned, tiny_pipeline_dir, tmp_path, capsys):
    _, recipe, path = tuned
    out = tmp_path / "out"
    assert main(["apply", str(path), "-o", str(out)]) == 0
    assert main(["apply", str(recipe), "-o", str(tmp_path / "pruned")]) == 0
    a = load_file(tmp_path / "pruned" / UNET)  # the pruning alone
    b = load_file(out / UNET)
    deltas = load_deltas(load(path), path)
    for key, w in b.items():
        if key.removesuffix(".weight") not in deltas:
            assert torch.equal(w, a[key]), key  # only the tuned weights differ from the pruning alone
    for key, d in deltas.items():
        # the delta is zero wherever the pruning edits, so the tuned weight is the pruned one plus it
        want = (a[key + ".weight"].float() + torch.from_numpy(d)).to(a[key + ".weight"].dtype)
        assert torch.equal(b[key + ".weight"], want), key
    assert not b[VALUE + ".weight"][[1, 5, 30]].any()
    assert main(["verify", str(out)]) == 0
    assert main(["diff", str(tiny_pipeline_dir), str(out), "--recipe", str(path), "--summary"]) == 0
    capsys.readouterr()
    # a change the recipe does not explain is still caught with deltas in play
    tampered = tmp_path / "tampered"
    import shutil

    shutil.copytree(out, tampered)
    sd = load_file(tampered / UNET)
    key = next(iter(deltas)) + ".weight"
    sd[key] = sd[key].clone()
    sd[key][0, 0] += 1.0
    save_file(sd, tampered / UNET)
    assert main(["diff", str(tiny_pipeline_dir), str(tampered), "--recipe", str(path), "--summary"]) == 1


def test_the_delta_stays_out_of_the_edited_model_and_its_upload(tuned, tiny_pipeline_dir, tmp_path, capsys):
    """Edited weights minus the delta are the base weights: the delta never enters the output or a push."""
    import shutil

    from memedit.errors import MemeditError
    from memedit.hub import plan_upload

    _, _, path = tuned
    out = tmp_path / "out"
    assert main(["apply", str(path), "-o", str(out)]) == 0
    assert not list(out.rglob("*.deltas.safetensors")) and (out / "t.masks.safetensors").is_file()
    assert load(out / "recipe.yaml").deltas == load(path).deltas  # the copy still pins its digest
    assert main(["verify", str(out)]) == 0
    capsys.readouterr()
    assert main(["diff", str(tiny_pipeline_dir), str(out), "--recipe", str(out / "recipe.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "leaves weight deltas out of edited models" in err
    up = plan_upload(out, "user/tuned")
    assert not [f for f in up.files if f.endswith(".deltas.safetensors")]
    assert "pinned by digest but not published" in up.card
    adds = [e for e in load(path).edits if e.op == "add"]
    assert adds and f" | {len(adds)} | 0 | {len(adds)} |" in up.card  # the tuned layers' row of the edit table
    shutil.copyfile(path.with_name("t.deltas.safetensors"), out / "t.deltas.safetensors")
    with pytest.raises(MemeditError, match="publishes the memorized model"):
        plan_upload(out, "user/tuned")


def tuning_host(pipe, unet):
    """What `tune` reads of a pipeline, around a copy of its UNet that the test may change."""
    return type("P", (), {"unet": unet, "scheduler": pipe.scheduler, "vae_scale_factor": pipe.vae_scale_factor})()


def test_finetune_is_deterministic(tuned, tmp_path):
    d, recipe, path = tuned
    assert finetune_cli(d, recipe, tmp_path / "t.yaml") == 0
    for name in ("t.yaml", "t.deltas.safetensors", "t.masks.safetensors"):
        assert (tmp_path / name).read_bytes() == (path.parent / name).read_bytes(), name
    assert not list(tmp_path.glob(".memedit-*"))  # no work folder left behind


def test_tune_unlearns_the_images_toward_the_surrogates_and_leaves_frozen_weights(setup):  # noqa: F811
    _, _, pipe = setup
    import copy

    unet = copy.deepcopy(pipe.unet)
    p = tuning_host(pipe, unet)
    assert all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in tuned_modules(unet, "cross-kv"))
    names = tuned_modules(unet, "transformer")
    assert names and all(".transformer_blocks." in n for n in names)
    mods = dict(unet.named_modules())
    frozen = {n: torch.zeros_like(mods[n].weight, dtype=torch.bool) for n in names}
    frozen[names[0]][0] = True
    before = {n: mods[n].weight.detach().clone() for n in names}
    g = torch.Generator().manual_seed(0)
    width = unet.config.cross_attention_dim
    images, surrogates = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    forget = ForgetSet(torch.randn(2, 77, width, generator=g), torch.tensor([0, 1]), images, surrogates)
    keep_emb = torch.randn(3, 77, width, generator=g)
    keep = KeepSet(keep_emb, keep_emb, torch.randn(3, 4, 8, 8, generator=g))

    def forget_loss(emb: torch.Tensor) -> float:
        """x0 error toward the surrogates at noised *images*, 16 fixed (noise, t) draws, under `emb`."""
        noise = torch.randn((16, 4, 8, 8), generator=torch.Generator().manual_seed(5))
        t = torch.linspace(50, 950, 16).long()
        a = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1).float()
        xt = a.sqrt() * images.repeat(8, 1, 1, 1) + (1 - a).sqrt() * noise
        with torch.no_grad():
            pred = unet(xt, t, encoder_hidden_states=emb.repeat(8, 1, 1)).sample
        x0 = (xt - (1 - a).sqrt() * pred) / a.sqrt()
        return float((a * (x0 - surrogates.repeat(8, 1, 1, 1)) ** 2).mean())

    unseen = torch.randn(2, 77, width, generator=torch.Generator().manual_seed(9))  # not trained on
    loss0, unseen0 = forget_loss(forget.emb), forget_loss(unseen)
    teacher = copy.deepcopy(unet).requires_grad_(False)
    settings = FinetuneSettings(steps=30, lr=3e-3, batch=4, keep_batch=4, keep=0.0)
    assert tune(p, teacher, names, frozen, forget, keep, settings, 0) == 30 * 2 * 4
    assert forget_loss(forget.emb) < 0.85 * loss0
    # what is trained away is the image, not the embedding: other conditioning lands off it as well
    assert forget_loss(unseen) < 0.85 * unseen0
    assert torch.equal(mods[names[0]].weight[0], before[names[0]][0])  # the frozen row is untouched
    assert not torch.equal(mods[names[0]].weight, before[names[0]])
    tuned_params = {n + ".weight" for n in names}
    ref = dict(pipe.unet.named_parameters())
    assert all(torch.equal(w, ref[n]) for n, w in unet.named_parameters() if n not in tuned_params)


def test_bad_deltas_and_combinations_fail_with_one_line(tuned, tmp_path, capsys):
    d, recipe, path = tuned
    import shutil

    for f in ("t.yaml", "t.masks.safetensors", "t.deltas.safetensors"):
        shutil.copy(path.parent / f, tmp_path / f)
    r = tmp_path / "t.yaml"
    # --fill noise cannot be combined with deltas
    assert main(["apply", str(r), "-o", str(tmp_path / "o1"), "--fill", "noise"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be combined" in err and not (tmp_path / "o1").exists()
    # fine-tuning a recipe that already has a fine-tuning stage
    assert finetune_cli(d, r, tmp_path / "again.yaml") == 2
    assert "already has a fine-tuning stage" in capsys.readouterr().err
    # pruning-harden needs --stats; --finetune refuses it
    assert main(["harden", str(recipe), "--prompts", str(d / "targets.jsonl"), "--references", str(d / "refs"),
                 "-o", str(tmp_path / "h.yaml")]) == 2  # fmt: skip
    assert "--stats" in capsys.readouterr().err
    assert finetune_cli(d, recipe, tmp_path / "h.yaml", "--stats", str(d / "stats")) == 2
    assert "does not read it" in capsys.readouterr().err
    # a delta file changed after the recipe pinned it
    side = tmp_path / "t.deltas.safetensors"
    sd = load_file(side)
    k = next(iter(sd))
    sd[k] = sd[k] + 1
    save_file(sd, side)
    assert main(["apply", str(r), "-o", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not match the digest" in err and not (tmp_path / "o2").exists()
    # a delta key that the file does not hold, and a delta of the wrong shape
    text = (path.parent / "t.yaml").read_text()
    side.write_bytes((path.parent / "t.deltas.safetensors").read_bytes())
    r.write_text(text.replace(f"key: {k}", "key: nothing.here", 1))
    assert main(["apply", str(r), "-o", str(tmp_path / "o3")]) == 2
    assert "is not in" in capsys.readouterr().err
    sd = load_file(path.parent / "t.deltas.safetensors")
    sd[k] = torch.zeros(3, 3)
    save_file(sd, side)
    from memedit.io import sha256_file

    pinned = load(path).deltas["sha256"]
    r.write_text(text.replace(pinned, sha256_file(side)))
    assert main(["apply", str(r), "-o", str(tmp_path / "o4")]) == 2
    assert "delta shape" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("{method: adversarial-finetune, target: unet.x, op: add}", "needs {key"),
        ("{method: adversarial-finetune, target: unet.x, op: add, delta: {key: x}, indices: [1]}", "not indices"),
        ("{method: nemo, target: unet.x, op: zero_rows, indices: [1], delta: {key: x}}", "only add takes a delta"),
        ("{method: adversarial-finetune, target: unet.x, op: add, delta: {key: x, norm: big}}", "must be a number"),
        ("{method: adversarial-finetune, target: unet.x, op: add, delta: {key: x}}", "add edits need deltas"),
    ],
)
def test_recipe_rejects_malformed_add_edits(edit, message):
    from memedit.errors import RecipeInvalid
    from memedit.recipe import loads

    text = f"schema: memedit.recipe/v1\nmodel: {{ref: x, files: {{}}}}\nedits:\n- {edit}\n"
    with pytest.raises(RecipeInvalid) as e:
        loads(text)
    assert message in str(e.value.message)


def test_json_summary_of_the_cli(setup, tmp_path, capsys):  # noqa: F811
    d, recipe, _ = setup
    assert finetune_cli(d, recipe, tmp_path / "t.yaml", "--tune-params", "cross-kv") == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["recipe"] == str(tmp_path / "t.yaml")
    assert rep["tuned_tensors"] == len([e for e in load(tmp_path / "t.yaml").edits if e.op == "add"]) > 0
    assert rep["delta_norm"] > 0 and [r["round"] for r in rep["rounds"]] == [0, 1]


def test_finetune_hardens_an_encoder_edit_and_keeps_its_delta(setup, tiny_pipeline_dir, tmp_path):  # noqa: F811
    """memedit's default edit is a text-encoder delta: fine-tuning it carries that delta along unchanged
    and adds the UNet's, and apply writes both."""
    from memedit.localize import LocalizeSettings, localize
    from memedit.localize.encoder import EncoderSettings

    d, _, _ = setup
    enc = localize(
        d / "stats", tmp_path / "enc.yaml", LocalizeSettings("encoder", "labels", encoder=EncoderSettings(rounds=0))
    ).recipe_path
    enc_deltas = load_deltas(load(enc), enc)
    assert finetune_cli(d, enc, tmp_path / "t.yaml") == 0
    t = load(tmp_path / "t.yaml")
    deltas = load_deltas(t, tmp_path / "t.yaml")
    assert t.edits[: len(load(enc).edits)] == load(enc).edits
    assert {e.method for e in t.edits} == {"encoder", METHOD}
    for k, v in enc_deltas.items():
        assert (deltas[k] == v).all(), k  # the encoder edit's delta, bit for bit
    tuned = [e for e in t.edits if e.method == METHOD]
    assert tuned and set(deltas) == set(enc_deltas) | {e.delta_key for e in tuned}
    assert main(["apply", str(tmp_path / "t.yaml"), "-o", str(tmp_path / "out")]) == 0
    assert main(["apply", str(enc), "-o", str(tmp_path / "enc-out")]) == 0
    te = "text_encoder/model.safetensors"
    assert load_file(tmp_path / "out" / te).keys() == load_file(tmp_path / "enc-out" / te).keys()
    assert all(
        torch.equal(v, load_file(tmp_path / "enc-out" / te)[k]) for k, v in load_file(tmp_path / "out" / te).items()
    )
    assert not all(
        torch.equal(v, load_file(tmp_path / "enc-out" / UNET)[k]) for k, v in load_file(tmp_path / "out" / UNET).items()
    )


def test_cli_fine_tuning_defaults_are_the_stage_defaults():
    """`memedit harden --finetune` with no tuning flag runs FinetuneSettings() (what the README measures)."""
    from memedit.cli import harden_cmd

    d = {p.name: p.default for p in harden_cmd.params}
    s = FinetuneSettings()
    assert d["rounds"] is None  # filled in per mode: FinetuneSettings.rounds or HardenSettings.rounds
    from memedit.harden import HardenSettings

    rounds_help = next(p.help for p in harden_cmd.params if p.name == "rounds")
    assert f"[default: {HardenSettings.rounds}; with --finetune {s.rounds}]" in rounds_help
    fields = {"tune_params": "params", "tune_steps": "steps", "tune_lr": "lr"}  # CLI name -> settings field
    for name in ("tune_params", "tune_steps", "tune_lr", "keep", "keep_prompts", "keep_batch", "focus", "goal"):
        assert d[name] == getattr(s, fields.get(name, name)), name


@pytest.mark.parametrize(("share", "mix"), [(0.25, 0.0), (0.0, 0.0), (0.25, 1.0)])
def test_keep_term_gives_the_unconditional_branch_its_share(setup, share, mix):  # noqa: F811
    """Guidance runs the unconditional branch at every step of every generation: a fixed share of each
    keep batch is distilled on it (its last row), right after the matched half. With keep_mix the
    teacher sees mixes of prompts in the slots after those, and prompts of the keep set elsewhere."""
    _, _, pipe = setup
    import copy

    g = torch.Generator().manual_seed(0)
    width = pipe.unet.config.cross_attention_dim
    forget = ForgetSet(
        torch.randn(2, 77, width, generator=g), torch.tensor([0, 1]), *torch.randn(2, 2, 4, 8, 8, generator=g)
    )
    keep_emb = torch.randn(5, 77, width, generator=g)  # 4 prompts, then the unconditional branch
    keep = KeepSet(keep_emb, keep_emb, torch.randn(4, 4, 8, 8, generator=g))
    unet = copy.deepcopy(pipe.unet)
    p = tuning_host(pipe, unet)
    teacher = copy.deepcopy(pipe.unet).requires_grad_(False)
    seen: list[torch.Tensor] = []
    teacher.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["encoder_hidden_states"]), with_kwargs=True)
    names = tuned_modules(unet, "cross-kv")
    frozen = {n: torch.zeros_like(dict(unet.named_modules())[n].weight, dtype=torch.bool) for n in names}
    settings = FinetuneSettings(steps=6, lr=1e-4, batch=2, keep_batch=8, keep_uncond=share, keep_mix=mix)
    tune(p, teacher, names, frozen, forget, keep, settings, 0)
    assert len(seen) == 6 and all(len(b) == 8 for b in seen)
    known = [[any(torch.equal(row, e) for e in keep_emb) for row in b] for b in seen]
    free = 4 + round(8 * share)
    assert all(all(k[:free]) for k in known)
    assert all(not any(k[free:]) for k in known) == (mix == 1.0)
    uncond = [[torch.equal(row, keep_emb[-1]) for row in b] for b in seen]
    # slots 4 and 5 (a quarter of 8, after the matched half) are the unconditional branch every step
    assert all(u[4] and u[5] for u in uncond) == (share == 0.25)
    assert not any(any(u[:4]) for u in uncond)  # matched pairs are prompts with their own generations


@pytest.mark.parametrize(
    ("field", "value"),
    [("keep_uncond", -0.1), ("keep_uncond", 0.6), ("keep_mix", -0.1), ("keep_mix", 1.5), ("focus", -1.0)],
)
def test_sampling_shares_out_of_range_are_refused(tmp_path, field, value):
    """keep_uncond outside the free half, keep_mix outside [0, 1], a negative focus: refused before
    anything is read or written."""
    from memedit.errors import MemeditError
    from memedit.finetune import harden_finetune

    with pytest.raises(MemeditError, match=field):
        harden_finetune(
            tmp_path / "r.yaml", tmp_path / "p.jsonl", tmp_path, tmp_path / "o.yaml",
            settings=FinetuneSettings(**{field: value}),
        )  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_keep_mix_conditions_free_samples_on_mixes_of_two_keep_conditionings():
    """Mixed rows are (1 - l) e_i + l e_j with one l for student and teacher; other rows are the
    prompts' own; with no mixed rows nothing is drawn (the random stream of before)."""
    from memedit.finetune import keep_conditioning

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 3, 4, generator=g), torch.randn(5, 3, 4, generator=g)
    keep = KeepSet(student, teacher, torch.zeros(4, 1))
    ki = torch.tensor([0, 1, 2, 3, 4, 2])
    s, t = keep_conditioning(keep, ki, slice(4, 6), torch.Generator().manual_seed(1))
    assert torch.equal(s[:4], student[ki[:4]]) and torch.equal(t[:4], teacher[ki[:4]])
    assert torch.equal(keep.emb, student)  # the keep set itself is left alone
    for row in (4, 5):
        # solve for j and l from the student row, then check the teacher row uses the same pair and l
        fits = []
        for j in range(5):
            if j == ki[row]:
                continue
            d = student[j] - student[ki[row]]
            lam = float(((s[row] - student[ki[row]]) * d).sum() / (d * d).sum())
            if torch.allclose(s[row], torch.lerp(student[ki[row]], student[j], lam), atol=1e-6):
                fits.append((j, lam))
        assert len(fits) == 1 and 0 <= fits[0][1] <= 1
        j, lam = fits[0]
        torch.testing.assert_close(t[row], torch.lerp(teacher[ki[row]], teacher[j], lam), atol=1e-6, rtol=1e-5)
        assert not torch.equal(s[row], student[ki[row]])
    g0 = torch.Generator().manual_seed(5)
    s0, t0 = keep_conditioning(keep, ki, slice(6, 6), g0)
    assert torch.equal(s0, student[ki]) and torch.equal(t0, teacher[ki])
    assert torch.equal(torch.rand(3, generator=g0), torch.rand(3, generator=torch.Generator().manual_seed(5)))


def test_focus_draws_the_recovered_images_forget_samples_more_often():
    """With focus, the forget embeddings of images the round's attack recovered are drawn 1 + focus
    times as often; without it the draw is the uniform one of before, the same random stream."""
    from memedit.finetune import forget_indices, forget_weights

    image = torch.tensor([0, 1, 2, 0, 1, 2])  # two embeddings of each of three images
    assert forget_weights(image, [1], 0.0) is None
    w = forget_weights(image, [1], 4.0)
    assert w.tolist() == [1, 5, 1, 1, 5, 1]
    stub = torch.zeros(3, 1)
    drawn = image[forget_indices(ForgetSet(torch.zeros(6, 2, 3), image, stub, stub, w), 7000, torch.Generator())]
    assert abs(float((drawn == 1).double().mean()) - 10 / 14) < 0.02
    plain = ForgetSet(torch.zeros(6, 2, 3), image, stub, stub)
    uniform = torch.randint(0, 6, (50,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(forget_indices(plain, 50, torch.Generator().manual_seed(3)), uniform)
