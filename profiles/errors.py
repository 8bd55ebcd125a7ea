"""The one error type of `elastic.profiles`. It does not derive from slicer's ElasticError (slicer imports
profiles, not the other way round); the CLI maps it to one line and an exit code."""

from __future__ import annotations


class ProfileError(Exception):
    """A device problem the user can fix: an unknown --target, a bad --gpu, a broken device table.

    Args:
        message: one line saying what was found, why it is refused and what to do.
        problems: every individual violation, collected before raising (shown one per line).
        path: the file the problem is about, when there is one.
    """

    def __init__(self, message: str, problems: list[str] | None = None, path: str | None = None):
        self.message = message
        self.problems = list(problems or [])
        self.path = path
        super().__init__(self.render())

    def render(self) -> str:
        head = f"{self.path}: {self.message}" if self.path else self.message
        return "\n".join([head, *(f"  - {p}" for p in self.problems)])
