"""Run a GGUF with llama.cpp itself (llama-cpp-python's bindings), through the one greedy loop
(``elastic.slicer.nn.generate``): llama.cpp's tokenizer, its logits, our argmax."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from elastic.profiles.progress import Progress
from elastic.slicer.errors import ElasticError
from elastic.slicer.formats.tokenizer import Tok
from elastic.slicer.planning.memory import LLAMA_UBATCH

from .gguf import open_llama, require_llama_cpp, silence_llama_cpp


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF a path names: the file itself, or the one ``.gguf`` of a directory (None: none)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        found = sorted(p for p in path.glob("*.gguf") if not p.name.startswith("."))
        if len(found) > 1:
            raise ElasticError(f"{len(found)} GGUF files here ({', '.join(p.name for p in found)}); name one",
                               path=str(path))
        return found[0] if found else None
    return None


class LlamaCppModel:
    """One llama.cpp context over a GGUF: the :class:`~elastic.slicer.nn.generate.Backend` the greedy
    loop drives (batch 1), and its tokenizer (:class:`LlamaTok`)."""

    name = "llama.cpp"

    def __init__(self, path: str | Path, *, n_ctx: int = 2048, threads: int | None = None, logits_all: bool = False):
        llama_cpp = require_llama_cpp()
        silence_llama_cpp(llama_cpp)
        self.llama_cpp, self.path = llama_cpp, Path(path)
        try:
            # flash attention: what the plan's compute buffer assumes (planning/llama_graph.py)
            self.llm = open_llama(llama_cpp, model_path=str(self.path), n_ctx=n_ctx, n_threads=threads,
                                  n_batch=LLAMA_UBATCH, flash_attn=True, logits_all=logits_all, verbose=False)
        except ValueError as e:  # llama-cpp-python's words for a file llama.cpp refused
            raise ElasticError(f"llama.cpp cannot load this GGUF ({e}); ELASTIC_DEBUG=1 shows llama.cpp's log",
                               path=str(self.path)) from None
        self.vocab_size = self.llm.n_vocab()
        self.max_context = n_ctx

    def _logits(self):
        """The last evaluated token's logits, (1, 1, V), read from llama.cpp (``llama_get_logits_ith``;
        ``Llama.scores`` holds them only with ``logits_all``, which would keep every position's)."""
        import numpy as np

        ptr = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab_size,)).copy()[None, None, :]

    def prefill(self, input_ids: Any) -> tuple[Any, Any]:
        rows = [list(map(int, r)) for r in input_ids]
        if len(rows) != 1:
            raise ElasticError("the llama.cpp backend runs one sequence at a time")
        self.llm.reset()
        self.llm.eval(rows[0])
        return self._logits(), None

    def step(self, next_ids: Any, state: Any) -> tuple[Any, Any]:
        self.llm.eval([int(t) for t in next_ids.tolist()])
        return self._logits(), state

    def tokenizer(self) -> "LlamaTok":
        return LlamaTok(self.llm)


class LlamaTok(Tok):
    """llama.cpp's own tokenizer of a GGUF (what a llama.cpp user gets), in the :class:`Tok` shape."""

    def __init__(self, llm):
        self.llm = llm
        self.vocab_size = llm.n_vocab()
        self.bos_id = llm.token_bos() if llm.token_bos() >= 0 else None
        self.eos_id = llm.token_eos() if llm.token_eos() >= 0 else None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # add_bos: llama.cpp's tokenizer.ggml.add_bos_token decides, as Hugging Face's tokenizer does
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.llm.detokenize(list(ids), special=not skip_special_tokens).decode("utf-8", errors="replace")


def generate_gguf(path: str | Path, prompt: str, *, max_new_tokens: int = 32, threads: int | None = None,
                  on_text=None) -> dict[str, Any]:
    """Greedy text from a GGUF run by llama.cpp: the same result shape as every backend's
    (``elastic.slicer.nn.generate.generate_text``), ``backend`` "llama.cpp".

    Raises:
        ElasticError: no GGUF at ``path``, or llama.cpp refuses it.
        MissingDependencyError: llama-cpp-python is not installed.
    """
    from elastic.slicer.nn.generate import generate_text as run

    gguf = find_gguf(path)
    if gguf is None:
        raise ElasticError("no .gguf file here: write one with `elastic export DIR --format gguf --out DIR`",
                           path=str(path))
    model = LlamaCppModel(gguf, threads=threads)
    tok = model.tokenizer()
    return run(model, tok, prompt, max_new_tokens, eos_token_id=tok.eos_id, max_context=model.max_context,
               on_text=on_text, path=str(gguf))


def perplexity_gguf(path: str | Path, *, seq_len: int = 256, max_windows: int | None = None,
                    max_tokens: int | None = None, threads: int | None = None,
                    progress: Progress | None = None):
    """Perplexity of a GGUF run by llama.cpp on the held-out text (the windows ``elastic eval`` uses,
    tokenized by llama.cpp's own tokenizer): the same :class:`~elastic.slicer.quantize.evaluate.EvalResult`
    as the reference model's, so a GGUF precision compares with its slice.

    Raises:
        ElasticError: no GGUF at ``path``, llama.cpp refuses it, or the logits are not finite.
    """
    import math
    import time

    import numpy as np

    from elastic.slicer.quantize.evaluate import EvalResult
    from elastic.slicer.quantize.text import heldout_windows

    t0 = time.perf_counter()
    file = find_gguf(path)
    if file is None:
        raise ElasticError("no .gguf file here: write one with `elastic export DIR --format gguf --out DIR`",
                           path=str(path))
    model = LlamaCppModel(file, n_ctx=seq_len + 1, threads=threads, logits_all=True)
    windows, corpus = heldout_windows(model.tokenizer(), seq_len, max_windows, max_tokens)
    nll, n = 0.0, 0
    for k, w in enumerate(windows):
        ids = w.tolist()
        model.llm.reset()
        model.llm.eval(ids[:-1])
        logits = np.asarray(model.llm.scores[: len(ids) - 1], dtype=np.float64)  # (seq_len, vocab)
        top = logits.max(axis=1, keepdims=True)
        logz = (top[:, 0] + np.log(np.exp(logits - top).sum(axis=1)))
        nll += float((logz - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
        n += len(ids) - 1
        if progress:
            progress("eval", k + 1, len(windows))
    mean = nll / n
    if not math.isfinite(mean):
        raise ElasticError("llama.cpp produced non-finite logits on the held-out text", path=str(file))
    precision = gguf_precision(file, model.llama_cpp)
    return EvalResult(str(file), precision, math.exp(mean), mean, n, len(windows), seq_len, corpus.to_json(),
                      time.perf_counter() - t0)


def gguf_precision(file: Path, llama_cpp) -> str:
    """The precision a GGUF was written in, by its ``general.file_type`` (llama.cpp's LLAMA_FTYPE_*)."""
    from elastic.slicer.formats.precision import GGUF

    from .gguf import gguf_name, require_gguf

    field = require_gguf().GGUFReader(file).fields.get("general.file_type")
    ftype = int(field.contents()) if field is not None else None
    return next((gguf_name(p) for p in GGUF if getattr(llama_cpp, f"LLAMA_FTYPE_{p.gguf_ftype}", None) == ftype),
                "gguf")
