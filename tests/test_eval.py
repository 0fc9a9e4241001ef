"""`memedit eval` on tiny pipelines: identical models show no change, the grid holds the generated
images, and the HTML report renders that grid in a real headless browser (Chromium)."""

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from memedit.evaluate import compose_grid, evaluate
from memedit.generate import GenSettings, generate
from memedit.model.load import load_pipeline
from memedit.model.ref import resolve

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import report_browser

SETTINGS = GenSettings(seeds=(1000, 1001), steps=4)


@pytest.fixture(scope="module")
def report(tiny_pipeline_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    refs = d / "refs"
    refs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(refs / "r.png")
    prompts = d / "p.jsonl"
    prompts.write_text(
        '{"prompt": "a red cat", "image": "r.png", "memorized": true}\n'
        '{"prompt": "a blue dog", "memorized": false}\n{"prompt": "a green bird", "memorized": false}\n'
    )
    out = d / "report"
    m = evaluate(str(tiny_pipeline_dir), str(tiny_pipeline_dir), prompts, refs, out, SETTINGS)
    return m, out, prompts, refs


def test_identical_models_show_no_change(report):
    m, out, _, _ = report
    s = m["summary"]
    assert s["preservation_ssim"] == pytest.approx(1.0)
    assert s["reproduction_rate_base"] == s["reproduction_rate_edited"]
    assert s["ssim_ref_base"] == s["ssim_ref_edited"]
    assert s["score_base_mean"] == s["score_edited_mean"]
    for r in m["per_prompt"]:
        assert r["score_base"] == r["score_edited"] and r["diversity_base"] == r["diversity_edited"]
    assert json.loads((out / "metrics.json").read_text())["summary"] == s
    assert {p.name for p in out.iterdir()} == {"metrics.json", "report.md", "report.html", "grid.png"}


def test_grid_holds_the_generated_images(report, tiny_pipeline_dir):
    m, out, _, refs = report
    pipe = load_pipeline(resolve(str(tiny_pipeline_dir)))
    imgs = generate(pipe, ["a red cat", "a blue dog", "a green bird"], SETTINGS)
    ref = np.asarray(Image.open(refs / "r.png").convert("RGB"))
    want = compose_grid([(ref, imgs[0], imgs[0]), (None, imgs[1], imgs[1]), (None, imgs[2], imgs[2])])
    grid = (out / "grid.png").read_bytes()
    assert np.array_equal(np.asarray(Image.open(out / "grid.png").convert("RGB")), want)
    assert hashlib.sha256(grid).hexdigest() == m["grid_sha256"]


NO_BROWSER = "Chromium is not installed (apt-get install chromium)"


@pytest.mark.skipif(report_browser.find_browser() is None, reason=NO_BROWSER)
def test_report_renders_the_grid_in_a_headless_browser(report):
    _, out, _, _ = report
    res = report_browser.check(out)
    assert res["embedded_equals_grid_png"] and res["grid_sha256_matches_metrics"]
    assert res["grid_shown_at"] is not None, res


def test_find_subimage_finds_and_misses():
    rng = np.random.default_rng(1)
    big = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
    small = big[10:30, 25:50].copy()
    assert report_browser.find_subimage(big, small) == (10, 25)
    small[3, 3] ^= 1
    assert report_browser.find_subimage(big, small) is None
