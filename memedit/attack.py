"""`memedit attack`: does an edited model still hold its memorized images? (Kowalczuk et al. 2025)

Pruning removes the path from a prompt to its memorized image, not necessarily the image. The attack
searches for a text-encoder output that brings the image back: starting from the prompt's own
embedding (or from noise, or from another prompt's), it optimizes the embedding with Adam against
the ordinary denoising loss toward the reference image (fresh noise and timestep every step), the
model frozen; then it generates from the embedding with the evaluation seeds and compares with the
reference by SSIM. An embedding *reproduces* the image when the majority of seeds reach the
reproduction threshold (the same rule as the efficacy benchmark). A target is *recovered* when the
found embedding or the prompt's own reproduces it: the attacker holds the prompt too, so an attack
that wanders off from a prompt that still works has not shown the image gone (robust accuracy is at
most clean accuracy, by the same argument). Both rates are reported. References the model never
memorized are the control: if they "recover" as well, the attack is inverting images, not finding
memorization.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from memedit.errors import MemeditError
from memedit.generate import COPY_SSIM, GenSettings, generate, reproduction
from memedit.model.cond import encode, unet_kwargs

INITS = ("prompt", "random", "other")


@dataclass(frozen=True)
class AttackSettings:
    steps: int = 50
    lr: float = 0.1
    batch: int = 8
    init: str = "prompt"  # prompt | random | other (the next target's prompt)
    seed: int = 0


@dataclass(frozen=True)
class Target:
    """One reference image to pull out of the model, with the prompt it was trained on."""

    prompt: str
    image: str  # file name in the references folder
    memorized: bool  # False: a control (an image the model did not memorize)
    kind: str = "none"


@dataclass(frozen=True)
class AttackOutcome:
    prompt: str
    image: str
    memorized: bool
    kind: str
    prompt_ssim: float  # mean SSIM of generations from the prompt itself
    prompt_reproduces: bool
    attack_ssim: float  # mean SSIM of generations from the found embedding
    attack_reproduces: bool  # the found embedding alone
    recovered: bool  # the found embedding or the prompt's own reproduces the image
    loss_start: float
    loss_end: float
    seeds_ssim: tuple[float, ...] = field(default_factory=tuple)


def load_targets(prompts: Path, references: Path) -> list[Target]:
    """Prompts of a file that name a reference image in `references` (the rest are skipped: the attack
    needs a target image). A prompt without a `memorized` field counts as memorized."""
    from memedit.evaluate import read_eval_prompts

    rows = read_eval_prompts(prompts, references)
    out = [Target(r.prompt, r.reference, r.memorized is not False, r.kind or "none") for r in rows if r.reference]
    if not out:
        raise MemeditError(
            f"no prompt in {prompts} names a reference image",
            "use a .jsonl with an 'image' field per prompt (e.g. memedit/lab/prompts/memorized.jsonl)",
        )
    return out


def model_resolution(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def reference_array(path: Path, size: int) -> np.ndarray:
    """The reference as uint8 RGB at the model's resolution (center crop, antialiased resize)."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    if img.size != (size, size):
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(img)


@torch.no_grad()
def reference_latent(pipe, image: np.ndarray) -> torch.Tensor:
    vae = pipe.vae
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].to(vae.device, vae.dtype) / 127.5 - 1
    return vae.encode(x).latent_dist.mean * vae.config.scaling_factor


def find_embedding(
    pipe, start: torch.Tensor, image: np.ndarray, settings: AttackSettings
) -> tuple[torch.Tensor, float, float]:
    """Optimize a (tokens, width) text embedding toward `image`; returns (embedding, first loss, last
    loss), the losses averaged over the first and last 5 steps."""
    unet, sched = pipe.unet, pipe.scheduler
    unet.requires_grad_(False)
    lat = reference_latent(pipe, image).float()
    g = torch.Generator("cpu").manual_seed(settings.seed)
    emb = start.detach().float().clone()[None].requires_grad_(True)
    opt = torch.optim.Adam([emb], lr=settings.lr)
    alphas = sched.alphas_cumprod.float()
    losses = []
    for _ in range(settings.steps):
        noise = torch.randn((settings.batch, *lat.shape[1:]), generator=g)
        t = torch.randint(0, len(alphas), (settings.batch,), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * lat + (1 - a).sqrt() * noise
        dev, dt = unet.device, unet.dtype
        xt = xt.to(dev, dt)
        cond = unet_kwargs(unet, emb.to(dev, dt).expand(settings.batch, -1, -1), xt, pipe.vae_scale_factor)
        pred = unet(xt, t.to(dev), **cond).sample
        target = denoising_target(sched, lat, noise, a)
        loss = F.mse_loss(pred.float(), target.to(pred.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    head, tail = losses[:5] or [float("nan")], losses[-5:] or [float("nan")]
    return emb.detach()[0], float(np.mean(head)), float(np.mean(tail))


def denoising_target(sched, x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict at x_t = sqrt(a) x0 + sqrt(1 - a) noise: the noise
    (epsilon prediction) or the velocity (v prediction)."""
    if sched.config.get("prediction_type", "epsilon") == "epsilon":
        return noise
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def start_embeddings(
    pipe, targets: list[Target], settings: AttackSettings, own: torch.Tensor | None = None
) -> torch.Tensor:
    """OWN: the targets' prompt embeddings, if already encoded."""
    own = encode(pipe, [t.prompt for t in targets]).float() if own is None else own
    if settings.init == "prompt":
        return own
    if settings.init == "other":
        return own.roll(1, dims=0) if len(targets) > 1 else encode(pipe, [""]).float().expand_as(own)
    g = torch.Generator("cpu").manual_seed(settings.seed + 1)
    return torch.randn(own.shape, generator=g) * own.std()


def attack(
    pipe,
    targets: list[Target],
    references: Path,
    settings: AttackSettings | None = None,
    gen: GenSettings | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Attack every target; returns {"targets": [...], "summary": {...}, "settings": {...},
    "embeddings": the found ones, "recovering": per target the embedding that reproduced its image
    (the found one, else the prompt's own; the found one where neither did)}."""
    settings = settings or AttackSettings()
    gen = gen or GenSettings()
    if settings.init not in INITS:
        raise MemeditError(f"unknown --init {settings.init!r}", f"choose one of {', '.join(INITS)}")
    size = model_resolution(pipe)
    refs = [reference_array(references / t.image, size) for t in targets]
    plain = generate(pipe, [t.prompt for t in targets], gen)
    own = encode(pipe, [t.prompt for t in targets]).float()
    starts = start_embeddings(pipe, targets, settings, own)
    found, outcomes = [], []
    for i in range(len(targets)):
        emb, l0, l1 = find_embedding(pipe, starts[i], refs[i], settings)
        found.append(emb)
        if progress:
            progress(i + 1, len(targets))
        outcomes.append((l0, l1))
    attacked = generate(pipe, torch.stack(found), gen)
    rows, recovering = [], []
    for i, t in enumerate(targets):
        rep0, s0 = reproduction(plain[i], refs[i])
        rep1, s1 = reproduction(attacked[i], refs[i])
        recovering.append(own[i].to(found[i]) if rep0 and not rep1 else found[i])
        rows.append(
            AttackOutcome(
                t.prompt,
                t.image,
                t.memorized,
                t.kind,
                float(np.mean(s0)),
                rep0,
                float(np.mean(s1)),
                rep1,
                rep0 or rep1,
                outcomes[i][0],
                outcomes[i][1],
                tuple(float(x) for x in s1),
            )
        )
    return {
        "targets": [asdict(r) for r in rows],
        "summary": summarize(rows),
        "settings": {**asdict(settings), "seeds": list(gen.seeds), "steps_sampling": gen.steps},
        "embeddings": torch.stack(found),
        "recovering": torch.stack(recovering),
    }


TENSORS = ("embeddings", "recovering")  # the keys of an `attack` result that hold tensors


def report(res: dict) -> dict:
    """An `attack` result without its tensors: what JSON and the results files hold."""
    return {k: v for k, v in res.items() if k not in TENSORS}


def _rate(xs: list[bool]) -> float | None:
    return float(np.mean(xs)) if xs else None


def summarize(rows: list[AttackOutcome]) -> dict:
    mem = [r for r in rows if r.memorized]
    ctl = [r for r in rows if not r.memorized]
    return {
        "memorized_targets": len(mem),
        "control_targets": len(ctl),
        "prompt_reproduction_rate": _rate([r.prompt_reproduces for r in mem]),
        "recovery_rate": _rate([r.recovered for r in mem]),
        "attack_recovery_rate": _rate([r.attack_reproduces for r in mem]),
        "recovery_rate_verbatim": _rate([r.recovered for r in mem if r.kind == "verbatim"]),
        "recovery_rate_template": _rate([r.recovered for r in mem if r.kind == "template"]),
        "control_recovery_rate": _rate([r.recovered for r in ctl]),
        "mean_attack_ssim": float(np.mean([r.attack_ssim for r in mem])) if mem else None,
        "control_mean_attack_ssim": float(np.mean([r.attack_ssim for r in ctl])) if ctl else None,
        "threshold_ssim": COPY_SSIM,
    }


def attack_model(
    model: str,
    prompts: str | Path,
    references: str | Path,
    settings: AttackSettings | None = None,
    gen: GenSettings | None = None,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """`memedit.attack_model(model, prompts, references)`: the CLI verb as a function; the result
    also holds the found embeddings (`"embeddings"`, one (tokens, width) tensor per target) and the
    recovering ones (`"recovering"`, see `attack`)."""
    from memedit.model.load import load_pipeline, pick_device, pick_dtype
    from memedit.model.ref import require_dir, resolve

    references = require_dir(Path(references), "references folder")
    targets = load_targets(Path(prompts), references)
    dev = pick_device(device)
    pipe = load_pipeline(resolve(model), pick_dtype(None, dev), dev)
    return attack(pipe, targets, references, settings, gen, progress)
