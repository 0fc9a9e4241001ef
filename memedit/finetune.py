"""Adversarial fine-tuning (`memedit harden --finetune`): unlearn the memorized images in the UNet.

Pruning, and any edit of the text encoder, removes one path from a prompt to its memorized image; the
embedding attack (`memedit.attack`) finds another, because the UNet still holds the image. This stage
changes the UNet itself. Each round attacks the current model, then fine-tunes the chosen UNet weights
for `steps` Adam steps on two terms:

- forget: at noised latents of the memorized images themselves, under any conditioning that leads
  there (each prompt's embedding through the edited and the original text encoder, every
  adversarial embedding found so far, each jittered by Gaussian noise), the UNet is trained to
  denoise toward a surrogate: the original model's generation of a hold-out prompt (one per
  memorized image, fixed seed). The loss is the x0 error weighted by alpha_t (the noise error
  weighted by 1 - alpha_t), bounded at both ends of the schedule. Training where the attack's own
  loss is measured (the reference's noised latents), not only on the embeddings found so far, is what
  makes the forgetting hold against embeddings the rounds never saw.
- keep: on hold-out prompts and the empty prompt (the unconditional branch of guidance), the tuned
  model's noise prediction under the edited text encoder is distilled to the original model's (its
  UNet and its text encoder), at noised latents of the original model's own generations, half of
  them with the prompt that generated them and a quarter with the empty prompt (guidance uses it
  at every step of every generation). With `keep_mix`, some of the remaining samples are conditioned
  on a convex mix of two keep conditionings (teacher and student alike), so that the model is also kept
  between the prompts the hold-out file names. Only prompts are needed: no training image besides
  the memorized references.

Rounds stop when the attack's recovery rate is at or below the goal. Positions the recipe already
edits (pruned or scaled) and exact zeros are frozen (their gradient is masked, and Adam leaves a
zero-gradient entry where it is), so the delta is zero there and the order of the edits does not
matter. The output is the input recipe plus one `add` edit per tuned weight (method
`adversarial-finetune`), with the float32 deltas in a digest-pinned sidecar (next to any deltas the
input recipe already had, e.g. the text-encoder edit's): applying stays data-free and exact.
`calibration.finetune` records the settings, every round and the cost in UNet passes (wall times
are printed, not recorded, so that the recipe is a pure function of inputs and seed).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from memedit.attack import (
    AttackSettings,
    attack,
    denoising_target,
    model_resolution,
    reference_array,
    reference_latent,
)
from memedit.errors import MemeditError
from memedit.generate import GenSettings
from memedit.model.cond import unet_kwargs
from memedit.recipe import Edit, Recipe, dump_atomic, load

METHOD = "adversarial-finetune"
# Which UNet weights are tuned. The text reaches the UNet only through the cross-attention keys and
# values, so `cross-kv` is the smallest set that can change what an embedding retrieves; the paper
# tunes every parameter (`all`).
PARAM_SETS: dict[str, Callable[[str, torch.nn.Module], bool]] = {
    "cross-kv": lambda n, m: isinstance(m, torch.nn.Linear) and n.endswith((".attn2.to_k", ".attn2.to_v")),
    "cross": lambda n, m: isinstance(m, torch.nn.Linear) and ".attn2." in n,
    "transformer": lambda n, m: isinstance(m, torch.nn.Linear) and ".transformer_blocks." in n,
    "all": lambda n, m: isinstance(getattr(m, "weight", None), torch.nn.Parameter),
}


@dataclass(frozen=True)
class FinetuneSettings:
    rounds: int = 2  # attack -> fine-tune rounds (the attack after the last one measures the result)
    # defaults: the trade-off between forgetting and preservation chosen by hand on the lab; the
    # benchmarked figures are those of benchmarks/robustness.py (README, Robustness)
    steps: int = 300  # Adam steps per round
    lr: float = 3e-5
    batch: int = 8  # forget samples per step
    # keep samples per step: the keep term is their mean, so more of them steady its gradient at the same
    # weight; on the lab 32 (16 before) kept both preservation figures higher at the same recovery
    keep_batch: int = 32
    params: str = "all"  # a key of PARAM_SETS
    keep: float = 1000.0  # weight of the keep (distillation) term
    keep_prompts: int = 200  # hold-out prompts for the keep term and the surrogates
    # keep samples on the unconditional branch: guidance runs it at every step of every generation and
    # scales its error by the guidance scale, yet it is only one of keep_prompts + 1 conditionings
    keep_uncond: float = 0.25
    # share of the keep batch's remaining samples (neither matched pairs nor the unconditional branch)
    # whose conditioning is a convex mix of two keep conditionings (hold-out prompts or the empty
    # prompt; the same mix for the teacher): the model is kept where the hold-out prompts are not,
    # toward prompts no list names. 0: the previous draw, the same random stream
    keep_mix: float = 0.0
    jitter: float = 0.5  # forget embeddings get Gaussian noise of up to this share of the embeddings' std
    # forget samples of an image the round's attack recovered are drawn 1 + focus times as often: once
    # most images are gone, a uniform draw spends most of the forget batch on them
    focus: float = 4.0
    goal: float = 0.05  # stop when the attack's recovery rate is at or below this
    seed: int = 0


@dataclass(frozen=True)
class ForgetSet:
    """What the forget term trains away: embeddings, each paired with the memorized image it leads to."""

    emb: torch.Tensor  # (n, rows, width)
    image: torch.Tensor  # (n,) index into `images`
    images: torch.Tensor  # (m, C, H, W) latents of the memorized references
    surrogates: torch.Tensor  # (m, C, H, W) what image i should denoise to instead
    weight: torch.Tensor | None = None  # (n,) sampling weight of each embedding; None: uniform


def forget_indices(forget: ForgetSet, b: int, g: torch.Generator) -> torch.Tensor:
    """B embeddings of the forget set, drawn with replacement by its weights."""
    if forget.weight is None:
        return torch.randint(0, len(forget.emb), (b,), generator=g)
    return torch.multinomial(forget.weight, b, replacement=True, generator=g)


def forget_weights(image: torch.Tensor, recovered: list[int], focus: float) -> torch.Tensor | None:
    """1 + FOCUS for each embedding whose image (index into the targets) is in RECOVERED, else 1."""
    if focus == 0:
        return None
    hot = torch.isin(image, torch.tensor(recovered, dtype=image.dtype))
    return 1.0 + focus * hot.double()


@dataclass(frozen=True)
class KeepSet:
    """What the keep term preserves: the tuned model under `emb` must predict what the original model
    predicts under `teacher_emb` (the same prompts through the original text encoder) at noised
    `x0` (the original model's generations of prompt i, for i < len(x0))."""

    emb: torch.Tensor  # (k, rows, width): hold-out prompts, then the unconditional branch
    teacher_emb: torch.Tensor
    x0: torch.Tensor


def keep_conditioning(
    keep: KeepSet, ki: torch.Tensor, mixed: slice, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) conditioning of the keep samples KI; rows MIXED get (1 - l) e_i + l e_j
    instead, with j another row of the keep set (a hold-out prompt or the unconditional branch) and
    l ~ U(0, 1), the same for student and teacher."""
    student, teacher = keep.emb[ki], keep.teacher_emb[ki]
    n = len(range(*mixed.indices(len(ki))))
    if n == 0:
        return student, teacher
    r = torch.randint(0, len(keep.emb) - 1, (n,), generator=g)
    kj = r + (r >= ki[mixed]).long()  # uniform over the rows other than i: a mix of e_i with itself is e_i
    lam = torch.rand((n, 1, 1), generator=g)
    student[mixed] = torch.lerp(student[mixed], keep.emb[kj], lam)
    teacher[mixed] = torch.lerp(teacher[mixed], keep.teacher_emb[kj], lam)
    return student, teacher


@dataclass(frozen=True)
class FinetuneRound:
    round: int
    recovery_rate: float
    recovered: tuple[str, ...]
    forget_embeddings: int  # embeddings the following fine-tuning trained away (0 in the last round)
    tune_seconds: float
    unet_passes: int  # UNet forward+backward sample passes of the fine-tuning (teacher passes not counted)


@dataclass(frozen=True)
class FinetuneResult:
    recipe_path: Path
    recipe: Recipe
    rounds: tuple[FinetuneRound, ...]
    tuned_tensors: int
    delta_norm: float
    seconds: float  # wall time of the whole run (attacks included)


def tuned_modules(unet: torch.nn.Module, params: str) -> list[str]:
    if params not in PARAM_SETS:
        raise MemeditError(f"unknown --tune-params {params!r}", f"choose one of {', '.join(PARAM_SETS)}")
    pick = PARAM_SETS[params]
    return [n for n, m in unet.named_modules() if n and pick(n, m)]


def frozen_positions(recipe: Recipe, masks: dict | None, name: str, weight: torch.Tensor) -> torch.Tensor:
    """Positions of `name`.weight that fine-tuning must leave alone: what the recipe already edits, and
    exact zeros."""
    from memedit.fill import edit_positions, recipe_ops

    edits = [e for e in recipe.edits if e.component == "unet" and e.module == name and e.op != "add"]
    m = {k: v.numpy() for k, v in (masks or {}).items()}
    _, touched = edit_positions(tuple(weight.shape), recipe_ops(edits, m))
    return torch.from_numpy(touched) | (weight == 0)


@torch.no_grad()
def _latents(pipe, prompts: list[str], seed: int, steps: int, batch: int) -> torch.Tensor:
    """x0 latents the pipeline generates for `prompts` (one fixed seed each), without decoding."""
    out = []
    for s in range(0, len(prompts), batch):
        chunk = prompts[s : s + batch]
        gens = [torch.Generator("cpu").manual_seed(seed + s + i) for i in range(len(chunk))]
        out.append(pipe(prompt=chunk, generator=gens, num_inference_steps=steps, output_type="latent").images)
    return torch.cat(out).float().cpu()


def tune(
    pipe,
    teacher: torch.nn.Module,
    names: list[str],
    frozen: dict[str, torch.Tensor],
    forget: ForgetSet,
    keep: KeepSet,
    settings: FinetuneSettings,
    round_seed: int,
) -> int:
    """`settings.steps` Adam steps on pipe.unet's `names` weights; returns UNet sample passes."""
    unet, sched = pipe.unet, pipe.scheduler
    modules = dict(unet.named_modules())
    unet.requires_grad_(False)
    params = [modules[n].weight for n in names]
    for w in params:
        w.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=settings.lr)
    g = torch.Generator("cpu").manual_seed(settings.seed * 1000 + round_seed)
    alphas = sched.alphas_cumprod.float()
    dev, dt = unet.device, unet.dtype
    b, kb = settings.batch, settings.keep_batch
    scale = settings.jitter * float(keep.emb.std())
    n_uncond = round(kb * settings.keep_uncond)
    free = kb // 2 + n_uncond  # first keep sample that is neither a matched pair nor unconditional
    mixed = slice(free, free + round((kb - free) * settings.keep_mix))
    for _ in range(settings.steps):
        fi = forget_indices(forget, b, g)
        img, femb = forget.image[fi], forget.emb[fi]
        jitter = torch.randn(femb.shape, generator=g) * torch.rand((b, 1, 1), generator=g) * scale
        xi = torch.randint(0, len(keep.x0), (kb,), generator=g)
        ki = torch.randint(0, len(keep.emb), (kb,), generator=g)
        ki[: kb // 2] = xi[: kb // 2]  # half on the original model's own trajectories
        ki[kb // 2 : kb // 2 + n_uncond] = len(keep.emb) - 1
        x0 = torch.cat([forget.images[img], keep.x0[xi]])
        kemb, ktemb = keep_conditioning(keep, ki, mixed, g)
        emb = torch.cat([femb + jitter, kemb])
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, len(alphas), (b + kb,), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        # the noise that would make x_t a noised surrogate: predicting it denoises toward the surrogate
        s, af = forget.surrogates[img], a[:b]
        target = denoising_target(sched, s, (xt[:b] - af.sqrt() * s) / (1 - af).sqrt(), af)
        xt, t, emb = xt.to(dev, dt), t.to(dev), emb.to(dev, dt)
        pred = unet(xt, t, **unet_kwargs(unet, emb, xt, pipe.vae_scale_factor)).sample.float()
        with torch.no_grad():
            temb = ktemb.to(dev, dt)
            want = teacher(xt[b:], t[b:], **unet_kwargs(unet, temb, xt[b:], pipe.vae_scale_factor)).sample
        forget_loss = ((1 - af).to(pred.device) * (pred[:b] - target.to(pred.device)) ** 2).mean()
        loss = forget_loss + settings.keep * F.mse_loss(pred[b:], want.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for n, w in zip(names, params, strict=True):
            w.grad[frozen[n]] = 0
        opt.step()
    unet.requires_grad_(False)
    return settings.steps * (b + kb)


def harden_finetune(
    recipe_path: str | Path,
    prompts: str | Path,
    references: str | Path,
    out: str | Path,
    holdout: str | Path | None = None,
    settings: FinetuneSettings = FinetuneSettings(),
    attack_settings: AttackSettings | None = None,
    gen: GenSettings | None = None,
    device: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Adversarially fine-tune the model `recipe_path` edits; writes recipe + deltas to `out`."""
    from memedit.harden import attack_recipe, harden_inputs
    from memedit.model.cond import encode, unconditional
    from memedit.model.load import load_pipeline, pick_device
    from memedit.model.ref import resolve
    from memedit.prompts import holdout_file, load_prompts

    if settings.rounds < 1:
        raise MemeditError("--rounds must be at least 1", "e.g. --rounds 3")
    if min(settings.steps, settings.batch, settings.keep_batch, settings.keep_prompts) < 1:
        raise MemeditError("--tune-steps, the batches and --keep-prompts must be positive", "e.g. --tune-steps 300")
    if not settings.lr > 0:
        raise MemeditError("--tune-lr must be positive", "e.g. --tune-lr 3e-5")
    if not settings.focus >= 0:
        raise MemeditError("focus must be 0 or more", "0 draws every forget embedding alike")
    if not 0 <= settings.keep_uncond <= 0.5:
        raise MemeditError("keep_uncond must be between 0 and 0.5", "half the keep batch is on matched pairs")
    if not 0 <= settings.keep_mix <= 1:
        raise MemeditError("keep_mix must be between 0 and 1", "it is a share of the keep batch's free samples")
    recipe_path, out = Path(recipe_path), Path(out)
    recipe, masks, deltas, targets, references = harden_inputs(recipe_path, out, prompts, references)
    if any(e.method == METHOD for e in recipe.edits):
        raise MemeditError(
            f"{recipe_path} already has a fine-tuning stage", "fine-tune the recipe it was made from instead"
        )
    base_ref = resolve(recipe.model.get("ref", ""))
    hold = load_prompts(holdout_file(holdout, base_ref))
    dev = pick_device(device)
    gen = gen or GenSettings()
    say = progress or (lambda _msg: None)
    rounds: list[FinetuneRound] = []
    t_start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    keep_prompts = list(hold.prompts[: settings.keep_prompts])
    # float32 whatever the checkpoint: fine-tuning in half precision loses small updates
    original = load_pipeline(base_ref, torch.float32, dev)
    keep_x0 = _latents(original, keep_prompts, settings.seed, gen.steps, gen.batch_size)
    # the sampled sets live on the CPU, where the sampling generator is; batches move to the device
    teacher_emb = torch.cat([encode(original, keep_prompts), unconditional(original)]).float().cpu()
    own_original = encode(original, [t.prompt for t in targets]).float().cpu()
    teacher = original.unet.requires_grad_(False).eval()
    del original
    with tempfile.TemporaryDirectory(prefix=".memedit-finetune-", dir=out.parent) as tmp:
        pipe, res = attack_recipe(
            recipe, masks, deltas, Path(tmp) / "round0", targets, references, attack_settings, gen, torch.float32, dev
        )
        unet = pipe.unet
        names = tuned_modules(unet, settings.params)
        modules = dict(unet.named_modules())
        start = {n: modules[n].weight.detach().clone() for n in names}
        frozen = {n: frozen_positions(recipe, masks, n, start[n].cpu()).to(start[n].device) for n in names}
        size = model_resolution(pipe)
        images = torch.cat([reference_latent(pipe, reference_array(references / t.image, size)) for t in targets])
        images = images.float().cpu()
        student_emb = torch.cat([encode(pipe, keep_prompts), unconditional(pipe)]).float().cpu()
        keep = KeepSet(student_emb, teacher_emb, keep_x0)
        own = encode(pipe, [t.prompt for t in targets]).float().cpu()
        n = len(targets)
        forget_emb, forget_img = [own, own_original], [torch.arange(n), torch.arange(n)]
        # memorized image i is unlearned toward the original model's generation of hold-out prompt i (cycling)
        surrogates = keep_x0[torch.arange(n) % len(keep_x0)]
        for r in range(settings.rounds + 1):
            if r:  # the model as it is in memory now
                res = attack(pipe, targets, references, attack_settings, gen)
            rows = res["targets"]
            rate = float(np.mean([t["recovered"] for t in rows]))
            back = [i for i, t in enumerate(rows) if t["recovered"]]
            done = rate <= settings.goal or r == settings.rounds
            seconds, passes = 0.0, 0
            if not done:
                # every embedding the attack found, recovered or not, is a way toward the image
                forget_emb.append(res["embeddings"].float().cpu())
                forget_img.append(torch.arange(n))
                img = torch.cat(forget_img)
                forget = ForgetSet(
                    torch.cat(forget_emb), img, images, surrogates, forget_weights(img, back, settings.focus)
                )
                t0 = time.perf_counter()
                passes = tune(pipe, teacher, names, frozen, forget, keep, settings, r)
                seconds = time.perf_counter() - t0
            rounds.append(
                FinetuneRound(
                    r, rate, tuple(rows[i]["prompt"] for i in back), 0 if done else len(forget.emb), seconds, passes
                )
            )
            say(f"round {r}: recovery {rate:.2f}" + ("" if done else f", tuned {passes} passes in {seconds:.0f} s"))
            if done:
                break
    new = {n: (modules[n].weight.detach() - start[n]).float().cpu().masked_fill(frozen[n].cpu(), 0.0) for n in names}
    new = {n: d for n, d in new.items() if bool(d.any())}
    edits = list(recipe.edits) + [
        Edit(METHOD, f"unet.{n}", "add", delta_key=n, delta_norm=round(float(d.norm()), 6)) for n, d in new.items()
    ]
    final = dataclasses.replace(
        recipe,
        edits=tuple(edits),
        calibration={
            **recipe.calibration,
            "finetune": {
                **dataclasses.asdict(settings),
                "attack": dataclasses.asdict(attack_settings or AttackSettings()),
                "prompts": str(prompts),
                "holdout": {"path": str(hold.path), "sha256": hold.sha256},
                # no wall times here: the recipe is a pure function of its inputs and seed
                "rounds": [{k: v for k, v in dataclasses.asdict(x).items() if k != "tune_seconds"} for x in rounds],
                "tuned_tensors": len(new),
                "unet_passes": sum(x.unet_passes for x in rounds),
            },
        },
    )
    dump_atomic(final, out, masks, {**(deltas or {}), **new} or None)
    total = float(torch.sqrt(sum((d.double() ** 2).sum() for d in new.values()))) if new else 0.0
    return FinetuneResult(out, load(out), tuple(rounds), len(new), total, time.perf_counter() - t_start)
