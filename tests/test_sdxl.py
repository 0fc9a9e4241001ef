"""SDXL pipelines run through the same code paths as SD 1.x/2.x: the conditioning memedit builds is
exactly what StableDiffusionXLPipeline gives its UNet, and calibrate -> localize -> apply -> detect ->
explain -> attack work end to end on a tiny SDXL pipeline built from configs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from memedit.calibrate import CalibSettings, calibrate, load_stats
from memedit.cli import main
from memedit.detect import DetectSettings
from memedit.generate import GenSettings, generate
from memedit.model.cond import cross_tokens, encode, is_xl, pooled_width, unconditional, unet_kwargs
from memedit.model.load import load_pipeline
from memedit.model.ref import resolve
from memedit.trace import Tracer, value_activations, value_layer_names

CAL = [f"a red cat number {i}" for i in range(5)]
HOLD = [f"a blue dog in a field {i}" for i in range(9)]


@pytest.fixture(scope="module")
def pipe(tiny_xl_pipeline_dir):
    return load_pipeline(resolve(str(tiny_xl_pipeline_dir)))


@pytest.fixture(scope="module")
def xl_stats(tiny_xl_pipeline_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("xl")
    rows = [json.dumps({"prompt": p, "memorized": i < 2}) for i, p in enumerate(CAL)]
    (d / "cal.jsonl").write_text("\n".join(rows) + "\n")
    (d / "hold.txt").write_text("\n".join(HOLD) + "\n")
    settings = CalibSettings(detect=DetectSettings(batch_size=3, generations=2), ffn_steps=2)
    calibrate(str(tiny_xl_pipeline_dir), d / "cal.jsonl", d / "hold.txt", d / "stats", settings)
    return d


def test_conditioning_is_what_the_sdxl_pipeline_gives_its_unet(pipe):
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda _m, a, kw: seen.append((a[0], kw)), with_kwargs=True)
    try:
        pipe(prompt="a red cat", num_inference_steps=1, output_type="latent", generator=torch.manual_seed(0))
    finally:
        hook.remove()
    x, kw = seen[0]
    emb = torch.cat([unconditional(pipe), encode(pipe, ["a red cat"])])
    mine = unet_kwargs(pipe.unet, emb, x, pipe.vae_scale_factor)
    assert emb.shape == (2, 77 + 1, 32 + 48)  # both encoders' tokens side by side, then the pooled row
    assert unconditional(pipe).abs().sum() == 0  # force_zeros_for_empty_prompt, as the pipeline does
    torch.testing.assert_close(mine["encoder_hidden_states"], kw["encoder_hidden_states"], rtol=0, atol=0)
    for k in ("text_embeds", "time_ids"):
        torch.testing.assert_close(mine["added_cond_kwargs"][k], kw["added_cond_kwargs"][k], rtol=0, atol=0)
    assert pooled_width(pipe.unet) == 16 and not emb[1, -1, 16:].any()


def test_generating_from_an_encoding_equals_generating_from_its_prompt(pipe):
    gen = GenSettings(seeds=(5, 6), steps=3)
    a = generate(pipe, ["a red cat", "a blue dog"], gen)
    # From text, the pipeline encodes one batch of prompt x seed (cat, cat, dog, dog); the text
    # encoders' float results depend on the batch size by an ulp (3.6e-7 measured), enough to flip one
    # pixel's rounding, so the encodings compared bit for bit come from that same batch.
    enc = encode(pipe, ["a red cat", "a red cat", "a blue dog", "a blue dog"])
    b = generate(pipe, enc[[0, 2]], gen)
    assert a.shape == (2, 2, 16, 16, 3) and np.array_equal(a, b)


def test_value_statistics_are_what_the_value_maps_see_inside_the_unet(pipe, xl_stats):
    info, t = load_stats(xl_stats / "stats")
    layers = value_layer_names(pipe.unet)
    # two-block transformer stacks: 2 attentions down, 1 mid, 3 up
    assert info["layers"]["value"] == layers and len(layers) == 2 * (2 + 1 + 3)
    seen = {}
    emb = encode(pipe, CAL[:1])
    x = torch.zeros(1, 4, 8, 8)
    with Tracer(pipe.unet, layers, on_output=lambda n, _m, _i, out: seen.setdefault(n, out.abs().mean(1))):
        pipe.unet(x, 10, **unet_kwargs(pipe.unet, emb, x, pipe.vae_scale_factor))
    direct = value_activations(pipe.unet, cross_tokens(pipe.unet, emb), layers)
    for n in layers:
        torch.testing.assert_close(direct[n].float(), seen[n].float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(t[f"prompts/value/{n}"][:1], seen[n].float(), rtol=1e-5, atol=1e-6)


# NeMo runs on SDXL through the same detection calls, but finds nothing to prune in random weights
# (no prompt is memorized); the lab tests cover what it selects
@pytest.mark.parametrize("method", ["subspace", "remap"])
def test_localize_and_apply_on_sdxl(tiny_xl_pipeline_dir, xl_stats, tmp_path, capsys, method):
    recipe, out = tmp_path / "r.yaml", tmp_path / "edited"
    targets = ["--targets", "labels"]
    assert main(["localize", str(xl_stats / "stats"), "-o", str(recipe), "--method", method, *targets]) == 0
    assert main(["apply", str(recipe), "-o", str(out)]) == 0
    capsys.readouterr()
    base = load_file(tiny_xl_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    edited = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    changed = sorted(k for k in base if not torch.equal(base[k], edited[k]))
    if method == "remap":  # keys and values of every cross-attention layer, nothing else
        assert len(changed) == 2 * 12 and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)
    else:  # weights of the transformer blocks' feed-forward output maps
        assert changed and all(k.endswith("ff.net.2.weight") for k in changed)
    edited_pipe = load_pipeline(resolve(str(out)))
    assert type(edited_pipe).__name__ == "StableDiffusionXLPipeline"
    assert generate(edited_pipe, CAL[:1], GenSettings(seeds=(0,), steps=2)).shape == (1, 1, 16, 16, 3)


def test_detect_explain_and_attack_run_on_sdxl(tiny_xl_pipeline_dir, xl_stats, tmp_path, capsys):
    model = str(tiny_xl_pipeline_dir)
    hold = str(xl_stats / "hold.txt")
    assert main(["detect", model, "--prompts", str(xl_stats / "cal.jsonl"), "--holdout", hold, "--json"]) == 0
    det = json.loads(capsys.readouterr().out)
    assert len(det["prompts"]) == 5 and all(p["score"] > 0 for p in det["prompts"])
    assert main(["explain", model, "a red cat", "--json"]) == 0
    exp = json.loads(capsys.readouterr().out)
    assert [t["token"] for t in exp["tokens"]][:3] == ["a", "r", "e"]  # the test tokenizer is per character
    yy, xx = np.mgrid[0:16, 0:16] / 15
    Image.fromarray((np.stack([xx, yy, 1 - xx], -1) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "t.jsonl").write_text('{"prompt": "a red cat", "image": "a.png", "memorized": true}\n')
    emb = tmp_path / "emb.safetensors"
    argv = ["attack", model, "--prompts", str(tmp_path / "t.jsonl"), "--references", str(tmp_path)]
    assert main([*argv, "--steps", "2", "--seeds", "2", "--save-embeddings", str(emb), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["summary"]["memorized_targets"] == 1
    assert load_file(emb)["0000"].shape == (78, 80)  # the attack optimizes the pooled row too


@pytest.mark.parametrize("arch, xl, pooled", [("sd15", False, None), ("sd21", False, None), ("sdxl", True, 1280)])
def test_published_configs_give_the_conditioning_their_pipelines_build(arch, xl, pooled):
    """At the real sizes: SDXL base's UNet takes OpenCLIP bigG's 1280-wide pooled embedding after six
    256-wide size ids, and 2048-wide tokens (768 + 1280); SD 1.5 / 2.1 take tokens only."""
    from diffusers import UNet2DConditionModel

    from tests.conftest import CONFIGS

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((CONFIGS / f"{arch}_unet.json").read_text()))
    assert is_xl(unet) == xl
    width = unet.config.cross_attention_dim
    emb = torch.zeros(2, 77 + xl, width)
    kw = unet_kwargs(unet, emb, torch.zeros(2, 4, 128, 128))
    assert kw["encoder_hidden_states"].shape == (2, 77, width)
    if xl:
        assert pooled_width(unet) == pooled and width == 768 + 1280
        assert kw["added_cond_kwargs"]["text_embeds"].shape == (2, pooled)
        assert kw["added_cond_kwargs"]["time_ids"].tolist() == [[1024, 1024, 0, 0, 1024, 1024]] * 2
    else:
        assert set(kw) == {"encoder_hidden_states"}


def test_hardening_ranks_value_neurons_by_what_cross_attention_sees(pipe):
    """`memedit harden` scores adversarial embeddings' value neurons on the token rows only: the pooled
    row never reaches a value map."""
    from memedit.harden import adversarial_neurons

    layers = value_layer_names(pipe.unet)[:2]
    emb = encode(pipe, ["a red cat", "a blue dog"])
    emb[:, -1] = 1e3  # a pooled row this large would dominate every mean if it were counted
    ones = {n: torch.ones(pipe.unet.get_submodule(n).out_features) for n in layers}
    zeros = {n: torch.zeros_like(v) for n, v in ones.items()}
    found = adversarial_neurons(pipe.unet, emb, layers, zeros, ones, 0.1, {})
    acts = value_activations(pipe.unet, cross_tokens(pipe.unet, emb), layers)
    for n in layers:
        k = math.ceil(0.1 * len(ones[n]))
        want = {int(r) for i in range(2) for r in acts[n][i].float().topk(k).indices}
        assert set(found[n]) == want


def test_encoder_edit_on_sdxl_changes_the_read_out_feed_forward_of_both_text_encoders(
    tiny_xl_pipeline_dir, xl_stats, pipe, tmp_path, capsys
):
    recipe, out = tmp_path / "r.yaml", tmp_path / "edited"
    argv = ["localize", str(xl_stats / "stats"), "-o", str(recipe), "--method", "encoder", "--targets", "labels"]
    assert main(argv) == 0
    assert main(["apply", str(recipe), "-o", str(out)]) == 0
    assert main(["verify", str(out)]) == 0
    assert main(["diff", str(tiny_xl_pipeline_dir), str(out), "--recipe", str(recipe)]) == 0
    capsys.readouterr()
    files = {
        "unet": "unet/diffusion_pytorch_model.safetensors",
        "text_encoder": "text_encoder/model.safetensors",
        "text_encoder_2": "text_encoder_2/model.safetensors",
    }
    changed = {}
    for component, f in files.items():
        a, b = load_file(tiny_xl_pipeline_dir / f), load_file(out / f)
        changed[component] = sorted(k for k in a if not torch.equal(a[k], b[k]))
    # SDXL reads both encoders' penultimate layer (of 2 here: layer 0), so that layer's fc2 is edited
    # (transformers names the second encoder's tensors text_model.*, the first's without the prefix)
    assert changed["unet"] == []
    for component in ("text_encoder", "text_encoder_2"):
        assert len(changed[component]) == 1 and changed[component][0].endswith("encoder.layers.0.mlp.fc2.weight")
    edited = load_pipeline(resolve(str(out)))

    def moved(prompts: list[str]) -> float:
        a, b = cross_tokens(pipe.unet, encode(pipe, prompts)), cross_tokens(edited.unet, encode(edited, prompts))
        return float(((b - a).norm(dim=-1) / a.norm(dim=-1)).mean())

    assert moved(CAL[:2]) > 2 * moved(HOLD)  # the labelled prompts move, the hold-out stays
    assert generate(edited, CAL[:1], GenSettings(seeds=(0,), steps=2)).shape == (1, 1, 16, 16, 3)
