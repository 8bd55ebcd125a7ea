"""A short generation from a model directory: proof that a slice runs, with its speed."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def smoke_test(model_dir: str | Path, prompt: str = "Hello", new_tokens: int = 16, dtype: str | None = None,
               eos_token_id: int | None = None, on_text: Callable[[str], None] | None = None,
               need_tokenizer: bool = True) -> dict[str, Any]:
    """Load ``model_dir`` with the reference model, generate greedily, time it.

    Args:
        eos_token_id: stop there; default: config.json's ``eos_token_id``.
        on_text: called with each new piece of text as it is decoded.
        need_tokenizer: refuse a model without ``tokenizer.json`` (text in, text out); False runs it
            on the prompt's UTF-8 bytes and returns token ids only (``text`` None): proof that it runs.

    Returns:
        ``elastic.slicer.nn.generate.generate_text``'s keys (``backend`` "torch", ``prompt``,
        ``prompt_tokens``, ``new_tokens``, ``tokens``, ``text``, ``prefill_s``, ``decode_s``,
        ``tokens_per_s``) plus ``path`` and ``load_s``.

    Raises:
        CheckpointError: ``need_tokenizer`` and the model has no ``tokenizer.json`` (checked before
            the weights are read).
        ElasticError: the checkpoint does not load, or the model produces non-finite logits.
    """
    import torch

    from elastic.slicer.formats.tokenizer import load_tokenizer, require_tokenizer
    from elastic.slicer.nn.generate import config_eos_token_id, generate_text
    from elastic.slicer.nn.model import TorchBackend, load_model
    from elastic.slicer.storage.reader import Checkpoint

    model_dir = Path(model_dir)
    t0 = time.perf_counter()
    ckpt = Checkpoint.open(model_dir, require_weights=True)  # headers only: every problem of the directory first
    tok = require_tokenizer(ckpt.root) if need_tokenizer else load_tokenizer(ckpt.root)  # before the weights load
    model = load_model(ckpt, dtype=getattr(torch, dtype) if dtype else None)
    load_s = time.perf_counter() - t0
    eos = eos_token_id if eos_token_id is not None else config_eos_token_id(model_dir)
    r = generate_text(TorchBackend(model), tok, prompt, new_tokens, eos_token_id=eos, on_text=on_text,
                      path=str(model_dir))
    return {**r, "load_s": round(load_s, 3)}
