"""memedit push against a local HTTP server speaking the Hub routes: real client, real HTTP."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from memedit.edit import apply
from tests.fake_hub import FakeHub
from tests.test_apply import make_recipe

TOKEN = "hf_SECRETtokenNEVERprinted123"


@pytest.fixture(scope="module")
def edited(tiny_pipeline_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("push")
    apply(make_recipe(tiny_pipeline_dir, d / "recipe.yaml"), d / "out")
    return d / "out"


def push(hub_url: str, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(
        {
            "HF_ENDPOINT": hub_url,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": os.environ.get("PYTEST_HF_HOME", "/tmp/memedit-test-hf-home"),
        }
    )
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "memedit.cli", "push", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_push_uploads_every_file_byte_identical_with_a_valid_card(edited):
    from huggingface_hub import ModelCard

    with FakeHub() as hub:
        p = push(hub.url, str(edited), "--repo", "user/tiny-edited")
        assert p.returncode == 0, p.stderr
        stored = hub.repos["user/tiny-edited"]["main"]
        for f in edited.rglob("*"):
            if f.is_file():
                assert stored[str(f.relative_to(edited))] == f.read_bytes()
        card = ModelCard(stored["README.md"].decode())
        meta = card.data.to_dict()
        assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
        assert {"memedit", "memorization-mitigation"} <= set(meta["tags"])
        assert "memedit verify" in card.text
        assert hub.validated and hub.validated[-1]["library_name"] == "diffusers"
        assert not (edited / "README.md").exists()  # the card goes into the upload, not into OUT
        writes = [h for m, path, h in hub.requests if m == "POST"]
        assert writes and all(h.get("authorization", h.get("Authorization", "")).endswith(TOKEN) for h in writes)
        assert TOKEN not in p.stdout + p.stderr and TOKEN.encode() not in b"".join(stored.values())


def test_dry_run_sends_nothing(edited):
    with FakeHub() as hub:
        p = push(hub.url, str(edited), "--repo", "user/x", "--dry-run")
        assert p.returncode == 0 and "README.md (model card)" in p.stdout
        assert yaml.safe_load(p.stdout.split("---")[1])["library_name"] == "diffusers"
        assert not [r for r in hub.requests if r[0] == "POST"]


@pytest.mark.parametrize("code,words", [(401, "refused the credentials"), (403, "no write access"), (404, "not found")])
def test_server_errors_are_one_line(edited, code, words):
    with FakeHub(fail_with=code) as hub:
        p = push(hub.url, str(edited), "--repo", "user/y")
    assert p.returncode == 2 and words in p.stderr and p.stderr.count("\n") == 1
    assert TOKEN not in p.stderr


def test_connection_refused_and_no_token(edited):
    p = push("http://127.0.0.1:9", str(edited), "--repo", "user/z")
    assert p.returncode == 2 and "cannot reach" in p.stderr and p.stderr.count("\n") == 1
    with FakeHub() as hub:
        p = push(hub.url, str(edited), "--repo", "user/z", token=None)
        assert p.returncode == 2 and "no Hugging Face token" in p.stderr
        assert not [r for r in hub.requests if r[0] == "POST"]


def test_repo_with_other_content_needs_a_revision(edited):
    with FakeHub() as hub:
        hub.repos["user/busy"] = {"main": {"weights.safetensors": b"other"}}
        p = push(hub.url, str(edited), "--repo", "user/busy")
        assert p.returncode == 2 and "already holds other files" in p.stderr
        p = push(hub.url, str(edited), "--repo", "user/busy", "--revision", "memedit")
        assert p.returncode == 0, p.stderr
        assert "README.md" in hub.repos["user/busy"]["memedit"]


def test_a_tampered_folder_is_not_pushed(edited, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(edited, bad)
    (bad / "recipe.yaml").write_text((bad / "recipe.yaml").read_text() + "\n# edited\n")
    with FakeHub() as hub:
        p = push(hub.url, str(bad), "--repo", "user/t")
        assert p.returncode == 2 and "fails memedit verify" in p.stderr
        assert not [r for r in hub.requests if r[0] == "POST"]
