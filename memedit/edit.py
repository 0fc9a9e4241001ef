"""Apply a recipe: stream the input tensor by tensor into an edited copy, atomically, with provenance.

Plan -> validate -> execute -> finalize. Every target tensor is checked (exists, 2-D, index range,
mask shape) before the first byte is written. Untouched files are copied byte-identical; a weight
file with an edited tensor is rewritten tensor by tensor (raw bytes for untouched tensors, so peak
memory is the largest edited tensor plus a buffer). Input digests are computed while reading and
checked against the recipe before the output is renamed into place: one read pass in total.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from memedit import recipe as recipes
from memedit.errors import MemeditError
from memedit.fill import FILLS, ZEROS, Fill, edit_positions, fill_values
from memedit.io import CHUNK, BackgroundHash, atomic_dir
from memedit.model.index import ModelIndex, TensorInfo, index_model
from memedit.model.ref import ModelRef, resolve
from memedit.model.safetensors_header import bits_view, nonzero, read_header

if TYPE_CHECKING:
    import numpy as np

# Editable weight formats. Zeroing is done on the raw bits (numpy), so apply imports torch only for
# `scale`, whose float rounding must be torch's (see _scaled).
EDITABLE_DTYPES = ("F64", "F32", "F16", "BF16")
PROVENANCE = "memedit.provenance.json"
RECIPE_COPY = "recipe.yaml"


@dataclass(frozen=True)
class TensorEdit:
    tensor: TensorInfo
    op: str  # zero_rows | zero_cols | scale | mask | add
    indices: tuple[int, ...] = ()
    factor: float | None = None
    mask: np.ndarray | None = field(default=None, compare=False)  # bool, the weight's shape
    edit_index: int = 0
    delta: np.ndarray | None = field(default=None, compare=False)  # float32, the weight's shape (add)


@dataclass(frozen=True)
class Plan:
    ref: ModelRef
    index: ModelIndex
    recipe: recipes.Recipe
    recipe_path: Path
    edits: tuple[TensorEdit, ...]
    overrides: dict
    fill: Fill = ZEROS

    def files_touched(self) -> list[Path]:
        return sorted({e.tensor.file for e in self.edits})

    def describe(self) -> list[str]:
        lines = []
        for e in self.edits:
            if e.op == "mask":
                what = f"{int(e.mask.sum())} elements"
            elif e.op == "add":
                what = f"{int((e.delta != 0).sum())} elements"
            else:
                what = f"{len(e.indices)} {'rows' if e.op in ('zero_rows', 'scale') else 'columns'}"
            lines.append(f"{e.op:9s} {what:>16s}  {e.tensor.key}  ({e.tensor.file.name})")
        return lines


def _model_files(ref: ModelRef) -> tuple[Path, list[Path]]:
    """(base folder, every file that belongs to the model), for copying and digests."""
    if ref.kind == "single_file":
        return ref.path.parent, [ref.path]
    files = sorted(
        p
        for p in ref.path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(ref.path).parts)
    )
    return ref.path, files


def plan(
    recipe_path: Path | str, model: str | None = None, allow_model_mismatch: bool = False, fill: Fill = ZEROS
) -> Plan:
    if fill.mode not in FILLS:
        raise MemeditError(f"unknown fill {fill.mode!r}", f"use one of {', '.join(FILLS)}")
    recipe_path = Path(recipe_path)
    recipe = recipes.load(recipe_path)
    masks = recipes.load_masks(recipe, recipe_path)
    deltas = recipes.load_deltas(recipe, recipe_path)
    if deltas and fill.mode != "zeros":
        # the noise scale is read from the untouched elements, and a delta touches them all
        raise MemeditError(
            f"--fill {fill.mode} cannot be combined with the fine-tuning deltas of {recipe_path}",
            "apply this recipe with the default zero fill",
        )
    ref = resolve(model or recipe.model.get("ref", ""))
    index = index_model(ref)
    tensors = index.tensors()
    edits = []
    for i, e in enumerate(recipe.edits):
        where = f"recipe {recipe_path}: edits[{i}]"
        w = tensors.get(e.tensor(".weight"))
        if w is None:
            raise recipes.RecipeInvalid(
                f"{where}: target {e.target} matches no module of {ref}",
                "run memedit inspect MODEL for the editable layers",
            )
        if len(w.shape) != 2 and e.op != "add":  # a delta fits any weight; rows and columns need a matrix
            raise recipes.RecipeInvalid(f"{where}: {e.target} is not a linear layer", "target a Linear module")
        if w.dtype not in EDITABLE_DTYPES:
            raise recipes.RecipeInvalid(f"{where}: {e.target} has dtype {w.dtype}", "memedit edits float tensors")
        limit = w.shape[1] if e.op == "zero_cols" else w.shape[0]
        bad = [j for j in e.indices if j >= limit]
        if bad:
            raise recipes.RecipeInvalid(
                f"{where}: index {bad[0]} is out of range for {e.target} "
                f"({limit} {'columns' if e.op == 'zero_cols' else 'rows'})",
                "regenerate the recipe for this model",
            )
        mask = _sidecar_tensor(where, "mask", e.mask_key, masks, recipe.masks, w) if e.op == "mask" else None
        delta = _sidecar_tensor(where, "delta", e.delta_key, deltas, recipe.deltas, w) if e.op == "add" else None
        edits.append(TensorEdit(w, e.op, e.indices, e.factor, mask, i, delta))
        b = tensors.get(e.tensor(".bias"))
        if b is not None and e.op in ("zero_rows", "scale"):  # a neuron is its row and its bias
            edits.append(TensorEdit(b, e.op, e.indices, e.factor, None, i))
    overrides = {"allow_model_mismatch": True} if allow_model_mismatch else {}
    return Plan(ref, index, recipe, recipe_path, tuple(edits), overrides, fill)


def _sidecar_tensor(where: str, what: str, key: str | None, tensors: dict, pin: dict | None, w: TensorInfo):
    """The mask or delta `key` of a sidecar file, checked against the weight it edits."""
    t = tensors.get(key or "")
    if t is None:
        where_from = (pin or {}).get("file")
        raise recipes.RecipeInvalid(f"{where}: {what} {key!r} is not in {where_from}", "regenerate the recipe")
    if tuple(t.shape) != w.shape:
        raise recipes.RecipeInvalid(
            f"{where}: {what} shape {tuple(t.shape)} != weight shape {w.shape}", "regenerate the recipe for this model"
        )
    return t


def _scaled(bits: np.ndarray, dtype: str, e: TensorEdit) -> np.ndarray:
    """Rows times a factor, rounded exactly as `(w.double() * f).to(dtype)` in torch."""
    import numpy as np
    import torch

    from memedit.io import tensor_bytes, torch_dtype

    tdt = torch_dtype(dtype)
    t = torch.frombuffer(bytearray(bits.tobytes()), dtype=tdt).reshape(bits.shape) if bits.size else torch.empty(0)
    idx = torch.as_tensor(e.indices, dtype=torch.long)
    t[idx] = (t[idx].double() * e.factor).to(tdt)
    return np.frombuffer(tensor_bytes(t), dtype=bits.dtype).reshape(bits.shape).copy()


def _added(bits: np.ndarray, dtype: str, e: TensorEdit) -> np.ndarray:
    """The weight plus its delta, rounded exactly as `(w.float() + d).to(dtype)` in torch."""
    import numpy as np
    import torch

    from memedit.io import tensor_bytes, torch_dtype

    tdt = torch_dtype(dtype)
    t = torch.frombuffer(bytearray(bits.tobytes()), dtype=tdt).reshape(bits.shape) if bits.size else torch.empty(0)
    t = (t.float() + torch.from_numpy(np.ascontiguousarray(e.delta))).to(tdt)
    return np.frombuffer(tensor_bytes(t), dtype=bits.dtype).reshape(bits.shape).copy()


def apply_edit(bits: np.ndarray, dtype: str, e: TensorEdit) -> np.ndarray:
    """One edit on a tensor's raw elements (see bits_view); returns a new array."""
    if e.op == "scale":
        return _scaled(bits, dtype, e)
    if e.op == "add":
        return _added(bits, dtype, e)
    out = bits.copy()
    if e.op == "zero_rows":
        out[list(e.indices)] = 0
    elif e.op == "zero_cols":
        out[:, list(e.indices)] = 0
    elif e.op == "mask":
        out[e.mask.astype(bool)] = 0
    return out


def changed_elements(old: np.ndarray, new: np.ndarray) -> int:
    """Elements whose value changed, +0.0 and -0.0 counting as equal (as `memedit diff` counts)."""
    if not old.size:
        return 0
    return int(((old != new) & (nonzero(old) | nonzero(new))).sum())


class _HashingReader:
    """Reads a file sequentially while hashing every byte read (the input digest, in the same pass)."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "rb")  # noqa: SIM115 - closed by the caller
        self.h = BackgroundHash()
        self.pos = 0

    def read(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise MemeditError(f"{self.f.name} changed or was truncated while reading", "run again")
        self.h.update(data)
        self.pos += n
        return data

    def finish(self) -> str:
        while block := self.f.read(CHUNK):
            self.h.update(block)
        self.f.close()
        return self.h.hexdigest()


def _copy_hashing(src: Path, dst: Path) -> tuple[str, str]:
    h = BackgroundHash()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while block := fi.read(CHUNK):
            h.update(block)
            fo.write(block)
    d = h.hexdigest()
    return d, d


def _rewrite(
    src: Path, dst: Path, edits: list[TensorEdit], recipe_sha: str, fill: Fill = ZEROS
) -> tuple[str, str, list[dict]]:
    """Stream src -> dst applying edits. Returns (input sha256, output sha256, per-tensor records)."""
    header = read_header(src)
    by_key = {e.tensor.key: [] for e in edits}
    for e in recipes.in_apply_order(edits):
        by_key[e.tensor.key].append(e)
    with open(src, "rb") as f:
        f.seek(8)
        raw = json.loads(f.read(header.header_len))
    meta = dict(raw.pop("__metadata__", None) or {})
    meta["memedit.recipe_sha256"] = recipe_sha
    entries = sorted(header.entries, key=lambda e: (e.begin, e.key))
    new_header: dict = {"__metadata__": dict(sorted(meta.items()))}
    for e in entries:
        new_header[e.key] = raw[e.key]
    hdr = json.dumps(new_header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hdr += b" " * (-len(hdr) % 8)
    reader = _HashingReader(src)
    reader.read(8 + header.header_len)
    out_hash = BackgroundHash()
    records = []
    with open(dst, "wb") as fo:

        def put(data: bytes) -> None:
            out_hash.update(data)
            fo.write(data)

        put(struct.pack("<Q", len(hdr)) + hdr)
        pos = 0
        for e in entries:
            if e.begin > pos:  # bytes between tensors (padding) are kept as they are
                put(reader.read(e.begin - pos))
            if e.key in by_key:
                data = reader.read(e.end - e.begin)
                old = bits_view(data, e.dtype, e.shape)
                new = old
                for ed in by_key[e.key]:
                    new = apply_edit(new, e.dtype, ed)
                extra = {}
                if fill.mode != "zeros":
                    zeroed, touched = edit_positions(e.shape, [(x.op, x.indices, x.mask) for x in by_key[e.key]])
                    values, sigma = fill_values(old, e.dtype, zeroed, ~touched, e.key, fill)
                    new = new.copy()
                    new[zeroed] = values
                    extra = {"fill_sigma": sigma}
                new_bytes = new.tobytes()
                put(new_bytes)
                records.append(
                    {
                        "key": e.key,
                        "dtype": e.dtype,
                        "shape": list(e.shape),
                        "ops": sorted({ed.op for ed in by_key[e.key]}),
                        "before_sha256": hashlib.sha256(data).hexdigest(),
                        "after_sha256": hashlib.sha256(new_bytes).hexdigest(),
                        "changed_elements": changed_elements(old, new),
                        **extra,
                    }
                )
            else:
                remaining = e.end - e.begin
                while remaining:
                    n = min(CHUNK, remaining)
                    put(reader.read(n))
                    remaining -= n
            pos = e.end
    return reader.finish(), out_hash.hexdigest(), records


def execute(p: Plan, out: Path | str, overwrite: bool = False) -> dict:
    """Write the edited model to OUT; returns the provenance statement."""
    from memedit.manifest import build_statement, write_statement

    out = Path(out)
    recipe_bytes = p.recipe_path.read_bytes()
    recipe_sha = hashlib.sha256(recipe_bytes).hexdigest()
    base, files = _model_files(p.ref)
    if (src := p.ref.path.resolve()) == (dst := out.resolve()) or src in dst.parents or dst in src.parents:
        raise MemeditError(f"output {out} is inside the input model", "choose an output folder outside the input")
    touched = {f.resolve(): [e for e in p.edits if e.tensor.file.resolve() == f.resolve()] for f in p.files_touched()}
    inputs: dict[str, str] = {}
    outputs: dict[str, str] = {}
    records: list[dict] = []
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for src in files:
            rel = src.relative_to(base) if p.ref.kind != "single_file" else Path(src.name)
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.resolve() in touched:
                din, dout, recs = _rewrite(src, dst, touched[src.resolve()], recipe_sha, p.fill)
                records += [{"file": str(rel), **r} for r in recs]
            else:
                din, dout = _copy_hashing(src, dst)
            inputs[str(rel)] = din
            outputs[str(rel)] = dout
        expected = p.recipe.model.get("files", {})
        mismatch = sorted(k for k in expected if inputs.get(k) != expected[k])
        if mismatch and not p.overrides.get("allow_model_mismatch"):
            raise MemeditError(
                f"the recipe was made for another model: {mismatch[0]} differs from the recipe's "
                f"digest{' (and more)' if len(mismatch) > 1 else ''}",
                "pass the model the recipe was derived from, or --allow-model-mismatch (recorded in the provenance)",
            )
        shutil.copyfile(p.recipe_path, tmp / RECIPE_COPY)
        outputs[RECIPE_COPY] = recipe_sha
        # Masks travel with the recipe copy (positions only). Weight deltas do not: edited weights
        # minus the delta are the base weights, so a published delta hands back the memorized model.
        # The recipe copy still pins the delta's digest.
        if p.recipe.masks:
            side = p.recipe.masks["file"]
            outputs[side], _ = _copy_hashing(p.recipe_path.parent / side, tmp / side)
        statement = build_statement(p, inputs, outputs, records, recipe_sha, mismatch if p.overrides else [])
        write_statement(tmp / PROVENANCE, statement)
    return statement


def apply(
    recipe: Path | str,
    out: Path | str,
    model: str | None = None,
    overwrite: bool = False,
    allow_model_mismatch: bool = False,
    fill: Fill = ZEROS,
) -> dict:
    """`memedit.apply(recipe, out)`: plan, validate, write atomically; returns the provenance statement.
    `fill=Fill("noise", seed)` writes seeded noise instead of zeros (see memedit.fill)."""
    return execute(plan(recipe, model, allow_model_mismatch, fill), out, overwrite)


def edited_pipeline(
    recipe: recipes.Recipe,
    masks: dict | None,
    deltas: dict | None,
    work: Path,
    dtype,
    device,
    model: str | None = None,
    allow_model_mismatch: bool = False,
):
    """The recipe applied into a scratch folder named after `work` and loaded as a pipeline; the
    folder is removed again (the weights stay in memory). What gets measured is exactly what
    `memedit apply` writes, fill, sidecars and rounding included."""
    from memedit.model.load import load_pipeline

    rpath = recipes.dump(recipe, work.with_name(work.name + ".yaml"), masks, deltas)
    folder = work.with_name(work.name + "-model")
    try:
        apply(rpath, folder, model, overwrite=True, allow_model_mismatch=allow_model_mismatch)
        return load_pipeline(resolve(str(folder)), dtype, device)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
