"""The one error tree of elastic, at the bottom layer (``profiles`` imports nothing of ours, every
other package imports it; ``elastic.slicer.errors`` re-exports it under the names the rest of the
code uses).

Every user-facing failure is an :class:`ElasticError` with a message that says what was found and
why it is refused, every individual problem collected, and, where the user can change a setting
to get past it, a structured :class:`Hint`. Messages never name a command-line flag: the CLI
renders a hint as the flag (``--force``), the TUI as its control ("replace").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


def debug_enabled() -> bool:
    """ELASTIC_DEBUG set to anything but "" or "0": tracebacks instead of one-line errors, and the
    tools elastic runs (Model Optimizer, llama.cpp, the ONNX exporter) keep their own output."""
    return os.environ.get("ELASTIC_DEBUG", "") not in ("", "0")


@dataclass(frozen=True)
class Hint:
    """A setting that would get past the error: ``setting`` is a front-end-neutral name (see
    ``SETTINGS``), ``value`` the value to give it (None: any / turn it on), ``action`` what to do,
    in words."""

    setting: str
    action: str
    value: Any = None


# the settings hints may name; each front end has one word (flag or control) for each
SETTINGS = ("replace", "checkpoint", "spec", "target", "gpu", "context", "batch", "dtype", "parity",
            "max_new_tokens", "precision", "kv_precision", "state_precision", "off_curve")


class ElasticError(Exception):
    """A problem the user can fix: bad input, a broken checkpoint, a missing optional package.

    Args:
        message: one line saying what was found and why it is refused.
        problems: every individual violation, collected before raising (shown one per line).
        path: the file or directory the problem is about, when there is one.
        hint: a setting that would get past it, for the front end to put in its own words.
    """

    def __init__(self, message: str, problems: list[str] | None = None, path: str | None = None,
                 hint: Hint | None = None):
        if hint is not None and hint.setting not in SETTINGS:
            raise ValueError(f"unknown hint setting {hint.setting!r}")
        self.message = message
        self.problems = list(problems or [])
        self.path = path
        self.hint = hint
        super().__init__(self.render())

    @property
    def headline(self) -> str:
        """The message, after the path it is about when there is one."""
        return f"{self.path}: {self.message}" if self.path else self.message

    def render(self) -> str:
        """Message and problems, without the hint (front ends add it in their own words)."""
        return "\n".join([self.headline, *(f"  - {p}" for p in self.problems)])


class ConfigError(ElasticError):
    """config.json (or another JSON description) is unreadable or violates an invariant."""


class CheckpointError(ElasticError):
    """The weights on disk are missing, truncated, or disagree with the config."""


class MissingDependencyError(ElasticError):
    """An optional package needed for this operation is not installed."""


class ProfileError(ElasticError):
    """A device problem the user can fix: an unknown target, a bad GPU index, a broken device table."""
