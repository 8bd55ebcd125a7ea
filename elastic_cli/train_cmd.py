"""``elastic train``: build an elastic checkpoint from a dense parent."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import JsonOpt, boundary, human_count, print_json


def _budgets(text: str) -> tuple[tuple[str, float], ...]:
    """ "100%=1.0,75%=0.75,50%=0.5" or "100%,75%,50%" (shares from the names)."""
    from slicer.errors import ConfigError

    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, share = part.partition("=")
        try:
            value = float(share) if share else float(name.rstrip("%")) / 100
        except ValueError:
            raise ConfigError(f"budget {part!r}: write NAME=SHARE (e.g. 6B=0.5) or a percentage (50%)") from None
        out.append((name, value))
    if not out:
        raise ConfigError("--budgets is empty")
    return tuple(sorted(out, key=lambda b: -b[1]))


def _floats(text: str | None) -> tuple[float, ...] | None:
    return tuple(float(x) for x in text.split(",")) if text else None


def train(
    parent: Annotated[Path, typer.Option("--parent", help="Dense nemotron_h checkpoint to make elastic.")],
    data: Annotated[Path, typer.Option("--data", help="Text (a file or a directory of .txt/.md/.py/.jsonl) or "
                                       "token shards from an earlier run.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The elastic checkpoint to write.")],
    budgets: Annotated[str, typer.Option("--budgets", help="NAME=SHARE of the parent's parameters, comma separated.")]
    = "100%=1.0,75%=0.75,50%=0.5",
    stage1_steps: Annotated[int, typer.Option(help="Stage 1 steps (short context, budgets uniform).")] = 300,
    stage1_context: Annotated[int, typer.Option(help="Stage 1 tokens per sequence.")] = 128,
    stage2_steps: Annotated[int, typer.Option(help="Stage 2 steps (longer context, weighted to the largest).")] = 100,
    stage2_context: Annotated[int, typer.Option(help="Stage 2 tokens per sequence.")] = 256,
    stage2_weights: Annotated[Optional[str], typer.Option(help="Stage 2 budget weights, largest first "
                                                          "(default 0.5,0.3,0.2 for three budgets).")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per step (per process).")] = 8,
    lr: Annotated[float, typer.Option(help="Model learning rate (AdamW).")] = 1e-3,
    router_lr: Annotated[float, typer.Option(help="Router learning rate.")] = 1e-2,
    warmup: Annotated[int, typer.Option(help="Warm-up steps.")] = 20,
    drop_layers: Annotated[int, typer.Option(help="Least important layers the router may drop.")] = 2,
    save_every: Annotated[int, typer.Option(help="Save the training state every N steps.")] = 50,
    seed: Annotated[int, typer.Option(help="Seed for data order, router init and Gumbel noise.")] = 0,
    work_dir: Annotated[Optional[Path], typer.Option(help="Training state and tokens (default: OUT.work).",
                                                     show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the work directory's state.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Make a dense Nemotron-H parent elastic: importance, permutation, router, two-stage distillation.

    The output is an elastic checkpoint v1: `elastic slice --budget NAME` reads it directly.
    Runs on CPU, one GPU, or several processes: `torchrun --nproc_per_node N -m elastic_cli.main train ...`.

    Examples:

      elastic train --parent ./dense --data ./corpus --out ./elastic

      elastic train --parent ./dense --data ./corpus --out ./elastic --budgets 12B=1.0,9B=0.73,6B=0.49

      elastic train --parent ./dense --data ./corpus --out ./elastic --resume
    """
    from slicer.errors import ConfigError
    from trainer.train import Stage, TrainConfig
    from trainer.train import train as run

    with boundary():
        b = _budgets(budgets)
        weights = _floats(stage2_weights)
        if weights is None:
            weights = (0.5, 0.3, 0.2) if len(b) == 3 else tuple(1.0 / len(b) for _ in b)
        cfg = TrainConfig(budgets=b, stage1=Stage(stage1_steps, stage1_context),
                          stage2=Stage(stage2_steps, stage2_context, weights), batch_size=batch_size, lr=lr,
                          router_lr=router_lr, warmup=warmup, drop_layers=drop_layers, save_every=save_every, seed=seed)
        work = work_dir or out.with_name(out.name + ".work")
        tokens = data if (data / "meta.json").is_file() else work / "tokens"
        rank0 = int(os.environ.get("RANK", "0")) == 0
        if tokens != data and not (tokens / "meta.json").is_file():
            if not data.exists():
                raise ConfigError("no such file or directory", path=str(data))
            if rank0:
                from trainer.data import build_token_shards
                from trainer.tokenizer import load_tokenizer

                build_token_shards(data, load_tokenizer(parent), tokens)
            _wait_for(tokens / "meta.json")
        show = rank0 and not json_out

        last: dict[str, float] = {}  # the latest distillation loss of every budget

        def progress(step: int, total: int, rec: dict) -> None:
            last[rec["budget"]] = rec["kd"]
            if show and (step % max(1, total // 20) == 0 or step == total):
                per_budget = "  ".join(f"{name} {kd:.4f}" for name, kd in last.items())
                typer.echo(f"step {step:>5}/{total}  kd per budget: {per_budget}  (this step: {rec['budget']}, "
                           f"{human_count(rec['params'])} params, cost {rec['cost']:.4f})", err=True)

        summary = run(parent, tokens, out, cfg, work_dir=work, resume=resume, force=force, progress=progress)
    if not rank0:
        return
    if json_out:
        print_json({"out": str(out), **summary})
        return
    lines = [f"wrote {out}  ({summary['steps']} steps, {summary['tokens']:,} tokens, {summary['world_size']} process(es))",
             f"parent val loss {summary['parent_val_loss']:.4f}"]
    for name, r in summary["budgets"].items():
        lines.append(f"  {name:<8} {human_count(r['parameters']):>9} params (target {human_count(r['target_parameters'])})"
                     f"  val loss {r['val_loss']:.4f}")
    lines.append(f"next: elastic inspect {out}")
    typer.echo("\n".join(lines))


def _wait_for(path: Path, timeout: float = 3600) -> None:
    """Other ranks wait for rank 0's tokenized data (a barrier without a process group yet)."""
    import time

    t = time.time()
    while not path.is_file():
        if time.time() - t > timeout:
            raise TimeoutError(f"waited {timeout:.0f}s for {path}")
        time.sleep(0.5)
    json.loads(path.read_text())
