"""Perplexity on held-out text: the held-out split of the bundled standard-library corpus
(``elastic.slicer.quantize.text``), through the reference model, for any model directory elastic
reads: an elastic checkpoint, a float slice, a quantized slice (dequantized, W8A8 activations
simulated).

The model runs in float32 whatever it stores, so two precisions of one budget differ only by
what their weights (and simulated activations) lose.

Example:
    >>> r = perplexity("./model-50-int4", max_windows=32)
    >>> r.perplexity, r.tokens
    (9.12, 8192)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elastic.profiles.progress import Progress
from elastic.slicer.errors import ConfigError, ElasticError

SEQ_LEN = 256  # tokens predicted per window (the demo's stage-2 training context)
BATCH = 8  # windows per forward pass


@dataclass(frozen=True)
class EvalResult:
    path: str
    precision: str  # "int4", "fp8", ... or the float dtype ("float32", "bfloat16")
    perplexity: float  # exp(nll)
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int
    seq_len: int
    corpus: dict[str, Any]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """``elastic eval --json``."""
        return {"path": self.path, "precision": self.precision, "perplexity": round(self.perplexity, 6),
                "nll": round(self.nll, 6), "tokens": self.tokens, "windows": self.windows, "seq_len": self.seq_len,
                "corpus": self.corpus, "seconds": round(self.seconds, 3)}


def perplexity(model_dir: str | Path, *, seq_len: int = SEQ_LEN, max_windows: int | None = None,
               max_tokens: int | None = None, batch_size: int = BATCH,
               progress: Progress | None = None) -> EvalResult:
    """Perplexity of the model at ``model_dir`` on the held-out text, streamed in windows.

    Args:
        seq_len: tokens predicted per window (each window holds ``seq_len + 1`` tokens).
        max_windows, max_tokens: stop after this many windows / predicted tokens (default: all of
            the held-out text, 215 windows of 256 with the demo's tokenizer).
        batch_size: windows per forward pass.
        progress: ``progress("eval", windows done, windows)``.

    Raises:
        ConfigError: a window size or limit below 1; a tokenizer whose ids the model does not have.
        ElasticError: the model does not load (see ``Checkpoint.open``); no held-out window fits.
    """
    import torch
    import torch.nn.functional as F

    from elastic.slicer.formats.tokenizer import load_tokenizer
    from elastic.slicer.nn.model import load_model
    from elastic.slicer.quantize.text import heldout_windows
    from elastic.slicer.storage.reader import Checkpoint

    bad = [f"{name} is {v}; it must be at least 1" for name, v in
           (("seq_len", seq_len), ("max_windows", max_windows), ("max_tokens", max_tokens), ("batch_size", batch_size))
           if v is not None and v < 1]
    if bad:
        raise ConfigError("invalid evaluation settings", problems=bad)
    t0 = time.perf_counter()
    ckpt = Checkpoint.open(model_dir, require_weights=True)
    tok = load_tokenizer(ckpt.root)
    if tok.vocab_size > ckpt.arch.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} ids, the model {ckpt.arch.vocab_size}: they do not "
                          "belong together", path=str(ckpt.root))
    windows, corpus = heldout_windows(tok, seq_len, max_windows, max_tokens)
    model = load_model(ckpt, dtype=torch.float32)
    precision = ckpt.quant.format.precision if ckpt.quant is not None else (ckpt.dtype or "unknown")
    nll, n = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            w = torch.stack(windows[start:start + batch_size])  # (b, seq_len + 1)
            logits = model(w[:, :-1])  # (b, seq_len, vocab), float32
            nll += float(F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
            n += w[:, 1:].numel()
            if progress:
                progress("eval", min(start + batch_size, len(windows)), len(windows))
    mean = nll / n
    if not math.isfinite(mean):
        raise ElasticError("the model produced non-finite logits on the held-out text", path=str(ckpt.root))
    return EvalResult(str(ckpt.root), precision, math.exp(mean), mean, n, len(windows), seq_len, corpus.to_json(),
                      time.perf_counter() - t0)
