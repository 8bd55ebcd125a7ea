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
  the target keeps two runs from writing the same output at once;
- a run's temporary directories beside the target (``.NAME.partial-OWNER-XXXXXXXX``, and
  ``.NAME.old-OWNER-XXXXXXXX`` while a replaced directory is deleted) carry their owner (host, pid
  and the process's start time) in their name, so a later run writing into the same directory
  removes those whose owner is gone (killed, or the machine rebooted) and leaves every other alone.

Example:
    >>> check_output("./model", force=False, sources=["./ckpt"])   # raises OutputError if unsafe
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import socket
import stat
from pathlib import Path
from typing import Iterable

from elastic.profiles.units import human_bytes as size_text  # sizes in messages: "1.06 MiB", "812 B"
from elastic.slicer.errors import ElasticError, Hint

MARKER = ".elastic-output.json"  # written into every directory this tool produces
REPLACE = Hint("replace", "to replace it (only an empty directory or one elastic wrote)")


class OutputError(ElasticError):
    """Writing the requested output could lose or corrupt data; nothing was touched."""


class DiskFullError(ElasticError):
    """The disk (or the user's quota) is full: the output was not written, and nothing of it was kept."""


SHOWN = 10  # entries named in a refusal before "and N more"


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


def _some(items: list[str]) -> str:
    """The first :data:`SHOWN` items, then how many more."""
    more = len(items) - SHOWN
    return ", ".join(items[:SHOWN]) + (f" and {more} more" if more > 0 else "")


def _listed(d: Path) -> set[str] | None:
    """The entries ``d``'s marker says elastic wrote, or None when ``d`` has no marker of elastic's."""
    marker = d / MARKER
    if not marker.is_file() or marker.is_symlink():
        return None
    try:
        data = json.loads(marker.read_text())
        return set(data["files"]) if data.get("written_by") == "elastic" else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _foreign(root: Path, listed: set[str], prefix: str = "") -> list[str]:
    """Entries under ``root`` elastic did not write, as paths from the top (``prefix``): a foreign
    directory once (``docs/``), not its contents. A directory inside that is itself elastic's
    output (the export fit-my-gpu writes into its model directory) counts by its own marker, and a
    temporary directory whose run is gone (:func:`stale_leftover`) counts as elastic's."""
    out: list[str] = []

    def walk(d: Path) -> None:
        for q in sorted(d.iterdir()):
            rel = str(q.relative_to(root))
            if rel == MARKER:
                continue
            if q.is_dir() and not q.is_symlink():
                if rel in listed:
                    walk(q)
                elif stale_leftover(q):
                    continue
                elif (inner := _listed(q)) is not None:
                    out.extend(_foreign(q, inner, f"{prefix}{rel}/"))
                else:
                    out.append(f"{prefix}{rel}/")
            elif rel not in listed:
                out.append(prefix + rel)

    walk(root)
    return out


def _not_replaceable(p: Path) -> str | None:
    """Why ``p`` (an existing directory) may not be replaced, or None when it may.

    A subdirectory that is itself an output elastic wrote (an export inside the model directory
    fit-my-gpu wrote) counts as elastic's too; the files elastic did not write are named first."""
    top = sorted(p.iterdir())
    if not top:
        return None
    listed = _listed(p)
    if listed is None:
        held = [q.name + ("/" if q.is_dir() and not q.is_symlink() else "") for q in top]
        if (p / MARKER).exists():
            return f"{MARKER} is not elastic's; it holds {_some(held)}"
        return f"no {MARKER}; it holds {_some(held)}"
    foreign = _foreign(p, listed)
    if foreign:
        n = len(foreign)
        return f"it also holds {n} {'entry' if n == 1 else 'entries'} elastic did not write: {_some(foreign)}"
    locked = [str(d) for d in (p, *(q for q in p.rglob("*") if q.is_dir() and not q.is_symlink()))
              if not os.access(d, os.W_OK)]
    if locked:
        return (f"elastic wrote it, but you may not write into {_some(locked)} (mode "
                f"{stat.filemode(Path(locked[0]).stat().st_mode)}), so its files could not be removed; make it "
                "writable (chmod -R u+w) to replace it")
    return None


def own_output(p: Path, kind: str) -> set[str] | None:
    """The entries of ``p`` when it is a complete output of elastic's of ``kind`` ("slice",
    "export"): its marker says so, every entry it lists is there and nothing else is (a temporary
    directory of a run that is gone aside). None otherwise."""
    if not p.is_dir() or p.is_symlink():
        return None
    try:
        data = json.loads((p / MARKER).read_text())
        listed = set(data["files"]) if data.get("written_by") == "elastic" and data.get("kind") == kind else None
        if listed is None or _foreign(p, listed) or not all((p / e).exists() for e in listed):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return listed


def write_marker(tmp: Path, kind: str) -> None:
    """Record, inside the directory about to be published, every entry this tool wrote there."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("elastic")
    except PackageNotFoundError:
        v = "unknown"
    data = {"written_by": "elastic", "version": v, "kind": kind, "files": [e for e in _entries(tmp) if e != MARKER]}
    (tmp / MARKER).write_text(json.dumps(data, indent=2) + "\n")


# ---- owners: who wrote a lock or a temporary directory, and whether that run is gone ----------


def _host() -> str:
    """This machine as it goes into a file name: its name (characters other than [A-Za-z0-9.-] as
    _) and, where /proc says, its pid namespace: containers that share a host name and a disk but
    not their pids are different machines here."""
    name = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "localhost"
    try:
        ns = re.sub(r"\D", "", os.readlink("/proc/self/ns/pid"))  # "pid:[4026531836]"
    except OSError:
        ns = ""
    return f"{name}.pidns{ns}" if ns else name


def _proc(pid: int) -> tuple[str, int] | None:
    """(state, start time) of process ``pid`` from /proc/PID/stat (fields 3 and 22; the start in
    clock ticks since boot names one process even after its pid is reused), None where /proc does
    not say."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
        fields = data[data.rindex(")") + 2:].split()  # from field 3 (state) on
        return fields[0], int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _start_time(pid: int) -> int | None:
    info = _proc(pid)
    return info[1] if info else None


def owner() -> str:
    """This process as the owner of a lock or a temporary directory: ``HOST@PID@START`` (START 0: unknown)."""
    return f"{_host()}@{os.getpid()}@{_start_time(os.getpid()) or 0}"


def _gone(host: str, pid: int, start: int) -> bool:
    """True when the run ``host``/``pid``/``start`` has certainly ended: it ran on this machine and
    no process has that pid, or the process that has it started at another time (the pid was
    reused). Another machine's run (a shared disk) is never judged gone."""
    if host not in (_host(), socket.gethostname()):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's: compare its start time below
    except OSError:
        return False
    info = _proc(pid)
    if info is None:
        return False
    state, now = info
    return state in ("Z", "X") or (bool(start) and now != start)  # killed, not yet reaped; or the pid reused


_LEFTOVER = re.compile(r"^\..*\.(?:partial|old)-(?P<host>[A-Za-z0-9._-]+)@(?P<pid>\d+)@(?P<start>\d+)-[A-Za-z0-9_]+$")


def partial_prefix(out: Path) -> str:
    """The name (less mkdtemp's random tail) of a temporary directory beside ``out`` owned by this
    process: ``.NAME.partial-HOST@PID@START-``; a long NAME is cut to keep it a valid file name."""
    tail = f".partial-{owner()}-"
    return f".{out.name[:255 - 9 - len(tail)]}{tail}"


def stale_leftover(p: Path) -> bool:
    """``p`` is a temporary directory of elastic's (``.NAME.partial-OWNER-*``, ``.NAME.old-OWNER-*``)
    whose run is gone: nothing will ever finish or remove it but a later run."""
    m = _LEFTOVER.match(p.name)
    return bool(m) and p.is_dir() and not p.is_symlink() and _gone(m["host"], int(m["pid"]), int(m["start"]))


def remove_stale_leftovers(parent: Path) -> list[Path]:
    """Remove the temporary directories in ``parent`` that runs killed before they could clean up
    (SIGKILL, a power cut) left behind; those of live runs and of other machines stay. Returns them."""
    try:
        found = [q for q in parent.iterdir() if q.name.startswith(".") and stale_leftover(q)]
    except OSError:
        return []
    for q in found:
        shutil.rmtree(q, ignore_errors=True)
    return [q for q in found if not q.exists()]


# ---- the lock beside the target ---------------------------------------------------------------


class OutputLock:
    """``.NAME.elastic-lock`` beside ``out``, created exclusively; a lock left by a run that is gone
    (see :func:`_gone`) is taken over."""

    def __init__(self, out: Path):
        self.path = out.parent / f".{out.name}.elastic-lock"
        self.held = False

    def acquire(self) -> None:
        host, pid, start = owner().split("@")
        me = f"{host} {pid} {start}\n"
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
        host, pid, start = (self._owner().split() + ["", "", "0"])[:3]  # "HOST PID [START]"
        if not pid.isdigit():
            return False
        return _gone(host, int(pid), int(start) if start.isdigit() else 0)

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
            head, _, tail = tmp.name.rpartition(".partial-")
            old = tmp.with_name(f"{head}.old-{tail}")  # the same owner: removed by a later run if this one dies
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


# ---- a full disk -------------------------------------------------------------------------------

_FULL = (errno.ENOSPC, errno.EDQUOT)


def disk_full_errno(e: BaseException | None) -> int | None:
    """ENOSPC or EDQUOT when ``e`` (or what caused it) is a full disk or an exhausted quota, else
    None. An error that crossed a process boundary (the export's tracing child) keeps the system's
    error only in its text."""
    seen = 0
    while e is not None and seen < 20:
        if isinstance(e, OSError) and e.errno in _FULL:
            return e.errno
        for n in _FULL:
            if isinstance(e, ElasticError) and f"[Errno {n}]" in e.message:
                return n
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def is_disk_full(e: BaseException | None) -> bool:
    """``e`` (or what caused it) is a full disk or an exhausted quota (see :func:`disk_full_errno`)."""
    return disk_full_errno(e) is not None


def free_bytes(path: str | Path) -> int | None:
    """Bytes free to this user on the filesystem that holds (or would hold) ``path``, None where unknown."""
    p = Path(os.path.abspath(Path(path).expanduser()))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def disk_full(out: str | Path, needed: int | None, what: str, *, cause: BaseException | None = None) -> DiskFullError:
    """The error for ``what`` (e.g. "the slice") not fitting beside ``out``: how much it needs (when
    known), how much is free there, and the system's words from ``cause`` (the OSError, or the
    error that carries it). Without a cause it was refused before anything was written."""
    free = free_bytes(Path(out).parent)
    code = disk_full_errno(cause)
    said = os.strerror(code) if code is not None else None  # "No space left on device", "Disk quota exceeded"
    facts = [f"it needs about {size_text(needed)}" if needed else "",
             f"{size_text(free)} free there{' now' if cause is not None else ''}" if free is not None else "",
             f"the system said: {said}" if said else ""]
    numbers = "; ".join(f for f in facts if f)
    quota = code == errno.EDQUOT
    head = (f"{'your disk quota is used up' if quota else 'no space left on the device'} for {what}"
            + (f" ({numbers})" if numbers else ""))
    done = ("nothing was written" if cause is None else
            f"the {'quota ran out' if quota else 'disk filled up'} while writing {what}; nothing of it was kept")
    err = DiskFullError(f"{head}: {done}. Free some space on that disk, or choose an output directory on another "
                        "one, and run it again", path=str(out))
    err.head, err.needed, err.free = head, needed, free
    return err


def require_space(out: str | Path, needed: int | None, what: str) -> None:
    """Refuse (:class:`DiskFullError`) before writing when ``needed`` bytes are known not to fit
    beside ``out``; where the free space is unknown, go ahead."""
    free = free_bytes(Path(out).parent)
    if needed and free is not None and free < needed:
        raise disk_full(out, needed, what)
