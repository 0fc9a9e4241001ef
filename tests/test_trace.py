import json

import pytest
import torch

from memedit.ablate import ablated
from memedit.errors import MemeditError
from memedit.trace import Tracer, ValueMaps, ffn_layer_names, value_activations, value_layer_names
from tests.conftest import CONFIGS


def small_unet(arch: str):
    """The real config of each architecture, shrunk in width only (same block types, linear projections,
    transformer depths, SDXL's added time/text embedding)."""
    from diffusers import UNet2DConditionModel

    cfg = json.loads((CONFIGS / f"{arch}_unet.json").read_text())
    n = len(cfg["block_out_channels"])
    cfg.update(block_out_channels=[32, 64, 64, 64][:n], cross_attention_dim=48, attention_head_dim=8, sample_size=8)
    if arch == "sdxl":
        cfg.update(
            transformer_layers_per_block=[1, 2, 2],
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=48 + 6 * 8,
        )
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config(cfg).eval()


def unet_forward(unet, emb):
    b = emb.shape[0]
    x = torch.randn(b, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    kw = {}
    if unet.config.addition_embed_type == "text_time":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(b, 48), "time_ids": torch.zeros(b, 6)}
    return unet(x, torch.tensor([500] * b), encoder_hidden_states=emb, **kw).sample


def values_the_forward_sees(unet, layers, emb) -> dict[str, torch.Tensor]:
    """{layer: mean over tokens of |to_v output|} as hooks inside a real UNet forward see it."""
    seen = {}

    def grab(name, module, inputs, output):
        seen.setdefault(name, output.abs().double().mean(dim=1))

    with torch.no_grad(), Tracer(unet, layers, on_output=grab):
        unet_forward(unet, emb)
    return seen


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_value_activations_equal_what_the_unet_forward_sees(arch):
    unet = small_unet(arch)
    layers = value_layer_names(unet)
    emb = torch.randn(3, 77, 48, generator=torch.Generator().manual_seed(0))
    seen = values_the_forward_sees(unet, layers, emb)
    direct = value_activations(unet, emb, layers)
    assert set(seen) == set(layers) == set(direct)
    for n in layers:
        torch.testing.assert_close(direct[n], seen[n], rtol=1e-6, atol=1e-9)


def test_value_maps_with_biased_and_unbiased_layers_equal_the_forward():
    """Models whose to_v carries a bias (some fine-tunes add one) stack zeros for the layers without."""
    unet = small_unet("sd15")
    layers = value_layer_names(unet)
    torch.manual_seed(3)
    for name in layers[::2]:
        old = unet.get_submodule(name)
        new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
        new.weight.data.copy_(old.weight)
        parent, _, leaf = name.rpartition(".")
        setattr(unet.get_submodule(parent), leaf, new)
    emb = torch.randn(2, 77, 48, generator=torch.Generator().manual_seed(0))
    seen = values_the_forward_sees(unet, layers, emb)
    maps = ValueMaps.of(unet, layers)
    assert maps.bias is not None and maps.bias.count_nonzero() > 0
    direct = maps(emb)
    for n in layers:
        torch.testing.assert_close(direct[n], seen[n], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_value_maps_float32_output_has_the_bits_of_float64_rounded(dtype):
    """calibrate stores float32 values computed without the float64 round trip; they must be the
    same bits as the float64 result rounded, so stats do not change with the shortcut."""
    unet = small_unet("sd15").to(dtype)
    maps = ValueMaps.of(unet, value_layer_names(unet))
    emb = torch.randn(5, 77, 48, generator=torch.Generator().manual_seed(4)).to(dtype)
    wide, narrow = maps(emb), maps(emb, torch.float32)
    for n in maps.layers:
        assert narrow[n].dtype == torch.float32
        assert torch.equal(narrow[n], wide[n].float())


def test_tracer_removes_hooks_even_after_an_error():
    unet = small_unet("sd15")
    layers = value_layer_names(unet) + ffn_layer_names(unet)
    with pytest.raises(RuntimeError, match="boom"), Tracer(unet, layers, on_input=lambda *a: None):
        raise RuntimeError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())


def test_unknown_layer_names_the_nearest():
    unet = small_unet("sd15")
    with pytest.raises(MemeditError) as e:
        Tracer(unet, ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_vv"], on_output=lambda *a: None)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v" in e.value.hint


def test_ablated_restores_bit_for_bit():
    unet = small_unet("sd15")
    name = value_layer_names(unet)[0]
    w = unet.get_submodule(name).weight
    before = w.detach().clone()
    with ablated(unet, {name: [0, 5]}):
        assert torch.all(w[[0, 5]] == 0) and torch.equal(w[1:5], before[1:5])
    assert torch.equal(w, before)
