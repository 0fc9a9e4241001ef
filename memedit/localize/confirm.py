"""Confirmation of a localization by images, without the training images.

The search oracle of NeMo in memedit is the detection score, one UNet call per trial: cheap, and
fooled where the score and the images part ways (on the lab, five neurons push a prompt's first-step
score under the threshold while its images still reproduce; benchmarks/efficacy.py). What makes a
memorized prompt memorized is that every seed gives the same image (lab: seed-to-seed SSIM 0.96 for
memorized prompts, 0.42 for ordinary ones), so the check generates each target prompt from the
edited model at several seeds and asks whether its images now vary across seeds as ordinary
prompts' do. The threshold follows NeMo's rule for its own oracle (methods/nemo.md, tau = mean + 1
std over hold-out prompts), on the base model's consistency of the hold-out prompts, so that it
belongs to one checkpoint, resolution and sampler.

A prompt can fail the check by giving one new image for every seed instead of its training image:
that stays unconfirmed, on purpose (the check cannot tell the two apart without the training image).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from memedit.generate import GenSettings, diversity, generate


@dataclass(frozen=True)
class ConfirmSettings:
    seeds: tuple[int, ...] = (1000, 1001, 1002, 1003)
    steps: int = 50
    guidance: float = 7.5
    reference_prompts: int = 20  # hold-out prompts that set the threshold (the first ones of the file)

    def gen(self) -> GenSettings:
        return GenSettings(seeds=self.seeds, steps=self.steps, guidance=self.guidance)


@dataclass(frozen=True)
class Confirmation:
    settings: ConfirmSettings
    threshold: float
    reference: tuple[float, ...]  # seed-to-seed SSIM of each reference prompt, base model
    prompts: tuple[str, ...]
    before: tuple[float, ...]  # seed-to-seed SSIM of each target prompt, base model
    after: tuple[float, ...]  # the same under the edit

    @property
    def confirmed(self) -> tuple[bool, ...]:
        return tuple(a < self.threshold for a in self.after)

    def to_json(self) -> dict:
        return {
            "settings": {**dataclasses.asdict(self.settings), "seeds": list(self.settings.seeds)},
            "rule": "confirmed: seed-to-seed SSIM under the edit < mean + 1 std of the reference prompts' (base)",
            "threshold": round(self.threshold, 6),
            "reference_mean": round(float(np.mean(self.reference)), 6),
            "confirmed": sum(self.confirmed),
            "prompts": [
                {"prompt": p, "before": round(b, 6), "after": round(a, 6), "confirmed": c}
                for p, b, a, c in zip(self.prompts, self.before, self.after, self.confirmed, strict=True)
            ],
        }


def consistency(pipe, prompts: list[str], settings: ConfirmSettings) -> list[float]:
    """Mean pairwise SSIM between the seeds' images of each prompt (1.0: the same image every seed)."""
    images = generate(pipe, prompts, settings.gen())
    return [diversity(images[i]) for i in range(len(prompts))]


def threshold(reference: list[float]) -> float:
    return float(np.mean(reference) + np.std(reference))


def confirm(base, edited, targets: list[str], references: list[str], settings: ConfirmSettings) -> Confirmation:
    """`base` and `edited` are pipelines of the unedited and the edited model."""
    if len(settings.seeds) < 2:
        raise ValueError("confirmation needs at least two seeds")
    reference = consistency(base, references[: settings.reference_prompts], settings)
    return Confirmation(
        settings,
        threshold(reference),
        tuple(reference),
        tuple(targets),
        tuple(consistency(base, targets, settings)),
        tuple(consistency(edited, targets, settings)),
    )
