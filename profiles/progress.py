"""The one progress shape every library function reports through; front ends (CLI, TUI) render it.

    progress(stage, done, total, **detail)

``stage`` is a short stable name ("tokenize", "pretrain", "stage 1", "slice", "build engine", ...),
``done``/``total`` count in the stage's own unit (bytes, steps, windows, tensors; ``total`` None: a
stage of unknown size), and ``detail`` holds optional named facts a front end may show (``loss=``,
``kd=``, ``message=`` a sentence about the stage). Library code never formats a progress line.

Example:
    >>> def show(stage, done, total, /, **detail):
    ...     print(stage, done, total, detail.get("loss"))
    >>> fit(model, ds, steps=2, progress=show)  # elastic.trainer.pretrain
    pretrain 1 2 5.91...
    pretrain 2 2 5.87...
"""

from __future__ import annotations

from typing import Any, Protocol


class Progress(Protocol):
    """A progress callback: ``(stage, done, total, **detail)``; it may raise to stop the work."""

    def __call__(self, stage: str, done: int, total: int | None, /, **detail: Any) -> None: ...


def quiet(stage: str, done: int, total: int | None, /, **detail: Any) -> None:
    """A :class:`Progress` that reports nowhere (for ``say = progress or quiet``)."""
