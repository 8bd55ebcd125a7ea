"""The training loop: turn a dense parent into an elastic checkpoint (DESIGN.md section 6).

importance -> permutation -> search space -> router + elastic forward -> two-stage curriculum with
forward-KL distillation from the frozen parent -> elastic checkpoint v1 (the slicer reads it as is).

Runs on CPU, on one GPU, and under ``torchrun`` (DDP; gloo on CPU, NCCL on GPU). Training state is
saved atomically every ``save_every`` steps to the work directory; ``resume=True`` continues
exactly (same batches, same Gumbel noise, same losses).
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from elastic.slicer.storage.reader import Checkpoint

from elastic.slicer.storage.writer import ShardedWriter
from elastic.slicer.formats.elastic_format import BUDGET_TOLERANCE, CONFIG_NAME, ROUTER_NAME, Budget, ElasticConfig
from elastic.slicer.errors import ConfigError, ElasticError
from elastic.slicer.nn.model import NemotronH, load_model, write_model
from elastic.slicer.storage.outputs import check_output
from elastic.slicer.slice import PASSTHROUGH_FILES
from elastic.slicer.formats.spec import SliceSpec

from .data import TokenDataset
from .elastic import (Router, anneal, budget_loss, default_search_space, elastic_forward, expected_params,
                      nested_forward, resolve_budgets, sample)
from .importance import depth_candidates, depth_order, width_importance
from .permute import orders, permute_

STATE_NAME = "train_state.pt"


@dataclass(frozen=True)
class Stage:
    steps: int  # optimizer steps in this stage
    context: int  # tokens per sequence
    weights: tuple[float, ...] | None = None  # budget sampling weights (None: uniform)


@dataclass(frozen=True)
class TrainConfig:
    budgets: tuple[tuple[str, float], ...] = (("100%", 1.0), ("75%", 0.75), ("50%", 0.5))  # name, share of params
    stage1: Stage = Stage(300, 128)  # short context, budgets uniform
    stage2: Stage = Stage(100, 256, (0.5, 0.3, 0.2))  # longer context, weighted to the largest
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

    def problems(self) -> list[str]:
        """Every invalid setting, one line each (empty when the configuration can be trained)."""
        return _config_problems(self)

    def validate(self) -> None:
        """Raise one :class:`ConfigError` listing every invalid setting."""
        problems = self.problems()
        if problems:
            raise ConfigError("invalid training settings; nothing was written", problems=problems)


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


def _label(field: str) -> str:
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
            problems.append(f"{_label(field)} is {value!r}; need an integer >= {low}")

    def need_real(field: str, value: Any, positive: bool) -> None:
        if not _is_real(value) or (value <= 0 if positive else value < 0):
            problems.append(f"{_label(field)} is {value!r}; need a finite number {'> 0' if positive else '>= 0'}")

    budgets = cfg.budgets if isinstance(cfg.budgets, (tuple, list)) else ()
    if not budgets:
        problems.append(f"{_label('budgets')} is empty; give at least one NAME=SHARE")
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
            problems.append(f"{_label(key + '.weights')} is {w!r}; need one weight per budget")
            continue
        if len(w) != len(budgets):
            problems.append(f"{_label(key + '.weights')} {tuple(w)} has {len(w)} weight(s); need one per budget "
                            f"({len(budgets)}), largest budget first")
        if not all(_is_real(x) and x >= 0 for x in w):
            problems.append(f"{_label(key + '.weights')} {tuple(w)}: every weight must be a finite number >= 0")
        elif sum(w) <= 0:
            problems.append(f"{_label(key + '.weights')} {tuple(w)}: the weights must sum to more than 0")
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
        problems.append(f"{_label('budget_dead_zone')} is {cfg.budget_dead_zone!r}; need a fraction in [0, 1)")
    for field in ("tau", "logit_scale"):
        pair = getattr(cfg, field)
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(_is_real(x) and x > 0 for x in pair):
            problems.append(f"{field} is {pair!r}; need (start, end), both finite numbers > 0")
    need_int("importance_batches", cfg.importance_batches, 1)
    need_int("drop_layers", cfg.drop_layers, 0)
    need_int("micro_batches", cfg.micro_batches, 0)
    if not isinstance(cfg.per_layer_mamba, bool):
        problems.append(f"{_label('per_layer_mamba')} is {cfg.per_layer_mamba!r}; need true or false")
    if not _is_real(cfg.budget_tolerance) or not 0 < cfg.budget_tolerance < 1:
        problems.append(f"{_label('budget_tolerance')} is {cfg.budget_tolerance!r}; need a fraction in (0, 1)")
    if cfg.fsdp not in ("auto", "on", "off"):
        problems.append(f"{_label('fsdp')} is {cfg.fsdp!r}; need auto, on or off")
    if not isinstance(cfg.activation_checkpointing, bool):
        problems.append(f"{_label('activation_checkpointing')} is {cfg.activation_checkpointing!r}; need true or false")
    need_int("save_every", cfg.save_every, 1)
    need_int("eval_batches", cfg.eval_batches, 1)
    if not _is_int(cfg.seed) or not 0 <= cfg.seed < 2**62:
        problems.append(f"{_label('seed')} is {cfg.seed!r}; need an integer in [0, 2**62)")
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


def _fmt_budgets(budgets: Any) -> str:
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
    mixed in; only ``save_every`` and ``eval_batches`` may change.
    """
    was, now = _flat(saved), _flat(asdict(cfg))
    problems = []
    for key, value in now.items():
        if key in RESUME_MAY_CHANGE or key not in was or was[key] == value:
            continue
        if key == "budgets":
            problems.append(f"{_label(key)}: saved {_fmt_budgets(was[key])}, requested {_fmt_budgets(value)}")
        else:
            problems.append(f"{_label(key)}: saved {was[key]!r}, requested {value!r}")
    return problems


class ElasticModule(nn.Module):
    """Student (the parent being made elastic) + router, one module so DDP syncs both (and the
    training state names both: ``student.*``, ``router.*``)."""

    def __init__(self, student: NemotronH, router: Router, ec: ElasticConfig, checkpoint: bool = False):
        super().__init__()
        self.student, self.router, self.ec, self.checkpoint = student, router, ec, checkpoint
        self.total = student.arch.param_counts()["total"]  # once: a MoE parent counts every expert's tensors

    def forward(self, ids, budget: int, tau: float, scale: float, gen):
        choice = sample(self.router, self.ec, self.student.arch, budget, tau, scale, gen,
                        full=self.ec.budgets[budget].target_parameters >= self.total)
        logits = elastic_forward(self.student, self.ec, choice, ids, checkpoint=self.checkpoint)
        return logits, expected_params(self.student.arch, self.ec, choice.hard), choice


class BudgetMissError(ElasticError):
    """A finished run resolved a budget further from its target than ``budget_tolerance``; the
    checkpoint is written and ``summary`` is what ``train`` would have returned."""

    def __init__(self, message: str, summary: dict, **kw):
        super().__init__(message, **kw)
        self.summary = summary


def shard(student: NemotronH, teacher: NemotronH, cuda: bool) -> None:
    """FSDP2: every block its own unit, the embeddings, final norm and LM head in the root's.

    The student keeps fp32 master weights; on CUDA it computes in bf16 and reduces gradients in
    fp32. The teacher (frozen, already bf16 on CUDA) is sharded the same way and only gathered.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else MixedPrecisionPolicy()
    for model, policy in ((student, mp), (teacher, MixedPrecisionPolicy())):
        for block in model.backbone.layers:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)


def _full_state(em: "ElasticModule", opt: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
    """The whole model and optimizer state (FQN keys), gathered onto the CPU (rank 0's copy is whole
    under FSDP; a collective: every rank calls it). Saved this way, a state resumes with or without
    FSDP and on any number of processes."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model = get_model_state_dict(em, options=opts)
    return model, (get_optimizer_state_dict(em, opt, options=opts) if opt is not None else None)


def forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per token, averaged."""
    t = teacher_logits.float().log_softmax(-1)
    s = student_logits.float().log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean()


def _dist() -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (torch.distributed.get_rank() if world > 1 else 0), world


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:  # linear warm-up, then cosine to 10%
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.total_steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


@torch.no_grad()
def eval_loss(model: NemotronH, ds: TokenDataset, context: int, batches: int, batch_size: int = 8,
              spec: SliceSpec | None = None) -> float:
    """Mean next-token cross-entropy on fixed validation windows (of the nested model ``spec``)."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    device = next(model.parameters()).device
    for x, y in ds.iter_eval(batch_size, context, batches):
        x, y = x.to(device), y.to(device)
        logits = model(x) if spec is None else nested_forward(model, spec, x)
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        n += y.numel()
    model.train(was)
    return total / max(1, n)


def _check_data(cfg: TrainConfig, arch: Any, train_ds: TokenDataset, val_ds: TokenDataset,
                data_dir: str | Path) -> None:
    """Refuse, before any training, data the run would fail on later (at the last step's evaluation)."""
    problems = []
    data_vocab = train_ds.meta.get("tokenizer", {}).get("vocab_size", 0)
    if data_vocab > arch.vocab_size:
        problems.append(f"the data's tokenizer has {data_vocab} tokens, the parent's vocabulary only "
                        f"{arch.vocab_size}: tokenize with the parent's tokenizer")
    if cfg.drop_layers >= arch.num_hidden_layers:
        problems.append(f"drop_layers (--drop-layers) is {cfg.drop_layers}; the parent has {arch.num_hidden_layers} "
                        f"layers and at least one must stay: at most {arch.num_hidden_layers - 1}")
    longest = lambda ds: int(ds.lengths.max()) if len(ds.lengths) else 0  # noqa: E731
    needs = [("train", train_ds, "stage1.context", cfg.stage1.context)]  # importance batches use it too
    if cfg.stage2.steps:
        needs.append(("train", train_ds, "stage2.context", cfg.stage2.context))
    val_key = "stage2.context" if cfg.stage2.steps else "stage1.context"
    needs.append(("val", val_ds, val_key, cfg.stage2.context if cfg.stage2.steps else cfg.stage1.context))
    for split, ds, key, ctx in needs:
        if longest(ds) < ctx + 1:
            problems.append(f"{_label(key)} is {ctx}: needs a {split} shard of {ctx + 1} tokens, the longest has "
                            f"{longest(ds)}; lower it or give more text")
    if problems:
        raise ConfigError("the data does not fit these settings; nothing was trained", problems=problems,
                          path=str(data_dir))


def _check_resume(state: dict, cfg: TrainConfig, budgets: tuple[Budget, ...], world: int, state_path: Path) -> None:
    """Refuse a resume whose settings differ from the saved run's (they would not load, or load wrong)."""
    problems = resume_problems(state.get("config") or {}, cfg)
    saved = [(b.get("name"), b.get("target_parameters")) for b in state.get("elastic_config", {}).get("budgets", [])]
    if not any(p.startswith("budgets") for p in problems) and saved != [(b.name, b.target_parameters) for b in budgets]:
        problems.append("budgets (--budgets): saved " + ",".join(f"{n}={t} params" for n, t in saved) +
                        ", requested " + ",".join(f"{b.name}={b.target_parameters} params" for b in budgets))
    saved_world = state.get("world_size") or (len(state["g_data"]) if isinstance(state.get("g_data"), list) else 1)
    if state.get("format", 1) < 2 and saved_world != world:  # format 1: one data stream per process
        problems.append(f"processes: saved with {saved_world}, resumed with {world} (each process has its own data "
                        "stream); resume with the same number of processes")
    done = state.get("step", 0)
    if isinstance(done, int) and done > cfg.total_steps:
        problems.append(f"the saved state is at step {done}, past the {cfg.total_steps} steps requested")
    if problems:
        raise ConfigError("cannot resume: these settings differ from the saved training state; pass the same "
                          "options as the run that saved it, or start over with another --work-dir",
                          problems=problems, path=str(state_path))


def _check_state_shapes(saved: dict, current: dict, what: str, state_path: Path) -> None:
    diff = [f"{k}: saved {tuple(saved[k].shape) if k in saved else 'missing'}, "
            f"now {tuple(v.shape)}" for k, v in current.items() if k not in saved or saved[k].shape != v.shape]
    diff += [f"{k}: saved, not in {what}" for k in saved if k not in current]
    if diff:
        raise ConfigError(f"cannot resume: the saved training state does not fit {what} (another parent or other "
                          "settings?); start over with another --work-dir", problems=diff[:10], path=str(state_path))


def train(parent_dir: str | Path, data_dir: str | Path, out: str | Path, cfg: TrainConfig = TrainConfig(), *,
          work_dir: str | Path | None = None, resume: bool = False, force: bool = False,
          progress: Callable[[str, int, int | None], None] | None = None, stop_after: int | None = None) -> dict:
    """Build an elastic checkpoint at ``out`` from the dense ``parent_dir``.

    Args:
        parent_dir: a nemotron_h checkpoint with weights (its tokenizer files are carried over).
        data_dir: token shards from ``elastic.trainer.data.build_token_shards`` (train and val splits).
        out: the elastic checkpoint to write: not a source (parent, data, work directory), not inside or
            around one; an existing one is replaced only with ``force`` and only if elastic wrote it.
        cfg: the settings; every invalid one is reported in one :class:`ConfigError` before any work.
        work_dir: where training state goes (default ``<out>.work``); ``resume`` continues from it, and
            refuses (ConfigError) when ``cfg`` differs from the saved run's settings.
        progress: the one progress protocol, ``progress(stage, step, total_steps)``; ``stage`` is a
            status line: the curriculum stage, the latest distillation loss of every budget, and
            this step's budget, size and cost loss.
        stop_after: stop (state saved) after this many steps, for tests of resuming.

    Returns:
        a summary: steps, tokens, validation loss per budget and of the parent, resolved sizes.
    """
    # a process group this call opens (under torchrun) is closed when it returns or fails, so the
    # process exits cleanly
    owned = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized()
    try:
        return _train(parent_dir, data_dir, out, cfg, work_dir=work_dir, resume=resume, force=force,
                      progress=progress, stop_after=stop_after)
    finally:
        if owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(parent_dir, data_dir, out, cfg: TrainConfig, *, work_dir, resume, force, progress, stop_after) -> dict:
    out = Path(out)
    work = check_train_args(parent_dir, data_dir, out, cfg, work_dir=work_dir, force=force)
    rank, world = _dist()
    ckpt = Checkpoint.open(parent_dir, require_weights=True)
    arch = ckpt.arch
    total_params = arch.param_counts()["total"]
    train_ds, val_ds = TokenDataset(data_dir, "train"), TokenDataset(data_dir, "val")
    _check_data(cfg, arch, train_ds, val_ds, data_dir)
    state_path = work / STATE_NAME
    state = torch.load(state_path, weights_only=False) if resume and state_path.is_file() else None
    if resume and state is None:
        raise ConfigError(f"nothing to resume: no {STATE_NAME}", path=str(work))
    budgets = tuple(Budget(name, round(f * total_params)) for name, f in cfg.budgets)
    if state is not None:
        _check_resume(state, cfg, budgets, world, state_path)

    cuda = torch.cuda.is_available()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu"
    problems = []
    if cfg.batch_size % world:
        problems.append(f"{_label('batch_size')} is {cfg.batch_size}: sequences per step in all processes; it must "
                        f"divide among the {world} processes")
    fsdp, why_fsdp = _use_fsdp(cfg, world, arch, device)
    if problems:
        raise ConfigError("invalid training settings for this launch; nothing was written", problems=problems)
    # the frozen teacher in bf16 on GPUs (it is only read), fp32 on the CPU (bf16 matmuls are slow there)
    teacher = load_model(ckpt, dtype=torch.bfloat16 if cuda else torch.float32, device=device).requires_grad_(False).eval()
    student = load_model(ckpt, dtype=torch.float32, device=device).requires_grad_(True).train()
    if state is None:  # importance, permutation, search space (every process alike: same data, same result)
        g = torch.Generator().manual_seed(cfg.seed + 7)
        calib = [train_ds.batch(g, cfg.batch_size, cfg.stage1.context)[0].to(device) for _ in range(cfg.importance_batches)]
        scores = width_importance(student, calib)
        permute_(student, orders(student, scores))
        depth = depth_order(student, calib[:2], candidates=depth_candidates(student, calib[:2], cfg.keep_attention),
                            steps=cfg.drop_layers)
        dims = default_search_space(arch, [j for j, _ in depth], cfg.per_layer_mamba)
        full = SliceSpec.full(arch).to_json(arch)
        ec = ElasticConfig(budgets, dims, {b.name: full for b in budgets})
        importance = {"scores": {k: v.clone() for k, v in scores.items()}, "depth": depth}
        start = 0
    else:
        _check_state_shapes(state["student"], student.state_dict(), "the parent", state_path)
        student.load_state_dict(state["student"])
        ec = ElasticConfig.from_json(state["elastic_config"], arch)
        importance, start = state["importance"], state["step"]
    with torch.random.fork_rng(devices=[]):  # the same router for the same seed, whatever ran before
        torch.manual_seed(cfg.seed)
        router = Router(ec.dimensions, len(budgets)).to(device)
    if state is not None:
        _check_state_shapes(state["router"], router.state_dict(), "the router of these budgets", state_path)
        router.load_state_dict(state["router"])
    em = ElasticModule(student, router, ec, checkpoint=cfg.activation_checkpointing)
    module: nn.Module = em
    if fsdp:
        shard(student, teacher, cuda)  # the router stays whole on every process; its gradients are averaged below
    elif world > 1:
        module = nn.parallel.DistributedDataParallel(em, find_unused_parameters=True,
                                                     device_ids=[torch.device(device).index] if cuda else None)
    opt = torch.optim.AdamW([
        {"params": list(student.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": list(router.parameters()), "lr": cfg.router_lr, "weight_decay": 0.0},
    ])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    # one data stream for the whole run: every process draws the step's batch and computes its share of
    # every micro-batch, so any number of processes trains on the same sequences as one process
    g_data = torch.Generator().manual_seed(cfg.seed + 1000)
    g_budget, g_gumbel = torch.Generator().manual_seed(cfg.seed + 1), torch.Generator().manual_seed(cfg.seed + 2)
    history: list[dict] = []
    if state is not None:
        _load_optimizer(em, opt, state["optimizer"], fsdp, state_path)
        sched.load_state_dict(state["scheduler"])
        g_data.set_state(state["g_data"][rank] if isinstance(state["g_data"], list) else state["g_data"])
        g_budget.set_state(state["g_budget"])
        g_gumbel.set_state(state["g_gumbel"])
        history = state["history"]

    def save_state(step: int) -> None:
        model_sd, opt_sd = _full_state(em, opt)  # every process takes part; rank 0 holds the whole
        if rank == 0:
            work.mkdir(parents=True, exist_ok=True)
            _atomic_save({
                "format": 2, "step": step,
                "student": {k.removeprefix("student."): v for k, v in model_sd.items() if k.startswith("student.")},
                "router": {k.removeprefix("router."): v for k, v in model_sd.items() if k.startswith("router.")},
                "optimizer": opt_sd, "scheduler": sched.state_dict(),
                "g_data": g_data.get_state(), "g_budget": g_budget.get_state(), "g_gumbel": g_gumbel.get_state(),
                "elastic_config": ec.to_json(), "importance": importance, "history": history, "config": asdict(cfg),
                "world_size": world, "fsdp": fsdp,
            }, state_path)

    end = cfg.total_steps if stop_after is None else min(cfg.total_steps, stop_after)
    t0 = time.perf_counter()
    last_kd: dict[str, float] = {}  # the latest distillation loss of every budget, for progress
    for step in range(start, end):
        stage = cfg.stage1 if step < cfg.stage1.steps else cfg.stage2
        weights = torch.tensor(stage.weights or [1.0] * len(budgets), dtype=torch.float64)
        batch = train_ds.batch(g_data, cfg.batch_size, stage.context)[0]
        # annealed within stage 1: stage 2 trains the architectures the router has settled on, which
        # are the ones deployed (the final temperature and logit scale hold through stage 2)
        tau = anneal(step, cfg.stage1.steps, *cfg.tau)
        scale = anneal(step, cfg.stage1.steps, *cfg.logit_scale)
        # every step mixes budgets: one budget per micro-batch, drawn with the stage's weights, and the
        # gradients of all micro-batches accumulated into one optimizer step; each process computes
        # its share of every micro-batch (at least one sequence)
        micro = batch.tensor_split(min(cfg.micro_batches or len(budgets), cfg.batch_size // world))
        opt.zero_grad(set_to_none=True)
        for m, chunk in enumerate(micro):
            x = chunk.tensor_split(world)[rank].to(device)
            b = int(torch.multinomial(weights, 1, generator=g_budget))
            last = m == len(micro) - 1
            if fsdp:  # FSDP2 reduce-scatters the gradients once, after the last micro-batch
                student.set_requires_gradient_sync(last)
            with contextlib.nullcontext() if world == 1 or fsdp or last else module.no_sync():
                with torch.no_grad():
                    t_logits = teacher(x)
                s_logits, cost, choice = module(x, b, tau, scale, g_gumbel)
                kd = forward_kl(t_logits, s_logits)
                cost_loss = budget_loss(cost, budgets[b].target_parameters, cfg.budget_dead_zone)
                # gradients are averaged over processes: this process's sequences count x.shape[0] / batch,
                # times world to undo the average; the cost is the same on every process
                (kd * (x.shape[0] * world / batch.shape[0]) +
                 cfg.router_weight * cost_loss * (chunk.shape[0] / batch.shape[0])).backward()
            kd_mean = kd.detach()
            if world > 1:  # the micro-batch's mean over all its sequences (NCCL reduces CUDA tensors only)
                t = (kd_mean * x.shape[0]).reshape(1).to(device)
                torch.distributed.all_reduce(t)
                kd_mean = t[0] / chunk.shape[0]
            rec = {"step": step, "micro_batch": m, "budget": budgets[b].name, "kd": kd_mean.item(),
                   "cost": cost_loss.item(), "params": choice.spec.parameters(arch),
                   "tokens": chunk.shape[0] * stage.context}
            history.append(rec)
            last_kd[rec["budget"]] = rec["kd"]
        if fsdp and world > 1:  # the router is not sharded: average its gradients here
            for p_ in router.parameters():
                if p_.grad is not None:
                    torch.distributed.all_reduce(p_.grad)
                    p_.grad /= world
        torch.nn.utils.clip_grad_norm_(list(student.parameters()), cfg.grad_clip)
        opt.step()
        sched.step()
        if progress:
            per_budget = "  ".join(f"{name} {kd:.4f}" for name, kd in last_kd.items())
            mixed = ", ".join(f"{r['budget']} {r['params']:,} params" for r in history[-len(micro):])
            progress(f"stage {1 if step < cfg.stage1.steps else 2}: kd per budget {per_budget}  (this step: "
                     f"{mixed})", step + 1, cfg.total_steps)
        if (step + 1) % cfg.save_every == 0 or step + 1 == end:
            save_state(step + 1)
    train_s = time.perf_counter() - t0

    if end < cfg.total_steps:  # stopped early on purpose: the state is saved, nothing else
        return {"stopped_at": end, "history": history}
    # resolve each budget by constrained choice over the router's scores (each budget's tolerance: the run's, at
    # most the format's default) and write the elastic checkpoint
    tol = min(cfg.budget_tolerance, BUDGET_TOLERANCE)
    ec, resolution = resolve_budgets(router.numpy_state(), ec, arch, tolerance=tol, scale=cfg.logit_scale[1],
                                     keep_attention=cfg.keep_attention)
    ElasticConfig.from_json(ec.to_json(), arch)  # what we write must read back
    tokens = sum(cfg.batch_size * (cfg.stage1.context if s < cfg.stage1.steps else cfg.stage2.context)
                 for s in range(cfg.total_steps))
    val_ctx = cfg.stage2.context if cfg.stage2.steps else cfg.stage1.context
    summary = {
        "steps": cfg.total_steps, "tokens": tokens, "world_size": world, "fsdp": fsdp, "fsdp_reason": why_fsdp,
        "train_seconds": round(train_s, 1),
        "parent_val_loss": eval_loss(teacher, val_ds, val_ctx, cfg.eval_batches),
        "budgets": {},
    }
    for b in budgets:
        spec = SliceSpec.from_json(ec.resolved[b.name], arch)
        summary["budgets"][b.name] = {
            "target_parameters": b.target_parameters, "parameters": spec.parameters(arch),
            "val_loss": eval_loss(student, val_ds, val_ctx, cfg.eval_batches, spec=spec),
            # the tokens this budget's micro-batches saw (all processes): what training it alone costs at equal tokens
            "tokens": sum(r.get("tokens", 0) for r in history if r["budget"] == b.name),
            # the resolver's log-probability against each row's argmax (its parameters too)
            **resolution.get(b.name, {}),
        }
    model_sd, _ = _full_state(em)
    if rank == 0:
        whole = student
        if fsdp:  # the gathered weights in a plain model for the writer
            with torch.device("meta"):
                whole = NemotronH(arch)
            whole.load_state_dict({k.removeprefix("student."): v for k, v in model_sd.items()
                                   if k.startswith("student.")}, assign=True)
        write_elastic_checkpoint(whole, ec, router, importance, ckpt.root, out, force=force,
                                 training={"config": asdict(cfg), **summary}, sources=[parent_dir, data_dir, work])
    if world > 1:
        torch.distributed.barrier()
    misses = _misses(summary, cfg.budget_tolerance)
    if misses:
        raise BudgetMissError(
            f"training finished, but {len(misses)} budget(s) resolved outside the tolerance; the checkpoint is "
            f"written (its training.json has every number) and the training state kept in {work}; train longer "
            "(more --stage1-steps) or raise --budget-tolerance", summary, problems=misses, path=str(out))
    return summary


def _misses(summary: dict, tolerance: float) -> list[str]:
    """One line for each budget of a run's summary that landed further than ``tolerance`` from its target."""
    return [f"budget {name}: resolved to {r['parameters']:,} parameters, target {r['target_parameters']:,} "
            f"({r['parameters'] / r['target_parameters'] - 1:+.1%}, tolerance {tolerance:.0%})"
            for name, r in summary["budgets"].items() if abs(r["parameters"] / r["target_parameters"] - 1) > tolerance]


def _use_fsdp(cfg: TrainConfig, world: int, arch: Any, device: str) -> tuple[bool, str]:
    """Whether to shard with FSDP2, and why (``cfg.fsdp``: on, off, or auto: when the DDP plan of
    ``elastic.trainer.memory`` would not fit the device)."""
    from .memory import use_fsdp

    cuda = device.startswith("cuda")
    total = torch.cuda.get_device_properties(device).total_memory if cuda else None
    return use_fsdp(cfg.fsdp, world, arch, total, cuda=cuda, cfg=cfg)


def _load_optimizer(em: "ElasticModule", opt: torch.optim.Optimizer, saved: dict, fsdp: bool, path: Path) -> None:
    """Restore the optimizer from a saved state: the whole-state form (parameter names as keys) into
    any layout, or an older state (parameter positions as keys) into an unsharded model."""
    if all(isinstance(k, int) for k in saved.get("state", {})):  # format 1: opt.state_dict()
        if fsdp:
            raise ConfigError("cannot resume this older training state under FSDP; resume with --fsdp off",
                              path=str(path))
        opt.load_state_dict(saved)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(em, opt, optim_state_dict=saved, options=StateDictOptions(full_state_dict=True))


def write_elastic_checkpoint(model: NemotronH, ec: ElasticConfig, router: Router, importance: dict,
                             source: Path, out: Path, force: bool = False, training: dict | None = None,
                             sources: Sequence[str | Path] = ()) -> Path:
    """Write an elastic checkpoint v1 atomically: weights, config, elastic_config, router,
    importance scores, the source's tokenizer files, and a training summary.

    ``out`` is checked by ``elastic.slicer.storage.outputs.check_output``: it may not be, lie inside or contain
    ``source`` or any of ``sources`` (the training data, the work directory), and with ``force``
    only a directory elastic wrote is replaced."""
    from safetensors.numpy import save as st_save

    scores = {k: v.detach().float().cpu().numpy() for k, v in importance["scores"].items()}
    with ShardedWriter(out, force=force, sources=[source, *sources], kind="train") as w:
        write_model(w, model)
        w.add_json(CONFIG_NAME, ec.to_json())
        (w.tmp / ROUTER_NAME).write_bytes(st_save(router.numpy_state(), metadata={"format": "np"}))
        (w.tmp / "importance.safetensors").write_bytes(st_save(scores, metadata={
            "depth_order": json.dumps(importance["depth"])}))
        w.add_files_from(source, PASSTHROUGH_FILES)
        if training is not None:
            w.add_json("training.json", training)
    return out
