"""Output safety: the one place that decides whether a directory may be written or replaced.

Every command that writes a directory (slice, export, train, fit-my-gpu, the TUI) goes through
:class:`elastic.slicer.storage.writer.ShardedWriter`, which calls :func:`check_output` before any slow work
and :func:`publish` at the end. The rules:

- an output that is a source, lies inside a source directory, or contains a source is refused
  (paths compared both as given and with symlinks resolved);
- replacing (``force``) is allowed only for an empty directory or one this tool wrote: it holds
  :data:`MARKER`, which lists every file the tool put there, and nothing else;
- the result appears by one atomic rename that fails when something appeared at the target
  meanwhile (Linux ``renameat2`` with ``RENAME_NOREPLACE``; ``RENAME_EXCHANGE`` to replace, so a
  directory being replaced is removed only after the new one is in place), and a lock file beside
  the target keeps two runs from writing the same output at once.

Example:
    >>> check_output("./model", force=False, sources=["./ckpt"])   # raises OutputError if unsafe
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Iterable

from elastic.slicer.errors import ElasticError, Hint

MARKER = ".elastic-output.json"  # written into every directory this tool produces
REPLACE = Hint("replace", "to replace it (only an empty directory or one elastic wrote)")


class OutputError(ElasticError):
    """Writing the requested output could lose or corrupt data; nothing was touched."""


def _forms(p: str | Path) -> set[Path]:
    """A path as given (absolute, not resolved) and with every symlink resolved."""
    p = Path(p).expanduser()
    return {Path(os.path.abspath(p)), p.resolve()}


def _within(a: Path, b: Path) -> bool:
    """a == b or a lies inside b."""
    return a == b or b in a.parents


def check_output(out: str | Path, *, force: bool, sources: Iterable[str | Path] = (),
                 source_files: Iterable[str | Path] = ()) -> None:
    """Raise :class:`OutputError` when writing ``out`` could lose data.

    Args:
        out: the directory to create or replace.
        force: replace ``out`` if it exists (only an empty directory or one elastic wrote).
        sources: directories (or files) being read: ``out`` may not be one of them, lie inside one,
            or contain one.
        source_files: files being read whose directory may hold the output (an export written into
            ``MODEL/export``): ``out`` may not be one of them or contain one.
    """
    outs = _forms(out)
    for src in sources:
        for s in _forms(src):
            for o in outs:
                if _within(o, s):
                    raise OutputError(f"is (or lies inside) the source {src}; writing there would destroy what is "
                                      "being read. Choose an output directory outside it", path=str(out))
                if _within(s, o):
                    raise OutputError(f"contains the source {src}; replacing it would delete what is being read. "
                                      "Choose another output directory", path=str(out))
    for src in source_files:
        for s in _forms(src):
            for o in outs:
                if _within(s, o):
                    raise OutputError(f"is or contains the source file {src}; choose another output directory",
                                      path=str(out))
    cwd = _forms(os.getcwd())
    if any(_within(c, o) for c in cwd for o in outs):
        raise OutputError("is (or contains) the current directory; choose an output directory beside it",
                          path=str(out))
    p = Path(out)
    if p.is_symlink():
        raise OutputError("is a symbolic link; give the directory itself (or a new path)", path=str(out))
    if not p.exists():
        return
    if not p.is_dir():
        raise OutputError("exists and is not a directory; it was left as it is", path=str(out))
    if not force:
        raise OutputError("already exists and was left as it is; choose a new output directory", path=str(out),
                          hint=REPLACE)
    why = _not_replaceable(p)
    if why:
        raise OutputError(f"exists and was not written by elastic ({why}); it was left as it is. "
                          "Remove it yourself or choose another output directory", path=str(out))


def _entries(root: Path) -> list[str]:
    """Relative paths of everything under root (directories too), sorted."""
    return sorted(str(q.relative_to(root)) for q in root.rglob("*"))


def _not_replaceable(p: Path) -> str | None:
    """Why ``p`` (an existing directory) may not be replaced, or None when it may.

    A subdirectory that is itself an output elastic wrote (an export inside the model directory
    fit-my-gpu wrote) counts as elastic's too."""
    entries = _entries(p)
    if not entries:
        return None
    marker = p / MARKER
    if not marker.is_file() or marker.is_symlink():
        return f"no {MARKER}; it holds {', '.join(entries[:3])}{' ...' if len(entries) > 3 else ''}"
    try:
        data = json.loads(marker.read_text())
        listed = set(data["files"]) if data.get("written_by") == "elastic" else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        listed = None
    if listed is None:
        return f"{MARKER} is not elastic's"
    nested = [e for e in entries if e not in listed and (p / e).is_dir() and not (p / e).is_symlink()
              and (p / e / MARKER).is_file() and _not_replaceable(p / e) is None]
    foreign = [e for e in entries if e != MARKER and e not in listed
               and not any(e == n or e.startswith(n + os.sep) for n in nested)]
    if foreign:
        return f"it also holds files elastic did not write: {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}"
    return None


def write_marker(tmp: Path, kind: str) -> None:
    """Record, inside the directory about to be published, every entry this tool wrote there."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("elastic")
    except PackageNotFoundError:
        v = "unknown"
    data = {"written_by": "elastic", "version": v, "kind": kind, "files": [e for e in _entries(tmp) if e != MARKER]}
    (tmp / MARKER).write_text(json.dumps(data, indent=2) + "\n")


# ---- the lock beside the target ---------------------------------------------------------------


class OutputLock:
    """``.NAME.elastic-lock`` beside ``out``, created exclusively; a lock left by a dead process
    on this host is taken over."""

    def __init__(self, out: Path):
        self.path = out.parent / f".{out.name}.elastic-lock"
        self.held = False

    def acquire(self) -> None:
        me = f"{socket.gethostname()} {os.getpid()}\n"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)
                    continue
                raise OutputError(f"another elastic run is writing it (lock {self.path}: {self._owner()}); wait "
                                  "for it to finish, or remove the lock file if that run is gone",
                                  path=str(self.path.parent / self.path.name[1:-len('.elastic-lock')])) from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return
        raise OutputError("could not take the output lock", path=str(self.path))

    def _owner(self) -> str:
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def _stale(self) -> bool:
        host, _, pid = self._owner().partition(" ")
        if host != socket.gethostname() or not pid.isdigit():
            return False  # another machine's run (a shared disk): never steal it
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


# ---- publishing --------------------------------------------------------------------------------

_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False where the call or the flag is not available (then the caller falls back)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def publish(tmp: Path, out: Path, *, replace: bool) -> None:
    """Move the finished ``tmp`` to ``out`` atomically.

    Without ``replace``, fails (OutputError) if anything appeared at ``out`` meanwhile. With it,
    ``out`` must still be replaceable; the old directory is swapped out in one step and deleted
    only after the new one is in place.
    """
    if out.exists() or out.is_symlink():
        if not replace:
            raise OutputError("appeared while this run was writing (another program or run created it); "
                              "it was left as it is and nothing of this run was kept", path=str(out))
        why = _not_replaceable(out) if out.is_dir() and not out.is_symlink() else "not a directory"
        if why:
            raise OutputError(f"changed while this run was writing ({why}); it was left as it is", path=str(out))
        try:
            exchanged = _renameat2(tmp, out, _RENAME_EXCHANGE)
        except FileNotFoundError:
            exchanged = False  # removed meanwhile: publish as new below
            replace = False
        if exchanged:
            shutil.rmtree(tmp)  # tmp now holds the old directory
            return
        if replace and out.exists():
            old = tmp.with_name(tmp.name.replace(".partial-", ".old-"))
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
            return
    try:
        if _renameat2(tmp, out, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise OutputError("appeared while this run was writing (another program or run created it); it was left "
                          "as it is and nothing of this run was kept", path=str(out)) from None
    if out.exists():  # fallback without renameat2: the lock keeps our own runs apart
        raise OutputError("appeared while this run was writing; it was left as it is", path=str(out))
    tmp.rename(out)
