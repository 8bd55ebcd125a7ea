"""Byte units, once for every package: elastic counts memory in binary units (GPUs are sold that
way: an "80GB" card has 80 GiB), and writes sizes as :func:`gib`, :func:`binary` and
:func:`table_unit` do."""

from __future__ import annotations

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
TIB = 1 << 40


def gib(n: float, digits: int = 2) -> str:
    """``n`` bytes in GiB with ``digits`` decimals.

    Example:
        >>> gib(3 * 2**29), gib(3 * 2**29, 1)
        ('1.50 GiB', '1.5 GiB')
    """
    return f"{n / GIB:.{digits}f} GiB"


def binary(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps them at 1 or more, three significant digits.

    Example:
        >>> binary(3 * 2**29), binary(3_221_225), binary(12)
        ('1.5 GiB', '3.07 MiB', '12 bytes')
    """
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} bytes"


def table_unit(largest: float) -> tuple[str, int]:
    """The unit a table of sizes is written in, given its largest entry: GiB from 1 GiB, else MiB.

    Example:
        >>> table_unit(3 * GIB), table_unit(5 * MIB)
        (('GiB', 1073741824), ('MiB', 1048576))
    """
    return ("GiB", GIB) if largest >= GIB else ("MiB", MIB)


def human_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit below 1024 of it, two decimals (what tables print).

    Example:
        >>> human_bytes(512), human_bytes(3 * 2**29)
        ('512 B', '1.50 GiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable: TiB returns")
