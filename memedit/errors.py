"""One error type for everything a user can get wrong; the CLI renders it as one line, exit 2."""

from __future__ import annotations


class MemeditError(Exception):
    """A user-facing failure: what went wrong, and how to fix it."""

    exit_code = 2

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message.rstrip(". ")
        self.hint = hint

    def one_line(self) -> str:
        text = f"error: {self.message}."
        if self.hint:
            hint = self.hint.rstrip(".")
            text += f" {hint[:1].upper()}{hint[1:]}."
        return " ".join(text.split())


class ModelNotFound(MemeditError):
    """The model reference names nothing we can read."""


class PickleRefused(MemeditError):
    """A pickle-based weight file was given; we never unpickle."""


class CorruptFile(MemeditError):
    """A file exists but its content is not what its format promises."""


class RecipeInvalid(MemeditError):
    """A recipe failed validation."""


class OutputExists(MemeditError):
    """The output location already holds something."""


class OutputNotWritable(MemeditError):
    """The output location cannot be written (permissions, disk full, file size limit)."""
