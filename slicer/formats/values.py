"""Type checks every JSON reader of ``formats`` shares (config.json, safetensors headers)."""

from __future__ import annotations

from typing import Any


def is_int(v: Any) -> bool:
    """An integer, and not a boolean (JSON's true is Python's 1)."""
    return isinstance(v, int) and not isinstance(v, bool)
