"""Load a runnable pipeline from a model reference (safetensors only, offline, no remote code)."""

from __future__ import annotations

import json

import torch

from memedit.errors import MemeditError
from memedit.model.ref import ModelRef

# pipeline class -> extra from_pretrained arguments: no safety checker, no watermark (neither is part
# of what memedit measures, and the watermarker would need an extra package)
RUNNABLE = {
    "StableDiffusionPipeline": {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
    "StableDiffusionXLPipeline": {"add_watermarker": False},
}
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def pick_device(name: str = "auto") -> torch.device:
    import os

    if name in ("auto", "cuda") and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")  # one GPU per torchrun process
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MemeditError("--device cuda was asked for but no CUDA device is available", "use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise MemeditError("--device mps was asked for but MPS is not available", "use --device cpu or auto")
    return torch.device(name)


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None or name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    if name not in DTYPES:
        raise MemeditError(f"unknown dtype {name!r}", "use float32, float16 or bfloat16")
    return DTYPES[name]


def load_pipeline(ref: ModelRef, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """An SD 1.x/2.x or SDXL text-to-image pipeline with the default (unfused) attention, ready for tracing."""
    import diffusers

    from memedit._quiet import quiet_loaded

    quiet_loaded()
    if ref.kind != "pipeline":
        raise MemeditError(
            f"running a model needs a diffusers pipeline folder (with model_index.json); {ref} is a "
            f"{ref.kind.replace('_', ' ')}",
            "pass the pipeline folder; for a single .safetensors file, convert it once with diffusers' "
            "from_single_file(...).save_pretrained(DIR) next to its config",
        )
    cls = json.loads((ref.path / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
    if cls not in RUNNABLE:
        raise MemeditError(
            f"{ref} is a {cls}; memedit runs {', '.join(sorted(RUNNABLE))} so far",
            "inspect and diff work on any UNet; running a model needs an SD 1.x/2.x or SDXL text-to-image pipeline",
        )
    pipe = getattr(diffusers, cls).from_pretrained(
        ref.path, dtype=dtype, local_files_only=True, use_safetensors=True, variant=ref.variant, **RUNNABLE[cls]
    )
    pipe.set_progress_bar_config(disable=True)
    prepare_for_tracing(pipe.unet)
    return pipe.to(device)


def prepare_for_tracing(unet: torch.nn.Module) -> None:
    """Hooks on to_v and ff.net.2 see every call only with the default, unfused attention."""
    for name, mod in unet.named_modules():
        if getattr(mod, "fused_projections", False) or hasattr(mod, "to_qkv"):
            raise MemeditError(
                f"attention {name} has fused QKV projections, which bypass to_v",
                "load the model without fuse_qkv_projections()",
            )
    # diffusers' default processor on torch 2 (SDPA); it calls attn.to_v and the FFN modules, so hooks
    # see every call. Custom processors a user installed may not, hence the reset.
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
