"""Training text on disk -> memory-mapped token shards -> random (x, y) batches. No downloads.

A corpus is files or directories of ``*.txt``/``*.md``/``*.py`` (one document per file) and
``*.jsonl``/``*.json`` (JSON lines, one document per line's ``"text"``). ``build_token_shards``
streams it through a tokenizer into raw little-endian shards that ``TokenDataset`` memory-maps.

Example:
    >>> tok = load_tokenizer("./tok")                      # trainer.tokenizer
    >>> meta = build_token_shards(stdlib_corpus(), tok, Path("./shards"))
    >>> ds = TokenDataset("./shards", "train")
    >>> x, y = ds.batch(torch.Generator().manual_seed(0), batch_size=8, seq_len=256)  # (8, 256) each
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Protocol

import numpy as np
import torch

# the corpus lives below (the quantizer's calibration text reads it too); re-exported for training
from elastic.slicer.corpus import (SPLIT_RULE, Source, corpus_files, file_documents, is_val_document,  # noqa: F401
                                   iter_texts, stdlib_corpus)
from elastic.profiles.progress import Progress
from elastic.slicer.errors import ElasticError

META_NAME = "meta.json"
SHARDS_FORMAT = "elastic-token-shards"


class TokenizerLike(Protocol):
    """What the shard builder needs from a tokenizer (``elastic.trainer.tokenizer.Tok`` is one)."""

    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...


# ---------------------------------------------------------------- shards


def shard_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab_size <= 65536), else uint32; always little-endian."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


class _ShardWriter:
    """Appends token ids to ``{prefix}_000.bin``, ``{prefix}_001.bin``, ... of ``shard_tokens`` each."""

    def __init__(self, out_dir: Path, prefix: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.prefix, self.dtype, self.shard_tokens = out_dir, prefix, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []  # {"file": name, "tokens": n}
        self.documents = 0
        self._f: BinaryIO | None = None

    def add(self, ids: np.ndarray) -> None:
        self.documents += 1
        while len(ids):
            if self._f is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            self._f.write(ids[:room].tobytes())
            self.shards[-1]["tokens"] += len(ids[:room])
            ids = ids[room:]

    def _open_next(self) -> None:
        self.close()
        name = f"{self.prefix}_{len(self.shards):03d}.bin"
        self._f = open(self.out_dir / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def summary(self) -> dict[str, Any]:
        return {"tokens": sum(s["tokens"] for s in self.shards), "documents": self.documents,
                "shards": self.shards}


def build_token_shards(
    source: Source,
    tokenizer: TokenizerLike,
    out_dir: str | Path,
    shard_tokens: int = 2**26,
    val_fraction: float = 0.05,
    seed: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Tokenize a corpus into memory-mappable train/validation shards.

    Documents are streamed one at a time (only one document's tokens are in memory); each is
    followed by the tokenizer's eos when it has one. A document goes to validation by a hash of its
    content (``SPLIT_RULE``), so validation text is held out of training. Shards are raw
    little-endian ``shard_dtype(vocab_size)`` arrays, ``train_000.bin``, ..., ``val_000.bin``, ...;
    a document may continue into the next shard. Everything is written to a temporary directory
    beside ``out_dir`` and renamed into place at the end.

    Args:
        source: see ``corpus_files``.
        tokenizer: ``encode(str) -> list[int]``, ``vocab_size``, ``eos_id`` (e.g. ``load_tokenizer``).
        out_dir: the shard directory to create.
        shard_tokens: tokens per shard file (the last of each split may hold fewer).
        val_fraction: expected fraction of documents held out for validation (0 disables it).
        seed: salts the split hash; another seed gives another split.
        overwrite: replace an existing ``out_dir``.
        progress: ``progress("tokenize", bytes read, corpus bytes, file=path)`` after each file.
    Returns:
        The contents of ``meta.json``: format, dtype, tokenizer, split rule, per-split shard token
        counts and document counts, and the source files with their sha256.
    Raises:
        ElasticError: bad input (see ``iter_texts``), ``out_dir`` exists, an id outside the
            vocabulary, or a split that ends up empty.
    """
    out_dir = Path(out_dir)
    if shard_tokens < 1 or not 0 <= val_fraction < 1:
        raise ElasticError(f"need shard_tokens >= 1 and 0 <= val_fraction < 1, got {shard_tokens}, {val_fraction}")
    if out_dir.exists() and not overwrite:
        raise ElasticError("shard directory already exists; remove it or pass overwrite", path=str(out_dir))
    files = corpus_files(source)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta = _write_shards(files, tokenizer, tmp, shard_tokens, val_fraction, seed, progress)
        _check_splits(meta, val_fraction, files)
        (tmp / META_NAME).write_text(json.dumps(meta, indent=1) + "\n")
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _write_shards(files: list[Path], tok: TokenizerLike, out: Path, shard_tokens: int,
                  val_fraction: float, seed: int, progress: Progress | None) -> dict[str, Any]:
    dtype = shard_dtype(tok.vocab_size)
    writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in ("train", "val")}
    eos = [] if tok.eos_id is None else [tok.eos_id]
    sources, done, total = [], 0, sum(p.stat().st_size for p in files)
    try:
        for path in files:
            hasher = hashlib.sha256()
            for text in file_documents(path, hasher):
                ids = _checked_ids(tok.encode(text) + eos, tok.vocab_size, path)
                writers["val" if is_val_document(text, val_fraction, seed) else "train"].add(ids.astype(dtype))
            size = path.stat().st_size
            sources.append({"path": str(path.resolve()), "bytes": size, "sha256": hasher.hexdigest()})
            done += size
            if progress:
                progress("tokenize", done, total, file=str(path))
    finally:
        for w in writers.values():
            w.close()
    return {
        "format": SHARDS_FORMAT,
        "version": 1,
        "dtype": dtype.name,  # little-endian on disk whatever the machine
        "shard_tokens": shard_tokens,
        "tokenizer": _tokenizer_info(tok),
        "eos_after_each_document": bool(eos),
        "split": {"rule": SPLIT_RULE, "val_fraction": val_fraction, "seed": seed},
        "splits": {s: w.summary() for s, w in writers.items()},
        "sources": sources,
    }


def _checked_ids(ids: list[int], vocab_size: int, path: Path) -> np.ndarray:
    arr = np.asarray(ids, dtype=np.int64)
    if len(arr) and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ElasticError(f"the tokenizer produced id {int(arr.max()) if arr.max() >= vocab_size else int(arr.min())} "
                           f"outside its vocabulary of {vocab_size}; the tokenizer is inconsistent", path=str(path))
    return arr


def _tokenizer_info(tok: TokenizerLike) -> dict[str, Any]:
    describe = getattr(tok, "describe", None)
    if callable(describe):
        return describe()
    return {"kind": type(tok).__name__, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
            "bos_id": getattr(tok, "bos_id", None)}


def _check_splits(meta: dict[str, Any], val_fraction: float, files: list[Path]) -> None:
    splits = meta["splits"]
    docs = splits["train"]["documents"] + splits["val"]["documents"]
    if docs == 0:
        raise ElasticError("the corpus has no non-empty document", path=", ".join(map(str, files[:3])))
    # (`elastic train` has no option for the fraction: the remedy it can offer is more documents)
    if splits["train"]["tokens"] == 0:
        raise ElasticError(f"all {docs} document(s) went to validation (held-out fraction {val_fraction}), none "
                           "to training; add documents (more files, or more JSON lines)")
    if val_fraction > 0 and splits["val"]["tokens"] == 0:
        raise ElasticError(f"none of the {docs} document(s) went to validation (held-out fraction {val_fraction}); "
                           "training needs held-out text to measure its loss: add documents (more files, "
                           "or more JSON lines)")


def _replace_dir(new: Path, dest: Path) -> None:
    """Rename ``new`` to ``dest``; an existing ``dest`` is removed only after the rename succeeds."""
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        os.replace(dest, old)
    os.replace(new, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- reading shards


class TokenDataset:
    """One split of a shard directory, memory-mapped read-only.

    ``len(ds)`` is the number of tokens. ``batch`` draws training windows, ``iter_eval`` walks
    fixed validation windows. A window of ``seq_len + 1`` tokens never crosses a shard boundary.

    Raises:
        ElasticError: no ``meta.json``, an unknown split, a shard file whose size disagrees with it.
    """

    def __init__(self, shard_dir: str | Path, split: str = "train"):
        self.dir = Path(shard_dir)
        meta_path = self.dir / META_NAME
        if not meta_path.is_file():
            raise ElasticError(f"no {META_NAME}: not a token shard directory; build one with "
                               "build_token_shards", path=str(self.dir))
        self.meta = json.loads(meta_path.read_text())
        if split not in self.meta["splits"]:
            raise ElasticError(f"unknown split {split!r}; have {sorted(self.meta['splits'])}", path=str(meta_path))
        self.split = split
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        self.shards = [self._open(s) for s in self.meta["splits"][split]["shards"] if s["tokens"]]
        self.lengths = np.array([len(s) for s in self.shards], dtype=np.int64)

    def _open(self, shard: dict[str, Any]) -> np.memmap:
        path = self.dir / shard["file"]
        want = shard["tokens"] * self.dtype.itemsize
        have = path.stat().st_size if path.is_file() else None
        if have != want:
            raise ElasticError(f"shard has {have} bytes, meta.json says {want}; rebuild the shards", path=str(path))
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(shard["tokens"],))

    def __len__(self) -> int:
        return int(self.lengths.sum())

    def _starts(self, seq_len: int) -> np.ndarray:
        """Number of valid window starts in each shard (a window holds seq_len + 1 tokens)."""
        starts = np.maximum(self.lengths - seq_len, 0)
        if starts.sum() == 0:
            longest = int(self.lengths.max()) if len(self.lengths) else 0
            raise ElasticError(f"no {self.split} shard holds seq_len + 1 = {seq_len + 1} tokens (longest: "
                               f"{longest}); use shorter sequences or add data", path=str(self.dir))
        return starts

    def _window(self, shard: int, offset: int, seq_len: int) -> np.ndarray:
        return np.asarray(self.shards[shard][offset:offset + seq_len + 1], dtype=np.int64)

    def batch(self, generator: torch.Generator, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch: windows start uniformly over every valid position of every shard.

        Only ``generator`` is consumed (one ``torch.randint`` call), so restoring its state
        (``generator.set_state``) replays the same batches.

        Returns:
            (x, y): int64 tensors of shape (batch_size, seq_len); y[:, t] = x[:, t + 1] in the stream.
        """
        starts = self._starts(seq_len)
        cum = np.cumsum(starts)  # window k lies in shard searchsorted(cum, k, "right")
        picks = torch.randint(int(cum[-1]), (batch_size,), generator=generator).numpy()
        shard_of = np.searchsorted(cum, picks, side="right")
        offsets = picks - (cum[shard_of] - starts[shard_of])
        w = torch.from_numpy(np.stack([self._window(s, o, seq_len) for s, o in zip(shard_of, offsets)]))  # (B, L+1)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def iter_eval(self, batch_size: int, seq_len: int, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed validation batches: consecutive windows (stride ``seq_len``, so every token after
        the first of a shard is predicted once), shard by shard, ``batch_size`` per batch (the last
        may be smaller), at most ``max_batches``. Same (x, y) layout as ``batch``."""
        self._starts(seq_len)
        if max_batches is not None and max_batches <= 0:
            return
        rows, made = [], 0
        for s, n in enumerate(self.lengths):
            for offset in range(0, int(n) - seq_len, seq_len):
                rows.append(self._window(s, offset, seq_len))
                if len(rows) == batch_size:
                    yield _pair(rows)
                    rows, made = [], made + 1
                    if max_batches is not None and made >= max_batches:
                        return
        if rows:
            yield _pair(rows)


def _pair(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.from_numpy(np.stack(rows))  # (B, L+1)
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()
