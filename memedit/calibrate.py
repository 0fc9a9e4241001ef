"""Calibration: run prompts through a model and collect what localization and detection need.

Per batch of prompts, in one place, from one text-encoder pass:
- value-neuron activations of every `attn2.to_v` (NeMo: mean |to_v(e)| over token positions), from
  the text-encoder output alone (no UNet pass);
- the Wen et al. detection score from the first K denoising steps (`detect.score_prompts`), and in
  the same UNet calls the FFN usage of every transformer block for the first `ffn_steps` calls
  (Chavhan et al.: each row of the GEGLU output scaled to unit norm, squares summed over rows and
  both CFG halves), per prompt and for the empty reference prompt.

Hold-out prompts give per-neuron float64 moments and the detection threshold at a target FPR;
calibration prompts keep per-prompt values. Every finished batch is saved under a partial folder
keyed by the digests of model, prompt files and settings, so a killed run continues where it
stopped; the final `stats.safetensors` + `stats.json` are assembled by streaming batch files
(memory stays flat in the number of prompts) and renamed into place atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from memedit import __version__
from memedit.detect import DetectSettings, score_prompts, threshold_at_fpr
from memedit.errors import MemeditError
from memedit.io import StreamingWriter, atomic_dir, save_tensors, sha256_file, write_errors, write_json
from memedit.model.cond import encode, unconditional
from memedit.model.index import index_model
from memedit.model.load import load_pipeline, pick_device, pick_dtype
from memedit.model.ref import ModelRef, resolve
from memedit.prompts import PromptSet, holdout_file, load_prompts
from memedit.stats import Moments
from memedit.trace import Tracer, ValueMaps, conditioning_value_activations, ffn_layer_names, value_layer_names

STATS_SCHEMA = "memedit.stats/v1"
SHARD_SCHEMA = "memedit.stats-shard/v1"


@dataclass(frozen=True)
class CalibSettings:
    detect: DetectSettings = dataclasses.field(default_factory=DetectSettings)
    ffn_steps: int = 10  # UNet calls traced for FFN usage (T_u of the subspace method); 0 = off
    fpr: float = 0.01  # target false-positive rate of the detection threshold on hold-out prompts
    dtype: str = "float32"
    device: str = "cpu"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CalibResult:
    out_dir: Path
    prompts: int
    holdout: int
    flagged: int
    threshold: float


def model_digests(ref: ModelRef) -> dict[str, str]:
    """sha256 of every weight file the model is read from, by path relative to the model."""
    index = index_model(ref)
    base = ref.path if ref.path.is_dir() else ref.path.parent
    files = sorted({f for c in index.components for f in c.files})
    return {str(f.relative_to(base)): sha256_file(f) for f in files}


def _run_key(digests: dict, cal: PromptSet, hold: PromptSet, settings: CalibSettings) -> str:
    """What a resumable run and its shards are keyed on: model, prompt files, settings, versions."""
    parts = {
        "model": digests,
        "prompts": cal.sha256,
        "holdout": hold.sha256,
        "settings": settings.to_json(),
        "memedit": __version__,
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class _FfnUsage:
    """Pre-hooks on ff.net.2 accumulating per-prompt, per-call usage sums (float64)."""

    def __init__(
        self,
        layers: list[str],
        steps: int,
        batch: int,
        generations: int,
        sizes: dict[str, int],
        device: torch.device | str = "cpu",
    ) -> None:
        self.layers, self.steps, self.b, self.n = layers, steps, batch, generations
        self.call = -1
        # sums stay on the model's device: a copy to the host per layer and call would stall a GPU
        self.acc = {n: torch.zeros(batch, steps, sizes[n], dtype=torch.float64, device=device) for n in layers}

    def on_call(self, k: int, t: int, b: int) -> None:
        self.call = k

    def hook(self, name: str, module, inputs, _out) -> None:
        if self.call >= self.steps:
            return
        h = inputs[0]  # (rows = 2 * b * n, tokens, inner), in the model's dtype
        # Unit-norm tokens in the model's dtype (squares of values <= 1 cannot overflow float16), summed
        # over tokens with float32 accumulation: no float32 copy of the activations is made. On a GPU
        # float32 copies moved more bytes than the layer itself (calibrate_speed --model sd15). A
        # norm along the tokens would save one more pass but is 15x slower on CPU (strided reduction).
        inv = torch.linalg.vector_norm(h, dim=-1, keepdim=True, dtype=torch.float32).clamp_min(1e-12).reciprocal()
        u = h * inv.to(h.dtype)
        per_row = (u * u).sum(dim=1, dtype=torch.float32).double()  # (2bn, inner)
        # [uncond block; cond block], each ordered prompt-major: both halves of prompt i go to row i
        per_prompt = per_row.reshape(2, self.b, self.n, -1).sum(dim=(0, 2))
        self.acc[name][:, self.call] += per_prompt


def _batches(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _value_batch(pipe, emb: torch.Tensor, maps: ValueMaps) -> dict[str, torch.Tensor]:
    """The value statistics of one batch from its `encode` output: (prompts, neurons) float32 per layer."""
    return {f"value/{n}": a for n, a in conditioning_value_activations(pipe.unet, emb, maps, torch.float32).items()}


@torch.no_grad()
def _run_batch(
    pipe,
    prompts: list[str],
    settings: CalibSettings,
    maps: ValueMaps,
    ffns: list[str],
    sizes: dict[str, int],
    empty: torch.Tensor,
    trace_ffn: bool,
) -> dict[str, torch.Tensor]:
    det = settings.detect
    emb = encode(pipe, prompts)
    out = _value_batch(pipe, emb, maps)
    if trace_ffn and ffns and settings.ffn_steps > 0:
        usage = _FfnUsage(ffns, settings.ffn_steps, len(prompts), det.generations, sizes, pipe.unet.device)
        with Tracer(pipe.unet, ffns, on_input=usage.hook):
            res = score_prompts(
                pipe, prompts, det, empty, on_call=usage.on_call, calls=settings.ffn_steps, prompt_emb=emb
            )
        out.update({f"ffn/{n}": usage.acc[n].float().cpu() for n in ffns})
    else:
        res = score_prompts(pipe, prompts, det, empty, prompt_emb=emb)
    out["detect/scores"] = torch.from_numpy(res.scores)
    out["detect/per_step"] = torch.from_numpy(res.per_step)
    out["detect/timesteps"] = torch.tensor(res.timesteps, dtype=torch.int64)
    return out


def _reference_usage(
    pipe, settings: CalibSettings, ffns: list[str], sizes: dict[str, int], empty: torch.Tensor
) -> dict[str, torch.Tensor]:
    """FFN usage of the empty prompt (the subspace method's reference B), one pass."""
    if not ffns or settings.ffn_steps <= 0:
        return {}
    usage = _FfnUsage(ffns, settings.ffn_steps, 1, settings.detect.generations, sizes, pipe.unet.device)
    with torch.no_grad(), Tracer(pipe.unet, ffns, on_input=usage.hook):
        score_prompts(pipe, [""], settings.detect, empty, on_call=usage.on_call, calls=settings.ffn_steps)
    return {f"ffn_reference/{n}": usage.acc[n][0].cpu() for n in ffns}


def calibrate(
    model: str,
    prompts: str | Path,
    holdout: str | Path | None,
    out_dir: str | Path,
    settings: CalibSettings = CalibSettings(),
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    shard: tuple[int, int] | None = None,
) -> CalibResult:
    """Run calibration; returns where the stats were written. Resumes an interrupted identical run.

    With `shard=(i, n)` only every n-th batch (starting at i) runs and OUT becomes a shard folder;
    `merge_shards` assembles the shards into stats byte-identical to a single run."""
    if shard is not None and not (shard[1] >= 1 and 0 <= shard[0] < shard[1]):
        raise MemeditError(f"invalid shard {shard[0]}/{shard[1]}", "use --shard i/n with 0 <= i < n")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise MemeditError(f"{out_dir} already exists and is not empty", "choose another -o or pass --overwrite")
    ref = resolve(model)
    cal = load_prompts(prompts)
    hold = load_prompts(
        holdout_file(
            holdout,
            ref,
            fix="pass --holdout FILE with non-memorized prompts (hold-out statistics and the "
            "detection threshold come from it)",
        )
    )
    if len(hold) < 2:
        raise MemeditError(f"hold-out file {hold.path} has {len(hold)} prompt", "give at least 2 (hundreds is better)")
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    settings = dataclasses.replace(settings, device=device.type, dtype=str(dtype).removeprefix("torch."))
    digests = model_digests(ref)
    key = _run_key(digests, cal, hold, settings)
    partial = out_dir.parent / f".{out_dir.name}.partial-{key[:16]}"
    torch.manual_seed(settings.detect.seed)
    pipe = load_pipeline(ref, dtype, device)  # fails on an unusable model before anything is written
    with write_errors(out_dir):
        partial.mkdir(parents=True, exist_ok=True)
        return _calibrate_into(
            pipe, ref, cal, hold, out_dir, partial, key, digests, settings, overwrite, progress, shard
        )


def _calibrate_into(
    pipe, ref, cal, hold, out_dir, partial, key, digests, settings, overwrite, progress, shard
) -> CalibResult:
    values, ffns = value_layer_names(pipe.unet), ffn_layer_names(pipe.unet)
    maps = ValueMaps.of(pipe.unet, values)  # stacked once for every batch
    sizes = {n: pipe.unet.get_submodule(n).in_features for n in ffns}
    empty = unconditional(pipe)
    jobs = [("holdout", hold, s, e) for s, e in _batches(len(hold), settings.detect.batch_size)]
    jobs += [("prompts", cal, s, e) for s, e in _batches(len(cal), settings.detect.batch_size)]
    all_jobs = jobs
    dist = _distributed()
    if dist is not None and shard is None:
        rank, world = dist
        jobs = [j for k, j in enumerate(jobs) if k % world == rank]  # data parallel over batches
    if shard is not None:
        jobs = [j for k, j in enumerate(jobs) if k % shard[1] == shard[0]]
    done = 0
    for kind, pset, s, e in jobs:
        path = partial / _job_name(kind, s, e)
        if not path.exists():
            tensors = _run_batch(
                pipe, list(pset.prompts[s:e]), settings, maps, ffns, sizes, empty, trace_ffn=kind == "prompts"
            )
            tmp = path.with_suffix(".tmp")
            save_tensors(tmp, tensors)
            tmp.replace(path)  # a batch file exists only when complete
        done += e - s
        if progress:
            progress(kind, done, len(hold) + len(cal))
    if dist is not None and shard is None:
        import torch.distributed as tdist

        tdist.barrier()  # every rank's batch files are in the shared partial folder
        if dist[0] != 0:
            tdist.barrier()  # rank 0 assembles; the others wait for the result
            info = json.loads((out_dir / "stats.json").read_text(encoding="utf-8"))
            det = info["detection"]
            return CalibResult(out_dir, len(cal), len(hold), len(det["flagged"]), det["threshold"])
        jobs = all_jobs
    ref_path = partial / "reference.safetensors"
    if not ref_path.exists():
        save_tensors(
            ref_path.with_suffix(".tmp"),
            _reference_usage(pipe, settings, ffns, sizes, empty) or {"empty": torch.zeros(1)},
        )
        ref_path.with_suffix(".tmp").replace(ref_path)

    if shard is not None:
        result = _write_shard(
            out_dir, partial, key, shard, ref, cal, hold, settings, values, ffns, sizes, jobs, all_jobs, overwrite
        )
    else:
        result = _assemble(out_dir, partial, ref, digests, cal, hold, settings, values, ffns, sizes, jobs, overwrite)
    shutil.rmtree(partial, ignore_errors=True)
    if dist is not None and shard is None:
        import torch.distributed as tdist

        tdist.barrier()
    return result


def _distributed() -> tuple[int, int] | None:
    """(rank, world size) under torchrun / accelerate launch, joining the process group if needed.

    Ranks split the batches; the result is assembled by rank 0 from every rank's batch files with the
    same code as a single process, so it is byte-identical to one (not merely close)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return tdist.get_rank(), tdist.get_world_size()


def _job_name(kind: str, s: int, e: int) -> str:
    return f"{kind}-{s:07d}-{e:07d}.safetensors"


def _write_shard(
    out_dir, partial, key, shard, ref, cal, hold, settings, values, ffns, sizes, jobs, all_jobs, overwrite
) -> CalibResult:
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        for kind, _, s, e in jobs:
            shutil.copyfile(partial / _job_name(kind, s, e), tmp / _job_name(kind, s, e))
        shutil.copyfile(partial / "reference.safetensors", tmp / "reference.safetensors")
        write_json(
            tmp / "shard.json",
            {
                "schema": SHARD_SCHEMA,
                "run_key": key,
                "shard": list(shard),
                "model": str(ref.path),
                "prompts": str(cal.path),
                "holdout": str(hold.path),
                "settings": settings.to_json(),
                "layers": {"value": values, "ffn": ffns},
                "ffn_sizes": sizes,
                "jobs": [_job_name(k, s, e) for k, _, s, e in jobs],
                "all_jobs": [_job_name(k, s, e) for k, _, s, e in all_jobs],
            },
        )
    return CalibResult(
        out_dir,
        sum(e - s for k, _, s, e in jobs if k == "prompts"),
        sum(e - s for k, _, s, e in jobs if k == "holdout"),
        0,
        float("nan"),
    )


def merge_shards(shards: list[str | Path], out_dir: str | Path, overwrite: bool = False) -> CalibResult:
    """Assemble shard folders of one calibration run into stats identical to a single-process run."""
    from memedit.model.ref import require_dir

    infos = []
    for d in shards:
        d = require_dir(Path(d), "shard folder")
        if not (d / "shard.json").is_file():
            raise MemeditError(f"{d} is not a calibration shard (no shard.json)", "pass folders written with --shard")
        infos.append((d, json.loads((d / "shard.json").read_text(encoding="utf-8"))))
    first = infos[0][1]
    if any(i["schema"] != SHARD_SCHEMA for _, i in infos):
        raise MemeditError("a shard has an unknown schema", "re-run the shards with this memedit version")
    if any(i["run_key"] != first["run_key"] for _, i in infos):
        raise MemeditError(
            "the shards come from different runs (model, prompts or settings differ)",
            "merge shards of one command that differ only in --shard",
        )
    n = first["shard"][1]
    got = sorted(i["shard"][0] for _, i in infos)
    if got != list(range(n)):
        raise MemeditError(
            f"shards {got} of {n} given; every shard 0..{n - 1} is needed exactly once", "pass all shard folders"
        )
    ref = resolve(first["model"])
    cal, hold = load_prompts(first["prompts"]), load_prompts(first["holdout"])
    settings = CalibSettings(**{**first["settings"], "detect": DetectSettings(**first["settings"]["detect"])})
    digests = model_digests(ref)
    key = _run_key(digests, cal, hold, settings)
    if key != first["run_key"]:
        raise MemeditError(
            "the model or prompt files changed since the shards were computed", "re-run the shards on the current files"
        )
    out_dir = Path(out_dir)
    partial = out_dir.parent / f".{out_dir.name}.merge-{key[:16]}"
    partial.mkdir(parents=True, exist_ok=True)
    try:
        for d, i in infos:
            for name in [*i["jobs"], "reference.safetensors"]:
                shutil.copyfile(d / name, partial / name)
        jobs = []
        for name in first["all_jobs"]:
            kind, s, e = name.removesuffix(".safetensors").split("-")
            jobs.append((kind, cal if kind == "prompts" else hold, int(s), int(e)))
        return _assemble(
            out_dir,
            partial,
            ref,
            digests,
            cal,
            hold,
            settings,
            first["layers"]["value"],
            first["layers"]["ffn"],
            first["ffn_sizes"],
            jobs,
            overwrite,
        )
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _assemble(
    out_dir: Path,
    partial: Path,
    ref: ModelRef,
    digests: dict,
    cal: PromptSet,
    hold: PromptSet,
    settings: CalibSettings,
    values: list[str],
    ffns: list[str],
    sizes: dict[str, int],
    jobs: list,
    overwrite: bool,
) -> CalibResult:
    files = {
        k: [partial / _job_name(kind, s, e) for kind, _, s, e in jobs if kind == k] for k in ("holdout", "prompts")
    }

    def read(path: Path, key: str) -> torch.Tensor:
        with safe_open(path, "pt") as f:
            return f.get_tensor(key)

    moments = {n: Moments.zeros(0) for n in values}
    hold_scores = []
    for p in files["holdout"]:
        with safe_open(p, "pt") as f:
            for n in values:
                m = Moments.zeros(f.get_slice(f"value/{n}").get_shape()[1])
                m.add(f.get_tensor(f"value/{n}"))
                moments[n] = m if moments[n].total.numel() == 0 else moments[n].merge(m)
            hold_scores.append(f.get_tensor("detect/scores"))
    hold_scores_t = torch.cat(hold_scores)
    threshold = threshold_at_fpr(hold_scores_t.numpy(), settings.fpr)
    scores = torch.cat([read(p, "detect/scores") for p in files["prompts"]])
    flagged = (scores > threshold).nonzero().flatten().tolist()
    timesteps = read(files["prompts"][0], "detect/timesteps").tolist()

    det = settings.detect
    P = len(cal)
    small: dict[str, torch.Tensor] = {
        "detect/scores": scores,
        "detect/holdout_scores": hold_scores_t,
        "detect/per_step": torch.cat([read(p, "detect/per_step") for p in files["prompts"]]),
    }
    for n in values:
        small.update(moments[n].state_dict(f"holdout/value/{n}/"))
    with safe_open(partial / "reference.safetensors", "pt") as f:
        small.update({k: f.get_tensor(k).double() for k in f.keys() if k != "empty"})  # noqa: SIM118
    streamed = [(f"prompts/value/{n}", torch.float32, (P, moments[n].total.numel())) for n in values]
    if settings.ffn_steps > 0:
        streamed += [(f"prompts/ffn/{n}", torch.float32, (P, settings.ffn_steps, sizes[n])) for n in ffns]
    entries = sorted([(k, v.dtype, tuple(v.shape)) for k, v in small.items()] + streamed)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        w = StreamingWriter(tmp / "stats.safetensors", entries)
        for key, _, _ in entries:
            if key in small:
                w.write(key, small[key])
                continue
            src = key.removeprefix("prompts/")
            for p in files["prompts"]:  # one batch file at a time: memory stays flat
                w.write(key, read(p, src))
        w.close()
        info = {
            "schema": STATS_SCHEMA,
            "memedit_version": __version__,
            "model": {"ref": str(ref), "path": str(ref.path), "kind": ref.kind, "files": digests},
            "prompt_files": {
                "prompts": {"path": str(cal.path), "sha256": cal.sha256, "count": len(cal)},
                "holdout": {"path": str(hold.path), "sha256": hold.sha256, "count": len(hold)},
            },
            "settings": settings.to_json(),
            "layers": {"value": values, "ffn": ffns},
            "prompts": list(cal.prompts),
            "labels": list(cal.labels),
            "detection": {
                "method": "wen2024-noise-diff",
                "k": det.k,
                "generations": det.generations,
                "schedule_steps": det.schedule_steps,
                "timesteps": timesteps,
                "fpr": settings.fpr,
                "threshold": threshold,
                "flagged": flagged,
            },
            "versions": {"torch": torch.__version__, "python": platform.python_version(), **_lib_versions()},
        }
        write_json(tmp / "stats.json", info)
    return CalibResult(out_dir, len(cal), len(hold), len(flagged), threshold)


def _lib_versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("diffusers", "transformers", "safetensors")}


def load_stats(stats_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(stats.json, lazily usable tensor dict) of a stats folder."""
    from memedit.model.ref import require_dir

    d = require_dir(Path(stats_dir), "stats folder")
    if not (d / "stats.json").is_file() or not (d / "stats.safetensors").is_file():
        raise MemeditError(f"{d} holds no stats.json + stats.safetensors", "run memedit calibrate first")
    info = json.loads((d / "stats.json").read_text(encoding="utf-8"))
    if info.get("schema") != STATS_SCHEMA:
        raise MemeditError(
            f"{d}/stats.json has schema {info.get('schema')!r}, expected {STATS_SCHEMA!r}",
            "re-run memedit calibrate with this version",
        )
    from safetensors.torch import load_file

    return info, load_file(d / "stats.safetensors")


def holdout_mean_std(tensors: dict[str, torch.Tensor], layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    m = Moments.from_state_dict(tensors, f"holdout/value/{layer}/")
    return m.mean, m.std
