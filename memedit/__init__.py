"""memedit: remove memorized training images from text-to-image diffusion models by editing weights."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("memedit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# The Python API mirrors the CLI verbs; imported lazily so that `import memedit` stays light.
_API = {
    "inspect_model": "memedit.inspect",
    "calibrate": "memedit.calibrate",
    "detect": "memedit.detect",
    "localize": "memedit.localize",
    "apply": "memedit.edit",
    "verify": "memedit.manifest",
    "diff_models": "memedit.diff",
    "evaluate": "memedit.evaluate",
    "attack_model": "memedit.attack",
    "run_demo": "memedit.demo",
}


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'memedit' has no attribute {name!r}")


__all__ = ["__version__", *_API]
