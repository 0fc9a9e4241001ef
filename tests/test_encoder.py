"""The text-encoder remap (localize --method encoder): its fit on a real tiny pipeline, and where it
finds the weight it edits in each checkpoint naming."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from memedit.errors import MemeditError
from memedit.localize.encoder import EncoderSettings, _layers, _run, fc2_delta, readouts, weight_name
from memedit.model.cond import encode
from memedit.model.load import load_pipeline
from memedit.model.ref import resolve

TARGETS = ["a red cat number 1", "a red cat number 2", "a red cat number 3"]
HOLD = [f"a {c} dog in a field {i}" for c in ("blue", "green", "brown") for i in range(6)]


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return load_pipeline(resolve(str(tiny_pipeline_dir)))


def _edited(pipe, delta: torch.Tensor):
    (r,) = readouts(pipe)
    fc2 = _layers(pipe.text_encoder)[r.layer].mlp.fc2
    before = fc2.weight.detach().clone()
    fc2.weight.data += delta.to(fc2.weight.dtype)
    return fc2, before


def test_sd_reads_the_last_layer_after_the_final_norm(pipe):
    (r,) = readouts(pipe)
    assert (r.component, r.layer, r.final_norm) == ("text_encoder", len(_layers(pipe.text_encoder)) - 1, True)


@pytest.mark.parametrize("strength", [1.0, 10.0])
def test_the_targets_move_toward_the_holdout_mean_and_the_holdout_stays(pipe, strength):
    (r,) = readouts(pipe)
    base_t, base_h = encode(pipe, TARGETS).double(), encode(pipe, HOLD).double()
    mean = base_h.mean(0)
    delta = fc2_delta(pipe, r, TARGETS, HOLD, EncoderSettings(strength=strength))
    fc2, before = _edited(pipe, delta)
    try:
        new_t, new_h = encode(pipe, TARGETS).double(), encode(pipe, HOLD).double()
    finally:
        fc2.weight.data.copy_(before)
    far_before = (base_t - mean).norm(dim=-1).mean()
    far_after = (new_t - mean).norm(dim=-1).mean()
    assert far_after < 0.7 * far_before
    moved_t = ((new_t - base_t).norm(dim=-1) / base_t.norm(dim=-1)).mean()
    moved_h = ((new_h - base_h).norm(dim=-1) / base_h.norm(dim=-1)).mean()
    assert moved_t > 3 * moved_h


def test_higher_strength_keeps_the_holdout_closer_and_a_huge_ridge_keeps_everything(pipe):
    (r,) = readouts(pipe)
    keys = _run(pipe, r, HOLD).keys  # what fc2 reads for the hold-out tokens: their change is D h
    fits = [fc2_delta(pipe, r, TARGETS, HOLD, EncoderSettings(strength=s)) for s in (1.0, 10.0, 100.0)]
    kept = [float((keys @ d.T).norm(dim=-1).pow(2).mean()) for d in fits]
    assert kept[0] > kept[1] > kept[2] > 0
    tiny = fc2_delta(pipe, r, TARGETS, HOLD, dataclasses.replace(EncoderSettings(), ridge=1e9))
    assert float(tiny.norm()) < 1e-6 * float(fits[0].norm())


def test_batching_does_not_change_the_fit(pipe):
    (r,) = readouts(pipe)
    one = fc2_delta(pipe, r, TARGETS, HOLD, EncoderSettings(), batch=32)
    many = fc2_delta(pipe, r, TARGETS, HOLD, EncoderSettings(), batch=2)
    # float32 encoders differ by an ulp between batch sizes; a lost or doubled batch would not be close
    torch.testing.assert_close(one, many, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    "names, layer, want",
    [
        (["text_model.encoder.layers.1.mlp.fc2.weight", "text_model.encoder.layers.11.mlp.fc2.weight"], 1, "1."),
        (["encoder.layers.3.mlp.fc1.weight", "encoder.layers.3.mlp.fc2.weight"], 3, "encoder.layers.3.mlp.fc2.weight"),
        (["transformer.text_model.encoder.layers.11.mlp.fc2.weight"], 11, "transformer.text_model."),
        (
            ["model.transformer.resblocks.22.mlp.c_proj.weight", "model.transformer.resblocks.2.mlp.c_proj.weight"],
            22,
            "22.",
        ),
    ],
    ids=["diffusers", "transformers-5", "sd1-single-file", "openclip-single-file"],
)
def test_the_edited_weight_is_found_under_each_checkpoint_naming(names, layer, want):
    got = weight_name(names, "text_encoder", layer)
    assert want in got and got in names


def test_a_checkpoint_without_that_weight_is_a_clear_error():
    with pytest.raises(MemeditError, match="feed-forward output weight of text_encoder layer 5"):
        weight_name(["encoder.layers.4.mlp.fc2.weight"], "text_encoder", 5)


def test_a_boosted_target_moves_further_and_the_others_no_less(pipe):
    """A weight above 1 asks more of that prompt without asking less of the others (the target term
    keeps the plain token count as its divisor)."""
    (r,) = readouts(pipe)
    mean = encode(pipe, HOLD).double().mean(0)
    base = encode(pipe, TARGETS).double()

    def far(weights):
        delta = fc2_delta(pipe, r, TARGETS, HOLD, EncoderSettings(strength=10.0), weights=weights)
        fc2, before = _edited(pipe, delta)
        try:
            return (encode(pipe, TARGETS).double() - mean).norm(dim=-1).mean(-1)
        finally:
            fc2.weight.data.copy_(before)

    plain, boosted = far(None), far([16.0, 1.0, 1.0])
    torch.testing.assert_close(far([1.0, 1.0, 1.0]), plain)
    assert boosted[0] < plain[0] < (base[0] - mean).norm(dim=-1).mean()
    assert bool((boosted[1:] <= plain[1:] + 1e-9).all())


def test_refine_boosts_what_the_oracle_still_sees_and_stops(pipe):
    from memedit.localize.encoder import refine

    names = {"text_encoder": [f"text_model.encoder.layers.{i}.mlp.fc2.weight" for i in range(8)]}
    seen: list[dict] = []

    def still(found):
        seen.append(found)
        return [len(seen) < 3, False, len(seen) < 2]  # prompt 0 needs two boosts, prompt 2 one

    found, rounds = refine(pipe, names, TARGETS, HOLD, EncoderSettings(rounds=5, boost=4.0), still)
    assert [r.weights for r in rounds] == [(1.0, 1.0, 1.0), (4.0, 1.0, 4.0), (16.0, 1.0, 4.0)]
    assert [r.still for r in rounds][-1] == (False, False, False)
    assert found is seen[-1] and len(seen) == 3
    _, capped = refine(pipe, names, TARGETS, HOLD, EncoderSettings(rounds=1), lambda f: [True, True, True])
    assert len(capped) == 2  # the first fit and one refit, however many the oracle still sees
