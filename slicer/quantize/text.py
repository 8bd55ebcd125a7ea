"""Bundled text for calibration and evaluation: the Python standard-library documents the demo
checkpoint was trained on (``elastic.slicer.corpus.stdlib_corpus``, no download), split as
``elastic train`` split them (``is_val_document``: a hash of each document's content).

Calibration takes the train split only; evaluation takes the held-out split only, so a
perplexity never scores text the model or its quantization scales have seen.

Example:
    >>> ids = calibration_ids(load_tokenizer(model_dir), samples=16, seq_len=256)   # (16, 256)
    >>> windows = heldout_windows(load_tokenizer(model_dir), seq_len=256)          # [(257,), ...]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from elastic.slicer.errors import ElasticError
from elastic.slicer.formats.tokenizer import Tok

# the demo's corpus and split (examples/make_demo_checkpoint.py: stdlib_corpus(max_bytes=1_500_000),
# build_token_shards' default held-out fraction and seed)
CORPUS_BYTES = 1_500_000
VAL_FRACTION = 0.05
SPLIT_SEED = 0


@dataclass(frozen=True)
class CorpusInfo:
    """Where the text came from, for manifests and JSON outputs."""

    split: str  # "train" or "val"
    documents: int  # documents of that split in the corpus
    windows: int  # windows taken
    seq_len: int  # tokens per window (predicted tokens, for held-out windows)

    def to_json(self) -> dict[str, Any]:
        return {"corpus": f"python standard library (stdlib_corpus(max_bytes={CORPUS_BYTES}))",
                "split": self.split, "split_rule": f"is_val_document(text, {VAL_FRACTION}, seed={SPLIT_SEED})",
                "documents": self.documents, "windows": self.windows, "seq_len": self.seq_len,
                "tokens": self.windows * self.seq_len}


def documents(split: str) -> list[str]:
    """The documents of one split ("train" or "val"), in corpus order."""
    from elastic.slicer.corpus import is_val_document, iter_texts, stdlib_corpus

    if split not in ("train", "val"):
        raise ValueError(split)
    want_val = split == "val"
    return [t for t in iter_texts(stdlib_corpus(CORPUS_BYTES))
            if is_val_document(t, VAL_FRACTION, SPLIT_SEED) == want_val]


def _ids(tok: Tok, text: str) -> list[int]:
    """One document's ids, followed by eos as the training shards have it."""
    return tok.encode(text) + ([] if tok.eos_id is None else [tok.eos_id])


def calibration_ids(tok: Tok, samples: int = 16, seq_len: int = 256) -> tuple[torch.Tensor, CorpusInfo]:
    """``samples`` windows of ``seq_len`` train-split tokens, spread evenly over the corpus.

    Window k starts at train document ``k * n // samples`` and runs on through the following
    documents until it holds ``seq_len`` tokens. Deterministic for a given Python build.

    Returns:
        (ids (samples, seq_len) int64, where they came from).
    """
    docs = documents("train")
    rows = []
    for k in range(samples):
        i, row = k * len(docs) // samples, []
        while len(row) < seq_len and i < len(docs):
            row += _ids(tok, docs[i])
            i += 1
        if len(row) < seq_len:
            raise ElasticError(f"the calibration corpus has too few tokens for {samples} x {seq_len}; ask for fewer")
        rows.append(row[:seq_len])
    return torch.tensor(rows, dtype=torch.long), CorpusInfo("train", len(docs), samples, seq_len)


def heldout_windows(tok: Tok, seq_len: int = 256, max_windows: int | None = None,
                    max_tokens: int | None = None) -> tuple[list[torch.Tensor], CorpusInfo]:
    """Consecutive windows of ``seq_len + 1`` held-out tokens (stride ``seq_len``: every token after
    the first is predicted once), over the held-out documents joined with eos, as
    ``TokenDataset.iter_eval`` walks validation shards.

    Args:
        max_windows: at most this many windows.
        max_tokens: at most this many predicted tokens (whole windows).

    Returns:
        (windows, each (seq_len + 1,) int64; where they came from).
    """
    docs = documents("val")
    limit = max_windows if max_windows is not None else float("inf")
    if max_tokens is not None:
        limit = min(limit, max_tokens // seq_len)
    stream: list[int] = []
    windows: list[torch.Tensor] = []
    for text in docs:
        if len(windows) >= limit:
            break
        stream += _ids(tok, text)
        while len(stream) >= seq_len + 1 and len(windows) < limit:
            windows.append(torch.tensor(stream[: seq_len + 1], dtype=torch.long))
            stream = stream[seq_len:]  # the last target is the next window's first input
    if not windows:
        raise ElasticError(f"no held-out window of {seq_len} tokens: ask for shorter windows or more tokens")
    return windows, CorpusInfo("val", len(docs), len(windows), seq_len)
