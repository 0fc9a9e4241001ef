"""`memedit diff A B`: what changed between two checkpoints, neuron by neuron, and is it what a recipe says.

A pure `diff_models` builds a `DiffReport` (headers first, bytes only where they differ, one tensor
pair in memory at a time); rendering is separate, so tests and `--json` read the same object.
Tensors are matched by component and diffusers name, so a folder and a single file compare.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from memedit.errors import MemeditError
from memedit.fill import ZEROS, Fill, edit_positions, fill_values, recipe_ops
from memedit.io import CHUNK, torch_dtype
from memedit.model.index import TensorInfo, index_model
from memedit.model.ref import resolve


@dataclass(frozen=True)
class TensorChange:
    component: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    changed_elements: int
    max_abs: float
    l2: float
    relative: float  # ||B - A|| / ||A||
    rows_changed: tuple[int, ...]
    rows_zeroed: tuple[int, ...]
    cols_changed: tuple[int, ...]
    cols_zeroed: tuple[int, ...]
    layer: str | None = None  # unet.<module> for value / FFN layers
    kind: str | None = None  # value | ffn


@dataclass(frozen=True)
class DiffReport:
    a: str
    b: str
    only_in_a: tuple[str, ...]
    only_in_b: tuple[str, ...]
    dtype_or_shape: tuple[str, ...]
    changed: tuple[TensorChange, ...]
    compared: int
    unexplained: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    against: str | None = None  # the recipe the verdict was checked against
    recognized_edit: str | None = None

    @property
    def identical(self) -> bool:
        return not (self.only_in_a or self.only_in_b or self.dtype_or_shape or self.changed)

    @property
    def clean(self) -> bool:
        """With a recipe: every change explained and every edit present."""
        return not (self.unexplained or self.missing or self.only_in_a or self.only_in_b or self.dtype_or_shape)

    def to_json(self) -> dict:
        d = asdict(self)
        d["identical"] = self.identical
        if self.against:
            d["clean"] = self.clean
        return d


def _read(info: TensorInfo) -> torch.Tensor:
    with open(info.file, "rb") as f:
        f.seek(info.begin)
        data = f.read(info.end - info.begin)
    if not data:
        return torch.empty(info.shape, dtype=torch_dtype(info.dtype))
    return torch.frombuffer(bytearray(data), dtype=torch_dtype(info.dtype)).reshape(info.shape)


def _same_bytes(a: TensorInfo, b: TensorInfo) -> bool:
    with open(a.file, "rb") as fa, open(b.file, "rb") as fb:
        fa.seek(a.begin)
        fb.seek(b.begin)
        left = a.end - a.begin
        while left:
            n = min(CHUNK, left)
            if fa.read(n) != fb.read(n):
                return False
            left -= n
    return True


def _layer_of(component: str, name: str) -> tuple[str | None, str | None]:
    if component != "unet":
        return None, None
    if name.endswith("attn2.to_v.weight") or name.endswith("attn2.to_v.bias"):
        return "unet." + name.rsplit(".", 1)[0], "value"
    if name.endswith("ff.net.2.weight"):
        return "unet." + name[: -len(".net.2.weight")] + ".net.2", "ffn"
    return None, None


# Rows per block when measuring a change: float64 copies of a whole SD-size FFN weight would cost
# ~50 MB each; blocks of ~1M elements keep diff's memory flat whatever the tensor size.
BLOCK_ELEMENTS = 1 << 20


def _change(component: str, name: str, a: TensorInfo, ta: torch.Tensor, tb: torch.Tensor, tol: float) -> TensorChange:
    shape = ta.shape
    ta2 = ta.reshape(shape[0], -1) if ta.dim() >= 1 else ta.reshape(1, 1)
    tb2 = tb.reshape(ta2.shape)
    width = max(1, ta2.shape[1])
    step = max(1, BLOCK_ELEMENTS // width)
    changed_n, max_abs, d2, a2 = 0, 0.0, 0.0, 0.0
    rows: list[int] = []
    rows_zero: list[int] = []
    col_changed = torch.zeros(ta2.shape[1], dtype=torch.bool)
    col_zero = torch.ones(ta2.shape[1], dtype=torch.bool)
    for r0 in range(0, ta2.shape[0], step):
        fa, fb = ta2[r0 : r0 + step].double(), tb2[r0 : r0 + step].double()
        d = (fb - fa).abs()
        ch = d > tol
        changed_n += int(ch.sum())
        if d.numel():
            max_abs = max(max_abs, float(d.max()))
        d2 += float((d * d).sum())
        a2 += float((fa * fa).sum())
        r = ch.any(dim=1).nonzero().flatten()
        rows += (r + r0).tolist()
        rows_zero += [r0 + int(i) for i in r if bool((fb[i] == 0).all())]
        col_changed |= ch.any(dim=0)
        col_zero &= (fb == 0).all(dim=0)
    cols = cz = ()
    if ta.dim() == 2:
        cols = tuple(col_changed.nonzero().flatten().tolist())
        cz = tuple(j for j in cols if bool(col_zero[j]))
    if ta.dim() not in (1, 2):
        rows, rows_zero = [], []
    norm_a, l2 = a2**0.5, d2**0.5
    layer, kind = _layer_of(component, name)
    return TensorChange(
        component,
        name,
        a.dtype,
        a.shape,
        changed_n,
        max_abs,
        l2,
        l2 / norm_a if norm_a else float("inf"),
        tuple(rows),
        tuple(rows_zero),
        cols,
        cz,
        layer,
        kind,
    )


def diff_models(a: str, b: str, recipe_path: str | Path | None = None, tolerance: float = 0.0) -> DiffReport:
    ra, rb = resolve(a), resolve(b)
    ia, ib = index_model(ra), index_model(rb)
    ta = {(c.name, t.name): t for c in ia.components for t in c.tensors}
    tb = {(c.name, t.name): t for c in ib.components for t in c.tensors}
    common_comps = {c.name for c in ia.components} & {c.name for c in ib.components}
    if ia.has("unet") and ib.has("unet"):
        sa = {n: t.shape for (c, n), t in ta.items() if c == "unet"}
        sb = {n: t.shape for (c, n), t in tb.items() if c == "unet"}
        shared = set(sa) & set(sb)
        if len(shared) < 0.5 * max(len(sa), len(sb)) or sum(sa[n] != sb[n] for n in shared) > 0.5 * len(shared):
            raise MemeditError(
                f"{a} and {b} have different UNet architectures", "diff compares two versions of the same model"
            )
    only_a = tuple(sorted(f"{c}/{n}" for c, n in set(ta) - set(tb) if c in common_comps))
    only_b = tuple(sorted(f"{c}/{n}" for c, n in set(tb) - set(ta) if c in common_comps))
    only_a += tuple(sorted(f"{c}/*" for c in {x.name for x in ia.components} - common_comps))
    only_b += tuple(sorted(f"{c}/*" for c in {x.name for x in ib.components} - common_comps))
    meta_changes = []
    changes = []
    compared = 0
    for key in sorted(set(ta) & set(tb)):
        x, y = ta[key], tb[key]
        compared += 1
        if x.dtype != y.dtype or x.shape != y.shape:
            meta_changes.append(f"{key[0]}/{key[1]}: {x.dtype}{list(x.shape)} -> {y.dtype}{list(y.shape)}")
            continue
        if _same_bytes(x, y):
            continue
        c = _change(key[0], key[1], x, _read(x), _read(y), tolerance)
        if c.changed_elements:
            changes.append(c)
    report = DiffReport(str(ra), str(rb), only_a, only_b, tuple(meta_changes), tuple(changes), compared)
    recognized = None
    if recipe_path is None and rb.kind != "single_file" and (rb.path / "memedit.provenance.json").is_file():
        recognized = str(rb.path / "recipe.yaml")
    elif recipe_path is None and rb.kind == "single_file" and (rb.path.parent / "memedit.provenance.json").is_file():
        recognized = str(rb.path.parent / "recipe.yaml")
    if recipe_path is not None:
        return check_against_recipe(report, Path(recipe_path), ta, tb, _fill_of(rb))
    if recognized:
        return DiffReport(**{**report.__dict__, "recognized_edit": recognized})
    return report


def _fill_of(rb) -> Fill:
    """The fill B was written with, from the provenance beside it (zeros when there is none). Only the
    mode and seed are read: the values are recomputed from A, so a wrong claim fails the check."""
    import json

    prov = (rb.path.parent if rb.kind == "single_file" else rb.path) / "memedit.provenance.json"
    try:
        st = json.loads(prov.read_text(encoding="utf-8"))
        return Fill.from_json(st["predicate"]["buildDefinition"]["internalParameters"].get("fill"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ZEROS


def check_against_recipe(report: DiffReport, recipe_path: Path, ta: dict, tb: dict, fill: Fill = ZEROS) -> DiffReport:
    """Every change must be explained by an edit the recipe lists, and every listed edit must be present
    (pruned positions holding zeros, or the seeded noise of a `--fill noise` apply)."""
    from memedit import recipe as recipes

    r = recipes.load(recipe_path)
    masks = recipes.load_masks(r, recipe_path)
    deltas = recipes.load_deltas(r, recipe_path)
    expected = recipes.edits_by_tensor(r, ta.__contains__)
    unexplained, missing = [], []
    changed = {(c.component, c.name): c for c in report.changed}
    for key, c in changed.items():
        if key not in expected:
            unexplained.append(f"{c.component}/{c.name}: {c.changed_elements} elements changed, no edit explains it")
    for key, edits in sorted(expected.items()):
        component, name = key
        a = _read(ta[key])
        b = _read(tb[key])
        allowed = torch.zeros_like(a, dtype=torch.bool)
        want = a.clone()
        for e in recipes.in_apply_order(edits):
            idx = list(e.indices)
            if e.op == "add":
                d = torch.from_numpy(deltas[e.delta_key].copy())
                allowed |= d != 0
                want = (want.float() + d).to(a.dtype)
            elif e.op == "zero_rows":
                allowed[idx] = True
                want[idx] = 0
            elif e.op == "zero_cols":
                allowed[:, idx] = True
                want[:, idx] = 0
            elif e.op == "scale":
                allowed[idx] = True
                want[idx] = (a[idx].double() * e.factor).to(a.dtype)
            elif e.op == "mask" and name.endswith(".weight"):
                m = torch.from_numpy(masks[e.mask_key].copy()).bool()
                allowed |= m
                want[m] = 0
        if fill.mode != "zeros":
            want = _with_fill(want, a, ta[key], tb[key].key, edits, masks, fill)
        diff = a != b
        outside = diff & ~allowed
        if key in changed and bool(outside.any()):
            first = [int(i) for i in outside.nonzero()[0].tolist()]
            unexplained.append(
                f"{component}/{name}: {int(outside.sum())} changed elements outside the recipe's edits, "
                f"first at index {first}"
            )
        wrong = allowed & (b != want)
        if bool(wrong.any()):
            first = [int(i) for i in wrong.nonzero()[0].tolist()]
            missing.append(
                f"{component}/{name}: {int(wrong.sum())} elements not edited as the recipe says, first at index {first}"
            )
    return DiffReport(
        **{**report.__dict__, "unexplained": tuple(unexplained), "missing": tuple(missing), "against": str(recipe_path)}
    )


def _with_fill(want: torch.Tensor, a: torch.Tensor, info: TensorInfo, key: str, edits, masks, fill: Fill):
    """`want` with the pruned positions holding the fill values recomputed from A."""
    import numpy as np

    from memedit.io import tensor_bytes
    from memedit.model.safetensors_header import bits_view

    zeroed, touched = edit_positions(tuple(a.shape), recipe_ops(edits, masks))
    a_bits = bits_view(tensor_bytes(a), info.dtype, tuple(a.shape))
    values, _ = fill_values(a_bits, info.dtype, zeroed, ~touched, key, fill)
    w_bits = np.array(bits_view(tensor_bytes(want), info.dtype, tuple(a.shape)))
    w_bits[zeroed] = values
    return torch.frombuffer(bytearray(w_bits.tobytes()), dtype=a.dtype).reshape(a.shape)


def recipe_for(provenance: Path) -> Path:
    recipe = Path(provenance).parent / "recipe.yaml"
    if not recipe.is_file():
        raise MemeditError(f"no recipe.yaml next to {provenance}", "pass --recipe explicitly")
    return recipe


__all__ = ["DiffReport", "TensorChange", "diff_models", "recipe_for"]
