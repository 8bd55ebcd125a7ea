"""Writing checkpoints: safetensors files streamed block by block (hashed on the way out) and
:class:`ShardedWriter`, which publishes a whole directory atomically under the rules of
:mod:`elastic.slicer.storage.outputs`.

Example:
    >>> with ShardedWriter("./model") as w:
    ...     w.add_json("config.json", config)
    ...     w.write_tensors([OutTensor(name, "F32", tuple(t.shape), lambda t=t: [t]) for name, t in sd.items()])
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from elastic.profiles.units import GIB
from elastic.slicer.formats.safetensors import DTYPES
from elastic.slicer.storage.reader import INDEX_NAME, SINGLE_NAME



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

    ``blocks()`` yields pieces whose concatenation along axis 0 is the tensor, so a large tensor
    can be written a few rows at a time. A piece is a torch tensor of that dtype, a numpy array of
    that dtype or of its raw bits (an unsigned integer of the same size: uint16 for "BF16"; see
    :func:`~elastic.slicer.formats.safetensors.bits_dtype`), or bytes as they go to the file.
    Tensors and arrays may be strided views; the writer copies them out.
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
        while (item := self.q.get()) is not None:
            if self.error is None:
                try:
                    data = _as_bytes(item)  # a copy for a strided view: made here, off the reading thread
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


def _as_bytes(item) -> memoryview | bytes:
    """The bytes of one block as they go to the file (bytes, numpy array or torch tensor)."""
    import numpy as np

    if isinstance(item, (bytes, bytearray, memoryview)):
        return item
    if isinstance(item, np.ndarray):
        return memoryview(np.ascontiguousarray(item).reshape(-1).view(np.uint8))
    import torch  # only a torch tensor gets here, so torch is already imported

    return memoryview(item.contiguous().reshape(-1).view(torch.uint8).numpy())


def _block_nbytes(t: OutTensor, block) -> int:
    """The bytes ``block`` adds to ``t``, once its element type is checked against ``t.dtype``."""
    import numpy as np

    if isinstance(block, (bytes, bytearray, memoryview)):
        return memoryview(block).nbytes
    if isinstance(block, np.ndarray):
        name, size = DTYPES[t.dtype]
        if block.dtype.itemsize != size or (block.dtype.kind != "u" and block.dtype.name != name):
            raise AssertionError(f"{t.name}: block dtype {block.dtype}, expected {name} or its raw bits")
        return block.nbytes
    if st_dtype(block.dtype) != t.dtype:
        raise AssertionError(f"{t.name}: block dtype {block.dtype}, expected {t.dtype}")
    return block.numel() * block.element_size()


def _write_safetensors(path: Path, tensors: list[OutTensor], on_bytes: Callable[[int], None] | None) -> tuple[int, str]:
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
                    nbytes = _block_nbytes(t, block)
                    sink.put(block)  # written (and made contiguous) on the sink's thread
                    written += nbytes
                    if on_bytes:
                        on_bytes(nbytes)
                if written != t.nbytes:
                    raise AssertionError(f"{t.name}: wrote {written} bytes, expected {t.nbytes}")
        finally:
            sha = sink.close()
        f.flush()
        os.fsync(f.fileno())  # on disk before the directory is renamed into place
    return offset, sha


class ShardedWriter:
    """Write a checkpoint atomically: into a temporary directory beside ``out``, renamed at the end.

    On any exception inside the ``with`` block (a failed read, a full disk, Ctrl-C, and SIGTERM where
    the writer runs in the main thread) the temporary directory is removed and ``out`` is untouched;
    a full disk is reported as ``DiskFullError``. A run killed outright (SIGKILL) leaves its
    temporary directory, named by its owner; the next writer into the same directory removes it.
    The output rules (never a source, replace only what elastic wrote, atomic publish, one writer
    at a time) live in :mod:`elastic.slicer.storage.outputs`.

    Example:
        >>> with ShardedWriter("./model") as w:
        ...     w.add_json("config.json", config)
        ...     w.write_tensors([OutTensor(name, "F32", tuple(t.shape), lambda t=t: [t]) for name, t in sd.items()])
    """

    def __init__(self, out: str | Path, force: bool = False, *, sources=(), source_files=(), kind: str = "checkpoint"):
        import tempfile

        from elastic.slicer.storage.outputs import (OutputLock, check_output, disk_full, is_disk_full, partial_prefix,
                                                    remove_stale_leftovers)

        self.out = Path(out)
        self.force, self.kind = force, kind
        self.expected: int | None = None  # bytes this output needs, when the caller knows (see expect)
        check_output(self.out, force=force, sources=sources, source_files=source_files)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.lock = OutputLock(self.out)
        self.lock.acquire()
        try:
            check_output(self.out, force=force, sources=sources, source_files=source_files)  # again, under the lock
            remove_stale_leftovers(self.out.parent)  # what killed runs left here (theirs are named by owner)
            self.tmp = Path(tempfile.mkdtemp(prefix=partial_prefix(self.out), dir=self.out.parent))
        except BaseException as e:
            self.lock.release()
            if is_disk_full(e):
                raise disk_full(self.out, None, self.what, cause=e) from e
            raise
        self.signals = _ExitOnSignal()  # SIGTERM cleans up as Ctrl-C does (main thread only)
        self.bytes_written = 0
        self.shards: list[str] = []
        self.sha256: dict[str, str] = {}  # shard file name -> sha256 of the file

    @property
    def what(self) -> str:
        """The output in words, for messages: "the slice", "the export"."""
        return f"the {self.kind}" if self.kind in ("slice", "export") else f"the {self.kind} output"

    def expect(self, nbytes: int) -> None:
        """Say how many bytes this output will take: refused at once (``DiskFullError``, nothing
        written) when they are known not to fit, and named if the disk fills up anyway."""
        from elastic.slicer.storage.outputs import require_space

        self.expected = nbytes
        require_space(self.out, nbytes, self.what)

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        import shutil

        from elastic.slicer.storage.outputs import DiskFullError, disk_full, is_disk_full

        try:
            if exc_type is None:
                try:
                    self.commit()
                    return
                except BaseException as e:
                    shutil.rmtree(self.tmp, ignore_errors=True)
                    if is_disk_full(e):
                        raise disk_full(self.out, self.expected, self.what, cause=e) from e
                    raise
            shutil.rmtree(self.tmp, ignore_errors=True)
            if is_disk_full(exc) and not isinstance(exc, DiskFullError):
                raise disk_full(self.out, self.expected, self.what, cause=exc) from exc
        finally:
            self.lock.release()
            self.signals.restore()

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

    def write_tensors(self, tensors: list[OutTensor], max_shard_bytes: int = 2 * GIB,
                      on_bytes: Callable[[int], None] | None = None) -> None:
        """Write all tensors, split into shards of at most ``max_shard_bytes`` (one tensor may exceed it).

        ``on_bytes(n)`` is called as each block of n bytes is written (the caller turns it into progress).
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
            nbytes, self.sha256[name] = _write_safetensors(self.tmp / name, group, on_bytes)
            total += nbytes
        if n > 1:
            weight_map = {t.name: name for name, group in zip(names, groups) for t in group}
            self.add_json(INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        self.shards = names

    def commit(self) -> Path:
        """Publish the finished directory at ``out`` (see :func:`elastic.slicer.storage.outputs.publish`)."""
        from elastic.slicer.storage.outputs import publish, write_marker

        write_marker(self.tmp, self.kind)
        umask = os.umask(0)
        os.umask(umask)
        for p in self.tmp.rglob("*"):  # mkdtemp uses 0700; give the modes any new file would get
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
        try:  # a directory being replaced keeps its mode (a read-only one stays read-only)
            mode = stat.S_IMODE(self.out.stat().st_mode) if self.force and self.out.is_dir() else None
        except OSError:
            mode = None
        self.tmp.chmod(mode if mode is not None else 0o777 & ~umask)
        self.bytes_written = sum(p.stat().st_size for p in self.tmp.rglob("*") if p.is_file())
        publish(self.tmp, self.out, replace=self.force)
        _fsync_dir(self.out.parent)
        return self.out


class Terminated(SystemExit):
    """SIGTERM (or SIGHUP) arrived while a :class:`ShardedWriter` wrote in the main thread: its
    temporary directory was removed, as for Ctrl-C, and the process exits with 128 + the signal."""


def _terminate(signum, frame) -> None:
    raise Terminated(128 + signum)


class _ExitOnSignal:
    """While a writer writes, SIGTERM and SIGHUP raise :class:`Terminated` in the main thread, so
    the ``with`` block cleans up. Only where the signal still has its default action (a program
    with its own handler keeps it) and only in the main thread (Python sets handlers there alone:
    a writer in another thread changes nothing)."""

    def __init__(self):
        import signal
        import threading

        self.saved: dict = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for name in ("SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:
                self.saved[sig] = signal.signal(sig, _terminate)

    def restore(self) -> None:
        import signal

        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        self.saved = {}


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
