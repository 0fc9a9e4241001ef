"""`memedit.inspect_model`: what a model holds and which of its layers memedit can edit."""

from __future__ import annotations

import dataclasses

from memedit.model.index import index_model, summarize
from memedit.model.ref import resolve
from memedit.model.targets import discover_layers


def inspect_model(model: str, variant: str | None = None) -> dict:
    ref = resolve(model, variant=variant)
    index = index_model(ref)
    layers = discover_layers(index)
    return {
        "model": str(ref),
        "resolved": ref.describe(),
        "path": str(ref.path),
        "kind": ref.kind,
        "layout": index.layout,
        "architecture": index.architecture,
        "components": summarize(index),
        "counts": {
            "value": sum(1 for x in layers if x.kind == "value"),
            "ffn": sum(1 for x in layers if x.kind == "ffn"),
        },
        "layers": [dataclasses.asdict(x) | {"weight_keys": list(x.weight_keys)} for x in layers],
    }
