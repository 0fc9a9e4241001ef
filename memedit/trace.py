"""Hooks on named modules, and value-neuron activations straight from the text encoder.

`Tracer` registers forward hooks on named submodules on enter and removes them on exit, also when
the body raised; an unknown name fails with that name and the nearest real ones. Callbacks reduce
inside the hook so that nothing large is kept.

Value neurons (rows of `attn2.to_v`) see only the prompt embedding, so their activations need no
UNet pass: `ValueMaps` applies every `to_v` module to the text-encoder output directly, as one matrix
product.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ValueMaps:
    """Every named `to_v` as one matrix product: their weights (and biases) stacked once.

    Built once per run (`ValueMaps.of`): looking the modules up and stacking their weights again for
    every batch is a share of the value statistics' time worth saving on small models. It holds a
    copy of the weights, so build it again after editing them."""

    layers: tuple[str, ...]
    widths: tuple[int, ...]
    weight: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    @torch.no_grad()
    def of(cls, unet: torch.nn.Module, layers: Sequence[str]) -> ValueMaps:
        mods = [get_module(unet, name) for name in layers]
        if not mods:
            return cls((), (), torch.empty(0), None)
        bias = None
        if any(m.bias is not None for m in mods):
            bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in mods])
        widths = tuple(m.out_features for m in mods)
        return cls(tuple(layers), widths, torch.cat([m.weight for m in mods]), bias)

    @torch.no_grad()
    def project(self, text_emb: torch.Tensor) -> torch.Tensor:
        """(batch, tokens, all neurons): every value map's output, before |.| and the token mean."""
        return torch.nn.functional.linear(text_emb.to(self.weight.dtype), self.weight, self.bias)

    @torch.no_grad()
    def __call__(self, text_emb: torch.Tensor, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
        """{layer: (batch, neurons) DTYPE} = mean over all token positions of |to_v(text_emb)|.

        NeMo's definition (official code): BOS and padding positions are included. The token mean
        is summed in the input precision and only then widened: a float64 copy of (batch, tokens,
        neurons) would cost more than the text encoder itself on small models. For a float32 input,
        DTYPE float32 gives the bits of float64 rounded to float32 (a division rounded twice through
        53 bits rounds as once)."""
        if not self.layers:
            return {}
        out = self.project(text_emb)
        # summed along the transposed view: on CPU faster than `.sum(dim=1)` of the same tensor, with
        # the same bits
        acts = out.abs_().transpose(1, 2).sum(dim=-1).to(dtype) / text_emb.shape[1]
        return dict(zip(self.layers, acts.split(self.widths, dim=1), strict=True))


def value_activations(unet: torch.nn.Module, text_emb: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
    """`ValueMaps` of LAYERS applied once to TEXT_EMB."""
    return ValueMaps.of(unet, layers)(text_emb)


def conditioning_value_activations(
    unet: torch.nn.Module, emb: torch.Tensor, maps: ValueMaps, dtype: torch.dtype = torch.float64
) -> dict[str, torch.Tensor]:
    """MAPS applied to a conditioning as `memedit.model.cond.encode` makes it (on SDXL, the token rows
    only: the pooled embedding never reaches a value map)."""
    from memedit.model.cond import cross_tokens

    return maps(cross_tokens(unet, emb), dtype)


def prompt_value_activations(
    pipe, prompts: list[str], layers: Sequence[str] | ValueMaps, dtype: torch.dtype = torch.float64
) -> dict[str, torch.Tensor]:
    """value_activations of prompts as the pipeline encodes them. LAYERS: names, or `ValueMaps` built
    once."""
    from memedit.model.cond import encode

    maps = layers if isinstance(layers, ValueMaps) else ValueMaps.of(pipe.unet, layers)
    return conditioning_value_activations(pipe.unet, encode(pipe, prompts), maps, dtype)
