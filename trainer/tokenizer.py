"""Train a byte-level BPE tokenizer on local text (loading one is ``elastic.slicer.formats.tokenizer``).

The saved directory is the standard Hugging Face form (``tokenizer.json``,
``tokenizer_config.json`` with ``PreTrainedTokenizerFast``, ``special_tokens_map.json``) that
transformers 4.x and 5.x and llama.cpp's converter read. Special tokens take Nemotron's ids:
``<unk>`` 0, ``<s>`` 1 (bos), ``</s>`` 2 (eos), ``<pad>`` 3; the 256 byte symbols follow.

The pre-tokenizer is exactly GPT-2's (byte-level, GPT-2 regex, no prefix space). llama.cpp's
converter recognises pre-tokenizers by a hash of a probe string's token ids, which no freshly
trained vocabulary matches: map the hash it prints to ``gpt-2`` there.

Example:
    >>> info = train_tokenizer(stdlib_corpus(), 4096, Path("./tok"))
    >>> tok = load_tokenizer("./tok")
    >>> tok.decode(tok.encode("héllo")) == "héllo"
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from elastic.slicer.errors import ElasticError
# loading lives in the slicer (generation and export read tokenizers too); re-exported for the trainer
from elastic.slicer.formats.tokenizer import (BOS, CONFIG_FILE, EOS, PAD, TOKENIZER_FILE, UNK, BpeTok, ByteTok,
                                              Tok, load_tokenizer, tokenizers_module)

from .data import iter_texts

__all__ = ["BpeTok", "ByteTok", "Tok", "TokenizerInfo", "load_tokenizer", "train_tokenizer"]

SPECIAL_MAP_FILE = "special_tokens_map.json"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)  # ids 0..3, in this order
_MIN_VOCAB = len(SPECIAL_TOKENS) + 256  # specials + every byte


@dataclass(frozen=True)
class TokenizerInfo:
    """What ``train_tokenizer`` wrote; the ids go into config.json (``bos_token_id`` ...)."""

    path: Path  # the directory holding tokenizer.json
    vocab_size: int  # actual size: may be below the requested one on a small corpus
    unk_id: int
    bos_id: int
    eos_id: int
    pad_id: int


def train_tokenizer(files: Sequence[str | Path], vocab_size: int, out_dir: str | Path,
                    model_max_length: int = 8192, min_frequency: int = 2) -> TokenizerInfo:
    """Train a byte-level BPE on local files and save it in Hugging Face form.

    Args:
        files: corpus files or directories (``elastic.trainer.data.corpus_files``: text, or JSON lines
            with ``"text"``); read locally, nothing is downloaded.
        vocab_size: target vocabulary including the 4 special tokens and 256 bytes (>= 260).
        out_dir: directory to write ``tokenizer.json``, ``tokenizer_config.json`` and
            ``special_tokens_map.json`` into (created; other files in it are left alone).
        model_max_length: longest sequence the model is meant for (recorded in the config).
        min_frequency: a pair must occur this often to be merged.
    Returns:
        The directory, the actual vocabulary size and the special-token ids.
    Raises:
        ElasticError: vocab_size too small, or bad corpus input (see ``iter_texts``).
    """
    if vocab_size < _MIN_VOCAB:
        raise ElasticError(f"vocab_size {vocab_size} is below {_MIN_VOCAB} (4 special tokens + 256 bytes)")
    tk = tokenizers_module()
    tok = tk.Tokenizer(tk.models.BPE(unk_token=None))  # byte-level: every input is covered, no unk
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(iter_texts(list(files)), trainer=trainer)
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    assert ids == [0, 1, 2, 3], ids  # BpeTrainer puts special tokens first, in order
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / TOKENIZER_FILE, tok.to_str(pretty=True))
    _atomic_write(out_dir / CONFIG_FILE, json.dumps(_tokenizer_config(model_max_length), indent=2) + "\n")
    _atomic_write(out_dir / SPECIAL_MAP_FILE, json.dumps(_special_map(), indent=2) + "\n")
    return TokenizerInfo(out_dir, tok.get_vocab_size(with_added_tokens=True), *ids)


def _special_map() -> dict[str, str]:
    return {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}


def _tokenizer_config(model_max_length: int) -> dict[str, Any]:
    # transformers 4.x needs "PreTrainedTokenizerFast" (5.x writes "TokenizersBackend", unknown to 4.x
    # and to llama.cpp's converter). No bos/eos is added on encode: the data pipeline places them.
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, t in enumerate(SPECIAL_TOKENS)}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **_special_map(),
        "added_tokens_decoder": added,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,  # else decode rewrites " ." to "." and breaks round trips
        "model_max_length": model_max_length,
    }


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
