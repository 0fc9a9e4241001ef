"""The embedding attack of the robustness issue, on a tiny pipeline: it optimizes, it is seeded, it
leaves the model alone, and the CLI reads, reports and refuses as promised."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from memedit.attack import AttackSettings, find_embedding, load_targets, start_embeddings
from memedit.cli import main
from memedit.model.cond import encode
from memedit.model.load import load_pipeline
from memedit.model.ref import resolve


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return load_pipeline(resolve(str(tiny_pipeline_dir)))


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    d = tmp_path_factory.mktemp("refs")
    rng = np.random.default_rng(0)
    # a smooth image the tiny VAE can represent, and one at another size (resized on load)
    yy, xx = np.mgrid[0:16, 0:16] / 15
    img = np.stack([xx, yy, 1 - xx], axis=-1) * 255
    Image.fromarray(img.astype(np.uint8)).save(d / "a.png")
    Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(d / "b.png")
    p = d / "targets.jsonl"
    p.write_text(
        '{"prompt": "a red cat", "image": "a.png", "memorized": true, "kind": "verbatim"}\n'
        '{"prompt": "a blue dog", "image": "b.png", "memorized": false}\n'
        '{"prompt": "no image here"}\n'
    )
    return d


def test_targets_keep_rows_with_references_and_their_labels(refs):
    t = load_targets(refs / "targets.jsonl", refs)
    assert [(x.prompt, x.image, x.memorized, x.kind) for x in t] == [
        ("a red cat", "a.png", True, "verbatim"),
        ("a blue dog", "b.png", False, "none"),
    ]


def test_optimization_lowers_the_denoising_loss_and_is_seeded(pipe, refs):
    from memedit.attack import reference_array

    img = reference_array(refs / "a.png", 16)
    start = encode(pipe, ["a red cat"])[0]
    s = AttackSettings(steps=15, lr=0.05, batch=4, seed=3)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    e1, l0, l1 = find_embedding(pipe, start, img, s)
    e2, _, _ = find_embedding(pipe, start, img, s)
    e3, _, _ = find_embedding(pipe, start, img, AttackSettings(steps=15, lr=0.05, batch=4, seed=4))
    assert l1 < l0  # the embedding moved toward the image
    assert torch.equal(e1, e2) and not torch.equal(e1, e3)
    assert not torch.equal(e1, start)
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in before.items())  # model frozen
    assert all(p.grad is None for p in pipe.unet.parameters())


def test_start_points(pipe, refs):
    t = load_targets(refs / "targets.jsonl", refs)
    own = start_embeddings(pipe, t, AttackSettings(init="prompt"))
    other = start_embeddings(pipe, t, AttackSettings(init="other"))
    rnd = start_embeddings(pipe, t, AttackSettings(init="random"))
    assert torch.equal(other[0], own[1]) and torch.equal(other[1], own[0])
    assert rnd.shape == own.shape and not torch.allclose(rnd, own)


def test_attack_cli_reports_memorized_and_control(capsys, tiny_pipeline_dir, refs, tmp_path):
    emb = tmp_path / "emb.safetensors"
    rc = main(
        [
            "attack",
            str(tiny_pipeline_dir),
            "--prompts",
            str(refs / "targets.jsonl"),
            "--references",
            str(refs),
            "--steps",
            "3",
            "--seeds",
            "2",
            "--save-embeddings",
            str(emb),
            "--json",
        ]
    )
    res = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert [r["image"] for r in res["targets"]] == ["a.png", "b.png"]
    s = res["summary"]
    assert s["memorized_targets"] == 1 and s["control_targets"] == 1
    mem = res["targets"][0]
    assert s["recovery_rate"] == float(mem["recovered"])
    assert s["attack_recovery_rate"] == float(mem["attack_reproduces"])
    assert mem["attack_reproduces"] == (sum(x >= 0.7 for x in mem["seeds_ssim"]) > 1)
    assert mem["recovered"] == (mem["attack_reproduces"] or mem["prompt_reproduces"])
    saved = load_file(emb)
    assert sorted(saved) == ["0000", "0001"] and saved["0000"].shape == (77, 32)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--references", "{refs}/missing-dir"], "does not exist"),
        (["--prompts", "{refs}/none.jsonl"], "names a reference image"),
        (["--save-embeddings", "{tmp}/e.pt"], "must end in .safetensors"),
    ],
)
def test_attack_cli_errors(capsys, tiny_pipeline_dir, refs, tmp_path, args, needle):
    (refs / "none.jsonl").write_text('{"prompt": "x"}\n')
    base = {"--prompts": str(refs / "targets.jsonl"), "--references": str(refs)}
    extra = [a.format(refs=refs, tmp=tmp_path) for a in args]
    for k in list(base):
        if k in extra:
            base.pop(k)
    argv = ["attack", str(tiny_pipeline_dir), *[x for kv in base.items() for x in kv], *extra]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1


def test_a_prompt_that_still_reproduces_counts_as_recovered(pipe, tmp_path):
    """The attacker holds the prompt too: a found embedding that wanders off from a prompt that still
    draws the image does not make the image gone, and iterated localization is handed the prompt's own
    embedding for it."""
    from memedit.attack import Target, attack
    from memedit.generate import GenSettings, generate

    gen = GenSettings(seeds=(1000,), steps=5)
    Image.fromarray(generate(pipe, ["a red cat"], gen)[0][0]).save(tmp_path / "own.png")
    # one huge Adam step from a random start: an embedding far from anything that draws this image
    far = AttackSettings(init="random", steps=1, lr=1e3, batch=2)
    res = attack(pipe, [Target("a red cat", "own.png", True)], tmp_path, far, gen)
    row, s = res["targets"][0], res["summary"]
    assert row["prompt_reproduces"] and not row["attack_reproduces"], (row["prompt_ssim"], row["attack_ssim"])
    assert row["recovered"]
    assert (s["recovery_rate"], s["attack_recovery_rate"], s["prompt_reproduction_rate"]) == (1.0, 0.0, 1.0)
    assert torch.equal(res["recovering"][0], encode(pipe, ["a red cat"])[0].float())
    assert not torch.equal(res["recovering"][0], res["embeddings"][0])
