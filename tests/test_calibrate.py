from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from memedit.calibrate import CalibSettings, _FfnUsage, calibrate, holdout_mean_std, load_stats
from memedit.detect import DetectSettings, score_prompts
from memedit.model.cond import encode
from memedit.model.load import load_pipeline
from memedit.model.ref import resolve
from memedit.trace import value_activations, value_layer_names

SETTINGS = CalibSettings(detect=DetectSettings(batch_size=3, generations=2), ffn_steps=2)


def cli_args(model: Path, prompt_files, out: Path) -> list[str]:
    """The calibrate command line equivalent to SETTINGS (for subprocess and torchrun tests)."""
    return [
        "calibrate",
        str(model),
        "--prompts",
        str(prompt_files[0]),
        "--holdout",
        str(prompt_files[1]),
        "-o",
        str(out),
        "--batch-size",
        "3",
        "--generations",
        "2",
        "--ffn-steps",
        "2",
        "--quiet",
        "--device",
        "cpu",
        "--dtype",
        "float32",
    ]


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    (d / "cal.jsonl").write_text(
        "".join(f'{{"prompt": "a red cat number {i}", "memorized": {str(i < 3).lower()}}}\n' for i in range(7))
    )
    (d / "hold.txt").write_text("\n".join(f"a blue dog in a field {i}" for i in range(11)) + "\n")
    return d / "cal.jsonl", d / "hold.txt"


@pytest.fixture(scope="module")
def stats_dir(tiny_pipeline_dir, prompt_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("stats") / "s"
    calibrate(str(tiny_pipeline_dir), prompt_files[0], prompt_files[1], out, SETTINGS)
    return out


def test_stats_contents_match_direct_computation(stats_dir, tiny_pipeline_dir, prompt_files):
    info, t = load_stats(stats_dir)
    pipe = load_pipeline(resolve(str(tiny_pipeline_dir)))
    layers = value_layer_names(pipe.unet)
    assert info["layers"]["value"] == layers
    hold = [f"a blue dog in a field {i}" for i in range(11)]
    acts = value_activations(pipe.unet, encode(pipe, hold), layers)
    for n in layers:
        mean, std = holdout_mean_std(t, n)
        torch.testing.assert_close(mean, acts[n].mean(0), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(std, acts[n].std(0), rtol=1e-4, atol=1e-7)
    cal = [f"a red cat number {i}" for i in range(7)]
    direct = value_activations(pipe.unet, encode(pipe, cal), layers)
    torch.testing.assert_close(t[f"prompts/value/{layers[0]}"], direct[layers[0]].float(), rtol=1e-5, atol=1e-6)
    # the detection score is the same function, on the same per-prompt latents
    res = score_prompts(pipe, cal[:3], SETTINGS.detect)
    torch.testing.assert_close(t["detect/scores"][:3], torch.from_numpy(res.scores), rtol=1e-5, atol=1e-6)
    assert info["labels"] == [True, True, True, False, False, False, False]
    assert t["detect/holdout_scores"].shape == (11,)
    # FFN usage: per prompt, per traced call, every unit; both CFG halves of 2 generations, unit-norm rows
    ffn = info["layers"]["ffn"][0]
    u = t[f"prompts/ffn/{ffn}"]
    assert u.shape[:2] == (7, 2) and torch.all(u >= 0)
    tokens = 8 * 8  # the tiny UNet's first block works on 8x8 latents
    torch.testing.assert_close(u.sum(-1), torch.full((7, 2), 2.0 * 2 * tokens), rtol=1e-4, atol=1e-3)
    assert t[f"ffn_reference/{ffn}"].shape == u.shape[1:]


def test_one_text_encoder_pass_per_batch(tiny_pipeline_dir):
    """A calibration batch encodes its prompts once, for the value statistics and the detection
    score alike, and gets the bits that encoding them separately for each gives."""
    from memedit.calibrate import _run_batch
    from memedit.model.cond import unconditional
    from memedit.trace import ValueMaps, ffn_layer_names, prompt_value_activations

    pipe = load_pipeline(resolve(str(tiny_pipeline_dir)))
    prompts = ["a red cat", "a blue dog", "a green bird"]
    maps, ffns = ValueMaps.of(pipe.unet, value_layer_names(pipe.unet)), ffn_layer_names(pipe.unet)
    sizes = {n: pipe.unet.get_submodule(n).in_features for n in ffns}
    empty = unconditional(pipe)
    calls: list[int] = []
    handle = pipe.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = _run_batch(pipe, prompts, SETTINGS, maps, ffns, sizes, empty, trace_ffn=True)
    finally:
        handle.remove()
    assert len(calls) == 1
    separate = score_prompts(pipe, prompts, SETTINGS.detect, empty)
    assert torch.equal(out["detect/scores"], torch.from_numpy(separate.scores))
    for name, act in prompt_value_activations(pipe, prompts, maps, torch.float32).items():
        assert torch.equal(out[f"value/{name}"], act)
    with pytest.raises(ValueError, match="one row set per prompt"):
        score_prompts(pipe, prompts, SETTINGS.detect, empty, prompt_emb=encode(pipe, prompts[:2]))


def test_wen_score_by_hand(tiny_pipeline_dir):
    """||eps(x, t, e_p) - eps(x, t, e_0)||_2 at the first DDIM step, mean over generations."""
    pipe = load_pipeline(resolve(str(tiny_pipeline_dir)))
    settings = DetectSettings(generations=2)
    res = score_prompts(pipe, ["a red cat"], settings)
    from memedit.detect import initial_latents, latent_shape

    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(50)
    t = sched.timesteps[0]
    x = initial_latents(["a red cat"], settings, latent_shape(pipe, None), torch.float32, torch.device("cpu"))
    with torch.no_grad():
        ec = pipe.unet(x, t, encoder_hidden_states=encode(pipe, ["a red cat"]).expand(2, -1, -1)).sample
        eu = pipe.unet(x, t, encoder_hidden_states=encode(pipe, [""]).expand(2, -1, -1)).sample
    expected = (ec - eu).flatten(1).norm(dim=1).mean().item()
    assert int(t) == 981 and res.timesteps == (981,)
    assert res.scores[0] == pytest.approx(expected, rel=1e-4)


def test_byte_identical_reruns(stats_dir, tiny_pipeline_dir, prompt_files, tmp_path):
    again = tmp_path / "again"
    calibrate(str(tiny_pipeline_dir), prompt_files[0], prompt_files[1], again, SETTINGS)
    assert sha(again / "stats.safetensors") == sha(stats_dir / "stats.safetensors")
    assert (again / "stats.json").read_text() == (stats_dir / "stats.json").read_text()


def test_interrupted_run_resumes_to_identical_stats(stats_dir, tiny_pipeline_dir, prompt_files, tmp_path):
    out = tmp_path / "resumed"
    calls = []

    def stop_after_two(kind, done, total):
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        calibrate(str(tiny_pipeline_dir), prompt_files[0], prompt_files[1], out, SETTINGS, progress=stop_after_two)
    assert not out.exists()
    partial = list(tmp_path.glob(".resumed.partial-*"))
    assert len(partial) == 1 and len(list(partial[0].glob("*.safetensors"))) == 2
    seen = []
    calibrate(
        str(tiny_pipeline_dir), prompt_files[0], prompt_files[1], out, SETTINGS, progress=lambda k, d, t: seen.append(d)
    )
    assert sha(out / "stats.safetensors") == sha(stats_dir / "stats.safetensors")
    assert not list(tmp_path.glob(".resumed.partial-*"))


def test_kill_9_then_same_command_continues(stats_dir, tiny_pipeline_dir, prompt_files, tmp_path):
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "memedit.cli",
        *cli_args(tiny_pipeline_dir, prompt_files, out),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not any(tmp_path.glob(".killed.partial-*/*.safetensors")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "stats.safetensors").exists()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    assert sha(out / "stats.safetensors") == sha(stats_dir / "stats.safetensors")


def test_existing_output_is_refused(stats_dir, tiny_pipeline_dir, prompt_files):
    from memedit.errors import MemeditError

    before = sha(stats_dir / "stats.safetensors")
    with pytest.raises(MemeditError, match="already exists"):
        calibrate(str(tiny_pipeline_dir), prompt_files[0], prompt_files[1], stats_dir, SETTINGS)
    assert sha(stats_dir / "stats.safetensors") == before


def test_shards_merge_to_the_single_run_bytes(stats_dir, tiny_pipeline_dir, prompt_files, tmp_path, capsys):
    from memedit.cli import main

    base = [
        str(tiny_pipeline_dir),
        "--prompts",
        str(prompt_files[0]),
        "--holdout",
        str(prompt_files[1]),
        "--batch-size",
        "3",
        "--generations",
        "2",
        "--ffn-steps",
        "2",
        "--quiet",
        "--dtype",
        "float32",
    ]
    for i in range(3):
        assert main(["calibrate", *base, "-o", str(tmp_path / f"s{i}"), "--shard", f"{i}/3"]) == 0
    assert main(["stats", "merge", *(str(tmp_path / f"s{i}") for i in (2, 0, 1)), "-o", str(tmp_path / "m")]) == 0
    assert sha(tmp_path / "m" / "stats.safetensors") == sha(stats_dir / "stats.safetensors")
    rc = main(["stats", "merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "-o", str(tmp_path / "m2")])
    assert rc == 2 and "exactly once" in capsys.readouterr().err
    assert main(["calibrate", *base, "-o", str(tmp_path / "x"), "--shard", "3/3"]) == 2


def test_torchrun_two_cpu_processes_match_the_single_process(stats_dir, tiny_pipeline_dir, prompt_files, tmp_path):
    out = tmp_path / "dist"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "memedit.cli",
        *cli_args(tiny_pipeline_dir, prompt_files, out),
    ]
    # torchrun defaults to 1 thread per process; CPU results depend on the thread count, so match ours
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    from safetensors.torch import load_file

    a, b = load_file(out / "stats.safetensors"), load_file(stats_dir / "stats.safetensors")
    assert set(a) == set(b)
    for k in a:  # the issue asks for 1e-6 relative; the assembly is shared, so it is exact
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=0)
    assert sha(out / "stats.safetensors") == sha(stats_dir / "stats.safetensors")


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
