"""Index before tensors: every weight of a model by component and diffusers name, from headers only.

A `ModelIndex` says which file holds which tensor with which dtype and shape, for a diffusers
pipeline folder, a single component folder or an original single-file checkpoint (whose UNet keys
are mapped to diffusers names by `keymap`). Nothing here reads tensor data.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from memedit.errors import CorruptFile, MemeditError, ModelNotFound
from memedit.model import keymap
from memedit.model.ref import ModelRef, pickle_refused
from memedit.model.safetensors_header import read_header

CLASS_TO_COMPONENT = {
    "UNet2DConditionModel": "unet",
    "AutoencoderKL": "vae",
    "CLIPTextModel": "text_encoder",
    "CLIPTextModelWithProjection": "text_encoder_2",
}


@dataclass(frozen=True)
class TensorInfo:
    component: str
    name: str  # diffusers name inside the component (original key minus prefix where unmapped)
    key: str  # the key as stored in the file
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets of the data in `file`
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ComponentIndex:
    name: str
    folder: Path | None  # None for single-file checkpoints
    class_name: str | None
    files: tuple[Path, ...]  # weight files read
    tensors: tuple[TensorInfo, ...]

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


@dataclass(frozen=True)
class ModelIndex:
    ref: ModelRef
    layout: str  # "diffusers" | "single_file"
    components: tuple[ComponentIndex, ...]

    def component(self, name: str) -> ComponentIndex:
        for c in self.components:
            if c.name == name:
                return c
        have = ", ".join(c.name for c in self.components) or "none"
        raise MemeditError(f"{self.ref} has no {name} component (components: {have})", "pass a model that contains it")

    def tensors(self) -> dict[tuple[str, str], TensorInfo]:
        """Every tensor of every component, keyed (component, diffusers name) as recipes address them."""
        return {(c.name, t.name): t for c in self.components for t in c.tensors}

    def has(self, name: str) -> bool:
        return any(c.name == name and c.tensors for c in self.components)

    @property
    def architecture(self) -> str:
        """SD 1.x / SD 2.x / SDXL by the UNet's cross-attention width, read from headers alone."""
        if not self.has("unet"):
            return "unknown"
        unet = self.component("unet").by_name()
        k = next((t for n, t in unet.items() if n.endswith("attn2.to_k.weight")), None)
        if k is None:
            return "unknown"
        width = k.shape[1]
        if "add_embedding.linear_1.weight" in unet and width == 2048:
            return "sdxl"
        return {768: "sd1", 1024: "sd2"}.get(width, "custom")


def _weight_files(folder: Path, variant: str | None) -> tuple[list[Path], str | None]:
    """The safetensors files that hold a component's weights, honoring sharded indexes and variants."""
    st = sorted(folder.glob("*.safetensors"))
    indexes = sorted(folder.glob("*.safetensors.index*.json"))

    def variant_of(p: Path) -> str | None:
        parts = p.name.split(".")
        if p.name.endswith(".json"):  # x.safetensors.index.fp16.json
            return parts[-2] if parts[-2] != "index" else None
        return parts[-2] if len(parts) >= 3 else None

    variants = sorted({v for v in map(variant_of, st + indexes) if v})
    chosen = variant
    if chosen is None and not [p for p in st if variant_of(p) is None] and len(variants) == 1:
        chosen = variants[0]  # only one variant present: that is what the folder holds
    if chosen is not None and chosen not in variants:
        raise ModelNotFound(
            f"{folder} has no {chosen!r} variant files (found: {', '.join(variants) or 'none'})",
            "drop --variant or choose one of those",
        )
    idx = [p for p in indexes if variant_of(p) == chosen]
    if idx:
        try:
            weight_map = json.loads(idx[0].read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CorruptFile(f"{idx[0]} is not a valid shard index", "re-export the model") from None
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise CorruptFile(f"{idx[0]} lists missing shard {missing[0].name}", "re-download the model")
        return files, chosen
    return [p for p in st if variant_of(p) == chosen], chosen


def _read_component(name: str, folder: Path, class_name: str | None, variant: str | None) -> ComponentIndex:
    files, _ = _weight_files(folder, variant)
    if not files:
        pickles = sorted(p for p in folder.iterdir() if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
        if pickles:
            raise pickle_refused(pickles[0])
    tensors = []
    for f in files:
        h = read_header(f)
        tensors.extend(
            TensorInfo(name, e.key, e.key, f, e.dtype, e.shape, h.data_start + e.begin, h.data_start + e.end)
            for e in h.entries
        )
    return ComponentIndex(name, folder, class_name, tuple(files), tuple(tensors))


def _class_name(folder: Path) -> str | None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise CorruptFile(f"{cfg} is not valid JSON", "re-export the model") from None
    if not isinstance(data, dict):
        raise CorruptFile(f"{cfg} is not a JSON object", "re-export the model")
    # diffusers configs name the class in _class_name, transformers configs in architectures
    return data.get("_class_name") or (data.get("architectures") or [None])[0]


def _index_pipeline(ref: ModelRef) -> ModelIndex:
    try:
        mi = json.loads((ref.path / "model_index.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise CorruptFile(f"{ref.path / 'model_index.json'} is not valid JSON", "re-export the pipeline") from None
    comps = []
    for name, spec in sorted(mi.items()):
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        folder = ref.path / name
        if folder.is_dir():
            comps.append(_read_component(name, folder, spec[1], ref.variant))
    return ModelIndex(ref, "diffusers", tuple(comps))


def _index_component(ref: ModelRef) -> ModelIndex:
    cls = _class_name(ref.path)
    name = CLASS_TO_COMPONENT.get(cls or "", ref.path.name)
    comp = _read_component(name, ref.path, cls, ref.variant)
    if not comp.tensors:
        raise ModelNotFound(f"{ref.path} holds no .safetensors weights", "point to a folder with model weights")
    return ModelIndex(ref, "diffusers", (comp,))


def _index_single_file(ref: ModelRef) -> ModelIndex:
    h = read_header(ref.path)
    keys = [e.key for e in h.entries]
    try:
        unet_names = (
            keymap.unet_ldm_to_diffusers_map(keys) if any(k.startswith(keymap.UNET_PREFIX) for k in keys) else {}
        )
    except keymap.KeyMapError as e:
        raise CorruptFile(f"{ref.path}: {e}", "memedit reads SD 1.x / 2.x / SDXL single-file layouts") from None
    groups: dict[str, list[TensorInfo]] = {}
    for e in h.entries:
        comp, stripped = keymap.component_of(e.key)
        name = unet_names.get(e.key, stripped)
        groups.setdefault(comp, []).append(
            TensorInfo(comp, name, e.key, ref.path, e.dtype, e.shape, h.data_start + e.begin, h.data_start + e.end)
        )
    comps = tuple(ComponentIndex(c, None, None, (ref.path,), tuple(ts)) for c, ts in sorted(groups.items()))
    return ModelIndex(ref, "single_file", comps)


def index_model(ref: ModelRef) -> ModelIndex:
    if ref.kind == "pipeline":
        return _index_pipeline(ref)
    if ref.kind == "component":
        return _index_component(ref)
    return _index_single_file(ref)


def summarize(index: ModelIndex) -> list[dict]:
    """Per component: files, parameter count, dtype counts (for `memedit inspect`)."""
    rows = []
    for c in index.components:
        rows.append(
            {
                "name": c.name,
                "class": c.class_name,
                "files": [str(f) for f in c.files],
                "parameters": sum(t.numel for t in c.tensors),
                "tensors": len(c.tensors),
                "dtypes": dict(sorted(Counter(t.dtype for t in c.tensors).items())),
            }
        )
    return rows
