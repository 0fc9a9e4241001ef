"""`memedit push OUT --repo OWNER/NAME`: publish a verified edited model with a model card.

The upload is built as a pure step (file list + rendered card, printed by `--dry-run`), then sent
in one commit through `huggingface_hub` (`create_repo` + `upload_folder` of a staging folder made of
hard links to OUT plus the card), so a failure leaves nothing claimed as done. Tokens come from the
usual huggingface_hub places (HF_TOKEN, the cached login) and are never printed or written.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from memedit import __version__
from memedit.errors import MemeditError

CARD_TAGS = ["memedit", "memorization-mitigation", "diffusers", "text-to-image"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Upload:
    folder: Path
    repo_id: str
    files: tuple[str, ...]  # relative paths from OUT
    card: str  # README.md text
    extra: tuple[tuple[str, Path], ...] = ()  # (path in repo, local file) outside OUT, e.g. the grid


def _license_of(ref: str) -> str | None:
    """The base model's license, where its card is in the local Hugging Face cache."""
    if not _HUB_ID.match(ref):
        return None
    try:
        from huggingface_hub import ModelCard, hf_hub_download

        path = hf_hub_download(ref, "README.md", local_files_only=True)
        return ModelCard.load(path).data.to_dict().get("license")
    except Exception:  # an unreadable or absent card just means: license unknown
        return None


def render_card(folder: Path, repo_id: str, report: Path | None = None) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    from memedit import recipe as recipes
    from memedit.io import sha256_file

    r = recipes.load(folder / "recipe.yaml")
    base = str(r.model.get("ref", ""))
    data = ModelCardData(
        base_model=base if _HUB_ID.match(base) else None,
        base_model_relation="finetune" if _HUB_ID.match(base) else None,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=list(CARD_TAGS),
        license=_license_of(base),
    )
    methods = {}
    for e in r.edits:
        name, url = recipes.METHODS[e.method]
        m = methods.setdefault(e.method, {"name": name, "url": url, "layers": 0, "neurons": 0, "deltas": 0})
        m["layers"] += 1
        m["neurons"] += len(e.indices)  # element masks count in the changed-elements total below
        m["deltas"] += e.op == "add"
    prov = json.loads((folder / "memedit.provenance.json").read_text(encoding="utf-8"))
    changed = sum(
        t["changed_elements"] for t in prov["predicate"]["buildDefinition"]["internalParameters"]["edited_tensors"]
    )

    def label(m: dict) -> str:
        return f"[{m['name']}]({m['url']})" if m["url"] else m["name"]

    rows = "\n".join(f"| {label(m)} | {m['layers']} | {m['neurons']} | {m['deltas']} |" for m in methods.values())
    prov_sha = sha256_file(folder / "memedit.provenance.json")
    delta_note = (
        "\nIts weight deltas (`add` edits) are pinned by digest but not published: the edited weights minus"
        "\nthem are the base weights."
        if r.deltas
        else ""
    )
    index = folder / "model_index.json"
    # the pipeline class the edited folder declares (SD 1.x/2.x or SDXL)
    cls = json.loads(index.read_text(encoding="utf-8")).get("_class_name") if index.is_file() else None
    cls = cls or "DiffusionPipeline"
    body = f"""
# {repo_id.split("/")[-1]}

This model is `{base}` with memorized training images removed by
[memedit](https://github.com/memedit/memedit) {__version__}: the weights below were edited, nothing else.

## What was removed, and how

| method | layers | neurons zeroed | layers with a weight delta |
|---|---|---|---|
{rows}

{len(r.prompts)} memorized prompts guided the edit; {changed:,} weight elements changed in total.
The full edit is `recipe.yaml` in this repository (explicit indices, no data needed to re-apply it).{delta_note}

## Provenance and verification

`memedit.provenance.json` (sha256 `{prov_sha}`) is an in-toto Statement listing every file of this
repository with its sha256, the digests of the base model's files, the recipe, and the digest of every
edited tensor before and after. Check this download against it:

```bash
pip install memedit
huggingface-cli download {repo_id} --local-dir edited
memedit verify edited
memedit diff {base if base else "BASE"} edited --provenance edited/memedit.provenance.json
```
"""
    if report is not None and (report / "metrics.json").is_file():
        m = json.loads((report / "metrics.json").read_text(encoding="utf-8"))
        from memedit.evaluate import SUMMARY_LABELS, _fmt

        lines = "\n".join(f"| {label} | {_fmt(m['summary'].get(k))} |" for k, label in SUMMARY_LABELS.items())
        body += f"""
## Evaluation (`memedit eval`, seeds {m["settings"]["seeds"]})

| measure | value |
|---|---|
{lines}

![reference | base | edited](memedit_grid.png)
"""
    body += f"""
## Use

```python
from diffusers import {cls}
pipe = {cls}.from_pretrained("{repo_id}")
```

## Limits

Pruning-based edits can be undone by optimized prompt embeddings (Finding Dori, Kowalczuk et al. 2025)
and zeroed weights are visible in a released checkpoint; see memedit's documentation.
"""
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body).content


def plan_upload(folder: str | Path, repo_id: str, report: str | Path | None = None) -> Upload:
    from memedit.manifest import verify
    from memedit.model.ref import require_dir

    folder = require_dir(Path(folder), "model folder")
    if not _HUB_ID.match(repo_id):
        raise MemeditError(f"{repo_id!r} is not a Hub repository id", "use --repo OWNER/NAME")
    leaks = sorted(p.name for p in folder.rglob("*.deltas.safetensors"))
    if leaks:
        raise MemeditError(
            f"{folder} holds the weight delta {leaks[0]}: edited weights minus it are the base weights, so "
            "publishing it publishes the memorized model",
            "remove it from the folder (memedit apply never writes it there; keep it private with the recipe)",
        )
    rep = verify(folder)
    if not rep.ok:
        raise MemeditError(
            f"{folder} fails memedit verify ({rep.problems[0]})",
            "push only an untouched output of memedit apply; run memedit verify for details",
        )
    files = tuple(sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()))
    if "README.md" in files:
        raise MemeditError(f"{folder} already has a README.md", "memedit writes the model card; remove it")
    rpath = Path(report) if report else None
    extra = ()
    if rpath is not None:
        if not (rpath / "grid.png").is_file():
            raise MemeditError(
                f"{rpath} is not a memedit eval report (no grid.png)", "pass the folder memedit eval wrote"
            )
        extra = (("memedit_grid.png", rpath / "grid.png"),)
    return Upload(folder, repo_id, files, render_card(folder, repo_id, rpath), extra)


def _stage(up: Upload) -> Path:
    """A temp folder with hard links to OUT's files (copies across devices) and the card."""
    stage = Path(tempfile.mkdtemp(prefix="memedit-push-"))
    for rel in up.files:
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(up.folder / rel, dst)
        except OSError:
            shutil.copyfile(up.folder / rel, dst)
    for rel, src in up.extra:
        shutil.copyfile(src, stage / rel)
    (stage / "README.md").write_text(up.card, encoding="utf-8")
    return stage


def _hub_error(e: Exception, repo_id: str) -> MemeditError:
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(e, HfHubHTTPError) and e.response is not None:
        code = e.response.status_code
        if code == 401:
            return MemeditError(
                f"the Hub refused the credentials for {repo_id} (401)",
                "log in with 'hf auth login' or set HF_TOKEN to a token with write access",
            )
        if code == 403:
            return MemeditError(f"no write access to {repo_id} (403)", "use a token with write access to that repo")
        if code == 404:
            return MemeditError(
                f"{repo_id} or its revision was not found on the Hub (404)", "check --repo and --revision"
            )
        return MemeditError(f"the Hub answered {code} for {repo_id}", "try again later")
    return MemeditError(
        f"cannot reach the Hugging Face Hub ({type(e).__name__})",
        "check the network or HF_ENDPOINT; nothing was uploaded",
    )


def _transport_errors() -> tuple[type[Exception], ...]:
    """The network error bases of whichever HTTP client this huggingface_hub version uses."""
    import importlib

    found = []
    for mod, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            found.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def push(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    report: str | Path | None = None,
) -> dict:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import get_token

    up = plan_upload(folder, repo_id, report)
    if not get_token():
        raise MemeditError("no Hugging Face token found", "log in with 'hf auth login' or set HF_TOKEN")
    api = HfApi()
    stage = _stage(up)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        existing = set(api.list_repo_files(repo_id, revision=revision)) - {".gitattributes"}
        ours = set(up.files) | {"README.md"} | {p for p, _ in up.extra}
        if existing and not existing <= ours and revision is None and not create_pr:
            raise MemeditError(
                f"{repo_id} already holds other files ({sorted(existing - ours)[0]}, ...)",
                "push to a new repo, or to a branch with --revision, or open a PR with --create-pr",
            )
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=stage,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or f"memedit: upload edited model ({__version__})",
        )
    except MemeditError:
        raise
    except (HfHubHTTPError, *_transport_errors(), OSError) as e:
        raise _hub_error(e, repo_id) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    digest = hashlib.sha256(up.card.encode()).hexdigest()
    return {
        "repo": repo_id,
        "commit": getattr(info, "oid", None),
        "url": str(getattr(info, "commit_url", "")),
        "files": len(up.files) + 1 + len(up.extra),
        "card_sha256": digest,
    }
