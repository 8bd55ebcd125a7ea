"""Loading a model directory's tokenizer: the one loader every layer uses (no torch).

``tokenizer.json`` (through the ``tokenizers`` library) when present, else UTF-8 bytes (for building
a training corpus from a model that ships no tokenizer). Text in and out of a model needs its real
tokenizer: :func:`require_tokenizer` refuses a directory without one, and :func:`missing_tokenizer`
says why a runtime cannot tokenize for it. Training a tokenizer is ``elastic.trainer.tokenizer``'s
job; it writes the files named here.

Example:
    >>> tok = load_tokenizer("./model-50")
    >>> tok.decode(tok.encode("héllo")) == "héllo"
    >>> missing_tokenizer("./model-50") is None   # else one sentence: what is missing, what to do
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from elastic.slicer.errors import CheckpointError, ElasticError, MissingDependencyError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
# what transformers' AutoTokenizer builds a tokenizer from: any one of these sets
TOKENIZER_SOURCES = ((TOKENIZER_FILE,), ("tokenizer.model",), ("vocab.json", "merges.txt"))
COPY_TOKENIZER = (f"copy {TOKENIZER_FILE}, {CONFIG_FILE} and special_tokens_map.json from the checkpoint this model "
                  "was sliced or trained from into it")
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"  # Nemotron's special tokens (ids 0..3 when trained here)


def tokenizers_module():
    """The ``tokenizers`` package, or a fix-it error when it is not installed."""
    try:
        import tokenizers
    except ImportError:
        raise MissingDependencyError("training or loading a BPE tokenizer needs the `tokenizers` package: "
                                     "pip install tokenizers") from None
    return tokenizers


class Tok:
    """A tokenizer: ``encode``, ``decode``, ``vocab_size``, ``bos_id``, ``eos_id``.

    By default ``encode`` adds no special tokens and ``decode`` keeps them (what a training corpus
    needs); generation asks for Hugging Face's defaults (add them, skip them) with the flags.
    """

    vocab_size: int
    bos_id: int | None
    eos_id: int | None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-ready identity (recorded in the shard directory's meta.json)."""
        return {"kind": type(self).__name__, "vocab_size": self.vocab_size, "bos_id": self.bos_id,
                "eos_id": self.eos_id}


class ByteTok(Tok):
    """UTF-8 bytes as ids 0..255; no bos/eos. For models that ship no tokenizer.

    ``decode`` drops ids above 255 (a model with a larger vocabulary can still produce them).
    """

    vocab_size, bos_id, eos_id = 256, None, None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class BpeTok(Tok):
    """A ``tokenizer.json`` through the ``tokenizers`` library.

    ``encode`` treats the text of special tokens (a literal ``</s>`` in a document) as ordinary
    text, so corpus content or a prompt can never inject a bos/eos id.
    """

    def __init__(self, path: Path, bos_token: str | None, eos_token: str | None):
        tk = tokenizers_module()
        self.path = path
        self._tok = tk.Tokenizer.from_file(str(path))
        self._tok.encode_special_tokens = True
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._tok.token_to_id(bos_token) if bos_token else None
        self.eos_id = self._tok.token_to_id(eos_token) if eos_token else None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def describe(self) -> dict[str, Any]:
        import hashlib

        return {**super().describe(), "path": str(self.path.resolve()),
                "sha256": hashlib.sha256(self.path.read_bytes()).hexdigest()}


def load_tokenizer(model_dir: str | Path) -> Tok:
    """The tokenizer of a model, export or tokenizer directory.

    ``tokenizer.json`` when present (bos/eos named by ``tokenizer_config.json``, else ``<s>``/``</s>``
    when the vocabulary has them), else ``ByteTok`` (vocab 256, no bos/eos): a stand-in for building
    a training corpus, never a model's real tokenizer (generation uses :func:`require_tokenizer`).

    Raises:
        ElasticError: ``model_dir`` is not a directory, or its tokenizer files are unreadable.
        CheckpointError: ``tokenizer.json`` is a link to a missing target (an interrupted download).
        MissingDependencyError: ``tokenizer.json`` is present but ``tokenizers`` is not installed.
    """
    from elastic.slicer.storage.reader import refuse_missing_link

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ElasticError("not a directory; pass a model or tokenizer directory", path=str(model_dir))
    path = model_dir / TOKENIZER_FILE
    refuse_missing_link(path)
    if not path.is_file():
        return ByteTok()
    refuse_missing_link(model_dir / CONFIG_FILE)
    bos, eos = _special_names(model_dir / CONFIG_FILE)
    try:
        return BpeTok(path, bos, eos)
    except Exception as e:  # tokenizers raises its own Exception type for a malformed file
        if isinstance(e, ElasticError):
            raise
        raise ElasticError(f"unreadable tokenizer ({e}); re-save or re-train it", path=str(path)) from None


def require_tokenizer(model_dir: str | Path) -> Tok:
    """The model's own tokenizer, for text in and out: :func:`load_tokenizer` without its byte-level
    stand-in (which would feed the model ids it never learned and print its output as garbage).

    Raises:
        CheckpointError: ``model_dir`` has no ``tokenizer.json`` (what it has instead, and what to do).
        ElasticError / MissingDependencyError: as :func:`load_tokenizer`.
    """
    tok = load_tokenizer(model_dir)
    if isinstance(tok, ByteTok):
        has = [f for f in ("tokenizer.model", "vocab.json") if (Path(model_dir) / f).is_file()]
        if has:
            raise CheckpointError(f"no {TOKENIZER_FILE}, which generation reads (the directory has {has[0]}): "
                                  "write one with transformers: AutoTokenizer.from_pretrained(dir)"
                                  ".save_pretrained(dir)", path=str(model_dir))
        raise CheckpointError(f"no tokenizer: without {TOKENIZER_FILE} the prompt cannot be turned into this model's "
                              f"token ids, nor its output into text; {COPY_TOKENIZER}", path=str(model_dir))
    return tok


def missing_tokenizer(model_dir: str | Path) -> str | None:
    """Why no runtime can tokenize text for the model in ``model_dir`` (no ``tokenizer.json``, no
    ``tokenizer.model``, no ``vocab.json`` + ``merges.txt``), as one sentence; None when it ships
    one of them."""
    model_dir = Path(model_dir)
    if any(all((model_dir / f).is_file() for f in files) for files in TOKENIZER_SOURCES):
        return None
    return (f"no tokenizer ({TOKENIZER_FILE}, tokenizer.model, or vocab.json + merges.txt): no runtime can turn "
            f"text into this model's token ids or its output into text (token ids in and out only); {COPY_TOKENIZER}")


def _special_names(config_path: Path) -> tuple[str | None, str | None]:
    config: dict[str, Any] = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ElasticError(f"not valid JSON ({e.msg} at line {e.lineno})", path=str(config_path)) from None

    def name(key: str, default: str) -> str:
        value = config.get(key, default)
        return value.get("content") if isinstance(value, dict) else value  # transformers' AddedToken form

    return name("bos_token", BOS), name("eos_token", EOS)
