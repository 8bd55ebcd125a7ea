"""What llama.cpp itself allocates for a GGUF at a context: the buffers it reports when it loads the
model (weights, KV cache, recurrent state, compute and output), read from its own log, and the
process's resident growth. Run in a fresh process (``python -m elastic.export.llama_buffers FILE
CONTEXT``, which :func:`measure` does) so that nothing else in the process counts, and so that the
log callback llama.cpp keeps process-wide is this module's alone.

Example:
    >>> m = measure("slice.gguf", 4096)
    >>> m["kv_cache"], m["ssm_state"], m["activations"]  # bytes, as llama.cpp prints them (MiB, 2 decimals)
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from elastic.profiles.units import MIB
from elastic.slicer.errors import ElasticError

PROMPT_TOKENS = 64  # one short prompt evaluated after loading: the buffers are the ones a run uses
UBATCH = 512  # n_batch = n_ubatch, as elastic's llama.cpp runtime loads a model


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _measure_here(path: str, context: int) -> dict[str, Any]:
    import llama_cpp

    from .gguf import open_llama

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def keep(level, text, user):  # noqa: ARG001 (llama.cpp's callback signature)
        lines.append(text.decode(errors="replace"))

    llama_cpp.llama_log_set(keep, None)
    base = _rss()
    llm = open_llama(llama_cpp, model_path=path, n_ctx=context, n_batch=UBATCH, n_ubatch=UBATCH, flash_attn=True,
                     use_mmap=False, verbose=True)
    llm.eval(list(range(4, 4 + PROMPT_TOKENS)))
    log = "".join(lines)

    def reported(what: str) -> int:
        return sum(round(float(v) * MIB) for v in re.findall(r"\S+ " + what + r" buffer size =\s*([0-9.]+) MiB", log))

    return {"weights": int(llama_cpp.llama_model_size(llm.model)), "model_buffers": reported("model"),
            "kv_cache": reported("KV"), "ssm_state": reported("RS"),
            "activations": reported("compute") + reported("output"), "rss": _rss() - base}


def measure(path: str | Path, context: int) -> dict[str, int]:
    """llama.cpp's buffers for GGUF ``path`` at ``context`` tokens, in bytes: ``weights``
    (llama_model_size), ``model_buffers``, ``kv_cache``, ``ssm_state``, ``activations`` (compute +
    output) as its log reports them, and ``rss`` (the process's resident growth). Raises
    ElasticError when llama.cpp fails."""
    out = subprocess.run([sys.executable, "-m", "elastic.export.llama_buffers", str(path), str(context)],
                         capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        raise ElasticError(f"llama.cpp could not load {path} at context {context}: {out.stderr.strip()[-400:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    path, context = (argv if argv is not None else sys.argv[1:])
    print(json.dumps(_measure_here(path, int(context))))


if __name__ == "__main__":
    main()
