"""``elastic inspect``: what a checkpoint holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from elastic.slicer.formats.arch import FORM_EXTENSION, FORM_PUZZLE, FORM_STOCK

# how a budget's slice is written (README: "What a slice writes")
FORM_NOTE = {FORM_STOCK: "nemotron_h", FORM_PUZZLE: "nemotron_h_puzzle (per-layer FFN)",
             FORM_EXTENSION: "nemotron_h_elastic (per-layer Mamba/attention; transformers only)"}

from .common import CheckpointOpt, JsonOpt, boundary, human_bytes, human_count, one_checkpoint, print_json


def inspect(
    checkpoint: Annotated[Optional[Path], typer.Argument(help="Checkpoint directory (or -c; default: see "
                                                         "--checkpoint).", show_default=False)] = None,
    checkpoint_opt: CheckpointOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show a checkpoint's layer pattern, sizes, parameters per layer kind, dtype and size on disk.

    Works from config.json alone, before downloading the weights.

    Examples:

      elastic inspect                      # the bundled demo checkpoint

      elastic inspect ./Nemotron-Elastic-12B --json | jq .parameters.total
    """
    from elastic.slicer.planning.describe import describe

    with boundary(json_out):
        info = describe(one_checkpoint(checkpoint, checkpoint_opt))
    if json_out:
        print_json(info)
        return
    p = info["parameters"]
    lines = [
        f"checkpoint   {info['path']}",
        f"elastic      {'yes' if info['elastic'] else 'no'}",
        f"layers       {info['num_hidden_layers']}  {info['layer_pattern']}",
        "             " + ", ".join(f"{n} {k}" for k, n in info["layers"].items()),
        "sizes        " + ", ".join(f"{k}={v}" for k, v in info["sizes"].items()),
        f"parameters   {human_count(p['total'])} ({p['total']:,})",
    ]
    count_note = f"             ({info['parameter_convention']})"
    moe = p["active"] != p["total"]
    if moe:  # all experts are resident; a token computes with top-k of them
        lines[-1] += f" total, {human_count(p['active'])} ({p['active']:,}) active per token"
    lines.append(count_note)
    for key, n in p.items():
        if key not in ("total", "active"):
            lines.append(f"  {key:<11}{n:>16,}")
    if info["weights_present"]:
        lines.append(f"dtype        {info['dtype']}")
        lines.append(f"on disk      {human_bytes(info['bytes_on_disk'])} ({info['shards']} shard(s))")
    else:
        lines.append(f"dtype        {info['dtype'] or 'unknown'} (from config.json)")
        lines.append("weights      not present: parameter counts come from config.json")
    if info["budgets"]:
        lines.append("budgets      name            parameters  of full  " + ("active   " if moe else "")
                     + "layers     written as")
        for b in info["budgets"]:
            if "error" in b:
                lines.append(f"             {b['name']:<8}  cannot be sliced: {b['error']}")
                continue
            share = b["parameters"] / p["total"]
            active = f"{human_count(b['active_parameters']):>7}  " if moe else ""
            lines.append(f"             {b['name']:<8}{b['parameters']:>18,}  {share:>7.1%}  {active}"
                         f"{b['layer_pattern']:<{max(9, len(b['layer_pattern']))}}  {FORM_NOTE[b['config_form']]}")
    typer.echo("\n".join(lines))
