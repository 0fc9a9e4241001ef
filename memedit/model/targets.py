"""Layer discovery: the editable neurons of a UNet, by diffusers module name, from headers alone.

- value layer: every cross-attention value projection `attn2.to_v`; a neuron is an output row.
- ffn layer: every transformer-block feed-forward; a neuron is a GEGLU hidden unit = an input column
  of `ff.net.2` (its producing rows are `j` and `j + inner` of `ff.net.0.proj`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from memedit.model.index import ModelIndex

_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


@dataclass(frozen=True)
class LayerTarget:
    name: str  # "unet.<module path>"
    kind: Literal["value", "ffn"]
    neurons: int
    in_features: int  # value: text-embedding width; ffn: block channels
    out_features: int
    weight_keys: tuple[str, ...]  # keys as stored in the file(s), the tensors an edit touches
    file: str
    dtype: str

    @property
    def module(self) -> str:
        """Module path inside the UNet (without the `unet.` prefix)."""
        return self.name.split(".", 1)[1]


def forward_order(module: str) -> tuple:
    """Sort key: down blocks, then mid, then up blocks, numerically."""
    head = module.split(".", 1)[0]
    nums = tuple(int(x) for x in re.findall(r"\.(\d+)(?=\.|$)", "." + module))
    return (_BLOCK_ORDER.get(head, 3), nums, module)


def discover_layers(index: ModelIndex) -> list[LayerTarget]:
    if not index.has("unet"):
        return []
    unet = index.component("unet").by_name()
    layers = []
    for name, t in unet.items():
        if name.endswith("attn2.to_v.weight"):
            mod = name[: -len(".weight")]
            keys = (t.key,) + ((unet[mod + ".bias"].key,) if mod + ".bias" in unet else ())
            layers.append(
                LayerTarget(f"unet.{mod}", "value", t.shape[0], t.shape[1], t.shape[0], keys, str(t.file), t.dtype)
            )
        elif name.endswith("ff.net.2.weight"):
            mod = name[: -len(".net.2.weight")]
            layers.append(
                LayerTarget(f"unet.{mod}", "ffn", t.shape[1], t.shape[0], t.shape[0], (t.key,), str(t.file), t.dtype)
            )
    return sorted(layers, key=lambda layer: (forward_order(layer.module), layer.kind))
