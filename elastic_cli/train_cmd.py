"""``elastic train``: build an elastic checkpoint from a dense parent."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import JsonOpt, boundary, human_count, print_json

# what trainer.data really reads (corpus_files, _file_documents) and what TokenDataset opens
DATA_HELP = ("Training text, UTF-8: a directory, searched recursively (hidden directories, site-packages and "
             "__pycache__ skipped), for *.txt, *.md, *.py files (each file one document) and *.jsonl, *.json "
             "files (JSON lines: one {\"text\": \"...\"} object per line, not a single JSON document); or one "
             "such file (a file with any other suffix is read as one text document); or a token-shard "
             "directory holding meta.json (e.g. OUT.work/tokens from an earlier run), used as is.")


def _budgets(text: str) -> tuple[tuple[str, float], ...]:
    """ "100%=1.0,75%=0.75,50%=0.5" or "100%,75%,50%" (shares from the names), largest first.

    Raises ConfigError listing every part that is neither NAME=SHARE nor a percentage; the values
    themselves (finite, in (0, 1], unique names) are checked by ``TrainConfig.validate``."""
    from elastic.slicer.errors import ConfigError

    problems: list[str] = []
    out = _parse_budgets(text, problems)
    if problems:
        raise ConfigError("invalid --budgets", problems=problems)
    return out


def _parse_budgets(text: str, problems: list[str]) -> tuple[tuple[str, float], ...]:
    """``_budgets`` that appends what it cannot parse to ``problems`` instead of raising."""
    out, found = [], []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, share = part.partition("=")
        name, share = name.strip(), share.strip()
        try:
            value = float(share) if sep else float(name.rstrip("%")) / 100
        except ValueError:
            found.append(f"--budgets: {part!r} is not NAME=SHARE (e.g. 6B=0.5) or a percentage (50%)")
            continue
        out.append((name, value))
    if not found and not out:
        found.append("--budgets is empty; give NAME=SHARE pairs, comma separated (e.g. 100%=1.0,50%=0.5)")
    problems.extend(found)
    return tuple(sorted(out, key=lambda b: -b[1] if b[1] == b[1] else 0.0))  # NaN (refused later) sorts anywhere


def _floats(text: str | None, option: str = "--stage2-weights", problems: list[str] | None = None
            ) -> tuple[float, ...] | None:
    """ "0.5,0.3,0.2" -> (0.5, 0.3, 0.2); None stays None. Text that is not comma-separated numbers
    is a ConfigError (or, with ``problems``, appended there)."""
    from elastic.slicer.errors import ConfigError

    if text is None:
        return None
    values, bad = [], []
    for part in (p.strip() for p in text.split(",")):
        try:
            values.append(float(part))
        except ValueError:
            bad.append(part)
    if bad or not values:
        what = "is not a number" if len(bad) == 1 else "are not numbers"
        msg = f"{option}: {', '.join(map(repr, bad))} {what}; write comma-separated numbers, e.g. 0.5,0.3,0.2"
        if problems is None:
            raise ConfigError(msg)
        problems.append(msg)
    return tuple(values)


def train(
    parent: Annotated[Path, typer.Option("--parent", "--checkpoint", "-c", help="Dense nemotron_h checkpoint to make "
                                         "elastic.")],
    data: Annotated[Path, typer.Option("--data", help=DATA_HELP)],
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
    micro_batches: Annotated[int, typer.Option(
        help="Budgets mixed in every step: the batch is split into this many micro-batches, each with its own "
        "budget (drawn with the stage's weights), gradients accumulated. 0: one per budget.")] = 0,
    per_layer_mamba: Annotated[bool, typer.Option(
        "--per-layer-mamba", help="Let the router choose Mamba and attention sizes per layer, not one per budget. "
        "Such slices load only in transformers (elastic's extension format); vLLM, sglang and llama.cpp take one "
        "global Mamba and attention size.")] = False,
    save_every: Annotated[int, typer.Option(help="Save the training state every N steps.")] = 50,
    seed: Annotated[int, typer.Option(help="Seed for data order, router init and Gumbel noise.")] = 0,
    work_dir: Annotated[Optional[Path], typer.Option(help="Training state and tokens (default: OUT.work).",
                                                     show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the work directory's state.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists and is empty or written by elastic (anything else is refused).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Make a dense Nemotron-H parent elastic: importance, permutation, router, two-stage distillation.

    The output is an elastic checkpoint v1: `elastic slice --budget NAME` reads it directly.
    Runs on CPU, one GPU, or several processes: `torchrun --nproc_per_node N -m elastic.cli.main train ...`.

    Examples:

      elastic train --parent ./dense --data ./corpus --out ./elastic

      elastic train --parent ./dense --data ./corpus --out ./elastic --budgets 12B=1.0,9B=0.73,6B=0.49

      elastic train --parent ./dense --data ./corpus --out ./elastic --resume
    """
    from elastic.slicer.errors import ConfigError
    from elastic.trainer.train import Stage, TrainConfig, check_train_args
    from elastic.trainer.train import train as run

    with boundary():
        problems: list[str] = []
        b = _parse_budgets(budgets, problems)
        weights = _floats(stage2_weights, "--stage2-weights", problems)
        if problems:
            raise ConfigError("invalid training settings; nothing was written", problems=problems)
        if weights is None:
            weights = (0.5, 0.3, 0.2) if len(b) == 3 else tuple(1.0 / len(b) for _ in b)
        cfg = TrainConfig(budgets=b, stage1=Stage(stage1_steps, stage1_context),
                          stage2=Stage(stage2_steps, stage2_context, weights), batch_size=batch_size, lr=lr,
                          router_lr=router_lr, warmup=warmup, drop_layers=drop_layers, micro_batches=micro_batches,
                          per_layer_mamba=per_layer_mamba,
                          save_every=save_every, seed=seed)
        # every setting and the output directory, before tokenizing anything
        work = check_train_args(parent, data, out, cfg, work_dir=work_dir, force=force)
        tokens = data if (data / "meta.json").is_file() else work / "tokens"
        rank0 = int(os.environ.get("RANK", "0")) == 0
        if tokens != data and not (tokens / "meta.json").is_file():
            if not data.exists():
                raise ConfigError("no such file or directory", path=str(data))
            if rank0:
                from elastic.trainer.data import build_token_shards
                from elastic.trainer.tokenizer import load_tokenizer

                build_token_shards(data, load_tokenizer(parent), tokens)
            _wait_for(tokens / "meta.json")
        show = rank0 and not json_out

        def progress(stage: str, step: int, total: int | None) -> None:
            if show and total and (step % max(1, total // 20) == 0 or step == total):
                typer.echo(f"step {step:>5}/{total}  {stage}", err=True)

        summary = run(parent, tokens, out, cfg, work_dir=work, resume=resume, force=force, progress=progress)
    if not rank0:
        return
    if json_out:
        print_json({"out": str(out), **summary})
        return
    lines = [f"wrote {out}  ({summary['steps']} steps, {summary['tokens']:,} tokens, {summary['world_size']} process(es))",
             f"parent val loss {summary['parent_val_loss']:.4f}"]
    from elastic.slicer.formats.elastic_format import BUDGET_TOLERANCE

    for name, r in summary["budgets"].items():
        miss = r["parameters"] / r["target_parameters"] - 1
        note = (f"  ({miss:+.0%} off target, beyond {BUDGET_TOLERANCE:.0%}: `elastic slice` will refuse it; "
                "train longer)" if abs(miss) > BUDGET_TOLERANCE else "")
        lines.append(f"  {name:<8} {human_count(r['parameters']):>9} params (target {human_count(r['target_parameters'])})"
                     f"  val loss {r['val_loss']:.4f}{note}")
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
