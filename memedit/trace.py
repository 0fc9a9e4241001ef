"""Hooks on named modules, and value-neuron activations straight from the text encoder.

`Tracer` registers forward hooks on named submodules on enter and removes them on exit, also when
the body raised; an unknown name fails with that name and the nearest real ones. Callbacks reduce
inside the hook so that nothing large is kept.

Value neurons (rows of `attn2.to_v`) see only the prompt embedding, so their activations need no
UNet pass: `value_activations` applies each `to_v` module to the text-encoder output directly.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import torch

from memedit.errors import MemeditError

Hook = Callable[[str, torch.nn.Module, tuple, object], None]


def get_module(root: torch.nn.Module, name: str) -> torch.nn.Module:
    try:
        return root.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in root.named_modules() if n]
        near = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        raise MemeditError(
            f"no module named {name!r}", "nearest: " + ", ".join(near) if near else "run memedit inspect MODEL"
        ) from None


class Tracer(AbstractContextManager):
    """with Tracer(unet, names, on_output=fn): unet(...)  — fn(name, module, inputs, output) per call.

    `on_input=fn` registers pre-hooks instead: fn(name, module, inputs, None)."""

    def __init__(
        self, root: torch.nn.Module, names: Iterable[str], on_output: Hook | None = None, on_input: Hook | None = None
    ) -> None:
        if (on_output is None) == (on_input is None):
            raise ValueError("give exactly one of on_output / on_input")
        self.root = root
        self.names = list(names)
        self.on_output, self.on_input = on_output, on_input
        self.modules = {n: get_module(root, n) for n in self.names}  # fail before anything is registered
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> Tracer:
        for name, mod in self.modules.items():
            if self.on_output is not None:
                fn = self.on_output
                self.handles.append(mod.register_forward_hook(lambda m, i, o, _n=name, _f=fn: _f(_n, m, i, o)))
            else:
                fn = self.on_input
                self.handles.append(mod.register_forward_pre_hook(lambda m, i, _n=name, _f=fn: _f(_n, m, i, None)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def value_layer_names(unet: torch.nn.Module) -> list[str]:
    """Every cross-attention value projection, in forward order (module paths inside the UNet)."""
    from memedit.model.targets import forward_order

    return sorted((n for n, _ in unet.named_modules() if n.endswith("attn2.to_v")), key=forward_order)


def ffn_layer_names(unet: torch.nn.Module) -> list[str]:
    """Every transformer-block feed-forward output projection `ff.net.2`, in forward order."""
    from memedit.model.targets import forward_order

    return sorted((n for n, _ in unet.named_modules() if n.endswith("ff.net.2")), key=forward_order)


@torch.no_grad()
def value_activations(unet: torch.nn.Module, text_emb: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
    """{layer: (batch, neurons) float64} = mean over all token positions of |to_v(text_emb)|.

    NeMo's definition (official code): BOS and padding positions are included. All layers are one
    matrix product (their weights stacked), and the token mean is summed in the input precision and
    only then widened: a float64 copy of (batch, tokens, neurons) would cost more than the text
    encoder itself on small models."""
    mods = [get_module(unet, name) for name in layers]
    if not mods:
        return {}
    weight = torch.cat([m.weight for m in mods])
    bias = None
    if any(m.bias is not None for m in mods):
        bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in mods])
    out = torch.nn.functional.linear(text_emb.to(weight.dtype), weight, bias)
    acts = out.abs_().sum(dim=1).double() / text_emb.shape[1]
    return dict(zip(layers, acts.split([m.out_features for m in mods], dim=1), strict=True))


def prompt_value_activations(pipe, prompts: list[str], layers: list[str]) -> dict[str, torch.Tensor]:
    """value_activations of prompts as the pipeline encodes them (on SDXL, the token rows only: the
    pooled embedding never reaches a value map)."""
    from memedit.model.cond import cross_tokens, encode

    return value_activations(pipe.unet, cross_tokens(pipe.unet, encode(pipe, prompts)), layers)
