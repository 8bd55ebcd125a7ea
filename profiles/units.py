"""Byte units, once for every package: elastic counts memory in binary units (GPUs are sold that
way: an "80GB" card has 80 GiB), and writes sizes as :func:`gib` does."""

from __future__ import annotations

GIB = 1 << 30
MIB = 1 << 20


def gib(n: float, digits: int = 2) -> str:
    """``n`` bytes in GiB with ``digits`` decimals.

    Example:
        >>> gib(3 * 2**29), gib(3 * 2**29, 1)
        ('1.50 GiB', '1.5 GiB')
    """
    return f"{n / GIB:.{digits}f} GiB"
