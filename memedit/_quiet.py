"""Keep library chatter (progress bars, deprecation notes) off a CLI user's terminal.

Importing diffusers and transformers costs seconds and ~100 MB, which the streaming verbs (apply,
verify, diff, inspect) never need: `quiet_libraries` only sets the environment they read at import
time, and `quiet_loaded` silences them once a code path that runs models has imported them.
"""

from __future__ import annotations

import os
import sys
import warnings


def quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    quiet_loaded()


def quiet_loaded() -> None:
    """Silence the loggers and progress bars of diffusers / transformers if they are imported."""
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    if "transformers" in sys.modules:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
