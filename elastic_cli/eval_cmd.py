"""``elastic eval``: perplexity of a model directory on held-out text."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from elastic.profiles.progress import quiet

from .common import CheckpointOpt, JsonOpt, boundary, human_count, one_checkpoint, print_json


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
    curve: Annotated[bool, typer.Option("--curve", help="Measure the size curve of an elastic checkpoint: every "
                                        "trained budget and every 5% from 40% to 100%, each sliced as `elastic slice "
                                        "--budget` slices it; says which in-between sizes lie outside their trained "
                                        "neighbours. Writes nothing unless --out names where.")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="With --curve: write the record here (a file, or "
                                                "a directory for DIR/size_curve.json). `elastic slice` and `elastic "
                                                "plan --fit exact` consult CHECKPOINT/size_curve.json.",
                                                show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="With --out: replace a record already there.")] = False,
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

      elastic eval -c ./my-elastic --curve --out ./my-elastic/size_curve.json
    """
    from elastic.slicer.planning.describe import default_checkpoint
    from elastic.slicer.quantize.evaluate import perplexity

    if curve or out is not None:
        return _curve(one_checkpoint(model_dir, checkpoint), out, force, curve, json_out,
                      dict(seq_len=seq_len, max_windows=max_windows, max_tokens=max_tokens, batch_size=batch_size))
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


def _curve(path: Path | None, out: Path | None, force: bool, curve: bool, json_out: bool, settings: dict) -> None:
    """`elastic eval --curve`: measure (``planning.measure.measure_curve``), write only to --out."""
    from elastic.slicer.errors import ConfigError
    from elastic.slicer.formats.size_curve import curve_target, write_curve
    from elastic.slicer.planning.describe import default_checkpoint
    from elastic.slicer.planning.measure import measure_curve

    with boundary(json_out):
        if not curve:
            raise ConfigError("--out writes a size-curve record: give --curve with it")
        target = curve_target(out, force) if out is not None else None  # refused before measuring
        with _windows_bar("measuring sizes", enabled=not json_out, unit="sizes") as advance:
            result, skipped = measure_curve(path or default_checkpoint(), progress=advance, **settings)
        written = write_curve(result, target, force=True) if target is not None else None
    if json_out:
        print_json({**result.to_json(), "skipped": skipped, "written": str(written) if written else None})
        return
    typer.echo(render_curve(result, skipped, written))


def render_curve(curve, skipped: list[dict], written: Path | None) -> str:
    """The size curve as a table: each measured architecture, its sizes, parameters, perplexity, verdict."""
    e = curve.evaluation
    lines = [f"{'sizes':<24}{'params':>10}{'perplexity':>12}  verdict"]
    for p in curve.points:
        verdict = "trained" if p.trained else ("between its neighbours" if curve.lies_between(p) else
                                               "OUTSIDE its neighbours: not offered")
        lines.append(f"{', '.join(p.sizes):<24}{human_count(p.parameters):>10}{p.perplexity:>12.4f}  {verdict}")
    lines += [f"skipped {s['size']}: {s['error']}" for s in skipped]
    lines.append(f"text    {e.get('tokens', 0):,} held-out tokens in {e.get('windows')} windows of {e.get('seq_len')}, "
                 f"{e.get('precision')}")
    lines.append(f"wrote   {written} (`elastic slice` and `elastic plan --fit exact` read CHECKPOINT/size_curve.json)"
                 if written else "not written (name where with --out)")
    return "\n".join(lines)


@contextmanager
def _windows_bar(description: str, enabled: bool = True, unit: str = "windows") -> Iterator:
    """The library's ``progress(stage, done, total, **detail)`` as a bar counting windows
    (common.progress_bar counts bytes), on stderr when it is a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield quiet
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), unit,
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)

        def advance(stage: str, done: int, total: int | None, /, **detail) -> None:
            bar.update(task, completed=done, total=total)

        yield advance
