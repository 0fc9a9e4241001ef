"""The Python API of the README: every name `import memedit` promises resolves lazily to the real thing."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import memedit


@pytest.mark.parametrize("name", [n for n in memedit.__all__ if n != "__version__"])
def test_every_api_name_resolves_to_the_function_or_class_of_its_module(name):
    obj = getattr(memedit, name)
    assert callable(obj) and obj.__name__ == name
    assert inspect.getmodule(obj).__name__ == memedit._API[name]


def test_an_api_name_stays_the_function_after_its_submodule_is_loaded():
    import memedit.calibrate  # loading it sets the package attribute to the module

    first = memedit.calibrate
    again = memedit.calibrate
    assert callable(first) and first is again and first.__module__ == "memedit.calibrate"
    for name in ("detect", "localize", "evaluate"):
        assert callable(getattr(memedit, name))


def test_the_readme_localize_example_builds_its_settings():
    default, nemo = memedit.LocalizeSettings(), memedit.LocalizeSettings(method="nemo", targets="flagged")
    assert dataclasses.is_dataclass(default) and default.method == "encoder" and default.targets == "auto"
    assert default.encoder.strength == 40.0 and default.encoder.rounds == 3
    assert nemo.method == "nemo" and nemo.targets == "flagged"


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        memedit.nothing  # noqa: B018
