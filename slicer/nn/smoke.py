"""A short generation from a model directory: proof that a slice runs, with its speed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def encode_prompt(model_dir: Path, prompt: str, vocab_size: int) -> tuple[list[int], Any]:
    """Token ids for ``prompt``: the checkpoint's tokenizer.json when present, else UTF-8 bytes
    (byte-level vocabularies), else the bytes folded into the vocabulary. Returns (ids, decoder)."""
    tok_file = model_dir / "tokenizer.json"
    if tok_file.is_file():
        try:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(tok_file))
            return tok.encode(prompt).ids, lambda ids: tok.decode(ids)
        except ImportError:
            pass
    ids = [b % vocab_size for b in prompt.encode()]
    if vocab_size >= 256:
        return ids, lambda out: bytes(i for i in out if i < 256).decode("utf-8", errors="replace")
    return ids, None


def smoke_test(model_dir: str | Path, prompt: str = "Hello", new_tokens: int = 16, dtype: str | None = None,
               eos_token_id: int | None = None) -> dict[str, Any]:
    """Load ``model_dir`` with the reference model, generate greedily (stopping at
    ``eos_token_id``), time it.

    Returns:
        ``backend`` ("torch"), ``prompt``, ``prompt_tokens``, ``new_tokens``, ``tokens`` (generated
        ids), ``text`` (when decodable), ``load_s``, ``prefill_s``, ``decode_s``, ``tokens_per_s``.
    """
    import torch

    from elastic.slicer.nn.model import load_model

    model_dir = Path(model_dir)
    t0 = time.perf_counter()
    model = load_model(model_dir, dtype=getattr(torch, dtype) if dtype else None)
    load_s = time.perf_counter() - t0
    ids, decode = encode_prompt(model_dir, prompt, model.arch.vocab_size)
    x = torch.tensor([ids or [0]])
    with torch.no_grad():
        cache = model.new_cache()
        t1 = time.perf_counter()
        logits = model(x, cache=cache, last_only=True)
        t2 = time.perf_counter()
        out = []
        for _ in range(new_tokens):
            nxt = logits[:, -1].argmax(-1)
            out.append(int(nxt))
            if eos_token_id is not None and out[-1] == eos_token_id:
                break
            logits = model(nxt[:, None], cache=cache)
        t3 = time.perf_counter()
    if not bool(torch.isfinite(logits).all()):
        from elastic.slicer.errors import ElasticError

        raise ElasticError("the model produced non-finite logits (NaN/inf): the slice does not run correctly",
                           path=str(model_dir))
    return {
        "backend": "torch",
        "path": str(model_dir),
        "prompt": prompt,
        "prompt_tokens": len(ids),
        "new_tokens": len(out),
        "tokens": out,
        "text": decode(out) if decode else None,
        "load_s": round(load_s, 3),
        "prefill_s": round(t2 - t1, 4),
        "decode_s": round(t3 - t2, 4),
        "tokens_per_s": round(len(out) / (t3 - t2), 1) if out and t3 > t2 else None,
    }
