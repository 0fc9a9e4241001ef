"""memedit's loss-attribution selection (localize --method attribution) on the bundled lab."""

from __future__ import annotations

import numpy as np
import pytest

from memedit.generate import load_image
from memedit.lab.check import lab_root, load_lab_pipeline, read_prompts
from memedit.localize.attribution import AttributionSettings, Target, greedy_order, rows_of, select
from memedit.trace import value_layer_names


@pytest.fixture(scope="module")
def lab():
    pipe = load_lab_pipeline()
    root = lab_root(None)
    rows = read_prompts(root / "prompts" / "memorized.jsonl")[:2]
    targets = [Target(i, r["prompt"], load_image(root / "images" / r["image"])) for i, r in enumerate(rows)]
    return pipe, value_layer_names(pipe.unet), targets


def test_a_prefix_ending_at_a_stop_is_what_that_budget_alone_chooses(lab):
    pipe, layers, targets = lab
    order, caused = greedy_order(pipe, layers, targets, budget=10, step=4, samples=8, stops=(6,))
    alone, _ = greedy_order(pipe, layers, targets, budget=6, step=4, samples=8)
    assert order[:6] == alone
    assert len(order) == len(set(order)) == 10 and set(caused) == set(order)
    assert all(set(ids) <= {0, 1} for ids in caused.values())


def test_select_maps_flat_indices_to_layer_rows(lab):
    pipe, layers, targets = lab
    widths = [pipe.unet.get_submodule(n).out_features for n in layers]
    settings = AttributionSettings(share=0.01, step=0.01, samples=8)
    chosen = select(pipe, layers, targets, settings)
    order, _ = greedy_order(pipe, layers, targets, budget=11, step=11, samples=8)
    expected = {n: sorted(r) for n, r in rows_of(order, layers, widths).items() if r}
    assert {n: sorted(r) for n, r in chosen.items()} == expected
    assert sum(len(r) for r in chosen.values()) == int(np.ceil(0.01 * sum(widths)))
    assert rows_of([0, widths[0], sum(widths) - 1], layers, widths) == {
        **{n: [] for n in layers},
        layers[0]: [0],
        layers[1]: [0],
        layers[-1]: [widths[-1] - 1],
    }
