"""memedit: remove memorized training images from text-to-image diffusion models by editing weights."""

from __future__ import annotations

import sys
import types
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
    "LocalizeSettings": "memedit.localize",
    "apply": "memedit.edit",
    "verify": "memedit.manifest",
    "diff_models": "memedit.diff",
    "evaluate": "memedit.evaluate",
    "attack_model": "memedit.attack",
    "run_demo": "memedit.demo",
}


def _resolve(name: str):
    import importlib

    return getattr(importlib.import_module(_API[name]), name)


class _ApiModule(types.ModuleType):
    """`memedit.calibrate` (also detect, localize, evaluate) names both a function of the API and the
    submodule that holds it, and loading a submodule sets the package attribute of that name to the
    module: a plain module `__getattr__` would hand out the module from then on (the second
    `memedit.calibrate(...)` of a session failed). API names therefore always resolve to the function;
    the submodules stay importable as usual (`from memedit.calibrate import ...`)."""

    def __getattribute__(self, name: str):
        if name in _API:
            return _resolve(name)
        return super().__getattribute__(name)


sys.modules[__name__].__class__ = _ApiModule


__all__ = ["__version__", *_API]
