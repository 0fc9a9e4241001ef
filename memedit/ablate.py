"""Temporary in-memory ablations for searching and measuring (never for writing models: see edit.py).

`ablated(unet, {"down_blocks.0...attn2.to_v": [3, 17]})` zeroes those output rows of each Linear's
weight (and bias) inside the block and restores the exact original values on exit, also on error.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from memedit.trace import get_module


@contextmanager
def ablated(root: torch.nn.Module, rows: Mapping[str, Sequence[int]]) -> Iterator[None]:
    saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, idx in rows.items():
                if len(idx) == 0:
                    continue
                mod = get_module(root, name)
                index = torch.as_tensor(list(idx), dtype=torch.long)
                for p in (mod.weight, getattr(mod, "bias", None)):
                    if p is not None:
                        saved.append((p, index, p[index].clone()))
                        p[index] = 0
        yield
    finally:
        with torch.no_grad():
            for p, index, old in reversed(saved):
                p[index] = old
