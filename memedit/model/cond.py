"""What the UNet is conditioned on, for SD 1.x/2.x and SDXL alike: the one place that encodes prompts
and builds the UNet's conditioning arguments.

memedit's algorithms treat a prompt's conditioning as one tensor of shape (rows, width): detection
differences it, the embedding attack optimizes it, fine-tuning trains toward it, generation takes it
back. SD 1.x/2.x condition on the text encoder's tokens only, so that tensor is the tokens. SDXL also
conditions on a pooled embedding (text_encoder_2's projected end-of-text state) and six size/crop
ids. The pooled embedding belongs to the prompt, so it travels as one extra row after the tokens
(zero-padded to the width): every algorithm keeps its tensor contract, and on SDXL sees and
optimizes everything a prompt controls. The size ids depend only on the resolution and are made at
the UNet call, as the SDXL pipeline makes them (original size = target size, no crop).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def is_xl(unet) -> bool:
    """SDXL-style UNets take the pooled text embedding and size ids through `added_cond_kwargs`."""
    return unet.config.get("addition_embed_type") == "text_time"


def pooled_width(unet) -> int:
    """Width of the pooled text embedding an SDXL UNet expects (its added embedding minus 6 size ids)."""
    return int(unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim)


@torch.no_grad()
def encode(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """(prompts, rows, width) conditioning as the pipeline computes it, in the UNet's dtype: the text
    encoder's last hidden state for SD 1.x/2.x; for SDXL the pipeline's own `encode_prompt` (both
    encoders' penultimate states side by side), then the pooled embedding as one more row."""
    if not is_xl(pipe.unet):
        ids = pipe.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(pipe.text_encoder.device)
        return pipe.text_encoder(ids)[0].to(pipe.unet.dtype)
    tokens, _, pooled_emb, _ = pipe.encode_prompt(
        list(prompts), device=pipe.text_encoder_2.device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    return pack(tokens, pooled_emb).to(pipe.unet.dtype)


def unconditional(pipe) -> torch.Tensor:
    """(1, rows, width): the classifier-free-guidance branch the pipeline uses with no negative
    prompt. SDXL pipelines with `force_zeros_for_empty_prompt` (the default) use zeros there, not the
    empty prompt's encoding."""
    empty = encode(pipe, [""])
    if is_xl(pipe.unet) and pipe.config.get("force_zeros_for_empty_prompt", True):
        return torch.zeros_like(empty)
    return empty


def pack(tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    width = tokens.shape[-1]
    if pooled.shape[-1] > width:
        raise ValueError(f"pooled embedding ({pooled.shape[-1]}) is wider than the tokens ({width})")
    row = torch.nn.functional.pad(pooled, (0, width - pooled.shape[-1]))
    return torch.cat([tokens, row[:, None].to(tokens.dtype)], dim=1)


def cross_tokens(unet, emb: torch.Tensor) -> torch.Tensor:
    """The rows cross-attention sees (every key and value map's input)."""
    return emb[:, :-1] if is_xl(unet) else emb


def pooled(unet, emb: torch.Tensor) -> torch.Tensor:
    return emb[:, -1, : pooled_width(unet)]


def unet_kwargs(unet, emb: torch.Tensor, latents: torch.Tensor, vae_scale: int = 8) -> dict:
    """Keyword arguments of `unet(latents, t, **...)` for conditioning `emb` (one row set per latent)."""
    if not is_xl(unet):
        return {"encoder_hidden_states": emb}
    h, w = (int(s) * vae_scale for s in latents.shape[-2:])
    ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=emb.dtype, device=emb.device).expand(emb.shape[0], -1)
    return {
        "encoder_hidden_states": cross_tokens(unet, emb),
        "added_cond_kwargs": {"text_embeds": pooled(unet, emb), "time_ids": ids},
    }


def pipeline_embeds(pipe, emb: torch.Tensor) -> dict:
    """Keyword arguments of `pipe(...)` that generate from conditioning `emb` instead of a prompt."""
    if not is_xl(pipe.unet):
        return {"prompt_embeds": emb}
    return {"prompt_embeds": cross_tokens(pipe.unet, emb), "pooled_prompt_embeds": pooled(pipe.unet, emb)}
