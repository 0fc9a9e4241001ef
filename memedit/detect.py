"""Memorization detection by text-conditional noise magnitude (Wen et al., ICLR 2024).

score(p) = mean over n generations of mean over the first K sampler steps of
||eps(x_t, t, e_p) - eps(x_t, t, e_0)||_2, one L2 norm over the whole latent of one generation.

This is the one implementation: `memedit calibrate` runs it and traces FFN neurons in the same UNet
calls (through `on_call`), and `memedit detect` reports it. Differences from the official code, by
design (see methods/wen.md): one CPU generator per prompt seeded from (seed, prompt text), latents
drawn in fp32 then cast, the difference cast to fp32 before the norm, v-prediction converted to
epsilon, and both CFG branches always computed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from memedit.prompts import prompt_seed

PAPER_FIGURES = (
    # source, model, K, n, AUROC, TPR@1%FPR  (methods/wen.md)
    ("Wen et al. paper, headline", "SD1.4", None, None, 0.960, 0.760),
    ("official repo notebook", "SD1.4 fp16", 50, 4, 0.994, 0.982),
    ("Jeon et al. re-run", "SD1.4", 1, 1, 0.976, 0.896),
    ("Jeon et al. re-run", "SD1.4", 1, 4, 0.992, 0.944),
)


@dataclass(frozen=True)
class DetectSettings:
    k: int = 1  # sampler steps averaged (the first K of the full schedule)
    generations: int = 4  # n latents per prompt
    schedule_steps: int = 50  # length of the schedule the first K steps come from
    guidance: float = 7.5  # moves the path only when K > 1
    seed: int = 0
    resolution: int | None = None  # pixels; default: the UNet's sample size x VAE factor
    batch_size: int = 8  # prompts per UNet call (each contributes 2 x generations rows)


@dataclass(frozen=True)
class ScoreBatch:
    scores: np.ndarray  # (prompts,) the detection score
    per_step: np.ndarray  # (prompts, generations, K) norms
    timesteps: tuple[int, ...]
    latent_numel: int


# on_call(call_index, timestep, batch_prompts) is invoked right before each UNet call
OnCall = Callable[[int, int, int], None]


def latent_shape(pipe, resolution: int | None) -> tuple[int, int, int]:
    factor = getattr(pipe, "vae_scale_factor", 8)
    size = (resolution // factor) if resolution else pipe.unet.config.sample_size
    return (pipe.unet.config.in_channels, size, size)


@torch.no_grad()
def encode(pipe, prompts: Sequence[str]) -> torch.Tensor:
    """Text-encoder output (last hidden state), as the pipeline conditions the UNet."""
    ids = pipe.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(pipe.text_encoder.device)
    return pipe.text_encoder(ids)[0].to(pipe.unet.dtype)


def initial_latents(
    prompts: Sequence[str],
    settings: DetectSettings,
    shape: tuple[int, int, int],
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    xs = [
        torch.randn(
            (settings.generations, *shape),
            generator=torch.Generator("cpu").manual_seed(prompt_seed(settings.seed, p)),
            dtype=torch.float32,
        )
        for p in prompts
    ]
    return torch.cat(xs).to(device=device, dtype=dtype)


def _eps_scale(scheduler, t: int) -> float:
    """Factor turning a v-prediction difference into an epsilon difference (the x_t term cancels)."""
    if scheduler.config.get("prediction_type", "epsilon") == "v_prediction":
        return float(scheduler.alphas_cumprod[int(t)].sqrt())
    return 1.0


@torch.no_grad()
def score_prompts(
    pipe,
    prompts: Sequence[str],
    settings: DetectSettings,
    empty_emb: torch.Tensor | None = None,
    on_call: OnCall | None = None,
    calls: int | None = None,
) -> ScoreBatch:
    """Scores for one batch of prompts. `calls` >= K runs more sampler steps (for tracing) than K."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(settings.schedule_steps, device=device)
    n_calls = max(settings.k, calls or 0)
    timesteps = [int(t) for t in sched.timesteps[:n_calls]]
    shape = latent_shape(pipe, settings.resolution)
    n, b = settings.generations, len(prompts)
    e_p = encode(pipe, prompts).repeat_interleave(n, dim=0)
    e_0 = (empty_emb if empty_emb is not None else encode(pipe, [""])).to(dtype).expand_as(e_p)
    x = initial_latents(prompts, settings, shape, dtype, device) * sched.init_noise_sigma
    norms = torch.zeros(b * n, settings.k, dtype=torch.float64)
    for k, t in enumerate(sched.timesteps[:n_calls]):
        if on_call is not None:
            on_call(k, int(t), b)
        xin = sched.scale_model_input(torch.cat([x, x]), t)
        eu, ec = pipe.unet(xin, t, encoder_hidden_states=torch.cat([e_0, e_p])).sample.chunk(2)
        if k < settings.k:
            d = (ec - eu).float() * _eps_scale(sched, int(t))
            norms[:, k] = d.flatten(1).norm(dim=1).double().cpu()
        if k < n_calls - 1:
            x = sched.step(eu + settings.guidance * (ec - eu), t, x).prev_sample
    per_step = norms.reshape(b, n, settings.k).numpy()
    return ScoreBatch(per_step.mean(axis=(1, 2)), per_step, tuple(timesteps[: settings.k]), int(np.prod(shape)))


def threshold_at_fpr(negatives: np.ndarray, fpr: float) -> float:
    """Smallest threshold such that at most `fpr` of the negatives score strictly above it."""
    s = np.sort(np.asarray(negatives, dtype=np.float64))[::-1]
    allowed = int(np.floor(fpr * len(s)))
    return float(s[min(allowed, len(s) - 1)])


def auroc_tpr(labels: Sequence[bool], scores: Sequence[float], fpr_target: float = 0.01) -> tuple[float, float]:
    """AUROC, and TPR at the last ROC point whose FPR is strictly below the target (the official rule)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.asarray(labels, dtype=int)
    fpr, tpr, _ = roc_curve(y, scores)
    below = tpr[fpr < fpr_target]
    return float(roc_auc_score(y, scores)), float(below.max() if len(below) else 0.0)
