"""The lab trainer: seeded end to end (a few steps of every stage), and where the arithmetic ran
is recorded. The full run is `memedit lab train`, measured in LAB.md."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from memedit.calibrate import _FfnUsage
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
    assert capsys.readouterr().out.strip().endswith("model")


def _reference_usage(h: torch.Tensor) -> torch.Tensor:
    """The subspace method's usage per row: sum over tokens of the squared unit-norm activations."""
    h = h.double()
    h = h / h.norm(dim=-1, keepdim=True)
    return (h * h).sum(dim=1)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_ffn_usage_hook_matches_the_definition_in_low_precision(dtype, tol):
    # large activations too: the hook must not square them in the model's dtype (fp16 overflows at 256)
    torch.manual_seed(0)
    b, n, tokens, inner = 2, 3, 16, 40
    h = torch.randn(2 * b * n, tokens, inner) * torch.logspace(-2, 3, inner)
    usage = _FfnUsage(["ff"], steps=2, batch=b, generations=n, sizes={"ff": inner})
    usage.on_call(1, 981, b)
    usage.hook("ff", None, (h.to(dtype),), None)
    want = _reference_usage(h.to(dtype)).reshape(2, b, n, inner).sum(dim=(0, 2))
    assert usage.acc["ff"].dtype == torch.float64
    assert torch.all(usage.acc["ff"][:, 0] == 0)
    torch.testing.assert_close(usage.acc["ff"][:, 1], want, rtol=tol, atol=tol * tokens)
