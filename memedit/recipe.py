"""`recipe.yaml`: an explicit, reviewable list of weight edits. Applying it needs no data and no randomness.

```yaml
schema: memedit.recipe/v1
memedit_version: 0.1.0
model: {ref: lab, files: {unet/diffusion_pytorch_model.safetensors: <sha256>, ...}}
calibration: {stats_sha256: <sha256>, settings: {...}, prompt_files: {...}}
seed: 0
prompts: ["prompt 0", "prompt 1"]          # the prompts edits cite, by position
edits:
  - method: nemo                            # nemo | subspace | subspace-structured | attribution | random | manual
    target: unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v
    op: zero_rows                           # zero_rows | zero_cols | scale | mask
    indices: [3, 17]                        # rows (zero_rows, scale) or columns (zero_cols)
    caused_by: {3: [0], 17: [0, 1]}         # neuron -> prompts that selected it
  - method: subspace
    target: unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2
    op: mask                                # element-wise; the mask lives in the sidecar file
    mask: {key: <tensor key>, density: 0.0093}
  - method: adversarial-finetune            # memedit harden --finetune
    target: unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k
    op: add                                 # weight += delta (float32, in the deltas sidecar)
    delta: {key: <tensor key>, norm: 0.012}
masks: {file: recipe.masks.safetensors, sha256: <sha256>}
deltas: {file: recipe.deltas.safetensors, sha256: <sha256>}
```
Within one tensor, `add` comes first and the pruning ops after it, so a pruned position stays pruned.
Loading is strict: unknown keys, versions, types, duplicate or out-of-range indices are errors that
name the field path. Only `yaml.safe_load`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from memedit import __version__
from memedit.errors import RecipeInvalid

if TYPE_CHECKING:
    import torch

SCHEMA = "memedit.recipe/v1"
METHODS = {
    "nemo": ("NeMo", "https://arxiv.org/abs/2406.02366"),
    "subspace": ("Shared FFN subspace pruning", "https://arxiv.org/abs/2406.18566"),
    "subspace-structured": ("Shared FFN subspace, whole neurons", "https://arxiv.org/abs/2406.18566"),
    "nemo-adversarial": (
        "NeMo selection on adversarial embeddings (memedit harden)",
        "https://arxiv.org/abs/2406.02366",
    ),
    "adversarial-finetune": (
        "Adversarial fine-tuning against embedding attacks (memedit harden --finetune)",
        "https://arxiv.org/abs/2507.16880",
    ),
    "attribution": (
        "Value neurons by loss attribution, one joint set (memedit; see memedit/localize/attribution.py)",
        "",
    ),
    "remap": (
        "Cross-attention key/value remap of the target prompts' tokens, closed form as in UCE "
        "(memedit; see memedit/localize/remap.py)",
        "https://arxiv.org/abs/2308.14761",
    ),
    "encoder": (
        "Text-encoder feed-forward remap of the target prompts' tokens, closed form as in ReFACT/MEMIT "
        "(memedit; see memedit/localize/encoder.py)",
        "https://arxiv.org/abs/2306.00738",
    ),
    "random": ("Random baseline", ""),
    "manual": ("Manual edit", ""),
}
# the pipeline components a recipe may edit: the denoiser and the text encoders whose output it reads
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
OPS = ("zero_rows", "zero_cols", "scale", "mask", "add")
SIDECAR_OPS = {"mask": "masks", "add": "deltas"}  # op -> top-level key of its digest-pinned sidecar file
TOP_KEYS = {"schema", "memedit_version", "model", "calibration", "seed", "prompts", "edits", "masks", "deltas", "notes"}
EDIT_KEYS = {"method", "target", "op", "indices", "factor", "caused_by", "mask", "delta"}


@dataclass(frozen=True)
class Edit:
    method: str
    target: str  # "<component>.<module path>" of a Linear: unet, text_encoder or text_encoder_2
    op: str
    indices: tuple[int, ...] = ()
    factor: float | None = None  # scale only
    caused_by: tuple[tuple[int, tuple[int, ...]], ...] = ()  # (neuron, prompt ids)
    mask_key: str | None = None  # mask only: key in the sidecar file
    mask_density: float | None = None
    delta_key: str | None = None  # add only: key in the deltas sidecar file
    delta_norm: float | None = None  # its Frobenius norm, for the reader of the recipe

    @property
    def component(self) -> str:
        return self.target.split(".", 1)[0]

    @property
    def module(self) -> str:
        """Module path inside its component."""
        return self.target.split(".", 1)[1]

    def tensor(self, suffix: str) -> tuple[str, str]:
        """(component, tensor name) of the weight (".weight") or bias (".bias") this edit changes."""
        return self.component, self.module + suffix

    def to_yaml(self) -> dict:
        d: dict[str, Any] = {"method": self.method, "target": self.target, "op": self.op}
        if self.op not in SIDECAR_OPS:
            d["indices"] = list(self.indices)
        if self.factor is not None:
            d["factor"] = self.factor
        if self.caused_by:
            d["caused_by"] = {n: list(p) for n, p in self.caused_by}
        if self.mask_key is not None:
            d["mask"] = {"key": self.mask_key, "density": self.mask_density}
        if self.delta_key is not None:
            d["delta"] = {"key": self.delta_key, "norm": self.delta_norm}
        return d


@dataclass(frozen=True)
class Recipe:
    model: dict  # {"ref": str, "files": {relative path: sha256}}
    edits: tuple[Edit, ...]
    calibration: dict = field(default_factory=dict)
    seed: int = 0
    prompts: tuple[str, ...] = ()
    masks: dict | None = None  # {"file": name, "sha256": digest}
    notes: str = ""
    deltas: dict | None = None  # {"file": name, "sha256": digest}
    memedit_version: str = __version__

    def to_yaml(self) -> dict:
        d: dict[str, Any] = {
            "schema": SCHEMA,
            "memedit_version": self.memedit_version,
            "model": self.model,
            "calibration": self.calibration,
            "seed": self.seed,
        }
        if self.notes:
            d["notes"] = self.notes
        d["prompts"] = list(self.prompts)
        d["edits"] = [e.to_yaml() for e in self.edits]
        if self.masks:
            d["masks"] = self.masks
        if self.deltas:
            d["deltas"] = self.deltas
        return d

    def neuron_count(self) -> int:
        return sum(len(e.indices) for e in self.edits if e.op not in SIDECAR_OPS)

    def delta_count(self) -> int:
        """Edits that add a weight delta (one per layer: remap, encoder, fine-tuning)."""
        return sum(e.op == "add" for e in self.edits)


class _Dumper(yaml.SafeDumper):
    """Block style everywhere except index lists, which stay on one line each."""


def _list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = bool(data) and all(isinstance(x, int) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _list)


def dumps(recipe: Recipe) -> str:
    return yaml.dump(
        recipe.to_yaml(), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120, allow_unicode=True
    )


def edits_by_tensor(recipe: Recipe, present) -> dict[tuple[str, str], list[Edit]]:
    """(component, tensor name) -> the recipe edits that change it, for the tensors `present(key)`
    accepts: a neuron is its weight row and its bias entry, so row edits (zero_rows, scale) also
    change the bias."""
    out: dict[tuple[str, str], list[Edit]] = {}
    for e in recipe.edits:
        for suffix in (".weight", ".bias"):
            if suffix == ".bias" and e.op not in ("zero_rows", "scale"):
                continue
            if present(e.tensor(suffix)):
                out.setdefault(e.tensor(suffix), []).append(e)
    return out


def sidecar_path(path: Path, kind: str) -> Path:
    """Where dump writes the `kind` ("masks" or "deltas") sidecar of the recipe at `path`."""
    return Path(path).with_name(Path(path).stem + f".{kind}.safetensors")


def in_apply_order(edits: list) -> list:
    """Edits of one tensor in the order apply runs them: additive deltas first, pruning after them, so
    that a pruned position stays pruned; otherwise the recipe's order."""
    return sorted(edits, key=lambda e: e.op != "add")


def dump(
    recipe: Recipe,
    path: Path,
    masks: dict[str, torch.Tensor] | None = None,
    deltas: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write recipe.yaml and its sidecar files (bool masks, float32 deltas), each digest-pinned in the YAML."""
    import torch

    from memedit.io import save_tensors, sha256_file

    path = Path(path)
    pinned = {}
    for kind, tensors, dtype in (("masks", masks, torch.bool), ("deltas", deltas, torch.float32)):
        if tensors:
            side = sidecar_path(path, kind)
            save_tensors(side, {k: v.to(dtype).contiguous() for k, v in tensors.items()})
            pinned[kind] = {"file": side.name, "sha256": sha256_file(side)}
    if pinned:
        recipe = Recipe(**{**recipe.__dict__, **pinned})
    path.write_text(dumps(recipe), encoding="utf-8")
    return path


def dump_atomic(
    recipe: Recipe,
    out: Path,
    masks: dict[str, torch.Tensor] | None = None,
    deltas: dict[str, torch.Tensor] | None = None,
) -> Path:
    """dump() into a temporary folder beside `out`, then move the sidecars and, last, the YAML into
    place: an interrupted write never leaves a new recipe whose pinned sidecar is missing."""
    import tempfile

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".memedit-recipe-", dir=out.parent) as tmp:
        staged = dump(recipe, Path(tmp) / out.name, masks, deltas)
        for kind in ("masks", "deltas"):
            if sidecar_path(staged, kind).exists():
                sidecar_path(staged, kind).replace(sidecar_path(out, kind))
        staged.replace(out)
    return out


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _err(path: Path | str, where: str, what: str) -> RecipeInvalid:
    return RecipeInvalid(f"recipe {path}: {where}: {what}", "fix the recipe or regenerate it with memedit localize")


def _int_list(path, where, value) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise _err(path, where, "must be a list of integers")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, int):
            raise _err(path, f"{where}[{i}]", f"{v!r} is not an integer")
        if v < 0:
            raise _err(path, f"{where}[{i}]", f"{v} is negative")
    if len(set(value)) != len(value):
        dup = sorted({v for v in value if value.count(v) > 1})[:5]
        raise _err(path, where, f"duplicate indices {dup}")
    return tuple(sorted(value))


def _parse_edit(path, i: int, raw: Any) -> Edit:
    where = f"edits[{i}]"
    if not isinstance(raw, dict):
        raise _err(path, where, "must be a mapping")
    unknown = sorted(set(raw) - EDIT_KEYS)
    if unknown:
        raise _err(path, where, f"unknown key(s) {', '.join(map(str, unknown))}")
    for key in ("method", "target", "op"):
        if not isinstance(raw.get(key), str):
            raise _err(path, f"{where}.{key}", "missing or not a string")
    if raw["method"] not in METHODS:
        raise _err(path, f"{where}.method", f"unknown method {raw['method']!r} (known: {', '.join(METHODS)})")
    if raw["op"] not in OPS:
        raise _err(path, f"{where}.op", f"unknown operation {raw['op']!r} (known: {', '.join(OPS)})")
    if raw["target"].split(".", 1)[0] not in COMPONENTS or "." not in raw["target"]:
        wanted = " or ".join(f"{c}.<path>" for c in COMPONENTS)
        raise _err(path, f"{where}.target", f"{raw['target']!r} must name a module as {wanted}")
    op = raw["op"]
    indices: tuple[int, ...] = ()
    if op not in SIDECAR_OPS:
        indices = _int_list(path, f"{where}.indices", raw.get("indices"))
    elif "indices" in raw:
        what = f"a {op} edit takes its values from the {SIDECAR_OPS[op]} file, not indices"
        raise _err(path, f"{where}.indices", what)
    for other, kind in (("mask", "mask"), ("delta", "add")):
        if other in raw and op != kind:
            raise _err(path, f"{where}.{other}", f"only {kind} takes a {other}, not {op}")
    factor = raw.get("factor")
    if op == "scale":
        if isinstance(factor, bool) or not isinstance(factor, int | float):
            raise _err(path, f"{where}.factor", "scale needs a numeric factor")
        factor = float(factor)
    elif factor is not None:
        raise _err(path, f"{where}.factor", f"only scale takes a factor, not {op}")
    caused = raw.get("caused_by") or {}
    if not isinstance(caused, dict):
        raise _err(path, f"{where}.caused_by", "must map a neuron index to a list of prompt ids")
    caused_t = tuple(sorted((int(k), _int_list(path, f"{where}.caused_by[{k}]", v)) for k, v in caused.items()))
    mask_key = density = None
    if op == "mask":
        m = raw.get("mask")
        if not isinstance(m, dict) or not isinstance(m.get("key"), str) or set(m) - {"key", "density"}:
            raise _err(path, f"{where}.mask", "needs {key: <tensor key in the mask file>, density: <float>}")
        mask_key, density = m["key"], m.get("density")
    delta_key = norm = None
    if op == "add":
        d = raw.get("delta")
        if not isinstance(d, dict) or not isinstance(d.get("key"), str) or set(d) - {"key", "norm"}:
            raise _err(path, f"{where}.delta", "needs {key: <tensor key in the deltas file>, norm: <float>}")
        if d.get("norm") is not None and (isinstance(d["norm"], bool) or not isinstance(d["norm"], int | float)):
            raise _err(path, f"{where}.delta.norm", "must be a number")
        delta_key, norm = d["key"], d.get("norm")
    return Edit(raw["method"], raw["target"], op, indices, factor, caused_t, mask_key, density, delta_key, norm)


def loads(text: str, path: Path | str = "<string>") -> Recipe:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "YAML"
        raise _err(path, where, "is not valid YAML") from None
    if not isinstance(raw, dict):
        raise _err(path, "top level", "must be a mapping")
    unknown = sorted(map(str, set(raw) - TOP_KEYS))
    if unknown:
        raise _err(path, "top level", f"unknown key(s) {', '.join(unknown)}")
    schema = raw.get("schema")
    if schema != SCHEMA:
        raise RecipeInvalid(
            f"recipe {path} has schema {schema!r}; this memedit reads {SCHEMA!r}",
            "upgrade memedit, or regenerate the recipe with this version",
        )
    model = raw.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("files", {}), dict):
        raise _err(path, "model", "must be {ref: ..., files: {path: sha256}}")
    edits = raw.get("edits")
    if not isinstance(edits, list) or not edits:
        raise _err(path, "edits", "must be a non-empty list")
    parsed = tuple(_parse_edit(path, i, e) for i, e in enumerate(edits))
    # One target may carry one edit per (op, method): `memedit harden` adds its own rows next to
    # NeMo's. A neuron is still edited in one place only: indices of the same op never overlap.
    seen: dict[tuple[str, str, str], int] = {}
    owner: dict[tuple[str, str, int], int] = {}
    for i, e in enumerate(parsed):
        if (e.target, e.op, e.method) in seen:
            j = seen[e.target, e.op, e.method]
            raise _err(path, f"edits[{i}]", f"repeats target {e.target} with op {e.op} (edits[{j}])")
        seen[e.target, e.op, e.method] = i
        for x in e.indices:
            if (e.target, e.op, x) in owner:
                j = owner[e.target, e.op, x]
                raise _err(path, f"edits[{i}]", f"index {x} of {e.target} is already edited by edits[{j}]")
            owner[e.target, e.op, x] = i
    prompts = raw.get("prompts") or []
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise _err(path, "prompts", "must be a list of strings")
    for i, e in enumerate(parsed):
        for n, ps in e.caused_by:
            if any(p >= len(prompts) for p in ps):
                raise _err(path, f"edits[{i}].caused_by[{n}]", "cites a prompt id past the prompts list")
    for op, kind in SIDECAR_OPS.items():
        side = raw.get(kind)
        if any(e.op == op for e in parsed) and not (isinstance(side, dict) and {"file", "sha256"} <= set(side)):
            raise _err(path, kind, f"{op} edits need {kind}: {{file: ..., sha256: ...}}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise _err(path, "seed", "must be an integer")
    return Recipe(
        model=model,
        edits=parsed,
        calibration=raw.get("calibration") or {},
        seed=seed,
        prompts=tuple(prompts),
        masks=raw.get("masks"),
        notes=str(raw.get("notes") or ""),
        deltas=raw.get("deltas"),
        memedit_version=str(raw.get("memedit_version", "")),
    )


def load(path: Path | str) -> Recipe:
    from memedit.model.ref import require_file

    path = require_file(Path(path), "recipe")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _err(path, "file", "is not UTF-8 text") from None
    return loads(text, path)


def _load_sidecar(recipe_path: Path, kind: str, pin: dict | None) -> dict[str, np.ndarray]:
    if not pin:
        return {}
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from memedit.io import sha256_file

    name = pin["file"]
    if not isinstance(name, str) or Path(name).name != name:
        raise _err(recipe_path, f"{kind}.file", f"{name!r} must be a file name beside the recipe, not a path")
    side = Path(recipe_path).parent / name
    if not side.is_file() and kind == "deltas":
        raise RecipeInvalid(
            f"recipe {recipe_path}: deltas.file: {side} is missing (memedit apply leaves weight deltas out of "
            "edited models: edited weights minus the delta are the base weights)",
            "pass the recipe that memedit localize or harden wrote, beside its deltas file",
        )
    if not side.is_file():
        raise _err(recipe_path, f"{kind}.file", f"{side} is missing")
    if sha256_file(side) != pin["sha256"]:
        raise _err(recipe_path, f"{kind}.sha256", f"{side.name} does not match the digest in the recipe")
    try:
        return load_file(side)
    except (SafetensorError, ValueError, OSError) as e:
        raise _err(recipe_path, f"{kind}.file", f"{side.name} is not a readable safetensors file ({e})") from None


def load_masks(recipe: Recipe, recipe_path: Path) -> dict[str, np.ndarray]:
    """The sidecar masks (numpy bool arrays), after checking the digest the YAML pins."""
    return _load_sidecar(recipe_path, "masks", recipe.masks)


def load_deltas(recipe: Recipe, recipe_path: Path) -> dict[str, np.ndarray]:
    """The sidecar weight deltas of `add` edits (numpy float32 arrays), after checking the pinned digest."""
    out = _load_sidecar(recipe_path, "deltas", recipe.deltas)
    for k, v in out.items():
        if v.dtype != np.float32:
            raise _err(recipe_path, "deltas.file", f"delta {k!r} is {v.dtype}, deltas are float32")
    return out
