"""Shared pieces of every command: the error boundary, option aliases, JSON output."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer

from elastic.profiles.progress import quiet
from elastic.profiles.units import GIB, KIB, MIB, TIB, human_bytes  # noqa: F401 (the CLI's formatter)
from elastic.slicer.errors import ElasticError

CheckpointOpt = Annotated[
    Optional[Path],
    typer.Option("--checkpoint", "-c", help="Checkpoint directory. Default: $ELASTIC_CHECKPOINT, the current "
                 "directory if it is an elastic checkpoint, else the bundled demo.", show_default=False),
]
def one_checkpoint(positional: Path | None, option: Path | None, required: bool = False) -> Path | None:
    """The checkpoint of a command that takes it as its object (positional) or as -c/--checkpoint."""
    from elastic.slicer.errors import ConfigError

    if positional is not None and option is not None and positional != option:
        raise ConfigError(f"two checkpoints given ({positional} and -c {option}); give one")
    chosen = positional if positional is not None else option
    if chosen is None and required:
        raise ConfigError("no checkpoint given: name the model directory (or -c DIR)")
    return chosen


JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts instead of text.")]


def precision_choice(name: str, allowed, *extra: str):
    """An Enum of every spelling of ``allowed`` precisions (``elastic.slicer.formats.precision``) plus
    words such as "auto"/"keep", for an option with ``case_sensitive=False``: every command takes
    every spelling."""
    from enum import Enum

    from elastic.slicer.formats.precision import spellings

    return Enum(name, {s: s for s in spellings(allowed, *extra)}, type=str)


def canonical_precision(value: str | None, allowed, *extra: str) -> str | None:
    """The canonical name ("bfloat16") of a spelling, or the extra word itself ("auto", "keep")."""
    from elastic.slicer.formats.precision import lookup

    value = getattr(value, "value", value)  # an Enum member from precision_choice
    if value is None or value.lower() in extra:
        return value.lower() if value else value
    return lookup(value, allowed).name


def debug() -> bool:
    from elastic.profiles.errors import debug_enabled

    return debug_enabled()


# how the CLI says each hint's setting (elastic.profiles.errors.SETTINGS)
FLAGS = {"replace": "--force", "checkpoint": "--checkpoint DIR", "spec": "--spec FILE", "target": "--target NAME",
         "gpu": "--gpu N", "context": "--context", "batch": "--batch", "dtype": "--dtype", "parity": "--no-parity",
         "max_new_tokens": "--max-new-tokens", "precision": "--precision", "kv_precision": "--kv-precision",
         "state_precision": "--state-precision", "off_curve": "--allow-off-curve"}


def hint_text(e: ElasticError) -> str | None:
    """The error's hint as a CLI user acts on it: what to do, and the flag."""
    h = e.hint
    if h is None:
        return None
    flag = FLAGS[h.setting]
    if h.value is not None and not isinstance(h.value, bool):
        flag = f"{flag.split()[0]} {h.value}"
    return f"{h.action} ({flag})"


@contextmanager
def boundary(json_out: bool = False) -> Iterator[dict[str, Any]]:
    """Map an ElasticError (or an OSError: a full disk, a path that cannot be read) to one message
    on stderr and exit code 2 (traceback with ELASTIC_DEBUG=1). With ``json_out`` the error is also
    one JSON object on stdout (``{"error", "hint", "problems", "path", "exit_code"}`` plus whatever
    the command put in the dict this yields, e.g. the plan that found no fit), so a script always
    has something to parse."""
    extra: dict[str, Any] = {}
    try:
        yield extra
    except ElasticError as e:
        if debug():
            raise
        fail(e, json_out=json_out, extra=extra)
    except KeyboardInterrupt:
        fail(ElasticError("interrupted"), code=130, json_out=json_out, extra=extra)
    except SystemExit as e:  # SIGTERM/SIGHUP during a write: the writer removed its partial output
        from elastic.slicer.storage.writer import Terminated

        if not isinstance(e, Terminated):
            raise
        fail(ElasticError("terminated by a signal; nothing of the output being written was kept"), code=int(e.code),
             json_out=json_out, extra=extra)
    except OSError as e:  # a full disk, a busy or unreadable path: the system's words, with the path
        if debug():
            raise
        fail(ElasticError(e.strerror or str(e), path=e.filename), json_out=json_out, extra=extra)


def fail(e: ElasticError, *, code: int = 2, json_out: bool = False, extra: dict[str, Any] | None = None) -> None:
    """Say an error the one way every command does (``error: ...`` and ``hint: ...`` on stderr; with
    ``json_out`` also one JSON object on stdout) and exit with ``code``."""
    hint = hint_text(e)
    typer.echo(f"error: {e.render()}" + (f"\nhint: {hint}" if hint else ""), err=True)
    if json_out:
        print_json({"error": e.headline, "hint": hint, "problems": e.problems,
                    "path": None if e.path is None else str(e.path), "exit_code": code, **(extra or {})})
    raise typer.Exit(code) from None


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


_SIZE_UNITS = {"": None, "k": KIB, "m": MIB, "g": GIB, "t": TIB}


def parse_bytes(text: str, option: str) -> int:
    """ "80GB", "80GiB", "24G", "512MiB" -> bytes. Binary whatever the spelling: GPUs sold as
    "80GB" have 80 GiB (an H100 80GB reports 79.6 GiB), so GB, GiB and G all mean 2**30 here.

    Raises:
        ConfigError: not a positive number with a unit (a bare number is refused: bytes or GB?).
    """
    import re

    from elastic.slicer.errors import ConfigError

    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*", text, re.I)
    unit = _SIZE_UNITS.get(m.group(2).lower()) if m else None
    if m is None or unit is None or float(m.group(1)) <= 0:
        raise ConfigError(f"{option} {text!r}: need a size with its unit, e.g. 80GB, 24GiB or 512MB "
                          "(binary: 1 GB = 2**30 bytes, as GPU sizes are sold)")
    return int(float(m.group(1)) * unit)


def runtime_lines(runtimes: dict[str, dict]) -> list[str]:
    """A slice manifest's ``runtimes``, one line each: "yes: how" or "no: why"."""
    width = max((len(name) for name in runtimes), default=0) + 2
    return [f"  {name:<{width}}{'yes: ' + r['how'] if r['loads'] else 'no: ' + r['why']}" for name, r in runtimes.items()]


def human_count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


@contextmanager
def progress_bar(description: str, enabled: bool = True) -> Iterator:
    """A rich progress bar on stderr, driven by the library's ``progress(stage, done, total, **detail)``
    callbacks (``elastic.profiles.progress``; total None: a stage of unknown size). Disabled (a no-op
    callback) for --json output or when stderr is not a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield quiet
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)

        def advance(stage: str, done: int, total: int | None, /, message: str | None = None, **_) -> None:
            bar.update(task, description=f"{description}: {message or stage}", completed=done, total=total)

        yield advance
