"""Text corpora on disk: which files a corpus is made of, their documents, the bundled standard-library
corpus (every machine has it, no download) and the train/validation split rule. No torch: the
trainer's token shards and the quantizer's calibration and held-out text both read corpora here.

A corpus is files or directories of ``*.txt``/``*.md``/``*.py`` (one document per file) and
``*.jsonl``/``*.json`` (JSON lines, one document per line's ``"text"``).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sysconfig
from pathlib import Path
from typing import Any, Iterator, Sequence

from elastic.slicer.errors import ElasticError
from elastic.slicer.storage.outputs import MARKER

TEXT_SUFFIXES = (".txt", ".md", ".py")
JSONL_SUFFIXES = (".jsonl", ".json")
SPLIT_RULE = ("document goes to val when int.from_bytes(sha256(seed as 8-byte little-endian + "
              "utf-8 text)[:8], 'big') / 2**64 < val_fraction; identical documents share a split")
# Directories a corpus walk never enters: installed packages (a venv or the base install's
# site-packages), caches, and hidden directories (.git, .venv). The stdlib corpus also skips test
# suites, which are full of deliberately broken or odd files.
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_STDLIB_SKIP_DIRS = _SKIP_DIRS | {"test", "tests", "idle_test"}
# Standard-library packages of ordinary, well-written code; the top-level modules come with them.
_STDLIB_PACKAGES = (
    "asyncio", "collections", "concurrent", "email", "html", "http", "importlib", "json", "logging",
    "multiprocessing", "re", "sqlite3", "tomllib", "unittest", "urllib", "wsgiref", "xml", "zoneinfo",
)

Source = str | Path | Sequence[str | Path]  # a file, a directory, or a list of them (corpus_files)


# ---------------------------------------------------------------- corpus files and documents


def corpus_files(source: Source) -> list[Path]:
    """The files a corpus is made of, in a deterministic order.

    Args:
        source: a file, a directory (searched recursively, sorted by relative path, skipping
            ``site-packages``, ``__pycache__``, hidden files and directories, and directories
            elastic wrote: slices, exports), or a list of those (kept
            in the given order, each directory expanded in sorted order).
    Returns:
        The files, without duplicates.
    Raises:
        ElasticError: a path does not exist, or no corpus file was found.
    """
    roots = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(s) for s in source]
    if not roots:
        raise ElasticError("no corpus given: pass text/jsonl files or directories")
    missing = [str(p) for p in roots if not p.exists()]
    if missing:
        raise ElasticError("corpus path does not exist; check the path", problems=missing)
    files: list[Path] = []
    for root in roots:
        if root.is_file():
            files.append(root)
            continue
        found = sorted((p for p in root.rglob("*") if _is_corpus_file(p, root)), key=lambda p: p.relative_to(root).as_posix())
        files.extend(found)
    files = list(dict.fromkeys(files))
    if not files:
        kinds = ", ".join(f"*{s}" for s in TEXT_SUFFIXES + JSONL_SUFFIXES)
        raise ElasticError(f"no corpus files found (looked for {kinds})", path=", ".join(map(str, roots)))
    return files


def _is_corpus_file(path: Path, root: Path, skip: frozenset[str] = _SKIP_DIRS) -> bool:
    """A text file of the corpus: not hidden, not under a skipped or hidden directory, and not inside
    a directory elastic wrote (a slice or an export beside the data is a model, not text)."""
    if path.suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES or not path.is_file():
        return False
    parts = path.relative_to(root).parts
    if any(part in skip or part.startswith(".") for part in parts):
        return False
    return not any((d / MARKER).is_file() for d in path.parents if d == root or root in d.parents)


def iter_texts(source: Source) -> Iterator[str]:
    """Every non-empty document of the corpus, in ``corpus_files`` order, one at a time.

    Raises:
        ElasticError: a missing path, no corpus files, no non-empty document, a file that is not
            UTF-8, or a JSON line that is not an object with a string ``"text"`` (file and line named).
    """
    empty = True
    for path in corpus_files(source):
        for text in file_documents(path, hashlib.sha256()):
            empty = False
            yield text
    if empty:
        raise ElasticError("the corpus has no non-empty document", path=str(source))


def file_documents(path: Path, hasher: Any) -> Iterator[str]:
    """The non-empty documents of one file; feeds every byte read to ``hasher``."""
    if path.suffix not in JSONL_SUFFIXES:
        data = path.read_bytes()
        hasher.update(data)
        text = _decode(data, path, None)
        if text:
            yield text
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            hasher.update(raw)
            text = _jsonl_text(raw, path, lineno)
            if text:
                yield text


def _decode(data: bytes, path: Path, lineno: int | None) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        where = f"{path}:{lineno}" if lineno else str(path)
        raise ElasticError(f"not UTF-8 text (bad byte at offset {e.start}); convert or remove the file",
                           path=where) from None


def _jsonl_text(raw: bytes, path: Path, lineno: int) -> str:
    line = _decode(raw, path, lineno).strip()
    if not line:
        return ""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ElasticError(f"not valid JSON ({e.msg}); each line of a .jsonl/.json corpus file must be "
                           'one object like {"text": "..."}', path=f"{path}:{lineno}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        found = f"keys {sorted(obj)[:5]}" if isinstance(obj, dict) else type(obj).__name__
        raise ElasticError(f'line has no string "text" field (found {found}); each line must be '
                           'one object like {"text": "..."}', path=f"{path}:{lineno}")
    return obj["text"]


def stdlib_corpus(max_bytes: int = 5_000_000) -> list[Path]:
    """Python standard-library source files: a corpus every machine has without a download.

    Top-level modules plus a fixed set of packages (``json``, ``email``, ``asyncio``, ...) of this
    interpreter's stdlib, never ``site-packages`` or test suites. Sorted by path relative to the
    stdlib and taken in that order, skipping any file that would take the total past ``max_bytes``.
    Deterministic for a given Python build.

    Raises:
        ElasticError: this Python ships no ``.py`` sources (some embedded builds) or none fits
            in ``max_bytes``.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = [p for p in root.glob("*.py") if p.is_file()]
    for pkg in _STDLIB_PACKAGES:
        if (root / pkg).is_dir():
            candidates += [p for p in (root / pkg).rglob("*.py") if _is_corpus_file(p, root, _STDLIB_SKIP_DIRS)]
    candidates.sort(key=lambda p: p.relative_to(root).as_posix())
    chosen, total = [], 0
    for path in candidates:
        size = path.stat().st_size
        if total + size > max_bytes:
            continue
        chosen.append(path)
        total += size
    if not chosen:
        raise ElasticError(f"no standard-library sources within max_bytes={max_bytes} "
                           f"({len(candidates)} .py files found); raise max_bytes or pass a corpus", path=str(root))
    return chosen


def is_val_document(text: str, val_fraction: float, seed: int) -> bool:
    """The train/validation rule (``SPLIT_RULE``): a hash of the content, so order-independent."""
    if val_fraction <= 0:
        return False
    digest = hashlib.sha256(struct.pack("<q", seed) + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction
