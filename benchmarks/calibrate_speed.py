"""Calibration speed and memory on the lab model (issue: calibration engine).

1. prompts/s of one calibration batch loop (value statistics + detection + FFN tracing over the
   traced UNet calls) against bare UNet forward passes of the same batch, steps and dtype, timed in
   the same run: ratio = bare / traced (target >= 0.9).
2. value-only statistics against a bare text-encoder forward of the same prompts (target >= 0.9),
   next to its FLOP ceiling: text-encoder FLOPs / (text-encoder + value-projection FLOPs), counted
   by torch's FlopCounterMode, for the lab and (on the meta device, no weights) for SD 1.5. The value
   projection is a real matrix product that no algebra removes (NeMo takes |.| per token before the
   mean), so the ratio cannot exceed that ceiling by more than the encoder's non-FLOP overhead.
3. peak RSS of a whole `memedit calibrate` for 200 vs 2,000 prompts (target: equal within 10%),
   one detection latent per prompt, FFN usage traced over --ffn-steps UNet calls.

    python benchmarks/calibrate_speed.py [--ffn-steps 10] [--skip-rss]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from memedit._quiet import quiet_libraries


def median_times(fns: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each function, the functions taking turns in every round so that a slow
    spell of a shared machine hits all of them alike."""
    for fn in fns.values():
        fn()  # warm-up
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in ts.items()}


def flop_ceiling(text_encoder, unet) -> dict[str, float]:
    """FLOPs of one prompt (77 tokens) through the text encoder and through the value projections."""
    from torch.utils.flop_counter import FlopCounterMode

    from memedit.trace import value_activations, value_layer_names

    ids = torch.zeros(1, text_encoder.config.max_position_embeddings, dtype=torch.long, device=text_encoder.device)
    with torch.no_grad(), FlopCounterMode(display=False) as text:
        emb = text_encoder(ids)[0]
    with FlopCounterMode(display=False) as value:
        value_activations(unet, emb.to(unet.dtype), value_layer_names(unet))
    t, v = text.get_total_flops(), value.get_total_flops()
    return {"text_encoder_flops": t, "value_flops": v, "ceiling": t / (t + v)}


def sd15_flop_ceiling() -> dict[str, float]:
    """The same count for SD 1.5 (CLIP ViT-L/14 text encoder, the SD 1.5 UNet config) without weights."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = Path(__file__).resolve().parent.parent
    with torch.device("meta"):
        text = CLIPTextModel(
            CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        )
        unet = UNet2DConditionModel.from_config(json.loads((root / "memedit/model/configs/sd15_unet.json").read_text()))
    return flop_ceiling(text, unet)


def rss_run(n: int, work: Path, ffn_steps: int) -> float:
    from memedit.lab import data as labdata

    prompts = work / f"p{n}.txt"
    scenes = labdata.scene_pool(n, seed=12345)
    prompts.write_text("\n".join(s.caption for s in scenes) + "\n")
    out = work / f"stats{n}"
    cmd = [
        "/usr/bin/time",
        "-f",
        "%M",
        sys.executable,
        "-m",
        "memedit.cli",
        "calibrate",
        "lab",
        "--prompts",
        str(prompts),
        "-o",
        str(out),
        "--overwrite",
        "--quiet",
        "--ffn-steps",
        str(ffn_steps),
        "--batch-size",
        "32",
        # one latent per prompt keeps the 2,000-prompt run short; memory per prompt (the stored value
        # and FFN statistics) does not depend on it
        "--generations",
        "1",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(p.stderr.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ffn-steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--skip-rss", action="store_true")
    args = ap.parse_args()
    quiet_libraries()
    from memedit.calibrate import CalibSettings, _run_batch
    from memedit.detect import DetectSettings, encode
    from memedit.lab.check import lab_dir, read_prompts
    from memedit.model.load import load_pipeline
    from memedit.model.ref import resolve
    from memedit.trace import ffn_layer_names, value_activations, value_layer_names

    pipe = load_pipeline(resolve("lab"))
    prompts = [r["prompt"] for r in read_prompts(lab_dir() / "prompts" / "holdout.jsonl")][: args.batch_size]
    det = DetectSettings(batch_size=args.batch_size)
    settings = CalibSettings(detect=det, ffn_steps=args.ffn_steps)
    values, ffns = value_layer_names(pipe.unet), ffn_layer_names(pipe.unet)
    sizes = {n: pipe.unet.get_submodule(n).in_features for n in ffns}
    empty = encode(pipe, [""])
    calls = max(det.k, args.ffn_steps)
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(det.schedule_steps)
    n = det.generations
    size = pipe.unet.config.sample_size

    def bare_unet() -> None:
        with torch.no_grad():
            e = encode(pipe, prompts).repeat_interleave(n, 0)
            x = torch.randn(len(prompts) * n, pipe.unet.config.in_channels, size, size)
            for t in sched.timesteps[:calls]:
                pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([empty.expand_as(e), e]))

    def traced() -> None:
        _run_batch(pipe, prompts, settings, values, ffns, sizes, empty, trace_ffn=True)

    def bare_text() -> None:
        with torch.no_grad():
            encode(pipe, prompts)

    def value_only() -> None:
        value_activations(pipe.unet, encode(pipe, prompts), values)

    t = {
        **median_times({"bare_unet": bare_unet, "traced": traced}, 7),
        **median_times({"bare_text": bare_text, "value_only": value_only}, 31),
    }
    ceilings = {"lab": flop_ceiling(pipe.text_encoder, pipe.unet), "sd15": sd15_flop_ceiling()}
    rows = [
        {
            "measure": f"calibration batch ({len(prompts)} prompts, {calls} UNet calls, n={n})",
            "prompts_per_s": len(prompts) / t["traced"],
            "ratio_bare_over_ours": t["bare_unet"] / t["traced"],
            "target": ">= 0.9",
        },
        {
            "measure": "value-only statistics vs text encoder",
            "prompts_per_s": len(prompts) / t["value_only"],
            "ratio_bare_over_ours": t["bare_text"] / t["value_only"],
            "target": ">= 0.9",
            "flop_ceiling": ceilings["lab"]["ceiling"],
        },
    ]
    common.table(rows, ["measure", "prompts_per_s", "ratio_bare_over_ours", "target", "flop_ceiling"])
    print(
        "value-only FLOP ceiling: lab {:.3f}, SD 1.5 {:.3f} (text encoder / (text encoder + value projections))".format(
            ceilings["lab"]["ceiling"], ceilings["sd15"]["ceiling"]
        )
    )
    rss = {}
    if not args.skip_rss:
        with tempfile.TemporaryDirectory() as d:
            for count in (200, 2000):
                rss[count] = rss_run(count, Path(d), args.ffn_steps)
        print(
            f"peak RSS: 200 prompts {rss[200]:.0f} MB, 2,000 prompts {rss[2000]:.0f} MB, "
            f"ratio {rss[2000] / rss[200]:.3f} (target <= 1.10)"
        )
    carried = False
    previous = common.RESULTS / "calibrate_speed.json"
    if not rss and previous.is_file():  # --skip-rss: keep the last measured RSS, marked as such
        rss = json.loads(previous.read_text()).get("peak_rss_mb", {})
        carried = bool(rss)
    common.write(
        "calibrate_speed",
        {
            "seconds": t,
            "rows": rows,
            "flop_ceiling": ceilings,
            "peak_rss_mb": rss,
            "peak_rss_from_previous_run": carried,
            "settings": json.loads(json.dumps(settings.to_json())),
        },
    )


if __name__ == "__main__":
    main()
