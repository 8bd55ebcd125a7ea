"""Typed errors. Every user-facing failure is an ElasticError with a fix-it message.

The CLI maps any ElasticError to one line on stderr and exit code 2; other exceptions are bugs.
"""

from __future__ import annotations


class ElasticError(Exception):
    """A problem the user can fix: bad input, a broken checkpoint, a missing optional package.

    Args:
        message: one line saying what was found and why it is refused.
        problems: every individual violation, collected before raising (shown one per line).
        path: the file or directory the problem is about, when there is one.
    """

    def __init__(self, message: str, problems: list[str] | None = None, path: str | None = None):
        self.message = message
        self.problems = list(problems or [])
        self.path = path
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.path}: {self.message}" if self.path else self.message
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])


class ConfigError(ElasticError):
    """config.json (or another JSON description) is unreadable or violates an invariant."""


class CheckpointError(ElasticError):
    """The weights on disk are missing, truncated, or disagree with the config."""


class MissingDependencyError(ElasticError):
    """An optional package needed for this operation is not installed."""
