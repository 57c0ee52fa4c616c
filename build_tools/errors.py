"""The build tools' own error: a step failed in a way the user can act on."""

from __future__ import annotations


class BuildError(RuntimeError):
    """A build step failed in a way the user can act on (the message says how)."""
