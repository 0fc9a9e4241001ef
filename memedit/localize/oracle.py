"""The image oracle of refinement: does a target prompt still draw what the base model drew for it?

`confirm.py` asks whether a prompt's images vary across seeds after an edit, which a prompt that
now draws one new image at every seed fails although it no longer draws its training image.
Without the training images, the base model's own images of a prompt stand in for them: a prompt
memorized by the base model draws one image at every seed (its seeds agree at the copy threshold),
and it still does after an edit when the edited model's image at a seed matches the base model's
at that seed on the majority of seeds, the rule the evaluation applies against training images.
Prompts whose base images differ across seeds draw no one image and are never called still drawing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from memedit.generate import COPY_SSIM, GenSettings, copied, diversity, generate, ssim


@dataclass(frozen=True)
class BaseDraws:
    images: np.ndarray  # (prompts, seeds, H, W, 3) uint8, base model
    one_image: tuple[bool, ...]  # the base model draws one image for this prompt at every seed


def base_draws(pipe, prompts: Sequence[str], gen: GenSettings) -> BaseDraws:
    images = generate(pipe, list(prompts), gen)
    return BaseDraws(images, tuple(diversity(im) >= COPY_SSIM for im in images))


def still_drawing(edited, prompts: Sequence[str], base: BaseDraws, gen: GenSettings) -> list[bool]:
    """Per prompt: the base model draws one image for it, and the edited model's image at a seed
    matches the base model's at that seed (SSIM >= COPY_SSIM) on the majority of seeds."""
    images = generate(edited, list(prompts), gen)
    return [
        one and copied([ssim(a, b) for a, b in zip(im, ref, strict=True)])
        for im, ref, one in zip(images, base.images, base.one_image, strict=True)
    ]
