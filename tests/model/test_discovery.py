import json

import pytest

from memedit.cli import main

EXPECTED = {
    # arch: (value layers, ffn layers, value in_features, value widths, ffn inner widths)
    "sd15": (16, 16, 768, {320, 640, 1280}, {1280, 2560, 5120}),
    "sd21": (16, 16, 1024, {320, 640, 1280}, {1280, 2560, 5120}),
    "sdxl": (70, 70, 2048, {640, 1280}, {2560, 5120}),
}


def inspect_json(capsys, target) -> dict:
    rc = main(["inspect", str(target), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


@pytest.mark.parametrize("arch", sorted(EXPECTED))
@pytest.mark.parametrize("layout", ["diffusers", "single_file"])
def test_inspect_counts_on_real_layouts(capsys, sd_layouts, arch, layout):
    n_value, n_ffn, width, value_out, ffn_inner = EXPECTED[arch]
    folder, single = sd_layouts[arch]
    report = inspect_json(capsys, folder if layout == "diffusers" else single)
    assert report["layout"] == layout
    assert report["architecture"] == {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}[arch]
    values = [x for x in report["layers"] if x["kind"] == "value"]
    ffns = [x for x in report["layers"] if x["kind"] == "ffn"]
    assert (len(values), len(ffns)) == (n_value, n_ffn)
    assert {x["in_features"] for x in values} == {width}
    assert {x["neurons"] for x in values} == value_out
    assert {x["neurons"] for x in ffns} == ffn_inner
    for x in report["layers"]:
        assert {"name", "kind", "neurons", "in_features", "weight_keys"} <= set(x)
        assert x["name"].startswith("unet.")
    if layout == "single_file":
        assert all(k.startswith("model.diffusion_model.") for x in report["layers"] for k in x["weight_keys"])


def test_same_layers_in_both_layouts(capsys, sd_layouts):
    folder, single = sd_layouts["sd15"]
    a, b = inspect_json(capsys, folder), inspect_json(capsys, single)
    strip = lambda r: [(x["name"], x["kind"], x["neurons"], x["in_features"]) for x in r["layers"]]  # noqa: E731
    assert strip(a) == strip(b)


def test_inspect_reads_headers_only(sd_layouts):
    """An SDXL UNet (2.6 B parameters) is inspected without reading its 5 GB of data."""
    import resource

    from memedit.inspect import inspect_model

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = inspect_model(str(sd_layouts["sdxl"][0]))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert report["components"][0]["parameters"] > 2.5e9
    assert grown_mb < 200


def test_tiny_pipeline_folder_and_component_folder(capsys, tiny_pipeline_dir):
    full = inspect_json(capsys, tiny_pipeline_dir)
    assert {c["name"] for c in full["components"]} >= {"unet", "vae", "text_encoder"}
    assert full["counts"] == {"value": 6, "ffn": 6}  # 2 down + 1 mid + 3 up
    unet_only = inspect_json(capsys, tiny_pipeline_dir / "unet")
    assert [x["name"] for x in unet_only["layers"]] == [x["name"] for x in full["layers"]]
    assert unet_only["kind"] == "component"


def test_variant_and_sharded_files(capsys, tiny_pipeline_dir, tmp_path):
    import shutil

    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet")
    unet.save_pretrained(tmp_path / "sharded", max_shard_size="200KB", safe_serialization=True)
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    a = inspect_json(capsys, tmp_path / "sharded")
    b = inspect_json(capsys, tiny_pipeline_dir / "unet")
    assert a["components"][0]["parameters"] == b["components"][0]["parameters"]
    assert a["counts"] == b["counts"]
    # an fp16 variant next to the full-precision files is chosen only when asked for
    shutil.copytree(tiny_pipeline_dir / "unet", tmp_path / "v")
    unet.half().save_pretrained(tmp_path / "v", variant="fp16", safe_serialization=True)
    assert set(inspect_json(capsys, tmp_path / "v")["components"][0]["dtypes"]) == {"F32"}
    rc = main(["inspect", str(tmp_path / "v"), "--variant", "fp16", "--json"])
    assert rc == 0
    assert set(json.loads(capsys.readouterr().out)["components"][0]["dtypes"]) == {"F16"}


def test_tokenizer_layouts_load(tiny_pipeline_dir, tmp_path):
    """Both tokenizer layouts are real: vocab.json + merges.txt, and tokenizer.json alone."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    slow = CLIPTokenizer.from_pretrained(tiny_pipeline_dir / "tokenizer")
    fast = CLIPTokenizerFast.from_pretrained(tiny_pipeline_dir / "tokenizer")
    fast.save_pretrained(tmp_path / "fast")
    for f in ("vocab.json", "merges.txt"):
        (tmp_path / "fast" / f).unlink(missing_ok=True)
    only_json = CLIPTokenizerFast.from_pretrained(tmp_path / "fast")
    ids = slow("a cat").input_ids
    assert ids == fast("a cat").input_ids == only_json("a cat").input_ids
