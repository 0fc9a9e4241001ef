"""Every bad input: one line on stderr, exit 2, no traceback, and nothing created or modified."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from memedit.cli import main
from tests.conftest import tree_digest


def run_cli(capsys, args: list[str]) -> tuple[int, str, str]:
    rc = main(args)
    c = capsys.readouterr()
    return rc, c.out, c.err


def assert_one_line_error(rc: int, err: str) -> None:
    assert rc == 2
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err


def _safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def make_bad_inputs(root: Path) -> dict[str, list[str]]:
    """name -> argv; each builds its own broken input under root."""
    cases: dict[str, list[str]] = {}
    cases["missing path"] = ["inspect", str(root / "does-not-exist")]
    (root / "empty").mkdir()
    cases["empty folder"] = ["inspect", str(root / "empty")]
    (root / "noconfig").mkdir()
    (root / "noconfig" / "weights.txt").write_text("x")
    cases["folder without model_index.json or config.json"] = ["inspect", str(root / "noconfig")]
    good_header = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    (root / "huge-len.safetensors").write_bytes(struct.pack("<Q", 2**60) + b"{}")
    cases["header length past the end"] = ["inspect", str(root / "huge-len.safetensors")]
    with open(root / "over-limit.safetensors", "wb") as f:  # 101 MB declared, file is big enough (sparse)
        f.write(struct.pack("<Q", 101 * 1024 * 1024))
        f.truncate(8 + 102 * 1024 * 1024)
    cases["header length over 100 MB"] = ["inspect", str(root / "over-limit.safetensors")]
    (root / "notjson.safetensors").write_bytes(struct.pack("<Q", 5) + b"{abc]")
    cases["header not JSON"] = ["inspect", str(root / "notjson.safetensors")]
    (root / "truncated.safetensors").write_bytes(_safetensors_bytes(good_header, b"\0" * 10))
    cases["truncated data"] = ["inspect", str(root / "truncated.safetensors")]
    (root / "tiny.safetensors").write_bytes(b"\x01\x02")
    cases["shorter than 8 bytes"] = ["inspect", str(root / "tiny.safetensors")]
    bad_dtype = {"w": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}
    (root / "dtype.safetensors").write_bytes(_safetensors_bytes(bad_dtype, b"\0" * 4))
    cases["unknown dtype"] = ["inspect", str(root / "dtype.safetensors")]
    overlap = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    (root / "overlap.safetensors").write_bytes(_safetensors_bytes(overlap, b"\0" * 12))
    cases["overlapping tensors"] = ["inspect", str(root / "overlap.safetensors")]
    for suffix in (".ckpt", ".bin", ".pt", ".pth"):
        # a pickle that would write a file if it were ever unpickled
        payload = b"cos\nsystem\n(S'touch " + str(root / "PWNED").encode() + b"'\ntR."
        (root / f"model{suffix}").write_bytes(payload)
        cases[f"pickle file {suffix}"] = ["inspect", str(root / f"model{suffix}")]
    (root / "pickle-unet").mkdir()
    (root / "pickle-unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (root / "pickle-unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    cases["component folder with only pickle weights"] = ["inspect", str(root / "pickle-unet")]
    (root / "readme.txt").write_text("hello")
    cases["not a safetensors file"] = ["inspect", str(root / "readme.txt")]
    cases["uncached Hub id offline"] = ["inspect", "some-org/some-model-that-is-not-cached"]
    cases["empty model reference"] = ["inspect", ""]
    (root / "cfg-dir").mkdir()
    cases["folder where a file is required"] = [
        "lab",
        "train",
        "--out",
        str(root / "o"),
        "--config",
        str(root / "cfg-dir"),
    ]
    cases["file where a folder is required"] = ["lab", "train", "--out", str(root / "readme.txt")]
    (root / "bad.yaml").write_text("unknown_setting: 3\n")
    cases["unknown training setting"] = ["lab", "train", "--out", str(root / "o2"), "--config", str(root / "bad.yaml")]
    cases["unknown option"] = ["inspect", "--no-such-flag", "x"]
    cases["missing argument"] = ["inspect"]
    (root / "variant").mkdir()
    (root / "variant" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    (root / "variant" / "diffusion_pytorch_model.safetensors").write_bytes(_safetensors_bytes(good_header, b"\0" * 16))
    cases["variant that does not exist"] = ["inspect", str(root / "variant"), "--variant", "bf16"]
    return cases


def _case_names() -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return list(make_bad_inputs(Path(d)))


@pytest.mark.parametrize("case", _case_names())
def test_bad_input_one_line_exit_2_nothing_changed(capsys, tmp_path, monkeypatch, case):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    root = tmp_path / "inputs"
    root.mkdir()
    argv = make_bad_inputs(root)[case]
    before = tree_digest(root)
    rc, _out, err = run_cli(capsys, argv)
    assert_one_line_error(rc, err)
    assert tree_digest(root) == before, "an input was created, modified or removed"
    assert not (tmp_path / "hf-home").exists() or not any((tmp_path / "hf-home").rglob("*.safetensors"))
    assert not (root / "PWNED").exists()


def test_error_line_from_the_real_entry_point(tmp_path):
    """The installed console script path: one line, exit 2; --debug shows the traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "memedit.cli", "inspect", str(tmp_path / "nope")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error: ")
    assert p.stdout == ""
    p = subprocess.run([*cmd[:3], "--debug", *cmd[3:]], capture_output=True, text=True, env=env)
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_message_shape():
    from memedit.errors import MemeditError

    assert MemeditError("thing broke.", "fix it").one_line() == "error: thing broke. Fix it."
