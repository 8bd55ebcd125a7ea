"""``elastic train``: build an elastic checkpoint from a dense parent."""

from __future__ import annotations

import json
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from elastic.profiles.units import GIB, gib
from elastic.slicer.errors import ConfigError
from elastic.slicer.formats.arch import Arch
from elastic.slicer.formats.elastic_format import BUDGET_TOLERANCE
from elastic.trainer.config import CLI_OPTIONS, TrainConfig, check_train_args, defaults, format_budgets
from elastic.trainer.config import stage2_weights as default_stage2_weights
from elastic.trainer.memory import HEADROOM, plan_training

from .common import JsonOpt, boundary, human_bytes, human_count, parse_bytes, print_json, progress_bar

# every option's default is the library's (tests/test_train_defaults.py checks that they agree)
DEFAULTS = defaults()

# what trainer.data really reads (corpus_files, _file_documents) and what TokenDataset opens
DATA_HELP = ("Training text, UTF-8: a directory, searched recursively (hidden directories, site-packages and "
             "__pycache__ skipped), for *.txt, *.md, *.py files (each file one document) and *.jsonl, *.json "
             "files (JSON lines: one {\"text\": \"...\"} object per line, not a single JSON document); or one "
             "such file (a file with any other suffix is read as one text document); or a token-shard "
             "directory holding meta.json (e.g. OUT.work/tokens from an earlier run), used as is.")


def _csv(values: tuple[float, ...]) -> str:
    return ",".join(f"{v:g}" for v in values)


class Fsdp(str, Enum):
    auto = "auto"
    on = "on"
    off = "off"


def _parse_budgets(text: str, problems: list[str]) -> tuple[tuple[str, float], ...]:
    """ "100%=1.0,75%=0.75,50%=0.5" or "100%,75%,50%" (shares from the names), largest first.

    Every part that is neither NAME=SHARE nor a percentage is appended to ``problems``; the values
    themselves (finite, in (0, 1], unique names) are checked by ``TrainConfig.validate``."""
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


# the help of every option that sets a TrainConfig field; its flag is the one CLI_OPTIONS names in messages
SETTING_HELP = {
    "budgets": "NAME=SHARE of the parent's parameters, comma separated.",
    "stage1.steps": "Stage 1 steps (short context, budgets uniform).",
    "stage1.context": "Stage 1 tokens per sequence.",
    "stage2.steps": "Stage 2 steps (longer context, weighted to the largest).",
    "stage2.context": "Stage 2 tokens per sequence.",
    "stage2.weights": f"Stage 2 budget weights, largest first (default {_csv(default_stage2_weights(3))} for three "
                      "budgets, equal otherwise).",
    "batch_size": "Sequences per optimizer step, all processes together (each computes its share; it must divide "
                  "among them).",
    "lr": "Model learning rate (AdamW).",
    "router_lr": "Router learning rate.",
    "warmup": "Warm-up steps.",
    "drop_layers": "Least important layers the router may drop.",
    "keep_attention": "Never let the router drop the most important attention layer, so every budget keeps one "
                      "(llama.cpp and transformers' generate() need one).",
    "micro_batches": "Budgets mixed in every step: the batch is split into this many micro-batches, each with its "
                     "own budget (drawn with the stage's weights), gradients accumulated. 0: one per budget.",
    "per_layer_mamba": "Let the router choose Mamba and attention sizes per layer, not one per budget. Such slices "
                       "load only in transformers (elastic's extension format); vLLM, sglang and llama.cpp take one "
                       "global Mamba and attention size.",
    "budget_dead_zone": "No cost loss while the sampled model is within this fraction of its budget's target (the "
                        "router's cost is the sampled model's parameters against the target).",
    "budget_tolerance": "At the end every budget is resolved to the router's most probable architecture within this "
                        f"fraction of its target parameters (at most {BUDGET_TOLERANCE:.0%}); where none exists the "
                        "run fails (exit 2) naming both numbers, and the checkpoint is written either way.",
    "fsdp": "Shard parameters, gradients, optimizer state and teacher across processes (FSDP2). auto: when several "
            f"processes and DDP's per-rank memory would not fit in {HEADROOM:.0%} of the GPU.",
    "activation_checkpointing": "Recompute each layer's activations in the backward (less memory, about a third "
                                "more compute).",
    "save_every": "Save the training state every N steps.",
    "seed": "Seed for data order, router init and Gumbel noise.",
}


def _setting(field: str, decls: str | None = None) -> Any:
    """The option of the TrainConfig setting ``field``: the flag ``CLI_OPTIONS`` gives it (``decls``
    for an on/off pair), the help above."""
    return typer.Option(decls or CLI_OPTIONS[field], help=SETTING_HELP[field])


def train(
    parent: Annotated[Path, typer.Option("--parent", "--checkpoint", "-c", help="Dense nemotron_h checkpoint to make "
                                         "elastic.")],
    data: Annotated[Optional[Path], typer.Option("--data", help=DATA_HELP + " Required unless --dry-run.",
                                                 show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The elastic checkpoint to write. Required unless "
                                                "--dry-run.", show_default=False)] = None,
    budgets: Annotated[str, _setting("budgets")] = format_budgets(DEFAULTS["budgets"]),
    stage1_steps: Annotated[int, _setting("stage1.steps")] = DEFAULTS["stage1.steps"],
    stage1_context: Annotated[int, _setting("stage1.context")] = DEFAULTS["stage1.context"],
    stage2_steps: Annotated[int, _setting("stage2.steps")] = DEFAULTS["stage2.steps"],
    stage2_context: Annotated[int, _setting("stage2.context")] = DEFAULTS["stage2.context"],
    stage2_weights: Annotated[Optional[str], _setting("stage2.weights")] = None,  # None: the library's rule
    batch_size: Annotated[int, _setting("batch_size")] = DEFAULTS["batch_size"],
    lr: Annotated[float, _setting("lr")] = DEFAULTS["lr"],
    router_lr: Annotated[float, _setting("router_lr")] = DEFAULTS["router_lr"],
    warmup: Annotated[int, _setting("warmup")] = DEFAULTS["warmup"],
    drop_layers: Annotated[int, _setting("drop_layers")] = DEFAULTS["drop_layers"],
    keep_attention: Annotated[bool, _setting("keep_attention", "--keep-attention/--no-keep-attention")]
    = DEFAULTS["keep_attention"],
    micro_batches: Annotated[int, _setting("micro_batches")] = DEFAULTS["micro_batches"],
    per_layer_mamba: Annotated[bool, _setting("per_layer_mamba")] = DEFAULTS["per_layer_mamba"],
    budget_dead_zone: Annotated[float, _setting("budget_dead_zone")] = DEFAULTS["budget_dead_zone"],
    budget_tolerance: Annotated[float, _setting("budget_tolerance")] = DEFAULTS["budget_tolerance"],
    fsdp: Annotated[Fsdp, _setting("fsdp")] = Fsdp(DEFAULTS["fsdp"]),
    activation_checkpointing: Annotated[bool, _setting("activation_checkpointing")]
    = DEFAULTS["activation_checkpointing"],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the memory plan per rank (parameters, gradients, "
                                          "optimizer state, teacher, gathered layers, activations) and the GPUs a "
                                          "run needs; read only the parent's config.json, write nothing.")] = False,
    gpus: Annotated[Optional[int], typer.Option("--gpus", min=1, help="Processes (one GPU each) to plan for. Default: "
                                                "$WORLD_SIZE, else the CUDA devices here, else 1.",
                                                show_default=False)] = None,
    gpu_memory: Annotated[Optional[str], typer.Option("--gpu-memory", help="Memory of each GPU for the plan, e.g. "
                                                      "80GB, 24GiB (binary: an 80GB card has 80 GiB). Default: this "
                                                      "machine's GPU; required with --gpus > 1 when there is none.",
                                                      show_default=False)] = None,
    save_every: Annotated[int, _setting("save_every")] = DEFAULTS["save_every"],
    seed: Annotated[int, _setting("seed")] = DEFAULTS["seed"],
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

      elastic train --parent examples/nemotron-elastic-12b --dry-run --gpus 8 --gpu-memory 80GB
    """
    with boundary(json_out):
        cfg = _config(budgets, stage2_weights, {
            "stage1.steps": stage1_steps, "stage1.context": stage1_context, "stage2.steps": stage2_steps,
            "stage2.context": stage2_context, "batch_size": batch_size, "lr": lr, "router_lr": router_lr,
            "warmup": warmup, "drop_layers": drop_layers, "keep_attention": keep_attention,
            "micro_batches": micro_batches, "per_layer_mamba": per_layer_mamba, "budget_tolerance": budget_tolerance,
            "budget_dead_zone": budget_dead_zone, "fsdp": fsdp.value, "activation_checkpointing": activation_checkpointing,
            "save_every": save_every, "seed": seed})
        if dry_run:  # the plan only: the parent's config.json, nothing written
            cfg.validate()
            _show_plan(_plan(parent, cfg, gpus, gpu_memory), parent, json_out)
            return
        summary = _run(parent, data, out, cfg, work_dir=work_dir, resume=resume, force=force, json_out=json_out)
    if summary is None:  # not rank 0: rank 0 reports
        return
    if json_out:
        print_json({"out": str(out), **summary})
        return
    typer.echo("\n".join(_summary_lines(summary, out)))


def _show_plan(plan, parent: Path, json_out: bool) -> None:
    """The dry run's memory plan, as JSON or lines."""
    if json_out:
        print_json(_plan_json(plan))
    else:
        typer.echo("\n".join(_plan_lines(plan, parent)))


def _run(parent: Path, data: Path | None, out: Path | None, cfg: TrainConfig, *, work_dir: Path | None, resume: bool,
         force: bool, json_out: bool) -> dict | None:
    """The options of a real run reconciled (--data and --out given, every setting and the output
    checked, the text tokenized), then one library call. Returns its summary on rank 0, else None."""
    from elastic.trainer.train import train as run  # torch

    missing = [flag for flag, value in (("--data", data), ("--out", out)) if value is None]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required to train; "
                          "give the training text and the output directory (or --dry-run to plan only)")
    # every setting and the output directory, before tokenizing anything
    work = check_train_args(parent, data, out, cfg, work_dir=work_dir, force=force)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    show = rank0 and not json_out
    tokens = _tokens(parent, data, work, rank0, show)

    def progress(stage: str, step: int, total: int | None, /, kd=None, sampled=(), **_) -> None:
        if show and total and (step % max(1, total // 20) == 0 or step == total):
            per_budget = "  ".join(f"{name} {loss:.4f}" for name, loss in (kd or {}).items())
            mixed = ", ".join(f"{name} {params:,} params" for name, params in sampled)
            typer.echo(f"step {step:>5}/{total}  {stage}: kd per budget {per_budget}  (this step: {mixed})", err=True)

    summary = run(parent, tokens, out, cfg, work_dir=work, resume=resume, force=force, progress=progress)
    return summary if rank0 else None


def _config(budgets: str, stage2_weights: str | None, settings: dict[str, Any]) -> TrainConfig:
    """The options as the library's config: --budgets and --stage2-weights parsed (every unparsable
    part in one ConfigError), everything else as given; ``TrainConfig.from_flat`` applies the
    stage-2 default rule."""
    problems: list[str] = []
    b = _parse_budgets(budgets, problems)
    weights = _floats(stage2_weights, "--stage2-weights", problems)
    if problems:
        raise ConfigError("invalid training settings; nothing was written", problems=problems)
    return TrainConfig.from_flat({"budgets": b, "stage2.weights": weights, **settings})


def _tokens(parent: Path, data: Path, work: Path, rank0: bool, show: bool = False) -> Path:
    """The token shards to train on: ``data`` itself when it holds them, else ``work/tokens``, built
    by rank 0 from the text at ``data`` (the other ranks wait for them)."""
    tokens = data if (data / "meta.json").is_file() else work / "tokens"
    if tokens != data and not (tokens / "meta.json").is_file():
        if not data.exists():
            raise ConfigError("no such file or directory", path=str(data))
        if rank0:
            from elastic.trainer.data import build_token_shards
            from elastic.trainer.tokenizer import load_tokenizer

            with progress_bar(f"tokenizing {data}", enabled=show) as advance:
                build_token_shards(data, load_tokenizer(parent), tokens, progress=advance)
        _wait_for(tokens / "meta.json")
    return tokens


def _summary_lines(summary: dict, out: Path) -> list[str]:
    """A finished run as text: what was written, and every budget's size and validation loss."""
    lines = [f"wrote {out}  ({summary['steps']} steps, {summary['tokens']:,} tokens, {summary['world_size']} process(es))",
             f"parent val loss {summary['parent_val_loss']:.4f}"]
    for name, r in summary["budgets"].items():
        miss = r["parameters"] / r["target_parameters"] - 1
        note = (f"  ({miss:+.0%} off target, beyond {BUDGET_TOLERANCE:.0%}: `elastic slice` will refuse it; "
                "train longer)" if abs(miss) > BUDGET_TOLERANCE else "")
        lines.append(f"  {name:<8} {human_count(r['parameters']):>9} params (target {human_count(r['target_parameters'])})"
                     f"  val loss {r['val_loss']:.4f}{note}")
    lines.append(f"next: elastic inspect {out}")
    return lines


def _local_world() -> int:
    """$WORLD_SIZE (under torchrun), else the CUDA devices torch sees here, else 1."""
    env = os.environ.get("WORLD_SIZE")
    if env:
        if not env.strip().isdigit() or int(env) < 1:
            raise ConfigError(f"WORLD_SIZE is {env!r}; need a positive integer (or pass --gpus N)")
        return int(env)
    try:
        import torch
    except ImportError:
        return 1
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def _plan(parent: Path, cfg: Any, gpus: int | None, gpu_memory: str | None) -> tuple[Any, str]:
    """--gpus and --gpu-memory reconciled with this machine, then one library call. Returns the
    plan and where its device size came from."""
    arch = Arch.from_file(parent)  # the config alone: no weights needed
    world = gpus or _local_world()
    if gpu_memory is not None:
        size = parse_bytes(gpu_memory, "--gpu-memory")
        return plan_training(arch, cfg, world, size, cuda=True), f"{_gb(size)} per GPU (--gpu-memory {gpu_memory})"
    from elastic.profiles.target import resolve_target

    _, found = resolve_target(None)  # this machine, decided as `elastic plan` decides it
    dev = found.chosen
    if dev.kind != "cpu":  # a GPU here; a Jetson shares its RAM with the OS: what the OS leaves counts
        size = dev.usable_bytes if dev.unified else dev.total_bytes
        return plan_training(arch, cfg, world, size, cuda=True), f"{_gb(size)} per GPU ({dev.name}, found here)"
    if world > 1:
        raise ConfigError(f"--gpu-memory is needed to plan for {world} GPUs: there is no GPU here to measure "
                          f"({'; '.join(found.reasons)}); e.g. --gpu-memory 80GB")
    return (plan_training(arch, cfg, 1, dev.usable_bytes, cuda=False),
            f"{human_bytes(dev.usable_bytes)} of host RAM usable (no GPU here: one CPU process)")


def _gb(n: int) -> str:
    """GPU sizes as they are sold: 80GB, 141GB (binary, as ``parse_bytes`` reads them)."""
    return f"{n / GIB:.4g}GB"


PARALLELISM = {"fsdp": "FSDP2 (fully_shard per layer + root)", "ddp": "DDP", "single": "one process"}
TERM_NAMES = {"optimizer": "optimizer state", "working": "working (gathered)"}


def _plan_json(result: tuple[Any, str]) -> dict:
    plan, where = result
    m = plan.memory
    return {
        "parallelism": m.parallelism, "world": m.world, "reason": plan.reason, "device": where, "estimate": True,
        "per_rank": {**{name: b for name, b, _ in m.terms()}, "total": m.total},
        "activation_parts": {name: b for name, b, _ in m.parts},
        "how": {**{name: how for name, _, how in m.terms()}, **{name: how for name, _, how in m.parts}},
        "fits": plan.fits, "gpu_bytes": plan.device_bytes, "headroom": HEADROOM,
        "gpus_needed": {_gb(b): n for b, n in plan.gpus_needed},
    }


def _plan_lines(result: tuple[Any, str], parent: Path) -> list[str]:
    """The plan as text: every term with how it was computed, whether it fits, what a run needs."""
    plan, where = result
    m, batch = plan.memory, plan.cfg.batch_size
    size = human_count(plan.parameters)
    cannot = (f"none with --batch-size {batch} (at most {batch} processes share a step): a larger --batch-size "
              "spreads the states over more GPUs" +
              ("" if plan.cfg.activation_checkpointing else "; --activation-checkpointing saves more"))
    g = lambda n: f"{gib(n):>12}"  # noqa: E731
    lines = [f"training memory plan for {parent} ({size} parameters), per rank: an estimate from the config, "
             "not a measurement",
             "parallelism  " + (plan.reason if m.parallelism == "single" else
                                f"{PARALLELISM[m.parallelism]} on {m.world} processes: {plan.reason}"),
             f"device       {where}", ""]
    for name, b, how in m.terms():
        lines.append(f"  {TERM_NAMES.get(name, name):<20}{g(b)}  {how}")
        if name == "activations":
            lines += [f"    {part:<18}{g(pb)}  {phow}" for part, pb, phow in m.parts]
    lines += [f"  {'total':<20}{g(m.total)}", ""]
    limit = HEADROOM * plan.device_bytes
    verdict = "yes" if plan.fits else "no"
    lines.append(f"fits: {verdict}: {gib(m.total)} {'<=' if plan.fits else '>'} {gib(limit)} "
                 f"({HEADROOM:.0%} of {gib(plan.device_bytes)}; the rest is left for the runtime (CUDA "
                 "context, NCCL buffers) and fragmentation)")
    needed = dict(plan.gpus_needed)
    if plan.cuda:
        n = needed[plan.device_bytes]
        lines.append(f"a {size} run with these settings needs {n} x {_gb(plan.device_bytes)} GPU{'s' * (n > 1)}" if n
                     else f"a {size} run does not fit on {_gb(plan.device_bytes)} GPUs with these settings")
    else:
        lines.append(f"planned for one CPU process (fp32 throughout); a {size} run on GPUs with these settings:")
    lines.append("by GPU size (one GPU: a plain process; more: FSDP):")
    lines += [f"  {_gb(b):>8}  " + (f"{n} GPU{'s' * (n > 1)}" if n else cannot) for b, n in sorted(needed.items())]
    return lines


def _wait_for(path: Path, timeout: float = 3600) -> None:
    """Other ranks wait for rank 0's tokenized data (a barrier without a process group yet)."""
    import time

    t = time.time()
    while not path.is_file():
        if time.time() - t > timeout:
            raise TimeoutError(f"waited {timeout:.0f}s for {path}")
        time.sleep(0.5)
    json.loads(path.read_text())
