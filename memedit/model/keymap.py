"""Original (LDM / single-file) <-> diffusers names of UNet tensors, as rules over names.

A table of renames, not a tensor converter: weights keep their bytes, only names change. Both
directions derive from one layout parameter (`layers_per_block`) that is read from the names
themselves, so it works for SD 1.x, 2.x, SDXL and any other LDM-layout UNet (the lab's included).
The tests check both directions against each other and against diffusers' own converter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

UNET_PREFIX = "model.diffusion_model."

# Components of an original single-file checkpoint, by key prefix (longest first).
SINGLE_FILE_COMPONENTS: tuple[tuple[str, str], ...] = (
    ("model.diffusion_model.", "unet"),
    ("first_stage_model.", "vae"),
    ("conditioner.embedders.0.", "text_encoder"),
    ("conditioner.embedders.1.", "text_encoder_2"),
    ("cond_stage_model.", "text_encoder"),
)

_TOP = (
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("label_emb.0.0.", "add_embedding.linear_1."),
    ("label_emb.0.2.", "add_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
)
_RESNET = (
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
)


class KeyMapError(ValueError):
    pass


def _swap(rest: str, table: tuple[tuple[str, str], ...], forward: bool) -> str:
    for a, b in table:
        src, dst = (a, b) if forward else (b, a)
        if rest.startswith(src):
            return dst + rest[len(src) :]
    return rest


def layers_per_block_from_diffusers(names: Iterable[str]) -> int:
    js = [int(m.group(1)) for n in names if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", n))]
    if not js:
        raise KeyMapError("no down_blocks.0.resnets.* tensors: not a UNet2DConditionModel state dict")
    return max(js) + 1


def layers_per_block_from_ldm(keys: Iterable[str]) -> int:
    ops = [int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))]
    if not ops:
        raise KeyMapError("no input_blocks.*.0.op.* tensors: not an LDM UNet state dict")
    return min(ops) - 1


def up_blocks_with_attention(names: Iterable[str]) -> set[int]:
    return {int(m.group(1)) for n in names if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", n))}


def diffusers_to_ldm(name: str, lpb: int, up_attn: set[int]) -> str:
    """`down_blocks.1.attentions.0.x` -> `input_blocks.4.1.x` (without the `model.diffusion_model.` prefix)."""
    for ldm, dif in _TOP:
        if name.startswith(dif):
            return ldm + name[len(dif) :]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = 1 + i * (lpb + 1) + j
        return (
            f"input_blocks.{n}.0.{_swap(rest, _RESNET, False)}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
        )
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", name):
        return f"input_blocks.{(int(m[1]) + 1) * (lpb + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", name):
        return f"middle_block.{0 if m[1] == '0' else 2}.{_swap(m[2], _RESNET, False)}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", name):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", name):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = i * (lpb + 1) + j
        return (
            f"output_blocks.{n}.0.{_swap(rest, _RESNET, False)}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"
        )
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", name):
        i = int(m[1])
        return f"output_blocks.{i * (lpb + 1) + lpb}.{2 if i in up_attn else 1}.conv.{m[2]}"
    raise KeyMapError(f"no original-layout name for UNet tensor {name!r}")


def ldm_to_diffusers(key: str, lpb: int) -> str:
    """Inverse of `diffusers_to_ldm`; `key` is without the `model.diffusion_model.` prefix."""
    for ldm, dif in _TOP:
        if key.startswith(ldm):
            return dif + key[len(ldm) :]
    if m := re.match(r"input_blocks\.(\d+)\.(\d+)\.(.*)", key):
        n, s, rest = int(m[1]), int(m[2]), m[3]
        i, j = divmod(n - 1, lpb + 1)
        if j == lpb:
            if not rest.startswith("op."):
                raise KeyMapError(f"unexpected tensor {key!r} in a downsampling block")
            return f"down_blocks.{i}.downsamplers.0.conv.{rest[3:]}"
        return (
            f"down_blocks.{i}.resnets.{j}.{_swap(rest, _RESNET, True)}"
            if s == 0
            else f"down_blocks.{i}.attentions.{j}.{rest}"
        )
    if m := re.match(r"middle_block\.(\d)\.(.*)", key):
        s, rest = int(m[1]), m[2]
        if s == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{0 if s == 0 else 1}.{_swap(rest, _RESNET, True)}"
    if m := re.match(r"output_blocks\.(\d+)\.(\d+)\.(.*)", key):
        n, s, rest = int(m[1]), int(m[2]), m[3]
        i, j = divmod(n, lpb + 1)
        if s == 0:
            return f"up_blocks.{i}.resnets.{j}.{_swap(rest, _RESNET, True)}"
        if s == 2 or rest.startswith("conv."):
            return f"up_blocks.{i}.upsamplers.0.conv.{rest[len('conv.') :]}"
        return f"up_blocks.{i}.attentions.{j}.{rest}"
    raise KeyMapError(f"no diffusers name for original UNet key {key!r}")


def unet_ldm_to_diffusers_map(ldm_keys: Iterable[str]) -> dict[str, str]:
    """{original key (with prefix) -> diffusers name} for every UNet key among `ldm_keys`."""
    keys = [k[len(UNET_PREFIX) :] for k in ldm_keys if k.startswith(UNET_PREFIX)]
    lpb = layers_per_block_from_ldm(keys)
    return {UNET_PREFIX + k: ldm_to_diffusers(k, lpb) for k in keys}


def unet_diffusers_to_ldm_map(names: Iterable[str]) -> dict[str, str]:
    """{diffusers name -> original key (with prefix)}; the inverse of `unet_ldm_to_diffusers_map`."""
    names = list(names)
    lpb = layers_per_block_from_diffusers(names)
    up_attn = up_blocks_with_attention(names)
    return {n: UNET_PREFIX + diffusers_to_ldm(n, lpb, up_attn) for n in names}


def component_of(key: str) -> tuple[str, str]:
    """(component, key without its prefix) for a key of an original single-file checkpoint."""
    for prefix, comp in SINGLE_FILE_COMPONENTS:
        if key.startswith(prefix):
            return comp, key[len(prefix) :]
    return "other", key
