"""``elastic slice``: cut a nested model out of a checkpoint into a dense checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from elastic.slicer.formats.precision import KEEP, WEIGHTS

from .common import (CheckpointOpt, JsonOpt, boundary, canonical_precision, human_bytes, human_count, precision_choice,
                     print_json, progress_bar, runtime_lines)

SliceDType = precision_choice("SliceDType", WEIGHTS, KEEP)


def slice_(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (new, or with --force an empty one or one elastic wrote).")],
    budget: Annotated[Optional[str], typer.Option("--budget", "-b", help="A budget of the elastic checkpoint "
                                                  "(see `elastic inspect`).", show_default=False)] = None,
    spec: Annotated[Optional[Path], typer.Option("--spec", help="A slice spec JSON file instead of a budget "
                                                 "(works on any nemotron_h checkpoint).", show_default=False)] = None,
    checkpoint: CheckpointOpt = None,
    dtype: Annotated[SliceDType, typer.Option("--dtype", case_sensitive=False,
                                       help="keep the stored dtype, or cast the weights to any spelling of "
                                       "bfloat16, float16, float32 (e.g. fp16 for GPUs without bf16).")] = SliceDType(KEEP),
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists and is empty or written by elastic (anything else is refused).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Physically slice a checkpoint along a budget (or a spec) into dense safetensors.

    The result is a standard nemotron_h checkpoint with a slice_manifest.json saying what it is
    and which runtimes load it. It is written to a temporary directory and renamed when complete:
    a failed or interrupted run leaves nothing under --out.

    Examples:

      elastic slice --budget 50% --out ./model-50

      elastic slice -c ./Nemotron-Elastic-12B --budget 6B --dtype float16 --out ./model-6B

      elastic slice -c ./dense-model --spec spec.json --out ./pruned --json
    """
    from elastic.slicer.storage.reader import Checkpoint
    from elastic.slicer.planning.describe import default_checkpoint
    from elastic.slicer.slice import slice_checkpoint

    with boundary():
        ckpt = Checkpoint.open(checkpoint or default_checkpoint(), require_weights=True)
        with progress_bar(f"slicing to {out}", enabled=not json_out) as advance:
            result = slice_checkpoint(ckpt, out, budget=budget, spec=spec,
                                      dtype=canonical_precision(dtype, WEIGHTS, KEEP),
                                      force=force, progress=advance)
    m = result.manifest
    if json_out:
        print_json(result.to_json())
        return
    what = f"budget {budget}" if budget else f"spec {spec}"
    lines = [
        f"wrote {result.out}  ({what}, {human_count(result.parameters)} parameters, {m['dtype']}, "
        f"{human_bytes(result.bytes_written)})",
        f"layers  {m['layer_pattern']}",
        "loads in:",
        *runtime_lines(m["runtimes"]),
    ]
    lines.append(f"next:   elastic inspect {result.out}")
    typer.echo("\n".join(lines))
