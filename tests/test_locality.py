"""The locality study's rankings on the bundled lab (benchmarks/lab_locality.py measures stop rates)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from memedit.ablate import ablated
from memedit.attack import reference_latent
from memedit.generate import load_image
from memedit.lab.check import lab_root, load_lab_pipeline, read_prompts
from memedit.lab.locality import iterative_taylor_rows, locality_study, random_rows, top_rows
from memedit.localize.attribution import taylor_scores
from memedit.model.cond import encode
from memedit.trace import value_layer_names


@pytest.fixture(scope="module")
def lab():
    pipe = load_lab_pipeline()
    root = lab_root(None)
    row = read_prompts(root / "prompts" / "memorized.jsonl")[0]
    return pipe, value_layer_names(pipe.unet), row["prompt"], load_image(root / "images" / row["image"])


@torch.no_grad()
def denoising_loss(pipe, prompt: str, image: np.ndarray, seed: int = 1, n: int = 64) -> float:
    """The prompt's epsilon loss toward `image` on other noise and timesteps than the scores saw."""
    lat, emb = reference_latent(pipe, image).float(), encode(pipe, [prompt])
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *lat.shape[1:]), generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    a = pipe.scheduler.alphas_cumprod.float()[t].view(-1, 1, 1, 1)
    pred = pipe.unet(a.sqrt() * lat + (1 - a).sqrt() * noise, t, encoder_hidden_states=emb.expand(n, -1, -1)).sample
    return float(((pred - noise) ** 2).mean())


def test_taylor_scores_predict_which_neurons_the_image_needs(lab):
    pipe, layers, prompt, image = lab
    scores = taylor_scores(pipe, layers, prompt, image)
    assert set(scores) == set(layers)
    assert all(len(scores[n]) == pipe.unet.get_submodule(n).out_features for n in layers)
    again = taylor_scores(pipe, layers, prompt, image)
    assert all(torch.equal(scores[n], again[n]) for n in layers)  # seeded
    base = denoising_loss(pipe, prompt, image)
    with ablated(pipe.unet, top_rows(scores, 0.05)):
        top = denoising_loss(pipe, prompt, image)
    with ablated(pipe.unet, random_rows(scores, 0.05, np.random.default_rng(0))):
        rand = denoising_loss(pipe, prompt, image)
    # held-out noise: the first-order ranking must generalize, and beat a random set of the same size
    assert top > base * 1.2
    assert top - base > 3 * (rand - base)
    assert denoising_loss(pipe, prompt, image) == base  # the ablations were undone


def test_iterative_sets_are_nested_with_the_per_layer_counts_of_top_rows(lab):
    pipe, layers, prompt, image = lab
    sets = iterative_taylor_rows(pipe, layers, prompt, image, steps=(0.05, 0.01))
    assert list(sets) == [0.01, 0.05]
    width = {n: pipe.unet.get_submodule(n).out_features for n in layers}
    for f, rows in sets.items():
        expected = {n: len(v) for n, v in top_rows(width_like(width), f).items()}
        assert {n: len(set(v)) for n, v in rows.items()} == expected
    assert all(sets[0.05][n][: len(sets[0.01][n])] == sets[0.01][n] for n in layers)
    # the first step is the plain ranking; later steps see the model with the first set zeroed
    assert sets[0.01] == top_rows(taylor_scores(pipe, layers, prompt, image), 0.01)
    base = denoising_loss(pipe, prompt, image)
    with ablated(pipe.unet, sets[0.05]):
        assert denoising_loss(pipe, prompt, image) > base * 1.2


def width_like(width: dict[str, int]) -> dict[str, torch.Tensor]:
    return {n: torch.zeros(w) for n, w in width.items()}


def test_unknown_ranking_is_refused():
    with pytest.raises(ValueError, match="ranking"):
        locality_study(ranking="gradient")
