"""``elastic eval``: perplexity of a model directory on held-out text."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from .common import CheckpointOpt, JsonOpt, boundary, one_checkpoint, print_json


def eval_(
    model_dir: Annotated[Optional[Path], typer.Argument(help="A model directory: a slice (float or quantized) or an "
                                                        "elastic checkpoint (or -c; default: see --checkpoint); or a "
                                                        ".gguf file, run by llama.cpp.",
                                                        show_default=False)] = None,
    checkpoint: CheckpointOpt = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens predicted per window.", min=1)] = 256,
    max_windows: Annotated[Optional[int], typer.Option("--max-windows", help="Stop after this many windows "
                                                       "(default: all of the held-out text).", min=1,
                                                       show_default=False)] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Stop after this many predicted tokens "
                                                      "(whole windows).", min=1, show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.", min=1)] = 8,
    json_out: JsonOpt = False,
) -> None:
    """Perplexity of a model on held-out text, to compare budgets and precisions.

    The text is the held-out split of the Python standard-library corpus the demo was trained on
    (no download), streamed in windows through the reference model in float32. Works on float and
    quantized slices (dequantized; fp8 and int8 activations simulated) and on an elastic
    checkpoint itself.

    Examples:

      elastic eval                                   # the bundled demo checkpoint

      elastic eval ./model-50-int4 --max-windows 32

      elastic eval ./model-50 --json | jq .perplexity

      elastic eval ./model-75-gguf/model-q4_k_m.gguf --max-windows 32
    """
    from elastic.slicer.planning.describe import default_checkpoint
    from elastic.slicer.quant.evaluate import perplexity

    with boundary(json_out):
        path = one_checkpoint(model_dir, checkpoint) or default_checkpoint()
        with _windows_bar(f"evaluating {path}", enabled=not json_out) as advance:
            if Path(path).suffix == ".gguf":  # llama.cpp itself, on the same windows
                from elastic.export.llama_runtime import perplexity_gguf

                r = perplexity_gguf(path, seq_len=seq_len, max_windows=max_windows, max_tokens=max_tokens,
                                    progress=advance)
            else:
                r = perplexity(path, seq_len=seq_len, max_windows=max_windows, max_tokens=max_tokens,
                               batch_size=batch_size, progress=advance)
    if json_out:
        print_json(r.to_json())
        return
    typer.echo("\n".join([
        f"perplexity {r.perplexity:.4f}  (nll {r.nll:.4f} per token)",
        f"model      {r.path}  ({r.precision})",
        f"text       {r.tokens:,} held-out tokens in {r.windows} windows of {r.seq_len} "
        f"({r.corpus['documents']} standard-library documents never trained on), {r.seconds:.1f} s",
    ]))


@contextmanager
def _windows_bar(description: str, enabled: bool = True) -> Iterator:
    """The library's ``progress(stage, done, total)`` as a bar counting windows (common.progress_bar
    counts bytes), on stderr when it is a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield lambda stage, done, total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), "windows",
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)

        def advance(stage: str, done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        yield advance
