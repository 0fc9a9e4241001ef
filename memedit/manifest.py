"""Provenance of an edited model (in-toto Statement v1, SLSA provenance v1 shape) and `verify`.

Subjects are every output file except the statement itself, sorted, with sha256 digests. The
predicate records the input files' digests, the recipe and its digest, tool and library versions,
override flags, and the before/after digest of every edited tensor. No timestamps or absolute
paths, so the same recipe on the same input gives the same bytes.

Integrity of the statement itself: `runDetails.metadata.invocationId` is the sha256 of the
canonical statement with that field empty, and the file must be the canonical serialization; so
any changed byte is caught. This is a checksum, not a signature: it proves the folder is intact,
not who made it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from memedit import __version__
from memedit.errors import MemeditError
from memedit.io import sha256_file
from memedit.recipe import SIDECAR_OPS

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://github.com/memedit/memedit/apply/v1"
PROVENANCE = "memedit.provenance.json"


def _versions() -> dict[str, str]:
    out = {"memedit": __version__, "python": platform.python_version(), "torch": version("torch")}
    for name in ("safetensors", "diffusers", "transformers", "huggingface-hub"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def canonical(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _self_digest(statement: dict) -> str:
    blank = json.loads(json.dumps(statement))
    blank["predicate"]["runDetails"]["metadata"]["invocationId"] = ""
    return hashlib.sha256(canonical(blank)).hexdigest()


def build_statement(
    plan,
    inputs: dict[str, str],
    outputs: dict[str, str],
    tensors: list[dict],
    recipe_sha: str,
    mismatched_inputs: list[str],
) -> dict:
    recipe = plan.recipe
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": k, "digest": {"sha256": v}} for k, v in sorted(outputs.items())],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "recipe": {"name": "recipe.yaml", "digest": {"sha256": recipe_sha}},
                    "model": recipe.model.get("ref", ""),
                    "overrides": dict(sorted(plan.overrides.items())),
                },
                "internalParameters": {
                    "layout": plan.index.layout,
                    "edits": [
                        {
                            "method": e.method,
                            "target": e.target,
                            "op": e.op,
                            "neurons": len(e.indices) if e.op not in SIDECAR_OPS else None,
                        }
                        for e in recipe.edits
                    ],
                    "edited_tensors": sorted(tensors, key=lambda r: (r["file"], r["key"])),
                    "fill": plan.fill.to_json(),
                    "mismatched_inputs": mismatched_inputs,
                },
                "resolvedDependencies": [{"name": k, "digest": {"sha256": v}} for k, v in sorted(inputs.items())],
            },
            "runDetails": {
                "builder": {"id": "https://github.com/memedit/memedit", "version": _versions()},
                "metadata": {"invocationId": ""},
            },
        },
    }
    statement["predicate"]["runDetails"]["metadata"]["invocationId"] = _self_digest(statement)
    return statement


def write_statement(path: Path, statement: dict) -> None:
    Path(path).write_bytes(canonical(statement))


@dataclass(frozen=True)
class VerifyReport:
    folder: Path
    problems: tuple[str, ...] = field(default_factory=tuple)
    files_checked: int = 0
    tensors_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(folder: Path | str) -> VerifyReport:
    """Recompute every digest of an edited model folder and check the edits it claims."""
    from memedit.model.ref import require_dir
    from memedit.model.safetensors_header import read_tensor_bytes

    folder = require_dir(Path(folder), "model folder")
    prov = folder / PROVENANCE
    if not prov.is_file():
        raise MemeditError(f"{folder} has no {PROVENANCE}", "verify works on folders written by memedit apply")
    problems: list[str] = []
    raw = prov.read_bytes()
    try:
        st = json.loads(raw)
        subjects = {s["name"]: s["digest"]["sha256"] for s in st["subject"]}
        pred = st["predicate"]
        claimed_self = pred["runDetails"]["metadata"]["invocationId"]
        tensors = pred["buildDefinition"]["internalParameters"]["edited_tensors"]
        recipe_sha = pred["buildDefinition"]["externalParameters"]["recipe"]["digest"]["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        return VerifyReport(folder, (f"{PROVENANCE}: not a memedit provenance statement",))
    if st.get("_type") != STATEMENT_TYPE or st.get("predicateType") != PREDICATE_TYPE:
        problems.append(f"{PROVENANCE}: unknown statement or predicate type")
    if raw != canonical(st) or _self_digest(st) != claimed_self:
        problems.append(f"{PROVENANCE}: modified after it was written (self digest mismatch)")
    present = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {PROVENANCE}
    for name in sorted(present - set(subjects)):
        problems.append(f"{name}: extra file not listed in the provenance")
    for name in sorted(set(subjects) - present):
        problems.append(f"{name}: listed in the provenance but missing")
    for name in sorted(set(subjects) & present):
        if sha256_file(folder / name) != subjects[name]:
            problems.append(f"{name}: sha256 differs from the provenance")
    if subjects.get("recipe.yaml") != recipe_sha:
        problems.append("recipe.yaml: digest differs from the recipe recorded in the provenance")
    checked = 0
    for rec in tensors:
        path = folder / rec["file"]
        if not path.is_file():
            continue
        try:
            _, data = read_tensor_bytes(path, rec["key"])
        except (MemeditError, KeyError, OSError):  # a damaged file is a finding, not a crash
            problems.append(f"{rec['file']}: tensor {rec['key']} cannot be read")
            continue
        if hashlib.sha256(data).hexdigest() != rec["after_sha256"]:
            problems.append(f"{rec['file']}: tensor {rec['key']} differs from its recorded edited digest")
        checked += 1
    problems += _check_edits_applied(folder, pred["buildDefinition"]["internalParameters"].get("fill"))
    return VerifyReport(folder, tuple(problems), len(subjects), checked)


def _check_edits_applied(folder: Path, fill_json: dict | None = None) -> list[str]:
    """The pruned positions of the recipe copy hold what the fill says (zeros, or the seeded noise
    recomputed from the untouched elements) in the output weights."""
    from memedit import recipe as recipes
    from memedit.fill import Fill, edit_positions, fill_values, recipe_ops
    from memedit.model.index import index_model
    from memedit.model.ref import resolve
    from memedit.model.safetensors_header import bits_view, nonzero, read_tensor_bytes

    fill = Fill.from_json(fill_json)
    try:
        r = recipes.load(folder / "recipe.yaml")
        masks = recipes.load_masks(r, folder / "recipe.yaml")
        tensors = index_model(resolve(str(_model_root(folder)))).tensors()
    except MemeditError as e:
        return [f"recipe.yaml: {e.message}"]
    problems = [f"{e.target}: not found in the output model" for e in r.edits if e.tensor(".weight") not in tensors]
    for key, edits in sorted(recipes.edits_by_tensor(r, tensors.__contains__).items()):
        info = tensors[key]
        try:
            entry, data = read_tensor_bytes(info.file, info.key)
        except (MemeditError, KeyError, OSError):
            continue  # reported by the digest checks
        w = bits_view(data, entry.dtype, entry.shape)
        zeroed, touched = edit_positions(entry.shape, recipe_ops(edits, masks))
        if not zeroed.any():
            continue
        want, _ = fill_values(w, entry.dtype, zeroed, ~touched, info.key, fill)
        got = w[zeroed]
        bad = bool(nonzero(got).any()) if fill.mode == "zeros" else not np.array_equal(got, want)
        if bad:
            what = "zero" if fill.mode == "zeros" else "the recorded noise fill"
            problems.append(f"{info.file.name}: tensor {info.key} does not hold {what} where the recipe prunes")
    return problems


def _model_root(folder: Path) -> Path:
    """The loadable model inside an edited folder: itself, or its single .safetensors file."""
    if (folder / "model_index.json").is_file() or (folder / "config.json").is_file():
        return folder
    sidecars = (".masks.safetensors", ".deltas.safetensors")
    singles = sorted(p for p in folder.glob("*.safetensors") if not p.name.endswith(sidecars))
    if len(singles) == 1:
        return singles[0]
    raise MemeditError(f"{folder} holds no recognizable model", "verify a folder written by memedit apply")
