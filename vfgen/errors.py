"""The one exception hierarchy of vfgen; the CLI turns these into one `Error:` line."""

from __future__ import annotations


class VfgenError(Exception):
    """Base of every error vfgen reports to a user."""


class ConfigError(VfgenError):
    """A user-supplied value is invalid. Names the field, the value and, if known, the file."""

    def __init__(self, field: str, value: object, reason: str, source: str | None = None):
        self.field = field
        self.value = value
        self.reason = reason
        self.source = source
        where = f"{source}: " if source else ""
        # A missing value has nothing to show: `MODEL: ...`, never `MODEL=None: ...`.
        shown = "" if value is None else f"={value!r}"
        super().__init__(f"{where}{field}{shown}: {reason}")


class PlanError(VfgenError):
    """The deployment cannot be placed (ports, GPUs, memory budget)."""


class RenderError(VfgenError):
    """A template failed to render; names the template file and line."""


class OutputError(VfgenError):
    """Files could not be written, or a path escapes the output root."""


class HealthError(VfgenError):
    """A health probe or wait failed in a way the user must see."""
