"""The safetensors file format: dtype codes, tensor entries, and a header parser that checks
what the safetensors library itself checks. No torch.

Headers are parsed here directly (8-byte little-endian length + JSON), so ``inspect`` and the
validation of a 24 GB checkpoint need neither torch nor reading any tensor data.

Example:
    >>> header, data_start = read_header(Path("model.safetensors"))
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elastic.slicer.errors import CheckpointError
from elastic.slicer.formats.values import is_int

# safetensors dtype code -> (name, bytes per element)
DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
# numpy dtype holding one element's raw bits, by element size: bfloat16 and float8 have no numpy
# dtype, and copying or cutting out elements needs their bits only, never their values
_BITS = {1: "u1", 2: "<u2", 4: "<u4", 8: "<u8"}
_MAX_HEADER = 100_000_000  # safetensors' own limit (MAX_HEADER_SIZE in its Rust crate)
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from the safetensors header."""

    name: str
    file: Path
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # byte range inside the data section
    data_start: int = 0  # where the data section starts in the file

    @property
    def row_bytes(self) -> int:
        """Bytes of one index along axis 0 (the whole tensor for a scalar)."""
        return math.prod(self.shape[1:]) * DTYPES[self.dtype][1]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype_name(self) -> str:
        return DTYPES.get(self.dtype, (self.dtype.lower(), 0))[0]


def bits_dtype(code: str) -> str:
    """The numpy dtype (a string, so this module needs no numpy) that views one element of
    safetensors dtype ``code`` as an unsigned integer of the same size: "BF16" -> "<u2".

    Little-endian like the file, so the bytes of such an array are the bytes on disk on any host.
    """
    return _BITS[DTYPES[code][1]]


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"repeated keys {dup[:3]}")
    return dict(pairs)


def _read_json(path: Path) -> tuple[Any, int, int]:
    """(the parsed JSON header, its length in bytes, the file's size): the 8-byte length and the JSON checked."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError("truncated safetensors file (shorter than its 8-byte header length)", path=str(path))
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise CheckpointError(
                    f"corrupt safetensors file: its first 8 bytes give a JSON header of {n:,} bytes, over "
                    f"safetensors' limit of {_MAX_HEADER:,} (the file has {size:,} bytes in all); not a safetensors "
                    "file, or a damaged one: download or copy it again", path=str(path))
            if 8 + n > size:
                raise CheckpointError(
                    f"truncated safetensors file: its first 8 bytes give a JSON header of {n:,} bytes, so the header "
                    f"alone ends at byte {8 + n:,}, but the file has {size:,} bytes: it stops {8 + n - size:,} "
                    f"byte{'s' * (8 + n - size > 1)} short of the header's end, before any tensor data; download or "
                    "copy it again", path=str(path))
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
    except OSError as e:
        raise CheckpointError(f"cannot read ({e.strerror})", path=str(path)) from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        why = str(e) if str(e).startswith("repeated keys") else "not JSON"
        raise CheckpointError(f"corrupt safetensors header ({why})", path=str(path)) from None
    return header, n, size


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse and validate a safetensors header. Returns (header dict, byte offset where data starts).

    Checks what the safetensors library itself checks, every problem at once: a header length
    within its 100 MB limit, a JSON object without repeated keys, ``__metadata__`` a map of
    strings, and for every tensor a known dtype, a shape of non-negative integers and
    ``data_offsets`` ``[start, end]`` covering exactly shape x element size, the tensors laid out
    one after another from 0 with no gap or overlap, ending exactly at the end of the file.

    Raises:
        CheckpointError: the file is missing, truncated, or its header is not valid.
    """
    header, n, size = _read_json(path)
    if not isinstance(header, dict):
        raise CheckpointError("corrupt safetensors header (not an object)", path=str(path))
    data_start = 8 + n
    problems: list[str] = []
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        problems.append("__metadata__ must map names to strings")
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            problems.append(f"{name}: expected an object with dtype, shape and data_offsets, found {info!r:.40}")
            continue
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        bad = []
        if not isinstance(dtype, str) or dtype not in DTYPES:
            bad.append(f"dtype {dtype!r:.20} is not one of {', '.join(DTYPES)}")
        if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
            bad.append(f"shape {shape!r:.40} is not a list of non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(is_int(o) and o >= 0 for o in offs)
                and offs[0] <= offs[1]):
            bad.append(f"data_offsets {offs!r:.40} is not [start, end] with 0 <= start <= end")
        if bad:
            problems.append(f"{name}: {'; '.join(bad)}")
            continue
        want = math.prod(shape) * DTYPES[dtype][1]
        if offs[1] - offs[0] != want:
            problems.append(f"{name}: data_offsets {offs} hold {offs[1] - offs[0]} bytes, but {dtype} {shape} "
                            f"needs {want}")
        spans.append((offs[0], offs[1], name))
    if problems:
        raise CheckpointError("corrupt safetensors header", problems=_cap(problems), path=str(path))
    at = 0
    for start, end, name in sorted(spans):
        if start != at:
            what = "overlaps the previous tensor" if start < at else f"leaves a gap of {start - at} bytes"
            problems.append(f"{name}: data_offsets start at {start}, where the tensor before ends at {at}: {what}")
        at = max(at, end)
    if problems:
        raise CheckpointError("corrupt safetensors header (tensor data not laid out one after another)",
                              problems=_cap(problems), path=str(path))
    need = f"8 + {n:,} bytes of header + {at:,} bytes of tensor data (as its data_offsets say) = {data_start + at:,}"
    if data_start + at > size:
        raise CheckpointError(
            f"truncated safetensors file: {need} bytes, but the file has {size:,} ({data_start + at - size:,} "
            "missing); download or copy it again", path=str(path))
    if data_start + at < size:
        raise CheckpointError(
            f"corrupt safetensors file: {need} bytes, but the file has {size:,} ({size - data_start - at:,} "
            "bytes after the last tensor); download or copy it again", path=str(path))
    return header, data_start


def _cap(problems: list[str], n: int = 20) -> list[str]:
    """At most n problems, then a count of the rest."""
    return problems if len(problems) <= n else [*problems[:n], f"... and {len(problems) - n} more"]
