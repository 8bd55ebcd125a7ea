"""``elastic generate``: greedy text from a model directory (PyTorch), an export directory (ONNX Runtime)
or a GGUF (llama.cpp)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import JsonOpt, boundary, one_checkpoint, print_json


class Backend(str, Enum):
    torch = "torch"
    onnx = "onnx"
    llama_cpp = "llama.cpp"


def generate(
    model_dir: Annotated[Optional[Path], typer.Argument(help="A model directory (torch), an export directory "
                                                        "(onnx) or a .gguf / a directory holding one (llama.cpp); "
                                                        "or give it with -c, and the prompt alone.",
                                                        show_default=False)] = None,
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt (default: Hello).", show_default=False)] = None,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", "-c", help="The model or export directory, "
                                                       "as an option.", show_default=False)] = None,
    backend: Annotated[Optional[Backend], typer.Option("--backend", help="torch: the PyTorch reference "
                                                       "model; onnx: ONNX Runtime; llama.cpp: llama.cpp itself. "
                                                       "Default: onnx for an export directory, llama.cpp for a "
                                                       "GGUF, else torch.", show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate (stops "
                                                "early at the end-of-sequence token).", min=1)] = 32,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: the runtime's "
                                                   "choice).", min=1, show_default=False)] = None,
    budget: Annotated[Optional[str], typer.Option("--budget", "-b", help="Run this budget of an elastic "
                                                  "checkpoint (a trained name like 50%, or a size) on the "
                                                  "parent's tensors, without slicing (torch).",
                                                  show_default=False)] = None,
    think_budget: Annotated[Optional[str], typer.Option("--think-budget", help="Budget control: decode the "
                                                        "reasoning (up to </think> or --max-think-tokens) with "
                                                        "this budget; needs --answer-budget.",
                                                        show_default=False)] = None,
    answer_budget: Annotated[Optional[str], typer.Option("--answer-budget", help="Budget control: prefill "
                                                         "prompt + thinking and answer with this budget.",
                                                         show_default=False)] = None,
    max_think_tokens: Annotated[Optional[int], typer.Option("--max-think-tokens", help="End the thinking "
                                                            "after this many tokens (default: at </think>).",
                                                            min=1, show_default=False)] = None,
    allow_off_curve: Annotated[bool, typer.Option("--allow-off-curve", help="Run a --budget size between the "
                                                  "trained budgets even where the checkpoint's size_curve.json "
                                                  "measured it outside its trained neighbours.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Run a model greedily and print the text as it comes, then the decode speed.

    Examples:

      elastic generate ./model-50 "The capital of France is"

      elastic generate ./model-50-onnx "The capital of France is" --backend onnx --json

      elastic generate ./model-75-gguf/model-q4_k_m.gguf "def main(" --backend llama.cpp

      elastic generate -c ./elastic-ckpt --budget 50% "The capital of France is"

      elastic generate -c ./elastic-ckpt --think-budget 50% --answer-budget 100% -n 256 "Solve ..."
    """
    from elastic.export.runtime import generate_text

    if checkpoint is not None and model_dir is not None and prompt is None:
        model_dir, prompt = None, str(model_dir)  # `generate -c DIR "prompt"`: the one positional is the prompt
    prompt = "Hello" if prompt is None else prompt
    shown = []  # the prompt is printed once the model produces text, so a refused request prints only the error

    def stream(piece: str) -> None:
        if not shown:
            typer.echo(prompt, nl=False)
            shown.append(True)
        typer.echo(piece, nl=False)  # click.echo flushes

    with boundary(json_out):
        model_dir = one_checkpoint(model_dir, checkpoint, required=True)
        try:
            r = generate_text(model_dir, prompt, backend=backend.value if backend else None,
                              max_new_tokens=max_new_tokens, threads=threads, on_text=None if json_out else stream,
                              budget=budget, think_budget=think_budget, answer_budget=answer_budget,
                              max_think_tokens=max_think_tokens, allow_off_curve=allow_off_curve)
        finally:
            if shown:
                typer.echo("")  # end the streamed line, even when generation fails half-way
    _show(r, prompt, bool(shown), json_out)


def _show(r: dict, prompt: str, streamed: bool, json_out: bool) -> None:
    """The result as JSON, or the text when none was streamed and the speed line on stderr."""
    if json_out:
        print_json(r)
        return
    if not streamed:  # no text came: the prompt, then the ids when they are not decodable
        text = r["text"] if r["text"] is not None else " ".join(str(t) for t in r["tokens"])
        typer.echo(f"{prompt}{text}")
    where = f" budget {r['budget']}" if r.get("budget") else ""
    if r.get("think_budget"):
        where = " budgets " + ", ".join(f"{b}: {n} tokens" for b, n in r["budgets"].items())
    typer.echo(f"[{r['backend']}{where}] {r['prompt_tokens']} prompt tokens, {r['new_tokens']} new tokens, "
               f"prefill {r['prefill_s'] * 1000:.1f} ms, decode {r['tokens_per_s']} tokens/s", err=True)
