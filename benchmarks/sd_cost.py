"""What each step of the README's SD 1.x walkthrough costs, measured on a random-weight Stable
Diffusion 1.5 pipeline of the real size (UNet from memedit/model/configs/sd15_unet.json, a CLIP
ViT-L/14-shaped text encoder with the real CLIP vocabulary, the SD VAE) at 512 px (issue: eval).

Random weights cost the same FLOPs as trained ones, so the times hold for a real checkpoint on the
same machine; the numbers of oracle calls per prompt come from the method (NeMo's search) and are
given as ranges. Per step: wall time of one calibration batch (detection score + value statistics +
FFN usage over the first 10 UNet calls, n=4 latents), one detection batch, one oracle call of the
NeMo search (one UNet call on 4 latents), and one generation (50 DDIM steps, guidance) per image.
`--text-only` times only the localizers that need no UNet call, `--method remap` and `--method encoder`
(text-encoder passes over the target and hold-out prompts, then one closed-form solve), on 32 + 32
prompts, and writes results/sd_cost_text.json.

    python benchmarks/sd_cost.py [--device cpu|cuda] [--dtype float32|float16] [--batch 1] [--text-only]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from memedit._quiet import quiet_libraries


def timed(fn, warm_up: bool) -> float:
    """Wall time of one call. On a GPU a first call also pays kernel selection and allocator growth,
    so it runs once untimed there; on a CPU the first call costs what every call costs."""
    if warm_up:
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--batch", type=int, default=1, help="prompts per calibration batch")
    ap.add_argument("--gen-steps", type=int, default=5, help="DDIM steps timed (scaled to 50)")
    ap.add_argument("--text-only", action="store_true", help="time the UNet-free localizers only")
    args = ap.parse_args()
    quiet_libraries()
    if args.text_only:
        text_only(args)
        return
    from memedit.calibrate import CalibSettings, _run_batch
    from memedit.detect import DetectSettings, score_prompts
    from memedit.model.cond import encode
    from memedit.model.load import prepare_for_tracing
    from memedit.trace import ValueMaps, ffn_layer_names, value_layer_names

    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    pipe = common.sd15_pipeline(dtype, args.device)
    prepare_for_tracing(pipe.unet)
    build_s = time.perf_counter() - t0
    prompts = [f"a photo of item {i} on a table" for i in range(args.batch)]
    det = DetectSettings(batch_size=args.batch)
    settings = CalibSettings(detect=det, ffn_steps=10)
    values, ffns = value_layer_names(pipe.unet), ffn_layer_names(pipe.unet)
    maps = ValueMaps.of(pipe.unet, values)
    sizes = {n: pipe.unet.get_submodule(n).in_features for n in ffns}
    empty = encode(pipe, [""])
    warm = args.device != "cpu"
    with torch.no_grad():
        calib_s = timed(lambda: _run_batch(pipe, prompts, settings, maps, ffns, sizes, empty, trace_ffn=True), warm)
        detect_s = timed(lambda: score_prompts(pipe, prompts, det, empty), warm)
        oracle_s = timed(lambda: score_prompts(pipe, prompts[:1], det, empty), warm)
        gen_s = timed(
            lambda: pipe(prompts[:1], num_inference_steps=args.gen_steps, guidance_scale=7.5, output_type="np"), warm
        )
    per_image_50 = gen_s * 50 / args.gen_steps
    rows = [
        {"step": "build random SD 1.5 pipeline", "seconds": build_s, "per": "once"},
        {
            "step": "calibrate (detect + value stats + FFN usage, 10 UNet calls)",
            "seconds": calib_s / args.batch,
            "per": "prompt",
        },
        {"step": "detect (K=1, n=4)", "seconds": detect_s / args.batch, "per": "prompt"},
        {"step": "NeMo oracle call (1 UNet call, 4 latents)", "seconds": oracle_s, "per": "call"},
        {"step": "generate 512 px, 50 DDIM steps, guidance 7.5", "seconds": per_image_50, "per": "image"},
    ]
    common.table(rows, ["step", "seconds", "per"])
    print(
        f"\nwalkthrough, 500 memorized + 500 hold-out prompts on this machine ({args.device}, {args.dtype}):\n"
        f"  calibrate: {1000 * calib_s / args.batch / 3600:.1f} h; "
        f"detect only: {1000 * detect_s / args.batch / 3600:.1f} h\n"
        f"  NeMo localize: {oracle_s:.1f} s per oracle call; a prompt takes at most 16 search rounds + 7 layer "
        f"checks + one call per candidate neuron\n"
        f"  eval, 10 seeds x 500 prompts x 2 models: {10000 * per_image_50 / 3600:.0f} h"
    )
    common.write(
        "sd_cost",
        {
            "rows": rows,
            "device": args.device,
            "dtype": args.dtype,
            "batch": args.batch,
            "gen_steps_timed": args.gen_steps,
            "note": "random weights of the real size; times per prompt / call / image",
        },
    )


def text_only(args) -> None:
    """`localize --method remap` and `--method encoder` at the real size: their whole cost is text-encoder
    passes over the target and hold-out prompts plus one solve (remap: 768 wide, then W (M - I) for all
    32 key and value maps; encoder: 3,072 wide)."""
    from memedit.localize.encoder import EncoderSettings, fc2_delta, readouts
    from memedit.localize.remap import RemapSettings, deltas
    from memedit.trace import value_layer_names

    pipe = common.sd15_pipeline(getattr(torch, args.dtype), args.device)
    targets = [f"a photo of item {i} on a table" for i in range(32)]
    hold = [f"a drawing of a {c} house number {i}" for c in ("red", "blue") for i in range(16)]
    (readout,) = readouts(pipe)
    warm = args.device != "cpu"
    values = value_layer_names(pipe.unet)
    with torch.no_grad():
        remap_s = timed(lambda: deltas(pipe, values, targets, hold, RemapSettings()), warm)
        encoder_s = timed(lambda: fc2_delta(pipe, readout, targets, hold, EncoderSettings()), warm)
    n = len(targets) + len(hold)
    rows = [
        {"step": f"localize --method {m} ({n} prompts, one solve)", "seconds": s, "per_prompt": s / n}
        for m, s in (("remap", remap_s), ("encoder", encoder_s))
    ]
    common.table(rows, ["step", "seconds", "per_prompt"])
    print(
        f"\nwalkthrough, 500 memorized + 500 hold-out prompts ({args.device}, {args.dtype}): "
        + ", ".join(f"{r['step'].split(' (')[0]} ~{1000 * r['per_prompt'] / 60:.1f} min" for r in rows)
    )
    common.write("sd_cost_text", {"rows": rows, "device": args.device, "dtype": args.dtype, "prompts": n})


if __name__ == "__main__":
    main()
