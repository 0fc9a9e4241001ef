"""The lab trainer: seeded end to end (a few steps of every stage), and where the arithmetic ran
is recorded. The full run is `memedit lab train`, measured in LAB.md."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from memedit.cli import main

TINY = """\
scene_pool: 200
vae_steps: 3
vae_batch: 8
clip_steps: 3
clip_batch: 16
unet_steps: 4
unet_batch: 8
warmup_steps: 2
"""


def _digests(model: Path) -> dict[str, str]:
    return {
        str(p.relative_to(model)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(model.rglob("*.safetensors"))
    }


@pytest.mark.slow
def test_lab_training_is_seeded_and_records_its_device(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    runs = []
    for name in ("a", "b"):
        assert main(["lab", "train", "--out", str(tmp_path / name), "--config", str(cfg), "--quiet"]) == 0
        runs.append(_digests(tmp_path / name / "model"))
    assert len(runs[0]) == 3  # unet, text encoder, vae
    assert runs[0] == runs[1]
    recorded = json.loads((tmp_path / "a" / "work" / "config.json").read_text())
    assert recorded["device"] == "cpu" and recorded["unet_steps"] == 4
    seconds = json.loads((tmp_path / "a" / "work" / "timings.json").read_text())
    stages = ("data", "autoencoder", "text_encoder", "unet")
    assert all(seconds[k] > 0 for k in stages) and seconds["total"] >= sum(seconds[k] for k in stages)
    # per-step rates from the intervals between steps: 3 steps give 2 intervals, 4 give 3
    rates = seconds["s_per_step"]
    assert {k: rates[k]["steps"] for k in stages[1:]} == {"autoencoder": 3, "text_encoder": 3, "unet": 4}
    for r in rates.values():
        assert 0 < r["p10"] <= r["median"] <= r["p90"]
        assert r["early"] > 0 and r["late"] > 0
    assert capsys.readouterr().out.strip().endswith("model")
