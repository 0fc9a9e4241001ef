import pytest
import torch

from memedit.model import keymap
from tests.conftest import meta_unet_state


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_round_trip_and_agreement_with_diffusers_converter(arch):
    import json

    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from tests.conftest import CONFIGS

    names = list(meta_unet_state(arch))
    fwd = keymap.unet_diffusers_to_ldm_map(names)
    assert len(set(fwd.values())) == len(names)  # injective
    back = keymap.unet_ldm_to_diffusers_map(fwd.values())
    assert {v: k for k, v in fwd.items()} == back
    # diffusers' own converter, fed tensors that encode their position, must land each on our name
    ckpt = {ldm: torch.tensor([float(i)]) for i, ldm in enumerate(fwd.values())}
    converted = convert_ldm_unet_checkpoint(ckpt, json.loads((CONFIGS / f"{arch}_unet.json").read_text()))
    assert set(converted) == set(names)
    assert all(int(converted[n].item()) == i for i, n in enumerate(names))


def test_known_keys_of_sd15():
    names = list(meta_unet_state("sd15"))
    fwd = keymap.unet_diffusers_to_ldm_map(names)
    # from the NeMo method summary's table
    assert (
        fwd["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.weight"]
        == "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_v.weight"
    )
    assert (
        fwd["mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight"]
        == "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight"
    )
    assert (
        fwd["up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2.weight"]
        == "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.2.weight"
    )


def test_unknown_names_are_errors():
    with pytest.raises(keymap.KeyMapError):
        keymap.diffusers_to_ldm("nonsense.weight", 2, set())
    with pytest.raises(keymap.KeyMapError):
        keymap.ldm_to_diffusers("nonsense.weight", 2)
