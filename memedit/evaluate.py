"""`memedit eval BASE EDITED`: the same seeds on both models, measured and shown side by side.

Per prompt: SSIM to the reference image where one is given (memorized prompts), reproduction
(majority of seeds at SSIM >= 0.7), the detection score before and after, seed-to-seed diversity,
and for prompts without a reference the base-vs-edited SSIM (preservation). Writes metrics.json,
report.md, a self-contained report.html (images embedded) and grid.png (rows = prompts, columns =
reference | base seeds | edited seeds). The grid is composed with Pillow: exact pixels, no plotting
library resampling the 32 px generations.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memedit.detect import DetectSettings, score_all
from memedit.errors import MemeditError
from memedit.generate import GenSettings, diversity, generate, load_image, reproduction, ssim
from memedit.io import atomic_dir, write_json

GRID_SCALE = 3  # 32 px generations are shown at 96 px


@dataclass(frozen=True)
class EvalPrompt:
    prompt: str
    reference: str | None  # file name inside the references folder
    memorized: bool | None
    kind: str | None = None  # verbatim | template | none, from a `kind` field


def read_eval_prompts(path: Path | str, references: Path | None) -> list[EvalPrompt]:
    from memedit.prompts import load_prompts

    pset = load_prompts(path)
    images: list[str | None] = [None] * len(pset)
    kinds: list[str | None] = [None] * len(pset)
    if Path(path).suffix == ".jsonl":
        rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        images = [r.get("image") if isinstance(r.get("image"), str) else None for r in rows]
        kinds = [r.get("kind") if isinstance(r.get("kind"), str) else None for r in rows]
    if any(images) and references is None:
        raise MemeditError(
            f"{path} names reference images but no --references folder was given",
            "pass --references DIR with those images",
        )
    if references is not None:
        for im in images:
            if im and not (references / im).is_file():
                raise MemeditError(
                    f"reference image {references / im} is missing",
                    "check --references and the 'image' fields of the prompt file",
                )
    return [EvalPrompt(p, im, lab, k) for p, im, lab, k in zip(pset.prompts, images, pset.labels, kinds, strict=True)]


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def compose_grid(rows: list[tuple[np.ndarray | None, np.ndarray, np.ndarray]], scale: int = GRID_SCALE) -> np.ndarray:
    """rows of (reference or None, base seeds (S,H,W,3), edited seeds (S,H,W,3)) -> one uint8 image."""
    s, h, w, _ = rows[0][1].shape
    gap = 2
    cols = 1 + 2 * s
    out = np.full((len(rows) * (h + gap), cols * (w + gap) + gap * 6, 3), 255, dtype=np.uint8)
    for r, (ref, base, edited) in enumerate(rows):
        y = r * (h + gap)
        tiles = [ref if ref is not None else np.full((h, w, 3), 235, np.uint8), *base, *edited]
        for c, tile in enumerate(tiles):
            x = c * (w + gap) + (gap * 3 if c > s else 0) + (gap * 3 if c > 0 else 0)
            out[y : y + h, x : x + w] = tile
    return out.repeat(scale, axis=0).repeat(scale, axis=1)


def evaluate(
    base: str,
    edited: str,
    prompts: str | Path,
    references: str | Path | None,
    out_dir: str | Path,
    settings: GenSettings | None = None,
    detect: DetectSettings | None = None,
    overwrite: bool = False,
    progress=None,
    max_grid_rows: int = 32,
) -> dict:
    from memedit.model.load import load_pipeline
    from memedit.model.ref import require_dir, resolve

    settings = settings or GenSettings()
    detect = detect or DetectSettings()
    refs_dir = require_dir(Path(references), "references folder") if references else None
    items = read_eval_prompts(prompts, refs_dir)
    texts = [i.prompt for i in items]
    pipes = {"base": load_pipeline(resolve(base)), "edited": load_pipeline(resolve(edited))}
    total = 2 * len(texts) * len(settings.seeds)
    done = [0]

    def tick(k: int) -> None:
        done[0] += k
        if progress:
            progress(done[0], total)

    images = {name: generate(p, texts, settings, tick) for name, p in pipes.items()}
    scores = {name: score_all(p, texts, detect).scores for name, p in pipes.items()}
    rows = []
    for i, item in enumerate(items):
        row = {
            "prompt": item.prompt,
            "reference": item.reference,
            "memorized": item.memorized,
            "score_base": float(scores["base"][i]),
            "score_edited": float(scores["edited"][i]),
            "diversity_base": diversity(images["base"][i]),
            "diversity_edited": diversity(images["edited"][i]),
        }
        if item.reference:
            ref = load_image(refs_dir / item.reference)
            for name in ("base", "edited"):
                rep, sc = reproduction(images[name][i], ref)
                row[f"ssim_ref_{name}"] = float(np.mean(sc))
                row[f"reproduces_{name}"] = rep
        else:
            row["ssim_base_vs_edited"] = float(
                np.mean([ssim(a, b) for a, b in zip(images["base"][i], images["edited"][i], strict=True)])
            )
        rows.append(row)
    with_ref = [r for r in rows if r["reference"]]
    without = [r for r in rows if not r["reference"]]
    summary = {
        "prompts": len(rows),
        "with_reference": len(with_ref),
        "reproduction_rate_base": float(np.mean([r["reproduces_base"] for r in with_ref])) if with_ref else None,
        "reproduction_rate_edited": float(np.mean([r["reproduces_edited"] for r in with_ref])) if with_ref else None,
        "ssim_ref_base": float(np.mean([r["ssim_ref_base"] for r in with_ref])) if with_ref else None,
        "ssim_ref_edited": float(np.mean([r["ssim_ref_edited"] for r in with_ref])) if with_ref else None,
        "preservation_ssim": float(np.mean([r["ssim_base_vs_edited"] for r in without])) if without else None,
        "score_base_mean": float(np.mean(scores["base"])),
        "score_edited_mean": float(np.mean(scores["edited"])),
    }
    metrics = {
        "base": base,
        "edited": edited,
        "prompts_file": str(prompts),
        "settings": {
            "seeds": list(settings.seeds),
            "steps": settings.steps,
            "guidance": settings.guidance,
            "detect_k": detect.k,
            "detect_generations": detect.generations,
        },
        "summary": summary,
        "per_prompt": rows,
    }
    grid_rows = [
        (load_image(refs_dir / it.reference) if it.reference else None, images["base"][i], images["edited"][i])
        for i, it in enumerate(items)
    ][:max_grid_rows]
    grid = _png(compose_grid(grid_rows))
    with atomic_dir(Path(out_dir), overwrite=overwrite) as tmp:
        (tmp / "grid.png").write_bytes(grid)
        metrics["grid_sha256"] = hashlib.sha256(grid).hexdigest()
        write_json(tmp / "metrics.json", metrics)
        (tmp / "report.md").write_text(render_markdown(metrics), encoding="utf-8")
        (tmp / "report.html").write_text(render_html(metrics, grid), encoding="utf-8")
    return metrics


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


SUMMARY_LABELS = {
    "reproduction_rate_base": "reproduction rate, base",
    "reproduction_rate_edited": "reproduction rate, edited",
    "ssim_ref_base": "mean SSIM to reference, base",
    "ssim_ref_edited": "mean SSIM to reference, edited",
    "preservation_ssim": "preservation SSIM (base vs edited, no reference)",
    "score_base_mean": "detection score, base",
    "score_edited_mean": "detection score, edited",
}


def render_markdown(m: dict) -> str:
    s = m["summary"]
    lines = [
        f"# memedit evaluation\n\nbase: `{m['base']}`  \nedited: `{m['edited']}`  \nprompts: `{m['prompts_file']}`"
        f" ({s['prompts']}, {s['with_reference']} with a reference image), seeds {m['settings']['seeds']}\n",
        "| measure | value |",
        "|---|---|",
    ]
    lines += [f"| {label} | {_fmt(s[k])} |" for k, label in SUMMARY_LABELS.items()]
    lines += [
        "",
        "![grid](grid.png)",
        "",
        "Columns: reference | base seeds | edited seeds.",
        "",
        "| prompt | SSIM ref base | SSIM ref edited | base vs edited | score base | score edited |",
        "|---|---|---|---|---|---|",
    ]
    for r in m["per_prompt"]:
        lines.append(
            f"| {r['prompt'].replace('|', '/')} | {_fmt(r.get('ssim_ref_base'))} | "
            f"{_fmt(r.get('ssim_ref_edited'))} | {_fmt(r.get('ssim_base_vs_edited'))} | "
            f"{_fmt(r['score_base'])} | {_fmt(r['score_edited'])} |"
        )
    return "\n".join(lines) + "\n"


def render_html(m: dict, grid_png: bytes) -> str:
    s = m["summary"]
    b64 = base64.b64encode(grid_png).decode()
    summary = "".join(
        f"<tr><td>{html.escape(label)}</td><td>{_fmt(s[k])}</td></tr>" for k, label in SUMMARY_LABELS.items()
    )
    per = "".join(
        f"<tr><td>{html.escape(r['prompt'])}</td><td>{_fmt(r.get('ssim_ref_base'))}</td>"
        f"<td>{_fmt(r.get('ssim_ref_edited'))}</td><td>{_fmt(r.get('ssim_base_vs_edited'))}</td>"
        f"<td>{_fmt(r['score_base'])}</td><td>{_fmt(r['score_edited'])}</td></tr>"
        for r in m["per_prompt"]
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>memedit evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:3px 8px}}img{{image-rendering:pixelated}}</style></head><body>
<h1>memedit evaluation</h1>
<p>base: <code>{html.escape(m["base"])}</code><br>edited: <code>{html.escape(m["edited"])}</code></p>
<table><tr><th>measure</th><th>value</th></tr>{summary}</table>
<h2>Generations</h2><p>Columns: reference | base seeds | edited seeds.</p>
<img id="grid" alt="grid of generations" src="data:image/png;base64,{b64}">
<h2>Per prompt</h2>
<table><tr><th>prompt</th><th>SSIM ref base</th><th>SSIM ref edited</th><th>base vs edited</th>
<th>score base</th><th>score edited</th></tr>{per}</table>
</body></html>
"""
