"""Shared fixtures: tiny pipelines built from configs with a locally made tokenizer (no network, ever),
and header-only files with the real SD 1.5 / 2.1 / SDXL UNet layouts."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CONFIGS = Path(__file__).resolve().parent.parent / "memedit" / "model" / "configs"
TORCH_TO_ST = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}


def make_char_tokenizer(out: Path) -> Path:
    """A CLIP tokenizer with a byte-level vocabulary and no merges: tiny, local, real class."""
    from memedit.lab.tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, **special}))
    (out / "special_tokens_map.json").write_text(json.dumps(special))
    return out


def build_tiny_pipeline(tmp: Path):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32,
        sample_size=16,
    )
    tok = CLIPTokenizer.from_pretrained(make_char_tokenizer(tmp / "tok"))
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=len(tok) - 2,
            eos_token_id=len(tok) - 1,
            pad_token_id=len(tok) - 1,
        )
    )
    sched = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A tiny random-weight StableDiffusionPipeline saved as a diffusers folder (safetensors)."""
    tmp = tmp_path_factory.mktemp("tiny")
    pipe = build_tiny_pipeline(tmp)
    out = tmp / "pipe"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_xl_pipeline(tmp: Path):
    """A tiny StableDiffusionXLPipeline: two text encoders (the second with a projection, whose pooled
    output conditions the UNet with the size ids), SDXL's added text-time embedding and deeper
    transformer stacks, as in diffusers' own SDXL tests."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    sd = build_tiny_pipeline(tmp)
    torch.manual_seed(1)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 16,
        cross_attention_dim=32 + 48,
        norm_num_groups=32,
    )
    tok = CLIPTokenizer.from_pretrained(make_char_tokenizer(tmp / "tok2"))
    common = {
        "vocab_size": len(tok),
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "bos_token_id": len(tok) - 2,
        "eos_token_id": len(tok) - 1,
        "pad_token_id": len(tok) - 1,
    }
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, projection_dim=16, **common))
    return StableDiffusionXLPipeline(
        vae=sd.vae,
        text_encoder=sd.text_encoder,
        text_encoder_2=te2,
        tokenizer=sd.tokenizer,
        tokenizer_2=tok,
        unet=unet,
        scheduler=sd.scheduler,
        add_watermarker=False,
    )


@pytest.fixture(scope="session")
def tiny_xl_pipeline_dir(tmp_path_factory) -> Path:
    """A tiny random-weight StableDiffusionXLPipeline saved as a diffusers folder (safetensors)."""
    tmp = tmp_path_factory.mktemp("tiny-xl")
    out = tmp / "pipe"
    build_tiny_xl_pipeline(tmp).save_pretrained(out, safe_serialization=True)
    return out


def meta_unet_state(arch: str) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    cfg = json.loads((CONFIGS / f"{arch}_unet.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg)
    return {k: v.to(torch.float16) for k, v in unet.state_dict().items()}


def write_sparse_safetensors(path: Path, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> Path:
    """A valid safetensors file whose data section is a hole: a full-size layout in no disk and no RAM."""
    header, pos = {}, 0
    for key, (shape, dtype) in shapes.items():
        n = torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
        header[key] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + pos)
    return path


@pytest.fixture(scope="session")
def sd_layouts(tmp_path_factory):
    """{arch: (diffusers unet folder, single file)} for sd15, sd21, sdxl — real layouts, header-only data."""
    from memedit.model.keymap import unet_diffusers_to_ldm_map

    root = tmp_path_factory.mktemp("sdlayouts")
    out = {}
    for arch in ("sd15", "sd21", "sdxl"):
        state = meta_unet_state(arch)
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
        folder = root / arch / "unet"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text((CONFIGS / f"{arch}_unet.json").read_text())
        write_sparse_safetensors(folder / "diffusion_pytorch_model.fp16.safetensors", shapes)
        ldm = unet_diffusers_to_ldm_map(shapes)
        single = {ldm[k]: v for k, v in shapes.items()}
        single["first_stage_model.decoder.conv_in.weight"] = ((512, 4, 3, 3), torch.float16)
        write_sparse_safetensors(root / arch / f"{arch}-single.safetensors", single)
        out[arch] = (folder, root / arch / f"{arch}-single.safetensors")
    return out


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under root with its sha256 and mode: compare before and after to prove nothing changed."""
    result = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_file():
            result[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            result[rel] = "dir"
    return result


AUDIT_KEY = pytest.StashKey[int]()  # set by tests/test_bad_inputs.py::test_audit_size


def pytest_terminal_summary(terminalreporter, config):
    """The bad-input audit's size, printed with every run (pytest captures prints inside tests)."""
    total = config.stash.get(AUDIT_KEY, None)
    if total is not None:
        terminalreporter.write_line(f"bad-input audit: {total} malformed inputs across all verbs")
