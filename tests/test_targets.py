"""Which calibration prompts localization aims at: flagged, labels, all, and auto."""

from __future__ import annotations

import pytest

from memedit.errors import MemeditError
from memedit.localize import resolve_targets, target_prompts


def _info(labels, flagged):
    return {"prompts": [f"p{i}" for i in range(len(labels))], "labels": labels, "detection": {"flagged": flagged}}


def test_auto_takes_the_labels_when_every_prompt_has_one():
    info = _info([True, False, True, False], [1])
    assert resolve_targets(info, "auto") == "labels"
    assert target_prompts(info, {}, "auto") == [0, 2] == target_prompts(info, {}, "labels")


@pytest.mark.parametrize("labels", [[None, None, None], [True, None, False]])
def test_auto_falls_back_to_detection_when_a_label_is_missing(labels):
    info = _info(labels, [2])
    assert resolve_targets(info, "auto") == "flagged"
    assert target_prompts(info, {}, "auto") == [2]


def test_the_explicit_modes_stay_what_they_say():
    info = _info([True, False, None], [1])
    assert target_prompts(info, {}, "flagged") == [1]
    assert target_prompts(info, {}, "all") == [0, 1, 2]
    with pytest.raises(MemeditError, match="needs a 'memorized' field"):
        target_prompts(info, {}, "labels")


def test_cli_method_and_target_choices_follow_the_engine():
    """The CLI spells its --method/--targets choices out (it must not import torch at load); they stay
    within what localize() accepts, and `memedit localize` offers all of it."""
    import click

    from memedit.cli import cli
    from memedit.localize import METHOD_CHOICES, TARGET_CHOICES

    seen = set()
    for name in ("localize", "demo"):
        for p in cli.commands[name].params:
            if p.name in ("method", "targets"):
                assert isinstance(p.type, click.Choice), (name, p.name)
                allowed = METHOD_CHOICES if p.name == "method" else TARGET_CHOICES
                assert set(p.type.choices) <= set(allowed), (name, p.name)
                if name == "localize":
                    assert tuple(p.type.choices) == allowed, p.name
                seen.add((name, p.name))
    assert len(seen) == 4
