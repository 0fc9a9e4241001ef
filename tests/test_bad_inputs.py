"""Bad-input audit across every verb: one line on stderr, exit 2, no traceback, inputs unchanged, no output left.

The cases of `test_cli_errors.py` (model references and safetensors files) count towards the audit too;
this module adds the other verbs' inputs. `test_audit_size` prints the total.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from memedit.cli import main
from memedit.edit import apply
from tests.conftest import tree_digest
from tests.test_apply import make_recipe
from tests.test_cli_errors import _case_names as reference_cases
from tests.test_cli_errors import assert_one_line_error


def build(root: Path, tiny: Path) -> dict[str, tuple[list[str], list[Path]]]:
    """name -> (argv, outputs that must not exist afterwards). Inputs live under root."""
    c: dict[str, tuple[list[str], list[Path]]] = {}
    out = root / "out"
    good = root / "good.txt"
    good.write_text("a red cat\n")
    hold = root / "hold.txt"
    hold.write_text("a blue dog\na green bird\n")
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text("\n\n  \n")
    (root / "binary.txt").write_bytes(b"\x00\x01\x02abc")
    (root / "latin1.txt").write_bytes("café crème\n".encode("latin-1"))
    (root / "bad.jsonl").write_text('{"prompt": "ok"}\n{not json}\n')
    (root / "nofield.jsonl").write_text('{"text": "a cat"}\n')
    (root / "badlabel.jsonl").write_text('{"prompt": "a cat", "memorized": "maybe"}\n')
    (root / "nocol.csv").write_text("text\na cat\n")
    (root / "prompts.pdf").write_text("a cat\n")
    (root / "adir").mkdir()
    (root / "afile").write_text("x")
    cal = ["calibrate", str(tiny), "--holdout", str(hold), "-o", str(out)]
    for name in (
        "empty.txt",
        "blank.txt",
        "binary.txt",
        "latin1.txt",
        "bad.jsonl",
        "nofield.jsonl",
        "badlabel.jsonl",
        "nocol.csv",
        "prompts.pdf",
    ):
        c[f"calibrate: prompt file {name}"] = ([*cal, "--prompts", str(root / name)], [out])
    c["calibrate: prompt path is a folder"] = ([*cal, "--prompts", str(root / "adir")], [out])
    c["calibrate: no hold-out for a non-lab model"] = (
        ["calibrate", str(tiny), "--prompts", str(good), "-o", str(out)],
        [out],
    )
    c["calibrate: output is an existing file"] = (
        ["calibrate", str(tiny), "--prompts", str(good), "--holdout", str(hold), "-o", str(root / "afile")],
        [],
    )
    c["calibrate: bad --shard"] = ([*cal, "--prompts", str(good), "--shard", "2/2"], [out])
    c["calibrate: --shard not I/N"] = ([*cal, "--prompts", str(good), "--shard", "x"], [out])
    c["calibrate: negative batch size"] = ([*cal, "--prompts", str(good), "--batch-size", "-1"], [out])
    c["calibrate: fpr out of range"] = ([*cal, "--prompts", str(good), "--fpr", "1.5"], [out])
    c["calibrate: --preset without --recipe-out"] = ([*cal, "--prompts", str(good), "--preset", "sd1"], [out])
    c["calibrate: --recipe-out with --shard"] = (
        [*cal, "--prompts", str(good), "--shard", "0/2", "--recipe-out", str(root / "r.yaml")],
        [out, root / "r.yaml"],
    )
    c["calibrate: cuda without a GPU"] = ([*cal, "--prompts", str(good), "--device", "cuda"], [out])
    c["calibrate: single file cannot run"] = (
        [
            "calibrate",
            str(tiny / "unet" / "diffusion_pytorch_model.safetensors"),
            "--prompts",
            str(good),
            "--holdout",
            str(hold),
            "-o",
            str(out),
        ],
        [out],
    )
    inpaint = root / "inpaint"
    shutil.copytree(tiny, inpaint)
    index = json.loads((inpaint / "model_index.json").read_text())
    (inpaint / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionInpaintPipeline"}))
    c["detect: a pipeline class memedit does not run"] = (
        ["detect", str(inpaint), "--prompts", str(good), "--threshold", "1"],
        [],
    )
    c["detect: threshold and holdout together"] = (
        ["detect", str(tiny), "--prompts", str(good), "--threshold", "1", "--holdout", str(hold)],
        [],
    )
    c["explain: empty prompt"] = (["explain", str(tiny), "  "], [])
    c["localize: stats folder missing"] = (
        ["localize", str(root / "nostats"), "-o", str(root / "r.yaml")],
        [root / "r.yaml"],
    )
    c["localize: folder without stats"] = (
        ["localize", str(root / "adir"), "-o", str(root / "r.yaml")],
        [root / "r.yaml"],
    )
    c["localize: stats path is a file"] = (
        ["localize", str(root / "afile"), "-o", str(root / "r.yaml")],
        [root / "r.yaml"],
    )
    c["localize: --holdout without --confirm"] = (
        ["localize", str(root / "adir"), "-o", str(root / "r.yaml"), "--holdout", str(hold)],
        [root / "r.yaml"],
    )

    recipe = make_recipe(tiny, root / "recipe.yaml")
    text = recipe.read_text()

    def variant(name: str, fn) -> Path:
        d = yaml.safe_load(text)
        fn(d)
        p = root / f"{name}.yaml"
        p.write_text(yaml.safe_dump(d, sort_keys=False))
        return p

    ap = lambda p: (["apply", str(p), "-o", str(out)], [out])  # noqa: E731
    c["apply: recipe missing"] = ap(root / "missing.yaml")
    c["apply: recipe is a folder"] = ap(root / "adir")
    (root / "notyaml.yaml").write_text("edits: [1, 2\n")
    c["apply: recipe not YAML"] = ap(root / "notyaml.yaml")
    (root / "binary.yaml").write_bytes(b"\xff\xfe\x00\x00garbage")
    c["apply: recipe binary"] = ap(root / "binary.yaml")
    c["apply: huge index"] = ap(variant("huge", lambda d: d["edits"][0].__setitem__("indices", [2**40])))
    c["apply: string index"] = ap(variant("stridx", lambda d: d["edits"][0].__setitem__("indices", "1,2")))
    c["apply: indices null"] = ap(variant("nullidx", lambda d: d["edits"][0].__setitem__("indices", None)))
    c["apply: factor is text"] = ap(variant("factor", lambda d: d["edits"][2].__setitem__("factor", "half")))
    c["apply: mask file path traversal"] = ap(
        variant("trav", lambda d: d["masks"].__setitem__("file", "../../etc/passwd"))
    )
    c["apply: mask file missing"] = ap(variant("nomask", lambda d: d["masks"].__setitem__("file", "gone.safetensors")))
    c["apply: edits not a list"] = ap(variant("editsmap", lambda d: d.__setitem__("edits", {"a": 1})))
    c["apply: model section wrong type"] = ap(variant("model", lambda d: d.__setitem__("model", "lab")))
    c["apply: seed not an integer"] = ap(variant("seed", lambda d: d.__setitem__("seed", "zero")))
    c["apply: repeated target and op"] = ap(variant("repeat", lambda d: d["edits"].append(dict(d["edits"][0]))))
    c["apply: output inside the input model"] = (
        ["apply", str(recipe), "--model", str(tiny), "-o", str(tiny / "edited")],
        [tiny / "edited"],
    )
    c["apply: model missing"] = (["apply", str(recipe), "--model", str(root / "nomodel"), "-o", str(out)], [out])
    c["verify: folder missing"] = (["verify", str(root / "nothing")], [])
    c["verify: folder without provenance"] = (["verify", str(root / "adir")], [])
    c["verify: a file, not a folder"] = (["verify", str(root / "afile")], [])
    c["diff: recipe and provenance together"] = (
        ["diff", str(tiny), str(tiny), "--recipe", str(recipe), "--provenance", str(root / "afile")],
        [],
    )
    c["diff: B missing"] = (["diff", str(tiny), str(root / "nomodel")], [])
    c["diff: negative tolerance"] = (["diff", str(tiny), str(tiny), "--tolerance", "-1"], [])
    (root / "lonely").mkdir()
    (root / "lonely" / "memedit.provenance.json").write_text("{}")
    c["diff: provenance without a recipe beside it"] = (
        ["diff", str(tiny), str(tiny), "--provenance", str(root / "lonely" / "memedit.provenance.json")],
        [],
    )
    refs_prompts = root / "refs.jsonl"
    refs_prompts.write_text('{"prompt": "a cat", "image": "cat.png"}\n')
    c["eval: prompts name images, no --references"] = (
        ["eval", str(tiny), str(tiny), "--prompts", str(refs_prompts), "-o", str(out)],
        [out],
    )
    c["eval: reference image missing"] = (
        [
            "eval",
            str(tiny),
            str(tiny),
            "--prompts",
            str(refs_prompts),
            "--references",
            str(root / "adir"),
            "-o",
            str(out),
        ],
        [out],
    )
    c["eval: references is a file"] = (
        [
            "eval",
            str(tiny),
            str(tiny),
            "--prompts",
            str(refs_prompts),
            "--references",
            str(root / "afile"),
            "-o",
            str(out),
        ],
        [out],
    )
    # adversarial fine-tuning: deltas and the harden --finetune flags
    import dataclasses

    import torch
    from PIL import Image

    from memedit.recipe import Edit, dump, load

    r0 = load(recipe)
    add = Edit("adversarial-finetune", r0.edits[0].target, "add", delta_key="d", delta_norm=0.0)
    tuned = dump(
        dataclasses.replace(r0, edits=(add,), masks=None),
        root / "tuned.yaml",
        deltas={"d": torch.zeros(32, 32)},  # the shape of the first edit's to_v
    )
    c["apply: --fill noise with deltas"] = (["apply", str(tuned), "-o", str(out), "--fill", "noise"], [out])
    tuned_text = tuned.read_text()
    (root / "nodelta.yaml").write_text(tuned_text.replace("file: tuned.deltas.safetensors", "file: gone.safetensors"))
    c["apply: deltas file missing"] = ap(root / "nodelta.yaml")
    (root / "nokey.yaml").write_text(tuned_text.replace("key: d\n", "key: nothing\n"))
    c["apply: delta key not in the deltas file"] = ap(root / "nokey.yaml")
    (root / "refs").mkdir()
    Image.new("RGB", (32, 32)).save(root / "refs" / "cat.png")
    hd = ["harden", str(recipe), "--prompts", str(refs_prompts), "--references", str(root / "refs")]
    c["harden: pruning without --stats"] = ([*hd, "-o", str(root / "h.yaml")], [root / "h.yaml"])
    c["harden: --finetune with --stats"] = (
        [*hd, "--finetune", "--stats", str(root / "adir"), "-o", str(root / "h.yaml")],
        [root / "h.yaml"],
    )
    c["harden: --finetune, no hold-out for a non-lab model"] = (
        [*hd, "--finetune", "-o", str(root / "h.yaml")],
        [root / "h.yaml"],
    )
    c["harden: --finetune on a recipe already fine-tuned"] = (
        ["harden", str(tuned), "--prompts", str(refs_prompts), "--references", str(root / "refs"), "--finetune",
         "--holdout", str(hold), "-o", str(root / "h.yaml")],
        [root / "h.yaml"],
    )  # fmt: skip
    c["harden: pruning with a fine-tuning flag"] = (
        [*hd, "--stats", str(root / "adir"), "--tune-lr", "0.01", "-o", str(root / "h.yaml")],
        [root / "h.yaml"],
    )
    c["harden: pruning with --focus"] = (
        [*hd, "--stats", str(root / "adir"), "--focus", "4", "-o", str(root / "h.yaml")],
        [root / "h.yaml"],
    )
    c["harden: negative --focus"] = ([*hd, "--finetune", "--focus", "-1", "-o", str(out)], [out])
    c["harden: --keep-batch 0"] = ([*hd, "--finetune", "--keep-batch", "0", "-o", str(out)], [out])
    c["harden: pruning with --keep-batch"] = (
        [*hd, "--stats", str(root / "adir"), "--keep-batch", "32", "-o", str(root / "h.yaml")],
        [root / "h.yaml"],
    )
    c["harden: --finetune with a pruning flag"] = (
        [*hd, "--finetune", "--fraction", "0.1", "-o", str(root / "h.yaml")],
        [root / "h.yaml"],
    )
    c["harden: unknown --tune-params"] = ([*hd, "--finetune", "--tune-params", "everything", "-o", str(out)], [out])
    c["push: invalid repo id"] = (["push", str(root / "adir"), "--repo", "not a repo", "--dry-run"], [])
    c["push: folder without provenance"] = (["push", str(root / "adir"), "--repo", "me/x", "--dry-run"], [])
    c["lab check: model is a file"] = (["lab", "check", "--model", str(root / "afile")], [])
    c["lab train: cuda without a GPU"] = (["lab", "train", "--out", str(out), "--device", "cuda"], [out])
    c["stats merge: not shards"] = (["stats", "merge", str(root / "adir"), "-o", str(out)], [out])
    c["inspect: conflicting variant on a single file"] = (["inspect", str(root / "afile")], [])
    return c


def _names() -> list[str]:
    import tempfile

    from tests.conftest import build_tiny_pipeline

    with tempfile.TemporaryDirectory() as d:
        tiny = Path(d) / "tiny"
        build_tiny_pipeline(Path(d)).save_pretrained(tiny)
        (Path(d) / "in").mkdir()
        return list(build(Path(d) / "in", tiny))


CASES = _names()


@pytest.fixture()
def model_copy(tiny_pipeline_dir, tmp_path):
    """A private copy of the tiny pipeline, so that 'inputs unchanged' covers the model too."""
    dst = tmp_path / "tiny"
    shutil.copytree(tiny_pipeline_dir, dst)
    return dst


@pytest.mark.parametrize("case", CASES)
def test_bad_input(capsys, tmp_path, model_copy, case, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = tmp_path / "in"
    root.mkdir()
    argv, outputs = build(root, model_copy)[case]
    before = tree_digest(tmp_path)
    rc = main(argv)
    err = capsys.readouterr().err
    assert_one_line_error(rc, err)
    assert tree_digest(tmp_path) == before, "an input was created, modified or removed"
    for o in outputs:
        assert not o.exists()
    assert not [p for p in tmp_path.rglob(".*tmp-*")], "a temp folder was left behind"


def _run_limited(argv: list[str], fsize: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run(
        [sys.executable, "-m", "memedit.cli", *argv],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )


def test_full_disk_is_one_line_and_leaves_nothing(tiny_pipeline_dir, tmp_path):
    """A file-size limit below the UNet's size: the write fails midway (EFBIG, as a full disk would)."""
    recipe = make_recipe(tiny_pipeline_dir, tmp_path / "recipe.yaml")
    before = tree_digest(tiny_pipeline_dir)
    p = _run_limited(["apply", str(recipe), "-o", str(tmp_path / "out")], fsize=200_000)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "could not write" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    assert tree_digest(tiny_pipeline_dir) == before


def test_unwritable_output_location(tiny_pipeline_dir, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions; the file-size limit test covers write failures")
    recipe = make_recipe(tiny_pipeline_dir, tmp_path / "recipe.yaml")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rc = main(["apply", str(recipe), "-o", str(ro / "out")])
        assert_one_line_error(rc, capsys.readouterr().err)
    finally:
        ro.chmod(0o700)


def test_apply_then_pickle_in_the_output_is_refused(tiny_pipeline_dir, tmp_path, capsys):
    """An edited folder where someone dropped a pickle: inspect refuses it, nothing is unpickled."""
    recipe = make_recipe(tiny_pipeline_dir, tmp_path / "recipe.yaml")
    apply(recipe, tmp_path / "out")
    (tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (tmp_path / "out" / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'true'\ntR.")
    rc = main(["inspect", str(tmp_path / "out")])
    assert_one_line_error(rc, capsys.readouterr().err)


def test_audit_size(request):
    total = len(CASES) + len(reference_cases()) + 3
    from tests.conftest import AUDIT_KEY

    request.config.stash[AUDIT_KEY] = total  # printed in the terminal summary (conftest.py), also in CI
    assert total >= 40
