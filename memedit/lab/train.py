"""Reproducible trainer of the memorization lab (`memedit lab train --out DIR`).

Three stages, as Stable Diffusion was built: an autoencoder, a text encoder pre-trained CLIP-style
on the captions and then frozen, and a text-conditioned UNet trained on VAE latents with 10%
caption dropout and EMA weights. The data mixes real photos that are heavily duplicated (the
memorized set) with a large pool of procedural scenes seen a few times each.

Completed stages are cached under DIR/work/, so an interrupted run continues at the next stage.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from memedit.errors import MemeditError
from memedit.lab import data as labdata
from memedit.lab.tokenizer import build_tokenizer_files

DEFAULT_CONFIG = Path(__file__).with_name("train.yaml")
CPU = torch.device("cpu")
# the trained stages in training order, as StepClock.tick and timings.json name them
STAGES = ("autoencoder", "text_encoder", "unet")


@dataclass(frozen=True)
class LabConfig:
    seed: int = 0
    resolution: int = 32
    scene_pool: int = 12000
    vae_channels: tuple[int, ...] = (32, 64, 64)
    latent_channels: int = 4
    vae_steps: int = 2500
    vae_batch: int = 32
    vae_lr: float = 1e-3
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_intermediate: int = 256
    clip_steps: int = 800
    clip_batch: int = 128
    clip_lr: float = 5e-4
    unet_channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 2
    attention_head_dim: int = 8
    unet_steps: int = 6000
    unet_batch: int = 24
    unet_lr: float = 5e-4
    warmup_steps: int = 200
    mem_fraction: float = 0.2667
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    # Variants of the locality study (LAB.md): how memorized images are captioned ("photo" or
    # "scene"), whether the text encoder's contrastive pre-training sees the memorized pairs, and the
    # UNet step from which the duplicated photos are mixed in (0: from the start; later: a general
    # model first, then fine-tuned on data that holds the duplicates, as SD 1.4 was).
    memorized_captions: str = "photo"
    clip_sees_memorized: bool = True
    mem_start_step: int = 0
    # Variant D: a pool of captioned natural-image crops (data.photo_pool) in the general data of the
    # text encoder and the UNet, drawn for photo_share of the non-memorized batch slots.
    general_photos: int = 0
    photo_share: float = 0.5
    # How the procedural scenes are captioned for the UNet ("full": every object and the background,
    # the first lab A; "terse": one object with some of its attributes, data.terse_caption, as a LAION
    # caption names a small part of its picture; the shipped lab since variant H2).
    scene_captions: str = "terse"

    @classmethod
    def load(cls, path: Path) -> LabConfig:
        """Settings from a YAML file over the defaults (train.yaml's). `base: OTHER.yaml` (relative to
        the file) starts from another config instead, so a variant of a variant lists only its change."""
        raw = cls._settings(Path(path), ())
        cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        for name, styles in (
            ("memorized_captions", labdata.CAPTION_STYLES),
            ("scene_captions", labdata.SCENE_CAPTION_STYLES),
        ):
            if getattr(cfg, name) not in styles:
                raise MemeditError(f"{path}: {name} must be one of {', '.join(styles)}", "see memedit/lab/train.yaml")
        return cfg

    @classmethod
    def _settings(cls, path: Path, chain: tuple[Path, ...]) -> dict:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(raw, dict):
            raise MemeditError(f"{path} is not a mapping of settings", "see memedit/lab/train.yaml")
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)} - {"base"})
        if unknown:
            raise MemeditError(f"{path}: unknown setting(s) {', '.join(unknown)}", "see memedit/lab/train.yaml")
        base = raw.pop("base", None)
        if base is None:
            return raw
        parent, chain = path.parent / str(base), (*chain, path.resolve())
        if not parent.is_file():
            raise MemeditError(f"{path}: base {parent} is not a file", "base is a path relative to this config")
        if parent.resolve() in chain:
            raise MemeditError(f"{path}: base {parent} leads back to this config", "break the cycle of base settings")
        return {**cls._settings(parent, chain), **raw}

    @property
    def memorized(self) -> tuple[labdata.MemorizedImage, ...]:
        return labdata.memorized_set(self.memorized_captions)


def _progress(quiet: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=quiet,
    )


@dataclass(frozen=True)
class StepRates:
    """Seconds per training step of one stage, from the interval between consecutive steps (the
    first step, which carries the stage's set-up, is not an interval). `early` and `late`: the
    medians of the first and last tenth of the intervals, which show a machine slowing over a run."""

    steps: int
    median: float
    p10: float
    p90: float
    early: float
    late: float


class StepClock:
    """When each training step of each stage ended: steady-state rates that set-up and one-off
    stalls cannot skew, for `timings.json` and benchmarks/lab_train_speed.py."""

    def __init__(self) -> None:
        self.ends: dict[str, list[float]] = {}

    def tick(self, stage: str) -> None:
        self.ends.setdefault(stage, []).append(time.perf_counter())

    def rates(self, stage: str) -> StepRates | None:
        """None where the stage ran fewer than 3 steps (fewer than 2 intervals)."""
        gaps = np.diff(self.ends.get(stage, []))
        if len(gaps) < 2:
            return None
        tenth = max(1, len(gaps) // 10)
        return StepRates(
            steps=len(gaps) + 1,
            median=float(np.median(gaps)),
            p10=float(np.percentile(gaps, 10)),
            p90=float(np.percentile(gaps, 90)),
            early=float(np.median(gaps[:tenth])),
            late=float(np.median(gaps[-tenth:])),
        )


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabData:
    mem_images: torch.Tensor  # (M, 3, R, R) in [-1, 1]
    mem_captions: tuple[tuple[str, ...], ...]  # training captions per memorized image
    scene_images: torch.Tensor  # (S, 3, R, R)
    scene_captions: tuple[str, ...]  # full captions: the text encoder's pre-training reads these
    unet_scene_captions: tuple[str, ...]  # what the UNet is trained on (LabConfig.scene_captions)
    extra_photos: torch.Tensor  # random crops of other real photos, for the autoencoder only
    photo_images: torch.Tensor  # captioned natural-image crops of the general data (variant D), maybe empty
    photo_captions: tuple[str, ...]


def training_scenes(cfg: LabConfig) -> list[labdata.Scene]:
    """The procedural scenes the lab trains on, in training-data order."""
    return labdata.scene_pool(cfg.scene_pool, cfg.seed, labdata.memorized_exclusions(cfg.memorized))


def scene_for_caption(cfg: LabConfig) -> dict[str, labdata.Scene]:
    """Each UNet training caption of a scene -> the first training scene it captions. A terse caption
    captions several scenes, each a training image of it; the first is a deterministic choice."""
    out: dict[str, labdata.Scene] = {}
    for s in training_scenes(cfg):
        out.setdefault(labdata.scene_caption(s, cfg.scene_captions), s)
    return out


def build_data(cfg: LabConfig) -> LabData:
    r = cfg.resolution
    mem = torch.from_numpy(np.stack([labdata.to_array(labdata.load_photo(m.source, r)) for m in cfg.memorized]))
    scenes = training_scenes(cfg)
    scene_imgs = torch.from_numpy(np.stack([labdata.to_array(labdata.render_scene(s, r)) for s in scenes]))
    # The autoencoder sees many crops of other real photos as well, so that it is a general codec
    # rather than one tuned to the ten memorized pictures.
    rng = random.Random(cfg.seed + 1)
    crops = []
    for src in labdata.EXTRA_PHOTOS:
        big = labdata.load_photo(src, 256)
        for _ in range(200):
            s = rng.randrange(48, 257)
            x, y = rng.randrange(0, 257 - s), rng.randrange(0, 257 - s)
            crops.append(labdata.to_array(big.crop((x, y, x + s, y + s)).resize((r, r), labdata.LANCZOS)))
    photos = labdata.photo_pool(cfg.general_photos, cfg.seed + 5, r)
    photo_imgs = [labdata.to_array(p.image) for p in photos]
    return LabData(
        mem,
        tuple(m.captions for m in cfg.memorized),
        scene_imgs,
        tuple(s.caption for s in scenes),
        # the text encoder stays a general model trained on its own data (as CLIP is to SD), so only
        # the UNet's captions change with the style
        tuple(labdata.scene_caption(s, cfg.scene_captions) for s in scenes),
        torch.from_numpy(np.stack(crops)),
        torch.from_numpy(np.stack(photo_imgs)) if photo_imgs else torch.zeros(0, 3, r, r),
        tuple(p.caption for p in photos),
    )


# ----------------------------------------------------------------------------------------------
# Stage 1: autoencoder
# ----------------------------------------------------------------------------------------------
def make_vae(cfg: LabConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=cfg.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=cfg.resolution,
    )


def train_vae(cfg: LabConfig, d: LabData, quiet: bool, device: torch.device = CPU, clock: StepClock | None = None):
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    vae = make_vae(cfg).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    pools = [d.mem_images, d.scene_images, d.extra_photos]
    with _progress(quiet) as prog:
        task = prog.add_task("lab: autoencoder", total=cfg.vae_steps, info="")
        for step in range(cfg.vae_steps):
            for group in opt.param_groups:
                group["lr"] = _lr(step, cfg.vae_steps, cfg.vae_lr, 100)
            # a quarter memorized photos, a quarter scenes, half other photos
            b = cfg.vae_batch
            parts = [
                p[torch.randint(len(p), (k,), generator=g)]
                for p, k in zip(pools, (b // 4, b // 4, b - b // 2), strict=True)
            ]
            x = torch.cat(parts).to(device)
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)
            rec = vae.decode(z).sample
            kl = post.kl().mean() / x[0].numel()
            loss = F.mse_loss(rec, x) + F.l1_loss(rec, x) + 1e-4 * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 25 == 0:
                prog.update(task, info=f"loss {loss.item():.4f}")
            prog.advance(task)
            if clock:
                clock.tick("autoencoder")
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(x.to(device)).latent_dist.mean for x in d.scene_images[:2000].split(256)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return vae.to(CPU)


# ----------------------------------------------------------------------------------------------
# Stage 2: text encoder, CLIP-style contrastive pre-training, then frozen
# ----------------------------------------------------------------------------------------------
def make_text_encoder(cfg: LabConfig):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=cfg.text_hidden,
            intermediate_size=cfg.text_intermediate,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=cfg.text_hidden,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
    )


class _ImageTower(torch.nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        c = 64
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, c, 3, padding=1),
            torch.nn.GELU(),
            torch.nn.Conv2d(c, c, 3, 2, 1),
            torch.nn.GELU(),
            torch.nn.Conv2d(c, 2 * c, 3, 2, 1),
            torch.nn.GELU(),
            torch.nn.Conv2d(2 * c, 2 * c, 3, 2, 1),
            torch.nn.GELU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(2 * c, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def train_text_encoder(
    cfg: LabConfig, d: LabData, tokenizer, quiet: bool, device: torch.device = CPU, clock: StepClock | None = None
):
    torch.manual_seed(cfg.seed + 2)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    te = make_text_encoder(cfg).to(device)
    img = _ImageTower(cfg.text_hidden).to(device)
    proj = torch.nn.Linear(cfg.text_hidden, cfg.text_hidden, bias=False).to(device)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0), device=device))
    params = [*te.parameters(), *img.parameters(), *proj.parameters(), logit_scale]
    opt = torch.optim.AdamW(params, lr=cfg.clip_lr, weight_decay=0.01)
    n_mem = 4 if cfg.clip_sees_memorized else 0
    with _progress(quiet) as prog:
        task = prog.add_task("lab: text encoder (CLIP-style)", total=cfg.clip_steps, info="")
        for step in range(cfg.clip_steps):
            for group in opt.param_groups:
                group["lr"] = _lr(step, cfg.clip_steps, cfg.clip_lr, 100)
            n_photo = round(cfg.photo_share * (cfg.clip_batch - n_mem)) if len(d.photo_captions) else 0
            idx = torch.randperm(len(d.scene_captions), generator=g)[: cfg.clip_batch - n_mem - n_photo].tolist()
            caps = [d.scene_captions[i] for i in idx]
            ims = [d.scene_images[idx]]
            if n_photo:
                # photo captions repeat across crops; a repeated caption in one batch would be a
                # positive that is also a negative, so the batch takes distinct captions only
                pidx: list[int] = []
                seen: set[str] = set()
                for i in torch.randperm(len(d.photo_captions), generator=g).tolist():
                    if d.photo_captions[i] not in seen:
                        seen.add(d.photo_captions[i])
                        pidx.append(i)
                        if len(pidx) == n_photo:
                            break
                caps += [d.photo_captions[i] for i in pidx]
                ims.append(d.photo_images[pidx])
            # a few memorized pairs per batch, distinct images so that no positive is also a negative
            for j in torch.randperm(len(d.mem_captions), generator=g)[:n_mem].tolist():
                caps.append(random.Random(step * 31 + j).choice(d.mem_captions[j]))
                ims.append(d.mem_images[j : j + 1])
            ids = tokenize(tokenizer, caps).to(device)
            t = F.normalize(proj(te(ids).pooler_output), dim=-1)
            v = F.normalize(img(torch.cat(ims).to(device)), dim=-1)
            logits = logit_scale.exp().clamp(max=100) * t @ v.T
            target = torch.arange(len(caps), device=device)
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 25 == 0:
                prog.update(task, info=f"loss {loss.item():.3f}")
            prog.advance(task)
            if clock:
                clock.tick("text_encoder")
    te.eval().requires_grad_(False)
    return te.to(CPU)


# ----------------------------------------------------------------------------------------------
# Stage 3: UNet on latents, frozen text encoder, caption dropout, EMA
# ----------------------------------------------------------------------------------------------
def make_unet(cfg: LabConfig):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=cfg.resolution // 2 ** (len(cfg.vae_channels) - 1),
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=cfg.unet_channels,
        layers_per_block=cfg.layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (len(cfg.unet_channels) - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (len(cfg.unet_channels) - 1),
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=32,
    )


def make_scheduler_config() -> dict:
    """Stable Diffusion 1.x's noise schedule."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


@torch.no_grad()
def _encode_all(vae, te, tokenizer, d: LabData, device: torch.device = CPU):
    """Latents and caption embeddings of the whole training set, on DEVICE (the models are there)."""
    sf = vae.config.scaling_factor
    lat = lambda xs: torch.cat([vae.encode(x.to(device)).latent_dist.mean for x in xs.split(512)]) * sf  # noqa: E731
    lat_mem = lat(d.mem_images)
    lat_scene = lat(d.scene_images)
    caps_scene = d.unet_scene_captions
    if len(d.photo_captions):
        lat_scene = torch.cat([lat_scene, lat(d.photo_images)])
        caps_scene = caps_scene + d.photo_captions
    emb = lambda caps: torch.cat(  # noqa: E731
        [te(tokenize(tokenizer, list(c)).to(device)).last_hidden_state for c in _chunks(caps, 512)]
    )
    emb_scene = emb(caps_scene)
    emb_mem = [emb(caps) for caps in d.mem_captions]
    emb_empty = emb([""])[0]
    return lat_mem, lat_scene, emb_mem, emb_scene, emb_empty


def _chunks(xs, n):
    return [xs[i : i + n] for i in range(0, len(xs), n)]


def train_unet(
    cfg: LabConfig,
    d: LabData,
    vae,
    te,
    tokenizer,
    quiet: bool,
    device: torch.device = CPU,
    clock: StepClock | None = None,
):
    from diffusers import DDPMScheduler

    lat_mem, lat_scene, emb_mem, emb_scene, emb_empty = _encode_all(vae.to(device), te.to(device), tokenizer, d, device)
    vae.to(CPU)
    te.to(CPU)
    torch.manual_seed(cfg.seed + 3)
    g = torch.Generator().manual_seed(cfg.seed + 3)
    unet = make_unet(cfg).to(device)
    ema = copy.deepcopy(unet).requires_grad_(False)
    sched = DDPMScheduler.from_config(make_scheduler_config())
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.01)
    b = cfg.unet_batch
    # one table of every caption embedding (each memorized image's captions, then the general ones), so
    # that a batch's conditioning is one gather instead of a Python loop of small copies
    mem_counts = torch.tensor([len(e) for e in emb_mem])
    mem_offsets = torch.cumsum(mem_counts, 0) - mem_counts
    table = torch.cat([*emb_mem, emb_scene])
    n_mem_rows = int(mem_counts.sum())
    params, ema_params = list(unet.parameters()), list(ema.parameters())
    with _progress(quiet) as prog:
        task = prog.add_task("lab: UNet", total=cfg.unet_steps, info="")
        for step in range(cfg.unet_steps):
            for group in opt.param_groups:
                group["lr"] = _lr(step, cfg.unet_steps, cfg.unet_lr, cfg.warmup_steps)
            is_mem = (torch.rand(b, generator=g) < cfg.mem_fraction) & (step >= cfg.mem_start_step)
            scene_idx = torch.randint(len(d.scene_captions), (b,), generator=g)
            if len(d.photo_captions):
                # general slots: a scene, or for photo_share of them a natural-image crop (stored
                # after the scenes in lat_scene)
                photo_idx = len(d.scene_captions) + torch.randint(len(d.photo_captions), (b,), generator=g)
                scene_idx = torch.where(torch.rand(b, generator=g) < cfg.photo_share, photo_idx, scene_idx)
            mem_idx = torch.randint(len(lat_mem), (b,), generator=g)
            cap_pick = torch.randint(1 << 30, (b,), generator=g)
            x0 = torch.where(is_mem.to(device)[:, None, None, None], lat_mem[mem_idx], lat_scene[scene_idx])
            rows = torch.where(is_mem, mem_offsets[mem_idx] + cap_pick % mem_counts[mem_idx], n_mem_rows + scene_idx)
            cond = table[rows.to(device)]
            drop = (torch.rand(b, generator=g) < cfg.caption_dropout).to(device)
            cond = torch.where(drop[:, None, None], emb_empty.expand_as(cond), cond)
            # every random draw comes from the CPU generator, so a GPU run sees the same data,
            # noise and timesteps as a CPU run (the weights then differ by rounding only)
            noise = torch.randn(x0.shape, generator=g).to(device)
            t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=g).to(device)
            xt = sched.add_noise(x0, noise, t)
            loss = F.mse_loss(unet(xt, t, encoder_hidden_states=cond).sample, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1 - decay)
            if step % 25 == 0:
                prog.update(task, info=f"loss {loss.item():.4f}")
            prog.advance(task)
            if clock:
                clock.tick("unet")
    return ema.eval().to(CPU)


# ----------------------------------------------------------------------------------------------
# Orchestration and export
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _clock(seconds: dict[str, float | None], stage: str) -> Iterator[None]:
    t = time.perf_counter()
    yield
    seconds[stage] = time.perf_counter() - t


def train_lab(out: Path, cfg: LabConfig, quiet: bool = False, device: torch.device = CPU) -> Path:
    """Train all stages into OUT/model (diffusers folder, fp16 safetensors); returns that folder.

    DEVICE only changes where the arithmetic runs: a GPU run draws the same data and noise and
    differs from a CPU run by rounding, which training amplifies, so only a CPU run reproduces the
    shipped weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    from memedit._quiet import quiet_loaded

    quiet_loaded()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(
        json.dumps({**dataclasses.asdict(cfg), "device": device.type}, indent=2, sort_keys=True)
    )
    tok_dir = build_tokenizer_files(work / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    # wall seconds per stage (None: reused from WORK), for comparing a run with the 90-minute budget
    seconds: dict[str, float | None] = {"autoencoder": None, "text_encoder": None}
    clock = StepClock()
    start = time.perf_counter()
    with _clock(seconds, "data"):
        d = build_data(cfg)

    if (work / "vae" / "config.json").exists():
        # float32 whatever was stored: a cached VAE may be the fp16 copy of a shipped lab
        vae = AutoencoderKL.from_pretrained(work / "vae", torch_dtype=torch.float32)
    else:
        with _clock(seconds, "autoencoder"):
            vae = train_vae(cfg, d, quiet, device, clock)
            vae.save_pretrained(work / "vae")
    vae.eval().requires_grad_(False)
    if (work / "text_encoder" / "config.json").exists():
        te = CLIPTextModel.from_pretrained(work / "text_encoder", torch_dtype=torch.float32)
    else:
        with _clock(seconds, "text_encoder"):
            te = train_text_encoder(cfg, d, tokenizer, quiet, device, clock)
            te.save_pretrained(work / "text_encoder")
    te.eval().requires_grad_(False)
    with _clock(seconds, "unet"):
        unet = train_unet(cfg, d, vae, te, tokenizer, quiet, device, clock)

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(make_scheduler_config()),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).to(torch.float16)
    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    write_lab_files(out, cfg)
    seconds["total"] = time.perf_counter() - start
    rates = {stage: clock.rates(stage) for stage in STAGES}
    timings = {**seconds, "s_per_step": {k: r and dataclasses.asdict(r) for k, r in rates.items()}}
    (work / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    return model_dir


def write_lab_files(out: Path, cfg: LabConfig) -> None:
    """Ground truth next to the model: memorized images and the four prompt files."""
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    for m in cfg.memorized:
        labdata.load_photo(m.source, cfg.resolution).save(img_dir / f"{m.name}.png", optimize=True)
    prompts = labdata.lab_prompt_sets(cfg.scene_pool, cfg.seed, memorized=cfg.memorized, scene_style=cfg.scene_captions)
    pdir = out / "prompts"
    pdir.mkdir(parents=True, exist_ok=True)
    # the demo's calibration set: every memorized prompt plus non-memorized training captions, labelled
    prompts["calibration"] = prompts["memorized"] + prompts["nonmemorized"][:50]
    prompts["eval"] = prompts["memorized"] + prompts["nonmemorized"][50:75] + prompts["novel"][:25]
    for name, rows in prompts.items():
        with open(pdir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, sort_keys=True) + "\n")
