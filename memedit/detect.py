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

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from memedit.errors import MemeditError
from memedit.model.cond import encode, unconditional, unet_kwargs
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
    latent_keys: Sequence[str] | None = None,
    prompt_emb: torch.Tensor | None = None,
) -> ScoreBatch:
    """Scores for one batch of prompts. `calls` >= K runs more sampler steps (for tracing) than K.

    Each prompt's latents are seeded by the prompt text; `latent_keys` seeds them by other texts
    instead (one per prompt), so that variants of a prompt can be scored on the same noise.
    `prompt_emb`: the prompts' `encode` output when the caller already has it (calibration needs it
    for the value statistics too), so the text encoder runs once per batch."""
    device, dtype = pipe.unet.device, pipe.unet.dtype
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(settings.schedule_steps, device=device)
    n_calls = max(settings.k, calls or 0)
    timesteps = [int(t) for t in sched.timesteps[:n_calls]]
    shape = latent_shape(pipe, settings.resolution)
    n, b = settings.generations, len(prompts)
    if prompt_emb is not None and prompt_emb.shape[0] != b:
        raise ValueError("prompt_emb needs one row set per prompt")
    e_p = (encode(pipe, prompts) if prompt_emb is None else prompt_emb).repeat_interleave(n, dim=0)
    e_0 = (empty_emb if empty_emb is not None else unconditional(pipe)).to(dtype).expand_as(e_p)
    keys = list(latent_keys) if latent_keys is not None else list(prompts)
    if len(keys) != b:
        raise ValueError("latent_keys needs one key per prompt")
    x = initial_latents(keys, settings, shape, dtype, device) * sched.init_noise_sigma
    norms = torch.zeros(b * n, settings.k, dtype=torch.float64)
    for k, t in enumerate(sched.timesteps[:n_calls]):
        if on_call is not None:
            on_call(k, int(t), b)
        xin = sched.scale_model_input(torch.cat([x, x]), t)
        cond = unet_kwargs(pipe.unet, torch.cat([e_0, e_p]), xin, pipe.vae_scale_factor)
        eu, ec = pipe.unet(xin, t, **cond).sample.chunk(2)
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


@dataclass(frozen=True)
class DetectionResult:
    prompts: tuple[str, ...]
    scores: tuple[float, ...]
    flagged: tuple[bool, ...]
    threshold: float
    threshold_source: str  # "holdout@<fpr>" or "given"
    labels: tuple[bool | None, ...]
    auroc: float | None
    tpr_at_1fpr: float | None
    settings: DetectSettings
    timesteps: tuple[int, ...]
    unet_calls_per_prompt: int  # sample-forwards: 2 * n * K

    def to_json(self) -> dict:
        out = {
            "prompts": [
                {"prompt": p, "score": s, "flagged": f}
                for p, s, f in zip(self.prompts, self.scores, self.flagged, strict=True)
            ],
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "settings": dataclasses.asdict(self.settings),
            "timesteps": list(self.timesteps),
            "unet_sample_forwards_per_prompt": self.unet_calls_per_prompt,
        }
        if self.auroc is not None:
            out["auroc"] = self.auroc
            out["tpr_at_1fpr"] = self.tpr_at_1fpr
        return out


def score_all(
    pipe, prompts: Sequence[str], settings: DetectSettings, progress=None, latent_keys: Sequence[str] | None = None
) -> ScoreBatch:
    empty = unconditional(pipe)
    parts = []
    for s in range(0, len(prompts), settings.batch_size):
        keys = latent_keys[s : s + settings.batch_size] if latent_keys is not None else None
        parts.append(score_prompts(pipe, prompts[s : s + settings.batch_size], settings, empty, latent_keys=keys))
        if progress:
            progress(min(len(prompts), s + settings.batch_size), len(prompts))
    return ScoreBatch(
        np.concatenate([p.scores for p in parts]),
        np.concatenate([p.per_step for p in parts]),
        parts[0].timesteps,
        parts[0].latent_numel,
    )


def detect(
    model: str,
    prompts_file,
    holdout_file=None,
    settings: DetectSettings | None = None,
    threshold: float | None = None,
    fpr: float = 0.01,
    labels_file=None,
    device: str = "auto",
    dtype: str = "auto",
    progress=None,
) -> DetectionResult:
    from memedit.model.load import load_pipeline, pick_device, pick_dtype
    from memedit.model.ref import resolve
    from memedit.prompts import holdout_file as pick_holdout
    from memedit.prompts import load_prompts

    settings = settings or DetectSettings()
    ref = resolve(model)
    pset = load_prompts(prompts_file)
    labels = pset.labels
    if labels_file is not None:
        lab = load_prompts(labels_file)
        by_prompt = dict(zip(lab.prompts, lab.labels, strict=True))
        labels = tuple(by_prompt.get(p) for p in pset.prompts)
    hold = None
    if threshold is None:
        hold = load_prompts(
            pick_holdout(
                holdout_file,
                ref,
                "no --holdout prompt file and no --threshold were given",
                "pass --holdout FILE with non-memorized prompts, or --threshold VALUE",
            )
        )
    dev = pick_device(device)
    pipe = load_pipeline(ref, pick_dtype(dtype, dev), dev)
    total = len(pset) + (len(hold) if hold else 0)
    step = (lambda d, t: progress(d, total)) if progress else None
    res = score_all(pipe, pset.prompts, settings, step)
    source = "given"
    if hold is not None:
        offset = len(pset)
        hstep = (lambda d, t: progress(offset + d, total)) if progress else None
        threshold = threshold_at_fpr(score_all(pipe, hold.prompts, settings, hstep).scores, fpr)
        source = f"holdout@{fpr:g}"
    auroc = tpr = None
    if all(x is not None for x in labels) and len(set(labels)) == 2:
        auroc, tpr = auroc_tpr(labels, res.scores)
    return DetectionResult(
        tuple(pset.prompts),
        tuple(float(s) for s in res.scores),
        tuple(bool(s > threshold) for s in res.scores),
        float(threshold),
        source,
        tuple(labels),
        auroc,
        tpr,
        settings,
        res.timesteps,
        2 * settings.generations * settings.k,
    )


@dataclass(frozen=True)
class Explanation:
    prompt: str
    tokens: tuple[str, ...]  # prompt tokens (BOS, EOS and padding dropped)
    # gradient: ||dL/de_p[i]||_2 per prompt token, mean over the steps used; occlusion: score drop
    # when the token is deleted from the prompt (same latents), which can be negative
    significance: tuple[float, ...]
    eos_padding: float | None  # gradient only: the same for the EOS + padding positions together
    score: float
    method: str = "gradient"

    def to_json(self) -> dict:
        return {
            "prompt": self.prompt,
            "method": self.method,
            "score": self.score,
            "eos_padding": self.eos_padding,
            "tokens": [
                {"position": i + 1, "token": t, "significance": s}
                for i, (t, s) in enumerate(zip(self.tokens, self.significance, strict=True))
            ],
        }


def explain_prompt(pipe, prompt: str, settings: DetectSettings) -> Explanation:
    """Token significance (Wen et al. sec. 3), without the official code's two quirks: the conditional
    copy sits in the conditional half, and the latent follows the normal CFG path toward the prompt."""
    device = pipe.unet.device
    tok = pipe.tokenizer(
        prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    ids = tok.input_ids[0].tolist()
    eos = pipe.tokenizer.eos_token_id
    n_tokens = ids.index(eos) - 1 if eos in ids[1:] else len(ids) - 1
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(settings.schedule_steps, device=device)
    n = settings.generations
    with torch.no_grad():
        e_p0 = encode(pipe, [prompt]).float()
        e_0 = unconditional(pipe).float().expand(n, -1, -1)
    x = initial_latents([prompt], settings, latent_shape(pipe, settings.resolution), torch.float32, device)
    x = x * sched.init_noise_sigma
    unet_dtype = pipe.unet.dtype
    pipe.unet.float()  # gradients in fp32: fp16 backward underflows
    grads = torch.zeros(e_p0.shape[1], dtype=torch.float64)
    total_score = 0.0
    try:
        for k, t in enumerate(sched.timesteps[: settings.k]):
            e_p = e_p0.clone().requires_grad_(True)
            xin = sched.scale_model_input(torch.cat([x, x]), t)
            cond = unet_kwargs(pipe.unet, torch.cat([e_0, e_p.expand(n, -1, -1)]), xin, pipe.vae_scale_factor)
            eu, ec = pipe.unet(xin, t, **cond).sample.chunk(2)
            d = (ec - eu) * _eps_scale(sched, int(t))
            loss = d.flatten().norm()  # one norm over the whole batch, as the official code
            loss.backward()
            grads += e_p.grad[0].norm(dim=-1).double().cpu()
            total_score += float(d.detach().flatten(1).norm(dim=1).mean())
            if k < settings.k - 1:
                with torch.no_grad():
                    x = sched.step(eu + settings.guidance * (ec - eu), t, x).prev_sample.detach()
    finally:
        pipe.unet.to(unet_dtype)
    grads /= settings.k
    words = pipe.tokenizer.convert_ids_to_tokens(ids[1 : 1 + n_tokens])
    words = [w.replace("</w>", "") for w in words]
    return Explanation(
        prompt,
        tuple(words),
        tuple(float(g) for g in grads[1 : 1 + n_tokens]),
        float(grads[1 + n_tokens :].sum()),
        total_score / settings.k,
    )


EXPLAIN_METHODS = ("gradient", "occlusion")


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids without BOS and EOS (at most model_max_length - 2)."""
    return tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids[1:-1]


def delete_token(tokenizer, prompt: str, position: int) -> str:
    """The prompt with its position-th token (1-based, as explanations number them) removed."""
    ids = _prompt_ids(tokenizer, prompt)
    return tokenizer.decode(ids[: position - 1] + ids[position:])


def deletion_variants(tokenizer, prompt: str) -> list[str]:
    """The prompt itself, then the prompt with each of its tokens deleted in turn (position order)."""
    ids = _prompt_ids(tokenizer, prompt)
    return [prompt] + [tokenizer.decode(ids[:i] + ids[i + 1 :]) for i in range(len(ids))]


def occlusion_prompt(pipe, prompt: str, settings: DetectSettings) -> Explanation:
    """Leave-one-token-out: significance of a token = the score's drop when the token is deleted from
    the prompt, every variant scored on the prompt's own latents (one batched detection pass).

    Wen et al.'s gradient asks how the score reacts to a small change of one position's text-encoder
    output; deleting a word also changes every later position (causal attention), which the gradient
    does not see. Occlusion measures the deletion itself, at n_tokens + 1 times one detection call."""
    variants = deletion_variants(pipe.tokenizer, prompt)
    scores = score_all(pipe, variants, settings, latent_keys=[prompt] * len(variants)).scores
    words = [w.replace("</w>", "") for w in pipe.tokenizer.convert_ids_to_tokens(_prompt_ids(pipe.tokenizer, prompt))]
    return Explanation(
        prompt,
        tuple(words),
        tuple(float(scores[0] - x) for x in scores[1:]),
        None,
        float(scores[0]),
        "occlusion",
    )


def explain(pipe, prompt: str, settings: DetectSettings, method: str) -> Explanation:
    if method not in EXPLAIN_METHODS:
        raise MemeditError(f"unknown explanation method {method!r}", f"use one of {', '.join(EXPLAIN_METHODS)}")
    return explain_prompt(pipe, prompt, settings) if method == "gradient" else occlusion_prompt(pipe, prompt, settings)
