"""A checkpoint directory on disk: config, shard index, safetensors headers. Torch only to read data.

Headers are parsed here directly (8-byte little-endian length + JSON), so ``inspect`` and the
validation of a 24 GB checkpoint need neither torch nor reading any tensor data.

Example:
    >>> ckpt = Checkpoint.open("./model")          # validates config, index, shards, shapes
    >>> ckpt.arch.layer_pattern, ckpt.dtype, ckpt.weights_bytes
    >>> w = ckpt.read("backbone.norm_f.weight")    # one tensor, read from its shard
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .arch import Arch, read_config
from .errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
ELASTIC_CONFIG_NAME = "elastic_config.json"
# safetensors files beside the weights that are not weights (elastic format sidecars)
SIDECAR_FILES = ("router.safetensors", "importance.safetensors")
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
_MAX_HEADER = 100_000_000  # safetensors' own limit (MAX_HEADER_SIZE in its Rust crate)
# Tensors that transformers itself ignores on load (multi-token-prediction heads).
IGNORED_PREFIXES = ("mtp.",)
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


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"repeated keys {dup[:3]}")
    return dict(pairs)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError("truncated safetensors file (shorter than its 8-byte header length)", path=str(path))
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"truncated or corrupt safetensors file (header says {n} bytes, file has {size})", path=str(path)
                )
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
    except OSError as e:
        raise CheckpointError(f"cannot read ({e.strerror})", path=str(path)) from None
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        why = str(e) if str(e).startswith("repeated keys") else "not JSON"
        raise CheckpointError(f"corrupt safetensors header ({why})", path=str(path)) from None
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
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            bad.append(f"shape {shape!r:.40} is not a list of non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) and o >= 0 for o in offs)
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
    if data_start + at > size:
        raise CheckpointError(
            f"truncated safetensors file: tensors need {data_start + at} bytes, the file has {size}; "
            "download or copy it again",
            path=str(path),
        )
    if data_start + at < size:
        raise CheckpointError(
            f"corrupt safetensors file: {size - data_start - at} bytes follow the last tensor (the header "
            f"describes {data_start + at} bytes); download or copy it again", path=str(path))
    return header, data_start


def _plain_name(name: Any) -> bool:
    """True when a shard name is a plain file name in the checkpoint directory (no directory part,
    not absolute, not "." or ".."). Where the file's symlink points is not our business: a Hugging
    Face cache snapshot links every file to ``../../blobs/HASH``."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name \
        and "\0" not in name and Path(name).name == name


class Checkpoint:
    """A Hugging Face ``nemotron_h`` directory: config, optional weights, optional elastic sidecar.

    Use :meth:`open`; it validates everything it can and raises one error listing all problems.
    """

    def __init__(self, root: Path, config: dict[str, Any], arch: Arch, tensors: dict[str, TensorInfo]):
        self.root = root
        self.config = config
        self.arch = arch
        self.tensors = tensors  # name -> TensorInfo; empty when the weights are absent

    # ---- opening and validation ---------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, require_weights: bool = False) -> "Checkpoint":
        """Open and validate a checkpoint directory.

        Args:
            path: the directory (or its config.json).
            require_weights: raise when no weights are present (else config-only mode).

        Raises:
            ConfigError: config.json missing or invalid.
            CheckpointError: a shard is missing, truncated, outside the directory, or a tensor
                disagrees with the config (every problem listed).
        """
        root = Path(path)
        if root.is_file() and root.name == "config.json":
            root = root.parent
        if not root.is_dir():
            raise CheckpointError("no such checkpoint directory", path=str(root))
        config = read_config(root / "config.json")
        arch = Arch.from_config(config, source=str(root / "config.json"))
        tensors = cls._scan_weights(root)
        if require_weights and not tensors:
            raise CheckpointError(
                f"no weights: expected {SINGLE_NAME} or {INDEX_NAME} beside config.json", path=str(root)
            )
        ckpt = cls(root, config, arch, tensors)
        if tensors:
            problems = ckpt.shape_problems()
            if problems:
                raise CheckpointError(
                    f"the weights disagree with config.json ({len(problems)} problems)",
                    problems=_cap(problems),
                    path=str(root),
                )
        return ckpt

    @staticmethod
    def _scan_weights(root: Path) -> dict[str, TensorInfo]:
        index_path = root / INDEX_NAME
        if index_path.is_file():
            try:
                index = json.loads(index_path.read_text())
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise CheckpointError("not a valid shard index (not JSON)", path=str(index_path)) from None
            except OSError as e:
                raise CheckpointError(f"cannot read ({e.strerror})", path=str(index_path)) from None
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError("not a valid shard index (needs a non-empty 'weight_map' object of "
                                      "tensor name -> shard file name)", path=str(index_path))
            problems = []
            if "metadata" in index and not isinstance(index["metadata"], (dict, type(None))):
                problems.append(f"metadata must be an object, found {index['metadata']!r:.40}")
            shards = sorted({s for s in weight_map.values() if isinstance(s, str)})
            for name, shard in weight_map.items():
                if not isinstance(shard, str):
                    problems.append(f"weight_map[{name!r}] must be a shard file name, found {shard!r:.40}")
            for shard in shards:
                n = sum(1 for s in weight_map.values() if s == shard)
                if not _plain_name(shard):
                    problems.append(f"shard name {shard!r} is not a plain file name in the checkpoint directory; refused")
                elif (root / shard).is_symlink() and not (root / shard).exists():
                    problems.append(f"shard {shard} is a link to {os.readlink(root / shard)}, which is missing "
                                    f"(holds {n} tensors; an interrupted download?)")
                elif not (root / shard).is_file():
                    problems.append(f"missing shard {shard} (holds {n} tensors)")
            if problems:
                raise CheckpointError("broken shard index", problems=_cap(problems), path=str(index_path))
            files = [root / s for s in shards]
        elif (root / SINGLE_NAME).is_file():
            weight_map, files = None, [root / SINGLE_NAME]
        elif (root / SINGLE_NAME).is_symlink():
            raise CheckpointError(f"{SINGLE_NAME} is a link to {os.readlink(root / SINGLE_NAME)}, which is missing "
                                  "(an interrupted download?)", path=str(root))
        else:
            stray = sorted(p.name for p in root.glob("*.safetensors") if p.name not in SIDECAR_FILES)
            if stray:
                raise CheckpointError(
                    f"found {', '.join(stray[:3])} but no {INDEX_NAME} saying which tensor is where", path=str(root)
                )
            return {}
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            header, data_start = read_header(file)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if weight_map is not None and weight_map.get(name) != file.name:
                    continue  # the index is the authority on where a tensor lives
                tensors[name] = TensorInfo(
                    name, file, meta["dtype"], tuple(meta["shape"]), tuple(meta["data_offsets"]), data_start
                )
        if weight_map is not None:
            lost = [n for n in weight_map if n not in tensors]
            if lost:
                raise CheckpointError(
                    f"{len(lost)} tensors listed in the index are not in their shard",
                    problems=_cap([f"{n} (index says {weight_map[n]})" for n in lost]),
                    path=str(index_path),
                )
        return tensors

    def shape_problems(self) -> list[str]:
        """Every difference between the tensors on disk and what config.json implies."""
        expected = self.arch.tensor_shapes()
        problems = []
        for name, shape in expected.items():
            info = self.tensors.get(name)
            if info is None:
                problems.append(f"missing tensor {name} {list(shape)}")
            elif info.shape != shape:
                problems.append(f"{name}: config implies shape {list(shape)}, {info.file.name} has {list(info.shape)}")
            elif info.dtype not in FLOAT_DTYPES:
                problems.append(f"{name} is {info.dtype_name} in {info.file.name}; model weights are floating point")
        for name in self.tensors:
            if name not in expected and not name.startswith(IGNORED_PREFIXES):
                problems.append(f"unexpected tensor {name} in {self.tensors[name].file.name} (not in config.json's layout)")
        return problems

    # ---- facts ---------------------------------------------------------------------------
    @property
    def has_weights(self) -> bool:
        return bool(self.tensors)

    @property
    def is_elastic(self) -> bool:
        return (self.root / ELASTIC_CONFIG_NAME).is_file()

    @property
    def weight_files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    @property
    def weights_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)

    @property
    def bytes_on_disk(self) -> int:
        """Every regular file in the directory (what a user downloads)."""
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    @property
    def dtype(self) -> str | None:
        """The dtype holding most of the parameters, else the config's ``torch_dtype``/``dtype``."""
        if self.tensors:
            by_dtype: Counter[str] = Counter()
            for t in self.tensors.values():
                by_dtype[t.dtype_name] += t.numel
            return by_dtype.most_common(1)[0][0]
        return self.config.get("dtype") or self.config.get("torch_dtype")

    # ---- reading data (torch) -----------------------------------------------------------
    def _fd(self, file: Path) -> int:
        """One descriptor per shard, kept open: the kernel's read-ahead follows sequential reads
        only within one open file."""
        fds = self.__dict__.setdefault("_fds", {})
        if file not in fds:
            fds[file] = os.open(file, os.O_RDONLY)
        return fds[file]

    def close(self) -> None:
        for fd in self.__dict__.pop("_fds", {}).values():
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    def read(self, name: str, rows: tuple[int, int] | None = None):
        """Read one tensor, or rows ``[r0, r1)`` of its first axis, with plain file reads.

        No memory map: a file truncated or replaced while we read gives a clear error, not a
        crash (a mapped page past the end of a file kills the process with SIGBUS).

        Returns:
            a CPU ``torch.Tensor`` in the dtype on disk, owning its memory.
        """
        import torch

        info = self.tensors[name]
        dtype = getattr(torch, DTYPES[info.dtype][0])
        r0, r1 = rows if rows is not None else (0, info.shape[0] if info.shape else 1)
        nbytes = (r1 - r0) * info.row_bytes
        shape = (r1 - r0, *info.shape[1:]) if info.shape else ()
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        buf = torch.empty(nbytes, dtype=torch.uint8)  # not zero-filled: the read overwrites it
        try:
            got = _pread_fully(self._fd(info.file), buf.numpy(), info.data_start + info.offsets[0] + r0 * info.row_bytes)
        except OSError as e:
            raise CheckpointError(f"cannot read {name} ({e.strerror})", path=str(info.file)) from None
        if got != nbytes:
            raise CheckpointError(
                f"truncated while reading {name}: the file ended {nbytes - got} bytes early "
                "(was it modified during the run?)", path=str(info.file)
            )
        return buf.view(dtype).view(shape)

    def iter_tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, Any]]:
        """Yield (name, tensor) one at a time, in file order."""
        wanted = names if names is not None else list(self.tensors)
        for name in sorted(wanted, key=lambda n: (self.tensors[n].file, self.tensors[n].offsets)):
            yield name, self.read(name)


def _pread_fully(fd: int, view, offset: int) -> int:
    """pread until the buffer is full or the file ends (reads may return short)."""
    mv, got = memoryview(view), 0
    while got < len(mv):
        n = os.preadv(fd, [mv[got:]], offset + got)
        if not n:
            break
        got += n
    return got


def _cap(problems: list[str], n: int = 20) -> list[str]:
    """At most n problems, then a count of the rest."""
    return problems if len(problems) <= n else [*problems[:n], f"... and {len(problems) - n} more"]


# ---- writing ----------------------------------------------------------------------------------


def st_dtype(torch_dtype) -> str:
    """safetensors' code for a torch dtype: torch.bfloat16 -> "BF16"."""
    name = str(torch_dtype).removeprefix("torch.")
    for code, (n, _) in DTYPES.items():
        if n == name:
            return code
    raise ValueError(f"no safetensors dtype for {torch_dtype}")


@dataclass(frozen=True)
class OutTensor:
    """One tensor to write: its name, dtype code, shape, and a producer of its data.

    ``blocks()`` yields tensors of that dtype whose concatenation along axis 0 is the tensor, so a
    large tensor can be written a few rows at a time.
    """

    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    blocks: Callable[[], Iterable[Any]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


class _Sink:
    """Writes and hashes blocks on a background thread, so reading the next block overlaps with
    writing this one (file writes and sha256 both release the GIL). At most ``depth`` blocks wait."""

    def __init__(self, f, depth: int = 3):
        import hashlib
        import queue
        import threading

        self.f, self.digest, self.error = f, hashlib.sha256(), None
        self.q: "queue.Queue" = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import torch

        while (item := self.q.get()) is not None:
            if self.error is None:
                try:
                    # a tensor (maybe a strided view) becomes bytes here, off the reading thread
                    data = item if isinstance(item, bytes) else \
                        memoryview(item.contiguous().reshape(-1).view(torch.uint8).numpy())
                    self.f.write(data)
                    self.digest.update(data)
                except BaseException as e:  # reported to the producer at its next put / close
                    self.error = e

    def put(self, data) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(data)

    def close(self) -> str:
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.digest.hexdigest()


def _write_safetensors(path: Path, tensors: list[OutTensor], progress: Callable[[int], None] | None) -> tuple[int, str]:
    """Stream tensors into one safetensors file: header first (all shapes are known), then data.

    Tensors are written in name order, so the same inputs give byte-identical files. Returns
    (data bytes written, sha256 of the whole file), the hash taken on the way out.
    """
    tensors = sorted(tensors, key=lambda t: t.name)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        sink = _Sink(f)
        try:
            sink.put(struct.pack("<Q", len(raw)) + raw)
            for t in tensors:
                written = 0
                for block in t.blocks():
                    if st_dtype(block.dtype) != t.dtype:
                        raise AssertionError(f"{t.name}: block dtype {block.dtype}, expected {t.dtype}")
                    nbytes = block.numel() * block.element_size()
                    sink.put(block)  # written (and made contiguous) on the sink's thread
                    written += nbytes
                    if progress:
                        progress(nbytes)
                if written != t.nbytes:
                    raise AssertionError(f"{t.name}: wrote {written} bytes, expected {t.nbytes}")
        finally:
            sha = sink.close()
        f.flush()
        os.fsync(f.fileno())  # on disk before the directory is renamed into place
    return offset, sha


class ShardedWriter:
    """Write a checkpoint atomically: into a temporary directory beside ``out``, renamed at the end.

    On any exception inside the ``with`` block (a failed read, a full disk, Ctrl-C) the temporary
    directory is removed and ``out`` is untouched. The output rules (never a source, replace only
    what elastic wrote, atomic publish, one writer at a time) live in :mod:`elastic.slicer.outputs`.

    Example:
        >>> with ShardedWriter("./model") as w:
        ...     w.add_json("config.json", config)
        ...     w.write_tensors([OutTensor(name, "F32", tuple(t.shape), lambda t=t: [t]) for name, t in sd.items()])
    """

    def __init__(self, out: str | Path, force: bool = False, *, sources=(), source_files=(), kind: str = "checkpoint"):
        import tempfile

        from .outputs import OutputLock, check_output

        self.out = Path(out)
        self.force, self.kind = force, kind
        check_output(self.out, force=force, sources=sources, source_files=source_files)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.lock = OutputLock(self.out)
        self.lock.acquire()
        try:
            check_output(self.out, force=force, sources=sources, source_files=source_files)  # again, under the lock
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        except BaseException:
            self.lock.release()
            raise
        self.bytes_written = 0
        self.shards: list[str] = []
        self.sha256: dict[str, str] = {}  # shard file name -> sha256 of the file

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        import shutil

        try:
            if exc_type is None:
                try:
                    self.commit()
                    return
                except BaseException:
                    shutil.rmtree(self.tmp, ignore_errors=True)
                    raise
            shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            self.lock.release()

    def add_json(self, filename: str, data: dict) -> None:
        self.add_text(filename, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def add_text(self, filename: str, text: str) -> None:
        (self.tmp / filename).write_text(text)

    def add_file(self, src: Path, filename: str | None = None) -> None:
        import shutil

        shutil.copyfile(src, self.tmp / (filename or src.name))

    def add_files_from(self, root: Path, names) -> None:
        """Copy those of ``names`` that exist in ``root`` (tokenizer and generation files)."""
        for name in names:
            if (root / name).is_file():
                self.add_file(root / name)

    def write_tensors(self, tensors: list[OutTensor], max_shard_bytes: int = 2 * 2**30,
                      progress: Callable[[int], None] | None = None) -> None:
        """Write all tensors, split into shards of at most ``max_shard_bytes`` (one tensor may exceed it).

        One shard is ``model.safetensors``; several are ``model-0000k-of-0000n.safetensors`` with
        ``model.safetensors.index.json``. Memory holds one block of one tensor at a time.
        """
        groups: list[list[OutTensor]] = [[]]
        size = 0
        for t in sorted(tensors, key=lambda t: t.name):
            if groups[-1] and size + t.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
        n = len(groups)
        names = [SINGLE_NAME] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        total = 0
        for name, group in zip(names, groups):
            nbytes, self.sha256[name] = _write_safetensors(self.tmp / name, group, progress)
            total += nbytes
        if n > 1:
            weight_map = {t.name: name for name, group in zip(names, groups) for t in group}
            self.add_json(INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        self.shards = names

    def commit(self) -> Path:
        """Publish the finished directory at ``out`` (see :func:`elastic.slicer.outputs.publish`)."""
        from .outputs import publish, write_marker

        write_marker(self.tmp, self.kind)
        umask = os.umask(0)
        os.umask(umask)
        for p in self.tmp.rglob("*"):  # mkdtemp uses 0700; give the modes any new file would get
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
        self.tmp.chmod(0o777 & ~umask)
        self.bytes_written = sum(p.stat().st_size for p in self.tmp.rglob("*") if p.is_file())
        publish(self.tmp, self.out, replace=self.force)
        _fsync_dir(self.out.parent)
        return self.out


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
