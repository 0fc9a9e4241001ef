import json

import numpy as np
import pytest

from memedit.cli import main
from memedit.detect import auroc_tpr, threshold_at_fpr


def test_threshold_at_fpr_allows_at_most_the_target_share():
    neg = np.arange(200, dtype=float)
    t = threshold_at_fpr(neg, 0.01)
    assert (neg > t).sum() == 2
    assert (neg > threshold_at_fpr(neg, 0.001)).sum() == 0


def test_auroc_and_official_tpr_rule():
    labels = [1, 1, 1, 0, 0, 0, 0]
    assert auroc_tpr(labels, [9, 8, 7, 3, 2, 1, 0]) == (1.0, 1.0)
    auroc, tpr = auroc_tpr(labels, [9, 8, 1.5, 3, 2, 1, 0])
    assert auroc == pytest.approx(10 / 12) and tpr == pytest.approx(2 / 3)


def test_detect_cli_json(capsys, tiny_pipeline_dir, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(
        '{"prompt": "a red cat", "memorized": true}\n{"caption": "a blue dog", "memorized": false}\n'
        '{"prompt": "a green bird", "memorized": false}\n'
    )
    h = tmp_path / "h.txt"
    h.write_text("one\ntwo\nthree\nfour\n")
    rc = main(
        ["detect", str(tiny_pipeline_dir), "--prompts", str(p), "--holdout", str(h), "--json", "--generations", "2"]
    )
    res = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert [x["prompt"] for x in res["prompts"]] == ["a red cat", "a blue dog", "a green bird"]
    assert all(x["flagged"] == (x["score"] > res["threshold"]) for x in res["prompts"])
    assert 0 <= res["auroc"] <= 1 and "tpr_at_1fpr" in res
    assert res["unet_sample_forwards_per_prompt"] == 4


def test_detect_needs_holdout_or_threshold(capsys, tiny_pipeline_dir, tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a red cat\n")
    rc = main(["detect", str(tiny_pipeline_dir), "--prompts", str(p)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: no --holdout") and err.count("\n") == 1
    rc = main(["detect", str(tiny_pipeline_dir), "--prompts", str(p), "--threshold", "1", "--holdout", str(p)])
    assert rc == 2 and "either --threshold or --holdout" in capsys.readouterr().err


def test_explain_gradient_covers_every_prompt_token(capsys, tiny_pipeline_dir):
    rc = main(["explain", str(tiny_pipeline_dir), "a red cat", "--json", "--generations", "2", "--method", "gradient"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["method"] == "gradient"
    assert "".join(t["token"] for t in res["tokens"]) == "aredcat"  # the tiny tokenizer is per character
    assert all(t["significance"] > 0 for t in res["tokens"]) and res["eos_padding"] > 0


def test_occlusion_is_the_score_drop_of_each_deletion_on_the_prompts_latents(capsys, tiny_pipeline_dir):
    from memedit.detect import DetectSettings, delete_token, score_prompts
    from memedit.model.load import load_pipeline
    from memedit.model.ref import resolve

    rc = main(["explain", str(tiny_pipeline_dir), "a red cat", "--json", "--generations", "2"])
    res = json.loads(capsys.readouterr().out)
    assert rc == 0 and res["method"] == "occlusion" and res["eos_padding"] is None  # the default method
    assert "".join(t["token"] for t in res["tokens"]) == "aredcat"
    pipe = load_pipeline(resolve(str(tiny_pipeline_dir)))
    s = DetectSettings(generations=2)
    variants = ["a red cat"] + [delete_token(pipe.tokenizer, "a red cat", i + 1) for i in range(len(res["tokens"]))]
    assert variants[1] != variants[2]  # deleting different tokens gives different prompts
    same = score_prompts(pipe, variants, s, latent_keys=["a red cat"] * len(variants)).scores
    for t, x in zip(res["tokens"], same[1:], strict=True):
        assert t["significance"] == pytest.approx(same[0] - x, rel=1e-5, abs=1e-7)
    # latent_keys changes only the noise: a prompt keyed by itself scores as by default, keyed by
    # another text it scores differently
    own = score_prompts(pipe, ["a red cat"], s).scores[0]
    assert score_prompts(pipe, ["a red cat"], s, latent_keys=["a red cat"]).scores[0] == own
    assert score_prompts(pipe, ["a red cat"], s, latent_keys=["other"]).scores[0] != own
