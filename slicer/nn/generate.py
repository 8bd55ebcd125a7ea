"""The one greedy decoding loop, over any backend that can prefill and step (no torch import).

A backend holds a model and its recurrent state: the PyTorch reference
(``elastic.slicer.nn.model.TorchBackend``) or ONNX Runtime (``elastic.export.runtime.OnnxGenerator``).
Arrays are the backend's own (torch tensors, numpy arrays); the loop only takes ``[:, -1]``,
``argmax(-1)`` and ``tolist()`` of them, which both support.

Example:
    >>> out = greedy(TorchBackend(model), torch.tensor([[72, 101]]), max_new_tokens=8)
    >>> out.tokens  # [[...8 ids...]]
    >>> r = generate_text(TorchBackend(model), load_tokenizer(model_dir), "Hello", 16, on_text=print)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from elastic.slicer.errors import ElasticError, Hint
from elastic.slicer.formats.tokenizer import ByteTok, Tok


class Backend(Protocol):
    """What the loop drives. ``state`` is opaque to the loop."""

    name: str  # "torch", "onnx": reported as ``backend``
    vocab_size: int

    def prefill(self, input_ids: Any) -> tuple[Any, Any]:
        """(logits (b, l or 1, vocab), state) for prompt ids (b, l): a nested list or the backend's array."""

    def step(self, next_ids: Any, state: Any) -> tuple[Any, Any]:
        """(logits (b, 1, vocab), new state) for one token per sequence, ids (b,)."""


@dataclass(frozen=True)
class Greedy:
    """What :func:`greedy` produced."""

    tokens: list[list[int]]  # (b, n) generated ids; every row has the same length n
    prefill_s: float  # seconds in prefill
    decode_s: float  # seconds from the end of prefill to the end of the last step
    finite: bool  # the last logits computed were all finite (NaN/inf means the model is broken)


def greedy(backend: Backend, input_ids: Any, max_new_tokens: int, eos_token_id: int | None = None,
           on_token: Callable[[list[int]], None] | None = None) -> Greedy:
    """Greedy decoding: one prefill, then one step per new token (none after an eos that ends it).

    Args:
        backend: see :class:`Backend`.
        input_ids: (b, l) prompt ids: nested lists or the backend's array type.
        max_new_tokens: at most this many tokens per row.
        eos_token_id: stop once every row has produced it (the eos itself is kept; rows that
            finished earlier keep receiving greedy tokens, so rows stay the same length).
        on_token: called after each step with the new id of every row (b ints), in order.

    Returns:
        :class:`Greedy`: the generated ids per row, and the timings.
    """
    t0 = time.perf_counter()
    logits, state = backend.prefill(input_ids)
    t1 = time.perf_counter()
    rows: list[list[int]] = [[] for _ in range(len(input_ids))]
    done = [False] * len(rows)
    for _ in range(max_new_tokens):
        nxt = logits[:, -1].argmax(-1)  # (b,), the backend's array type: the next step's input as it is
        step = [int(t) for t in nxt.tolist()]
        for row, t in zip(rows, step):
            row.append(t)
        if on_token is not None:
            on_token(step)
        if eos_token_id is not None:
            done = [d or t == eos_token_id for d, t in zip(done, step)]
            if all(done):
                break
        logits, state = backend.step(nxt, state)  # also after the last token: its state is checked finite
    t2 = time.perf_counter()
    return Greedy(rows, t1 - t0, t2 - t1, math.isfinite(float(abs(logits).max())))


# ---- text in, text out ----------------------------------------------------------------------


class TextStream:
    """Decodes a growing list of ids and hands out only the new text.

    A piece that ends inside a multi-byte character (decoded as U+FFFD) is held back until the
    next id completes it; :meth:`finish` hands out whatever is left. The pieces concatenate to
    ``decode(all ids)`` whenever each decode extends the previous one (byte-level BPE, bytes).
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode, self.ids, self.sent = decode, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        return self._emit(text)

    def finish(self) -> str:
        return self._emit(self.decode(self.ids))

    def _emit(self, text: str) -> str:
        if len(text) <= len(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece


def encode_prompt(tok: Tok, prompt: str, vocab_size: int) -> tuple[list[int], bool]:
    """(ids, decodable): the tokenizer's ids (with its special tokens, as Hugging Face adds them).

    The byte-level stand-in of a model that ships no tokenizer (``ByteTok``) is not the model's
    tokenizer: its output ids are never decoded (its "text" would be garbage). A model whose
    vocabulary is smaller than its tokenizer's (a test model: UTF-8 bytes into fewer than 256 ids)
    gets the ids folded into its vocabulary, and its output is not decodable either.
    """
    ids = tok.encode(prompt, add_special_tokens=True)
    if all(i < vocab_size for i in ids):
        return ids, not isinstance(tok, ByteTok)
    return [i % vocab_size for i in ids], False


def check_context(prompt_tokens: int, max_new_tokens: int, max_context: int | None, path: str | None = None) -> None:
    """Refuse a request longer than the runtime's maximum context (None: no recorded maximum)."""
    total = prompt_tokens + max_new_tokens
    if max_context is None or total <= max_context:
        return
    room = max_context - prompt_tokens
    hint = (Hint("max_new_tokens", "generate fewer tokens", room) if room >= 1
            else Hint("context", "export again for longer sequences", total))
    raise ElasticError(f"the prompt ({prompt_tokens} tokens) + {max_new_tokens} new tokens = {total} tokens is longer "
                       f"than this export's maximum context of {max_context} tokens", path=path, hint=hint)


def generate_text(backend: Backend, tok: Tok, prompt: str, max_new_tokens: int, *, eos_token_id: int | None = None,
                  max_context: int | None = None, on_text: Callable[[str], None] | None = None,
                  path: str | None = None) -> dict[str, Any]:
    """Greedy text generation, timed: encode, :func:`greedy`, decode.

    Args:
        backend: the model (see :class:`Backend`).
        tok: its tokenizer (``elastic.slicer.formats.tokenizer.load_tokenizer``).
        eos_token_id: stop there (the model's config.json ``eos_token_id``).
        max_context: refuse prompt + max_new_tokens above this (an export's recorded maximum).
        on_text: called with each new piece of decoded text as it comes (not called when the
            output is not decodable).
        path: the model or export directory, for messages.

    Returns:
        ``backend``, ``prompt``, ``prompt_tokens``, ``new_tokens``, ``tokens`` (generated ids), ``text``
        (None when not decodable: ``tok`` is the byte-level stand-in of a model without a tokenizer,
        or the model's vocabulary is smaller than the tokenizer's), ``prefill_s``, ``decode_s``,
        ``tokens_per_s`` (decode; None for no tokens).

    Raises:
        ElasticError: the request is longer than ``max_context``, or the logits are not finite.
    """
    ids, decodable = encode_prompt(tok, prompt, backend.vocab_size)
    fed = ids or [tok.bos_id if tok.bos_id is not None and tok.bos_id < backend.vocab_size else 0]
    check_context(len(fed), max_new_tokens, max_context, path)
    streaming = on_text is not None and decodable
    stream = TextStream(lambda out: tok.decode(out, skip_special_tokens=True))

    def on_token(step: list[int]) -> None:
        piece = stream.push(step[0])
        if piece:
            on_text(piece)

    g = greedy(backend, [fed], max_new_tokens, eos_token_id, on_token if streaming else None)
    if streaming and (piece := stream.finish()):
        on_text(piece)
    if not g.finite:
        raise ElasticError("the model produced non-finite logits (NaN/inf): the model does not run correctly",
                           path=path)
    tokens = g.tokens[0]
    return {
        "backend": backend.name,
        "path": path,
        "prompt": prompt,
        "prompt_tokens": len(ids),
        "new_tokens": len(tokens),
        "tokens": tokens,
        "text": tok.decode(tokens, skip_special_tokens=True) if decodable else None,
        "prefill_s": round(g.prefill_s, 4),
        "decode_s": round(g.decode_s, 4),
        "tokens_per_s": round(len(tokens) / g.decode_s, 1) if tokens and g.decode_s > 0 else None,
    }


def config_eos_token_id(model_dir: str | Path) -> int | None:
    """``eos_token_id`` of the directory's config.json (the first one when it is a list); None when
    there is none or no readable config.json (generation then runs to ``max_new_tokens``)."""
    try:
        eos = json.loads((Path(model_dir) / "config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return None
    return eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else None
