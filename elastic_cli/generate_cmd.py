"""``elastic generate``: greedy text from a model directory (PyTorch) or an export directory (ONNX Runtime)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import JsonOpt, boundary, print_json


class Backend(str, Enum):
    torch = "torch"
    onnx = "onnx"


def generate(
    model_dir: Annotated[Path, typer.Argument(help="A model directory (torch) or an export directory (onnx).",
                                              show_default=False)],
    prompt: Annotated[str, typer.Argument(help="The prompt.")] = "Hello",
    backend: Annotated[Optional[Backend], typer.Option("--backend", "-b", help="torch: the PyTorch reference "
                                                       "model; onnx: ONNX Runtime. Default: onnx for an export "
                                                       "directory, else torch.", show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate (stops "
                                                "early at the end-of-sequence token).", min=1)] = 32,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: the runtime's "
                                                   "choice).", min=1, show_default=False)] = None,
    json_out: JsonOpt = False,
) -> None:
    """Run a model greedily and print the text and the decode speed.

    Examples:

      elastic generate ./model-50 "The capital of France is"

      elastic generate ./model-50-onnx "The capital of France is" --backend onnx --json
    """
    from elastic.export.runtime import generate_text

    with boundary():
        r = generate_text(model_dir, prompt, backend=backend.value if backend else None,
                          max_new_tokens=max_new_tokens, threads=threads)
    if json_out:
        print_json(r)
        return
    text = r["text"] if r["text"] is not None else " ".join(str(t) for t in r["tokens"])
    typer.echo(f"{prompt}{text}")
    typer.echo(f"[{r['backend']}] {r['prompt_tokens']} prompt tokens, {r['new_tokens']} new tokens, "
               f"prefill {r['prefill_s'] * 1000:.1f} ms, decode {r['tokens_per_s']} tokens/s", err=True)
