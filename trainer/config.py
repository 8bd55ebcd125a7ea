"""The training settings (no torch): :class:`TrainConfig`, its validation, its defaults, and what
a resume may change. Front ends read their defaults from :func:`defaults` and build a config with
:meth:`TrainConfig.from_flat`, so every default and the stage-2 weighting rule live here once.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from elastic.slicer.errors import ConfigError
from elastic.slicer.storage.outputs import check_output


@dataclass(frozen=True)
class Stage:
    """One stage of the curriculum."""

    steps: int  # optimizer steps in this stage
    context: int  # tokens per sequence
    weights: tuple[float, ...] | None = None  # budget sampling weights (None: uniform)


def stage2_weights(n: int) -> tuple[float, ...]:
    """Stage 2's budget weights when none are given, largest budget first: 0.5, 0.3, 0.2 for three
    budgets, equal otherwise."""
    return (0.5, 0.3, 0.2) if n == 3 else tuple(1.0 / n for _ in range(n))


DEFAULT_BUDGETS = (("100%", 1.0), ("75%", 0.75), ("50%", 0.5))


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run (``elastic train`` sets those in :data:`CLI_OPTIONS`)."""

    budgets: tuple[tuple[str, float], ...] = DEFAULT_BUDGETS  # name, share of params, largest first
    stage1: Stage = Stage(300, 128)  # short context, budgets uniform
    stage2: Stage = Stage(100, 256, stage2_weights(len(DEFAULT_BUDGETS)))  # longer context, weighted to the largest
    batch_size: int = 8
    lr: float = 1e-3  # model (the paper: 9e-5 at 12B; a miniature trains faster)
    router_lr: float = 1e-2
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    router_weight: float = 1.0  # weight of the budget loss
    # no budget loss within this fraction of the target; inside the end-of-run tolerance, because the hard
    # sample freezes as the temperature anneals and a budget can settle just outside the zone (a 5% zone
    # left the MoE demo's 50% at -5.5%)
    budget_dead_zone: float = 0.02
    tau: tuple[float, float] = (1.0, 0.05)  # Gumbel-softmax temperature, annealed
    logit_scale: tuple[float, float] = (1.0, 10.0)  # router logit scale, annealed
    importance_batches: int = 8
    drop_layers: int = 2  # least important layers the router may drop
    # never a depth candidate: the attention layer whose removal changes the logits most, so every budget
    # keeps one (llama.cpp aborts on a model without attention; transformers' generate() fails on it)
    keep_attention: bool = True
    micro_batches: int = 0  # budgets per optimizer step, one per micro-batch (0: one per budget)
    per_layer_mamba: bool = False  # Mamba/attention sizes per layer (transformers-only slices) instead of per budget
    budget_tolerance: float = 0.05  # at the end every resolved budget within this of its target, or the run fails
    fsdp: str = "auto"  # "on", "off", or "auto" (on when several processes and the DDP state would not fit)
    activation_checkpointing: bool = False  # recompute each layer's activations in the backward
    save_every: int = 50
    eval_batches: int = 8
    seed: int = 0

    @property
    def total_steps(self) -> int:
        return self.stage1.steps + self.stage2.steps

    @classmethod
    def from_flat(cls, settings: Mapping[str, Any]) -> TrainConfig:
        """A config from flat settings (the keys of :func:`defaults`: ``stage1.steps``, ...); a setting
        not given keeps its default, and ``stage2.weights`` not given or None follows
        :func:`stage2_weights` for the budgets given. Values are not checked here (:meth:`validate`).

        Example:
            >>> TrainConfig.from_flat({"budgets": (("a", 1.0), ("b", 0.5))}).stage2.weights
            (0.5, 0.5)
        """
        values = defaults()
        unknown = sorted(set(settings) - set(values))
        if unknown:
            raise TypeError(f"unknown training settings: {', '.join(unknown)}")
        values.update(settings)
        if settings.get("stage2.weights") is None:
            budgets = values["budgets"]
            values["stage2.weights"] = stage2_weights(len(budgets) if isinstance(budgets, (tuple, list)) else 0)
        stages = {name: Stage(**{f.name: values.pop(f"{name}.{f.name}") for f in fields(Stage)})
                  for name in ("stage1", "stage2")}
        return cls(**values, **stages)

    def problems(self) -> list[str]:
        """Every invalid setting, one line each (empty when the configuration can be trained)."""
        return _config_problems(self)

    def validate(self) -> None:
        """Raise one :class:`ConfigError` listing every invalid setting."""
        problems = self.problems()
        if problems:
            raise ConfigError("invalid training settings; nothing was written", problems=problems)


def flatten(cfg: TrainConfig) -> dict[str, Any]:
    """Every setting of ``cfg``, the stages' fields dotted (``stage1.steps``), values as they are."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, Stage):
            out.update({f"{f.name}.{sf.name}": getattr(value, sf.name) for sf in fields(Stage)})
        else:
            out[f.name] = value
    return out


def defaults() -> dict[str, Any]:
    """Every setting's default, flat as :func:`flatten` writes it: what front ends start from."""
    return flatten(TrainConfig())


# TrainConfig fields (dotted for the stages) -> the `elastic train` option that sets them
CLI_OPTIONS = {
    "budgets": "--budgets", "stage1.steps": "--stage1-steps", "stage1.context": "--stage1-context",
    "stage2.steps": "--stage2-steps", "stage2.context": "--stage2-context", "stage2.weights": "--stage2-weights",
    "batch_size": "--batch-size", "lr": "--lr", "router_lr": "--router-lr", "warmup": "--warmup",
    "drop_layers": "--drop-layers", "keep_attention": "--keep-attention", "micro_batches": "--micro-batches", "per_layer_mamba": "--per-layer-mamba",
    "budget_tolerance": "--budget-tolerance", "budget_dead_zone": "--budget-dead-zone", "fsdp": "--fsdp", "activation_checkpointing": "--activation-checkpointing",
    "save_every": "--save-every", "seed": "--seed",
}
# settings a resume may change: they do not alter the trajectory of training
# (the training state is saved whole, so a resume may also shard it differently)
RESUME_MAY_CHANGE = frozenset({"save_every", "eval_batches", "fsdp", "activation_checkpointing", "budget_tolerance"})


def setting_label(field: str) -> str:
    """A setting as messages name it: the field and the option that sets it (``batch_size (--batch-size)``)."""
    flag = CLI_OPTIONS.get(field)
    return f"{field} ({flag})" if flag else field


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _config_problems(cfg: TrainConfig) -> list[str]:
    problems: list[str] = []

    def need_int(field: str, value: Any, low: int) -> None:
        if not _is_int(value) or value < low:
            problems.append(f"{setting_label(field)} is {value!r}; need an integer >= {low}")

    def need_real(field: str, value: Any, positive: bool) -> None:
        if not _is_real(value) or (value <= 0 if positive else value < 0):
            problems.append(f"{setting_label(field)} is {value!r}; need a finite number {'> 0' if positive else '>= 0'}")

    budgets = cfg.budgets if isinstance(cfg.budgets, (tuple, list)) else ()
    if not budgets:
        problems.append(f"{setting_label('budgets')} is empty; give at least one NAME=SHARE")
    names = []
    for b in budgets:
        if not isinstance(b, (tuple, list)) or len(b) != 2:
            problems.append(f"budget {b!r}: need a (name, share) pair")
            continue
        name, share = b
        if not isinstance(name, str) or not name.strip():
            problems.append(f"budget {b!r}: needs a non-empty name")
        names.append(name)
        if not _is_real(share) or not 0 < share <= 1:
            problems.append(f"budget {name!r}: share {share!r} of the parent's parameters must be a finite number "
                            "in (0, 1]")
    dups = sorted({n for n in names if names.count(n) > 1}, key=str)
    if dups:
        problems.append(f"budget names must be unique; repeated: {', '.join(map(str, dups))}")

    for key, stage in (("stage1", cfg.stage1), ("stage2", cfg.stage2)):
        need_int(f"{key}.steps", stage.steps, 0)
        need_int(f"{key}.context", stage.context, 1)
        w = stage.weights
        if w is None:
            continue
        if not isinstance(w, (tuple, list)):
            problems.append(f"{setting_label(key + '.weights')} is {w!r}; need one weight per budget")
            continue
        if len(w) != len(budgets):
            problems.append(f"{setting_label(key + '.weights')} {tuple(w)} has {len(w)} weight(s); need one per budget "
                            f"({len(budgets)}), largest budget first")
        if not all(_is_real(x) and x >= 0 for x in w):
            problems.append(f"{setting_label(key + '.weights')} {tuple(w)}: every weight must be a finite number >= 0")
        elif sum(w) <= 0:
            problems.append(f"{setting_label(key + '.weights')} {tuple(w)}: the weights must sum to more than 0")
    if _is_int(cfg.stage1.steps) and _is_int(cfg.stage2.steps) and cfg.stage1.steps >= 0 and cfg.stage2.steps >= 0 \
            and cfg.stage1.steps + cfg.stage2.steps < 1:
        problems.append("no training steps: stage1.steps (--stage1-steps) + stage2.steps (--stage2-steps) must be >= 1")

    need_int("batch_size", cfg.batch_size, 1)
    need_real("lr", cfg.lr, positive=True)
    need_real("router_lr", cfg.router_lr, positive=True)
    need_int("warmup", cfg.warmup, 0)
    need_real("weight_decay", cfg.weight_decay, positive=False)
    need_real("grad_clip", cfg.grad_clip, positive=True)
    need_real("router_weight", cfg.router_weight, positive=False)
    if not _is_real(cfg.budget_dead_zone) or not 0 <= cfg.budget_dead_zone < 1:
        problems.append(f"{setting_label('budget_dead_zone')} is {cfg.budget_dead_zone!r}; need a fraction in [0, 1)")
    for field in ("tau", "logit_scale"):
        pair = getattr(cfg, field)
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(_is_real(x) and x > 0 for x in pair):
            problems.append(f"{field} is {pair!r}; need (start, end), both finite numbers > 0")
    need_int("importance_batches", cfg.importance_batches, 1)
    need_int("drop_layers", cfg.drop_layers, 0)
    need_int("micro_batches", cfg.micro_batches, 0)
    if not isinstance(cfg.per_layer_mamba, bool):
        problems.append(f"{setting_label('per_layer_mamba')} is {cfg.per_layer_mamba!r}; need true or false")
    if not _is_real(cfg.budget_tolerance) or not 0 < cfg.budget_tolerance < 1:
        problems.append(f"{setting_label('budget_tolerance')} is {cfg.budget_tolerance!r}; need a fraction in (0, 1)")
    if cfg.fsdp not in ("auto", "on", "off"):
        problems.append(f"{setting_label('fsdp')} is {cfg.fsdp!r}; need auto, on or off")
    if not isinstance(cfg.activation_checkpointing, bool):
        problems.append(f"{setting_label('activation_checkpointing')} is {cfg.activation_checkpointing!r}; need true or false")
    need_int("save_every", cfg.save_every, 1)
    need_int("eval_batches", cfg.eval_batches, 1)
    if not _is_int(cfg.seed) or not 0 <= cfg.seed < 2**62:
        problems.append(f"{setting_label('seed')} is {cfg.seed!r}; need an integer in [0, 2**62)")
    return problems


def check_train_args(parent_dir: str | Path, data_dir: str | Path, out: str | Path, cfg: TrainConfig, *,
                     work_dir: str | Path | None = None, force: bool = False) -> Path:
    """Everything that can be refused before any slow work: the settings (one :class:`ConfigError`
    listing every problem) and the output (``elastic.slicer.storage.outputs.check_output``: never a source, replace
    only what elastic wrote). Returns the work directory."""
    out = Path(out)
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".work")
    cfg.validate()
    check_output(out, force=force, sources=[parent_dir, data_dir, work])
    return work


def format_budgets(budgets: Any) -> str:
    """Budgets as ``--budgets`` reads them (``100%=1.0,50%=0.5``); anything else as its repr."""
    try:
        return ",".join(f"{name}={share}" for name, share in budgets)
    except (TypeError, ValueError):
        return repr(budgets)


def _flat(cfg: dict) -> dict[str, Any]:
    """asdict(TrainConfig) with the stages flattened (stage1.steps, ...), tuples as lists."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return json.loads(json.dumps(out, default=str))


def resume_problems(saved: dict, cfg: TrainConfig) -> list[str]:
    """How the settings of a saved training state differ from ``cfg`` (empty: safe to resume).

    A resume restores the router (one input per budget), the optimizer (its learning rates) and
    every random stream, so any difference would either fail to load or be silently ignored or
    mixed in; only the settings in :data:`RESUME_MAY_CHANGE` may differ.
    """
    was, now = _flat(saved), _flat(asdict(cfg))
    problems = []
    for key, value in now.items():
        if key in RESUME_MAY_CHANGE or key not in was or was[key] == value:
            continue
        if key == "budgets":
            problems.append(f"{setting_label(key)}: saved {format_budgets(was[key])}, requested {format_budgets(value)}")
        else:
            problems.append(f"{setting_label(key)}: saved {was[key]!r}, requested {value!r}")
    return problems
