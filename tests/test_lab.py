"""The bundled lab: files, formats, and the whole pipeline end to end on it (small prompt subsets)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from memedit.cli import main
from memedit.lab.check import lab_dir, read_prompts

LAB = lab_dir()
pytestmark = pytest.mark.skipif(not (LAB / "model" / "model_index.json").is_file(), reason="lab model not built")


def test_lab_model_is_a_small_fp16_diffusers_folder():
    from diffusers import StableDiffusionPipeline

    files = [p for p in (LAB / "model").rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 1024 * 1024
    assert not [p for p in files if p.suffix in (".bin", ".ckpt", ".pt", ".pth")]
    pipe = StableDiffusionPipeline.from_pretrained(LAB / "model", local_files_only=True)
    assert pipe.unet.dtype.is_floating_point
    assert len(pipe.tokenizer) == 49408
    # the real CLIP BPE vocabulary: known ids of CLIP ViT-L/14's tokenizer
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    from safetensors import safe_open

    with safe_open(LAB / "model" / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert f.get_slice(next(iter(f.keys()))).get_dtype() == "F16"


def test_prompt_files_and_ground_truth():
    from PIL import Image

    names = ("memorized", "nonmemorized", "novel", "holdout", "holdout_rich")
    sets = {n: read_prompts(LAB / "prompts" / f"{n}.jsonl") for n in names}
    for name, rows in sets.items():
        for r in rows:
            assert set(r) == {"prompt", "memorized", "kind", "image"}
            assert r["memorized"] == (name == "memorized")
            assert (r["kind"] in ("verbatim", "template")) == (name == "memorized")
    texts = {n: {r["prompt"] for r in rows} for n, rows in sets.items()}
    assert not texts["holdout"] & (texts["memorized"] | texts["nonmemorized"] | texts["novel"])
    assert not texts["holdout_rich"] & (texts["memorized"] | texts["nonmemorized"] | texts["novel"])
    assert len(texts["holdout_rich"]) == 200 and len(texts["holdout_rich"] - texts["holdout"]) == 100
    # the shipped files are what the trainer writes for the shipped config
    from memedit.lab import data as labdata
    from memedit.lab.train import DEFAULT_CONFIG, LabConfig

    cfg = LabConfig.load(DEFAULT_CONFIG)
    assert cfg == LabConfig()  # the dataclass defaults are the shipped config (variants list only changes)
    assert labdata.lab_prompt_sets(
        cfg.scene_pool, cfg.seed, memorized=cfg.memorized, scene_style=cfg.scene_captions
    ) == {n: sets[n] for n in ("memorized", "nonmemorized", "novel", "holdout", "holdout_rich")}
    assert not texts["novel"] & texts["nonmemorized"]
    images = {r["image"] for r in sets["memorized"]}
    assert len(images) >= 8
    assert {"verbatim", "template"} == {r["kind"] for r in sets["memorized"]}
    for im in images:
        assert Image.open(LAB / "images" / im).size == (32, 32)


def test_inspect_lab_prints_the_resolved_source(capsys):
    assert main(["inspect", "lab", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert "bundled lab model" in rep["resolved"] and rep["counts"]["value"] >= 7


@pytest.fixture(scope="module")
def lab_stats(tmp_path_factory):
    """Lab statistics from 4 memorized and 4 non-memorized prompts, with a recipe made right after
    calibration (--recipe-out) from a preset file."""
    tmp = tmp_path_factory.mktemp("labstats")
    mem = read_prompts(LAB / "prompts" / "memorized.jsonl")[:4]
    non = read_prompts(LAB / "prompts" / "nonmemorized.jsonl")[:4]
    cal = tmp / "cal.jsonl"
    cal.write_text("".join(json.dumps(r) + "\n" for r in mem + non))
    hold = tmp / "hold.jsonl"
    hold.write_text("".join(json.dumps(r) + "\n" for r in read_prompts(LAB / "prompts" / "holdout.jsonl")[:40]))
    preset = tmp / "mine.yaml"
    preset.write_text(
        "preset: memedit.preset/v1\nvalue_layers: 11\nmethod: subspace\ntargets: labels\n"
        "subspace: {rho: 0.02, steps: 2}\n"
    )
    argv = ["calibrate", "lab", "--prompts", str(cal), "--holdout", str(hold), "-o", str(tmp / "s")]
    argv += ["--ffn-steps", "2", "--quiet", "--recipe-out", str(tmp / "first.yaml"), "--preset", str(preset)]
    assert main(argv) == 0
    return tmp


def test_calibrate_recipe_out_uses_the_preset(lab_stats, capsys):
    from memedit.recipe import load

    r = load(lab_stats / "first.yaml")
    loc = r.calibration["localize"]
    assert loc["method"] == "subspace" and loc["targets"] == "labels"
    assert loc["subspace"]["rho"] == 0.02 and loc["subspace"]["steps"] == 2
    assert loc["preset"]["name"] == "mine" and len(loc["preset"]["sha256"]) == 64
    assert r.edits and all(e.method == "subspace" for e in r.edits)


def test_explicit_options_override_a_preset(lab_stats, capsys):
    from memedit.recipe import load

    out = lab_stats / "over.yaml"
    argv = ["localize", str(lab_stats / "s"), "-o", str(out), "--preset", "lab", "--method", "subspace"]
    assert main([*argv, "--targets", "labels", "--subspace-steps", "2", "--quiet"]) == 0
    loc = load(out).calibration["localize"]
    assert loc["method"] == "subspace" and loc["targets"] == "labels"  # given explicitly
    assert loc["subspace"]["steps"] == 2 and loc["subspace"]["rho"] == 0.01  # rho from the lab preset
    assert loc["preset"]["name"] == "lab"


def test_a_preset_sets_encoder_settings_and_explicit_options_win(lab_stats, capsys):
    from memedit.recipe import load

    preset = lab_stats / "enc.yaml"
    preset.write_text(
        "preset: memedit.preset/v1\nmethod: encoder\ntargets: labels\n"
        "encoder: {strength: 20, ridge: 0.01, rounds: 0, oracle_seeds: [1, 2]}\n"
    )
    out = lab_stats / "enc-preset.yaml"
    argv = ["localize", str(lab_stats / "s"), "-o", str(out), "--preset", str(preset), "--strength", "5", "--quiet"]
    assert main(argv) == 0
    enc = load(out).calibration["localize"]["encoder"]
    assert enc["strength"] == 5.0  # given on the command line
    assert enc["ridge"] == 0.01 and enc["rounds"] == 0 and enc["oracle_seeds"] == [1, 2]  # from the preset
    preset.write_text("preset: memedit.preset/v1\nencoder: {rounds: many}\n")
    assert main(["localize", str(lab_stats / "s"), "-o", str(lab_stats / "never.yaml"), "--preset", str(preset)]) == 2
    err = capsys.readouterr().err.strip()
    assert "encoder.rounds must be int" in err and len(err.splitlines()) == 1, err


def test_attribution_recipe_zeroes_the_share_asked_and_is_deterministic(lab_stats, capsys):
    from memedit.recipe import load

    paths = [lab_stats / "attr1.yaml", lab_stats / "attr2.yaml"]
    for out in paths:
        argv = ["localize", str(lab_stats / "s"), "-o", str(out), "--method", "attribution"]
        assert main([*argv, "--targets", "labels", "--share", "0.02", "--quiet"]) == 0
    r = load(paths[0])
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert r.calibration["localize"]["attribution"]["share"] == 0.02
    assert {e.method for e in r.edits} == {"attribution"} and {e.op for e in r.edits} == {"zero_rows"}
    assert all(e.target.endswith("attn2.to_v") for e in r.edits)
    assert r.neuron_count() == 22  # ceil(0.02 x 1,088 value neurons), over all value layers
    cited = {p for e in r.edits for _, ps in e.caused_by for p in ps}
    assert cited and cited <= set(range(len(r.prompts)))  # each neuron names the prompts it serves


def test_remap_recipe_is_deterministic_and_moves_the_targets_more_than_other_prompts(lab_stats, capsys):
    import torch

    from memedit.lab.check import load_lab_pipeline
    from memedit.model.cond import encode
    from memedit.model.load import load_pipeline
    from memedit.model.ref import resolve
    from memedit.recipe import load, sidecar_path

    paths = [lab_stats / "remap1.yaml", lab_stats / "remap2.yaml"]
    for out in paths:
        argv = ["localize", str(lab_stats / "s"), "-o", str(out), "--method", "remap"]
        assert main([*argv, "--targets", "labels", "--strength", "10", "--quiet"]) == 0
    r, again = load(paths[0]), load(paths[1])
    assert r.edits == again.edits and r.deltas["sha256"] == again.deltas["sha256"]  # file names differ
    assert sidecar_path(paths[0], "deltas").read_bytes() == sidecar_path(paths[1], "deltas").read_bytes()
    assert r.calibration["localize"]["remap"] == {"strength": 10.0, "ridge": 0.001}
    ridged = lab_stats / "remap-ridge.yaml"
    argv = ["localize", str(lab_stats / "s"), "-o", str(ridged), "--method", "remap", "--targets", "labels"]
    assert main([*argv, "--strength", "10", "--ridge", "0", "--quiet"]) == 0
    rr = load(ridged)
    assert rr.calibration["localize"]["remap"] == {"strength": 10.0, "ridge": 0.0}
    assert rr.deltas["sha256"] != r.deltas["sha256"]
    assert {(e.method, e.op) for e in r.edits} == {("remap", "add")}
    assert sorted(e.target.rsplit(".", 1)[1] for e in r.edits) == ["to_k"] * 11 + ["to_v"] * 11
    assert main(["apply", str(paths[0]), "-o", str(lab_stats / "remapped")]) == 0
    base, edited = load_lab_pipeline(), load_pipeline(resolve(str(lab_stats / "remapped")))
    targets = list(r.prompts)
    others = [x["prompt"] for x in read_prompts(LAB / "prompts" / "novel.jsonl")[:8]]  # in no fit

    @torch.no_grad()
    def change(prompts: list[str]) -> float:
        e = encode(base, prompts).float()
        rel = []
        for name in [x.module for x in r.edits]:
            a = base.unet.get_submodule(name)(e)
            b = edited.unet.get_submodule(name).float()(e)
            rel.append(((b - a).norm(dim=-1) / a.norm(dim=-1)).mean())
        return float(torch.stack(rel).mean())

    assert change(targets) > 2 * change(others)


def test_encoder_recipe_edits_one_text_encoder_weight_and_moves_the_targets_more_than_other_prompts(lab_stats, capsys):
    import torch
    from safetensors.torch import load_file

    from memedit.lab.check import load_lab_pipeline
    from memedit.model.cond import encode
    from memedit.model.load import load_pipeline
    from memedit.model.ref import resolve
    from memedit.recipe import load, sidecar_path

    # memedit's defaults: the encoder edit, refined by the image oracle, on the labelled prompts (auto)
    paths = [lab_stats / "encoder1.yaml", lab_stats / "encoder2.yaml"]
    for out in paths:
        assert main(["localize", str(lab_stats / "s"), "-o", str(out), "--quiet"]) == 0
    assert "4 target prompts -> weight deltas on 1 layer(s)" in capsys.readouterr().out
    r, again = load(paths[0]), load(paths[1])
    assert r.edits == again.edits and r.calibration == again.calibration
    assert sidecar_path(paths[0], "deltas").read_bytes() == sidecar_path(paths[1], "deltas").read_bytes()
    loc = r.calibration["localize"]
    assert loc["method"] == "encoder" and loc["targets"] == "auto" and loc["targets_used"] == "labels"
    enc = dict(loc["encoder"])
    refinement = enc.pop("refinement")
    assert enc == {
        "strength": 40.0,
        "ridge": 0.001,
        "rounds": 3,
        "boost": 4.0,
        "oracle_seeds": [7000, 7001, 7002, 7003],
        "oracle_steps": 50,
    }
    assert 1 <= len(refinement) <= 4 and refinement[0]["weights"] == [1.0] * len(r.prompts)
    # the lab reads its 4-layer text encoder's last layer: that layer's feed-forward output map only
    assert [(e.method, e.target, e.op) for e in r.edits] == [
        ("encoder", "text_encoder.encoder.layers.3.mlp.fc2", "add")
    ]
    out = lab_stats / "encoded"
    assert main(["apply", str(paths[0]), "-o", str(out)]) == 0
    assert main(["verify", str(out)]) == 0
    assert main(["diff", "lab", str(out), "--recipe", str(paths[0])]) == 0
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (out / unet).read_bytes() == (LAB / "model" / unet).read_bytes()
    base_te, new_te = (
        load_file(LAB / "model/text_encoder/model.safetensors"),
        load_file(out / "text_encoder/model.safetensors"),
    )
    assert [k for k in base_te if not torch.equal(base_te[k], new_te[k])] == ["encoder.layers.3.mlp.fc2.weight"]
    base, edited = load_lab_pipeline(), load_pipeline(resolve(str(out)))
    others = [x["prompt"] for x in read_prompts(LAB / "prompts" / "novel.jsonl")[:8]]  # in no fit

    def moved(prompts: list[str]) -> float:
        a, b = encode(base, prompts).float(), encode(edited, prompts).float()
        return float(((b - a).norm(dim=-1) / a.norm(dim=-1)).mean())

    assert moved(list(r.prompts)) > 2 * moved(others)


def test_refinement_boosts_the_memorized_targets_the_oracle_still_sees(lab_stats, capsys):
    """A nearly empty edit (strength 1e4) leaves every memorized target drawing its base image at the
    oracle's seeds, so each is boosted; the non-memorized targets, whose base images differ across
    seeds, never are. The rounds and the oracle's seeds are recorded in the recipe."""
    from memedit.recipe import load

    out = lab_stats / "refined.yaml"
    argv = ["localize", str(lab_stats / "s"), "-o", str(out), "--method", "encoder", "--targets", "all"]
    assert main([*argv, "--strength", "1e4", "--refine-rounds", "1", "--quiet"]) == 0
    r = load(out)
    enc = r.calibration["localize"]["encoder"]
    assert enc["rounds"] == 1 and enc["oracle_seeds"] == [7000, 7001, 7002, 7003]
    first, second = enc["refinement"]
    memorized = {
        i
        for i, p in enumerate(r.prompts)
        if p in {x["prompt"] for x in read_prompts(LAB / "prompts" / "memorized.jsonl")}
    }
    assert len(memorized) == 4 and set(first["still_drawing"]) == memorized
    assert first["weights"] == [1.0] * 8
    assert second["weights"] == [4.0 if i in memorized else 1.0 for i in range(8)]


@pytest.mark.parametrize(
    "option, value, owner",
    [
        ("--share", "0.1", "attribution"),
        ("--strength", "3", "remap"),
        ("--ridge", "0.001", "remap"),
        ("--strength", "7", "encoder"),
        ("--refine-rounds", "2", "encoder"),
    ],
)
def test_a_method_option_without_its_method_is_a_one_line_error(lab_stats, capsys, option, value, owner):
    out = lab_stats / "never.yaml"
    rc = main(["localize", str(lab_stats / "s"), "-o", str(out), "--method", "nemo", option, value])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and option in err and f"--method {owner}" in err and len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize(
    "preset, needle",
    [
        ("sd1", "is for models with 16 value layers"),
        ("sd3", "unknown preset 'sd3'"),
        ("{tmp}/bad.yaml", "unknown key(s) colour"),
        ("{tmp}/missing.yaml", "does not exist"),
    ],
)
def test_bad_presets_are_one_line_errors(lab_stats, capsys, preset, needle):
    (lab_stats / "bad.yaml").write_text("preset: memedit.preset/v1\ncolour: red\n")
    out = lab_stats / "never.yaml"
    rc = main(["localize", str(lab_stats / "s"), "-o", str(out), "--preset", preset.format(tmp=lab_stats)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_pipeline_end_to_end_on_the_lab(lab_stats, tmp_path, capsys):
    assert (
        main(
            [
                "localize",
                str(lab_stats / "s"),
                "-o",
                str(tmp_path / "r.yaml"),
                "--method",
                "both",
                "--targets",
                "labels",
                "--subspace-steps",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    assert main(["apply", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "e")]) == 0
    assert main(["verify", str(tmp_path / "e")]) == 0
    assert main(["diff", "lab", str(tmp_path / "e"), "--recipe", str(tmp_path / "r.yaml"), "--summary"]) == 0
    capsys.readouterr()


def test_the_shipped_lab_recipes_are_for_the_shipped_lab(tmp_path):
    """memedit/recipes/found/: lab-encoder.yaml is what `memedit demo` localizes on this lab model (the
    default method), lab-nemo.yaml what `memedit demo --method nemo --targets flagged` does. Applied,
    the encoder recipe changes the one text-encoder weight it names and nothing else."""
    import torch
    from safetensors.torch import load_file

    from memedit.calibrate import model_digests
    from memedit.edit import apply
    from memedit.model.ref import resolve
    from memedit.presets import PRESET_DIR
    from memedit.recipe import load, load_deltas

    digests = model_digests(resolve("lab"))
    nemo = load(PRESET_DIR / "found" / "lab-nemo.yaml")
    assert nemo.model["ref"] == "lab" and nemo.model["files"] == digests
    assert nemo.edits and all(e.method == "nemo" for e in nemo.edits)
    path = PRESET_DIR / "found" / "lab-encoder.yaml"
    enc = load(path)
    assert enc.model["ref"] == "lab" and enc.model["files"] == digests
    loc = enc.calibration["localize"]
    assert loc["method"] == "encoder" and loc["targets_used"] == "labels" and len(enc.prompts) == 22
    assert not loc["encoder"]["refinement"][-1]["still_drawing"]  # the last fit stopped every target
    (target,) = load_deltas(enc, path)  # digest-pinned sidecar
    apply(path, tmp_path / "e")
    base = load_file(LAB / "model" / "text_encoder" / "model.safetensors")
    edited = load_file(tmp_path / "e" / "text_encoder" / "model.safetensors")
    changed = [k for k in base if not torch.equal(base[k], edited[k])]
    assert target == "text_encoder.encoder.layers.3.mlp.fc2" and changed == ["encoder.layers.3.mlp.fc2.weight"]


def test_variant_configs_load_and_differ_from_the_shipped_lab():
    from memedit.lab.train import LabConfig

    variants = sorted((LAB.parent / "lab" / "variants").glob("*.yaml"))
    assert len(variants) >= 3
    # H3 (the bundled lab, train.yaml) is H2 with these cut to fit the CPU budget; every variant
    # trains with H2's, so none silently inherits a cut that its study row was not measured with
    h2 = {"vae_batch": 64, "clip_steps": 1200, "unet_batch": 32, "mem_fraction": 0.2}
    for v in variants:
        cfg = LabConfig.load(v)
        assert cfg != LabConfig(), v.name
        own = yaml.safe_load(v.read_text(encoding="utf-8"))  # what the variant file itself changes (F: its share)
        for key, value in h2.items():
            assert key in own or getattr(cfg, key) == value, (v.name, key)
        # the study's variants change the first lab (A: full captions), or, for H, A's step count with
        # terse captions; H2 is exactly the bundled lab without the cuts
        if v.stem == "terse_captions_long":
            assert cfg == dataclasses.replace(LabConfig(), **h2)
            continue
        assert cfg.scene_captions == "full" or (v.stem == "terse_captions" and cfg.unet_steps == 4000), v.name
    first = LabConfig.load(LAB.parent / "lab" / "variants" / "full_captions.yaml")
    assert first == dataclasses.replace(LabConfig(), scene_captions="full", unet_steps=4000, **h2)


def test_a_config_can_start_from_another_and_bad_bases_are_one_line_errors(tmp_path):
    """`base:` (relative to the file) resolves before the file's own settings; a base chain that is
    missing or loops back is refused with a one-line error, not a traceback or a recursion."""
    from memedit.errors import MemeditError
    from memedit.lab.train import LabConfig

    (tmp_path / "a.yaml").write_text("unet_steps: 100\nseed: 3\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\nseed: 4\n")
    assert LabConfig.load(tmp_path / "sub" / "b.yaml") == dataclasses.replace(LabConfig(), unet_steps=100, seed=4)
    (tmp_path / "missing.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(MemeditError, match=r"base .*nowhere\.yaml is not a file"):
        LabConfig.load(tmp_path / "missing.yaml")
    (tmp_path / "x.yaml").write_text("base: y.yaml\n")
    (tmp_path / "y.yaml").write_text("base: x.yaml\n")
    with pytest.raises(MemeditError, match="leads back"):
        LabConfig.load(tmp_path / "x.yaml")
    (tmp_path / "u.yaml").write_text("base: a.yaml\ncolour: red\n")
    with pytest.raises(MemeditError, match="unknown setting"):
        LabConfig.load(tmp_path / "u.yaml")


def test_natural_photo_pool_is_seeded_captioned_and_apart_from_the_memorized_set():
    """Variant D's general natural-image data: the same seed gives the same crops and captions, a
    tinted crop's caption names its tint, and no crop caption is a memorized caption."""
    import numpy as np

    from memedit.lab import data as labdata

    a, b = labdata.photo_pool(60, seed=5), labdata.photo_pool(60, seed=5)
    assert [p.caption for p in a] == [p.caption for p in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b, strict=True))
    assert [p.caption for p in labdata.photo_pool(60, seed=6)] != [p.caption for p in a]
    memorized = {c for style in labdata.CAPTION_STYLES.values() for m in style for c in m.captions}
    assert not {p.caption for p in a} & memorized
    for p in a:
        arr = np.asarray(p.image, dtype=np.float32)
        assert arr.shape == (32, 32, 3)
        if p.caption.startswith("a black and white photo"):
            assert np.ptp(arr, axis=-1).max() == 0  # gray: all channels equal
        else:
            colour = next(c for c in labdata.COLORS if f", {c} tones," in p.caption)
            tint = np.array(labdata.COLORS[colour], dtype=np.float32)
            # the channels keep the tint's order (brightest channel of the tint is brightest here)
            assert arr.reshape(-1, 3).mean(0).argmax() == tint.argmax() or np.ptp(tint) < 40


def test_terse_captions_name_part_of_their_scene_and_fit_many_scenes():
    """Variant H: a terse caption is a function of its scene, names one of its objects' shape with
    only that object's attributes (and at most the scene's background colour), and many scenes share
    one caption; the full style is the scene's own caption."""
    from memedit.lab import data as labdata

    scenes = labdata.scene_pool(2000, seed=0)
    terse = [labdata.scene_caption(s, "terse") for s in scenes]
    assert terse == [labdata.terse_caption(s) for s in scenes]  # deterministic
    assert [labdata.scene_caption(s, "full") for s in scenes] == [s.caption for s in scenes]
    assert len(set(terse)) < 0.7 * len(scenes)  # a caption fits many scenes
    for s, c in zip(scenes, terse, strict=True):
        words = set(c.split())
        background = [col for col in labdata.COLORS if f"on a {col} background" in c]
        assert background in ([], [s.bg_color]), c
        named = [o for o in s.objects if o.shape in words]
        assert named, c
        # every colour word left after the background belongs to a named object
        colours = {col for col in labdata.COLORS if col in words} - set(background)
        assert colours <= {o.color for o in named}, c
        assert len(c) < len(s.caption) or len(s.objects) == 1


def test_terse_prompt_sets_keep_novel_captions_unseen_and_the_sets_apart():
    from memedit.lab import data as labdata

    sets = labdata.lab_prompt_sets(3000, seed=0, n_eval=40, n_holdout=80, scene_style="terse")
    train = {labdata.terse_caption(s) for s in labdata.scene_pool(3000, seed=0)}
    seen, novel, hold = ([r["prompt"] for r in sets[k]] for k in ("nonmemorized", "novel", "holdout"))
    assert (len(seen), len(novel), len(hold)) == (40, 40, 80)
    assert all(len(set(x)) == len(x) for x in (seen, novel, hold))
    assert set(seen) <= train and not set(novel) & train
    assert not set(hold) & (set(seen) | set(novel))
    memorized = {r["prompt"] for r in sets["memorized"]}
    assert not memorized & (set(seen) | set(novel) | set(hold))
    assert sets["memorized"] == labdata.lab_prompt_sets(3000, seed=0, n_eval=40, n_holdout=80)["memorized"]


def test_an_unknown_scene_caption_style_is_refused(tmp_path):
    from memedit.errors import MemeditError
    from memedit.lab.train import LabConfig

    bad = tmp_path / "bad.yaml"
    bad.write_text("scene_captions: short\n")
    with pytest.raises(MemeditError, match="scene_captions must be one of full, terse"):
        LabConfig.load(bad)


def test_the_unet_trains_on_the_scene_caption_style_and_the_text_encoder_on_full_captions():
    from memedit.lab import data as labdata
    from memedit.lab.train import LabConfig, build_data

    cfg = LabConfig(scene_pool=30, scene_captions="terse")
    d = build_data(cfg)
    scenes = labdata.scene_pool(30, cfg.seed, labdata.memorized_exclusions(cfg.memorized))
    assert d.scene_captions == tuple(s.caption for s in scenes)
    assert d.unet_scene_captions == tuple(labdata.terse_caption(s) for s in scenes)
    assert build_data(LabConfig(scene_pool=30, scene_captions="full")).unet_scene_captions == d.scene_captions


@pytest.mark.parametrize("config", ["train.yaml", "variants/full_captions.yaml"])
def test_every_shipped_nonmemorized_prompt_has_a_training_image(config):
    """The efficacy and robustness benchmarks pair each non-memorized prompt with a training image of
    it (denoising loss on general data): under the shipped config and A's, every non-memorized prompt
    is the UNet caption of a scene the UNet trained on."""
    import sys

    import numpy as np

    from memedit.lab import data as labdata
    from memedit.lab.train import DEFAULT_CONFIG, LabConfig, scene_for_caption, training_scenes

    cfg = LabConfig.load(DEFAULT_CONFIG.parent / config)
    found = scene_for_caption(cfg)
    trained = set(training_scenes(cfg))
    if config == "train.yaml":
        prompts = [r["prompt"] for r in read_prompts(lab_dir() / "prompts" / "nonmemorized.jsonl")]
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
        import efficacy

        got, images = efficacy.nonmemorized_training_pairs(8)
        assert got == prompts[:8]
        assert [np.asarray(labdata.render_scene(found[p])).tolist() for p in got] == [i.tolist() for i in images]
    else:  # A's prompt files are no longer shipped; its prompt sets come from the same code
        sets = labdata.lab_prompt_sets(
            cfg.scene_pool, cfg.seed, memorized=cfg.memorized, scene_style=cfg.scene_captions
        )
        prompts = [r["prompt"] for r in sets["nonmemorized"]]
    for p in prompts:
        assert found[p] in trained
        assert labdata.scene_caption(found[p], cfg.scene_captions) == p
