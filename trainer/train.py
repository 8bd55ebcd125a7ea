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
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from elastic.profiles.progress import Progress
from elastic.slicer.storage.reader import Checkpoint

from elastic.slicer.storage.writer import ShardedWriter
from elastic.slicer.formats.elastic_format import BUDGET_TOLERANCE, CONFIG_NAME, ROUTER_NAME, Budget, ElasticConfig
from elastic.slicer.errors import ConfigError, ElasticError
from elastic.slicer.nn.model import NemotronH, load_model, write_model
from elastic.slicer.slice import PASSTHROUGH_FILES
from elastic.slicer.formats.spec import SliceSpec

from .config import CLI_OPTIONS, RESUME_MAY_CHANGE, Stage  # noqa: F401 (callers import them from here too)
from .config import TrainConfig, check_train_args, resume_problems, setting_label
from .data import TokenDataset
from .elastic import (Router, anneal, default_search_space, elastic_forward, expected_params, nested_forward,
                      resolve_budgets, router_cost, sample)
from .importance import depth_candidates, depth_order, width_importance
from .permute import orders, permute_

STATE_NAME = "train_state.pt"


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
            problems.append(f"{setting_label(key)} is {ctx}: needs a {split} shard of {ctx + 1} tokens, the longest has "
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
          progress: Progress | None = None, stop_after: int | None = None) -> dict:
    """Build an elastic checkpoint at ``out`` from the dense ``parent_dir``.

    Args:
        parent_dir: a nemotron_h checkpoint with weights (its tokenizer files are carried over).
        data_dir: token shards from ``elastic.trainer.data.build_token_shards`` (train and val splits).
        out: the elastic checkpoint to write: not a source (parent, data, work directory), not inside or
            around one; an existing one is replaced only with ``force`` and only if elastic wrote it.
        cfg: the settings; every invalid one is reported in one :class:`ConfigError` before any work.
        work_dir: where training state goes (default ``<out>.work``); ``resume`` continues from it, and
            refuses (ConfigError) when ``cfg`` differs from the saved run's settings.
        progress: ``progress(stage, step, total_steps, kd=..., sampled=...)`` after each step
            (``elastic.profiles.progress``): ``stage`` "stage 1" or "stage 2" (the curriculum), ``kd``
            the latest distillation loss of every budget (name -> loss), ``sampled`` this step's
            budgets as (name, parameters) pairs.
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

    run, start = _setup(cfg, ckpt, budgets, train_ds, state, state_path, rank, world)
    end = cfg.total_steps if stop_after is None else min(cfg.total_steps, stop_after)
    t0 = time.perf_counter()
    last_kd: dict[str, float] = {}  # the latest distillation loss of every budget, for progress
    for step in range(start, end):
        records = _step(run, step, train_ds)
        last_kd.update({r["budget"]: r["kd"] for r in records})
        if progress:
            progress(f"stage {1 if step < cfg.stage1.steps else 2}", step + 1, cfg.total_steps, kd=dict(last_kd),
                     sampled=[(r["budget"], r["params"]) for r in records])
        if (step + 1) % cfg.save_every == 0 or step + 1 == end:
            _save_state(run, step + 1, work, state_path)
    train_s = time.perf_counter() - t0

    if end < cfg.total_steps:  # stopped early on purpose: the state is saved, nothing else
        return {"stopped_at": end, "history": run.history}
    return _finish(run, val_ds, train_s, ckpt.root, out, force=force, sources=[parent_dir, data_dir, work], work=work)


@dataclass
class _Run:
    """What a training run holds from its setup to its checkpoint, shared by the loop's parts."""

    cfg: TrainConfig
    rank: int
    world: int
    device: str
    fsdp: bool
    why_fsdp: str
    arch: Any
    budgets: tuple[Budget, ...]
    teacher: NemotronH
    student: NemotronH
    router: Router
    em: ElasticModule
    module: nn.Module  # em, or em in DDP
    opt: torch.optim.Optimizer
    sched: Any
    g_data: torch.Generator
    g_budget: torch.Generator
    g_gumbel: torch.Generator
    ec: ElasticConfig
    importance: dict
    history: list[dict]


def _setup(cfg: TrainConfig, ckpt: Checkpoint, budgets: tuple[Budget, ...], train_ds: TokenDataset,
           state: dict | None, state_path: Path, rank: int, world: int) -> tuple[_Run, int]:
    """Models, router, parallelism, optimizer and random streams, fresh or restored from ``state``.
    Returns the run and the step it starts at."""
    arch = ckpt.arch
    cuda = torch.cuda.is_available()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu"
    problems = []
    if cfg.batch_size % world:
        problems.append(f"{setting_label('batch_size')} is {cfg.batch_size}: sequences per step in all processes; it must "
                        f"divide among the {world} processes")
    fsdp, why_fsdp = _use_fsdp(cfg, world, arch, device)
    if problems:
        raise ConfigError("invalid training settings for this launch; nothing was written", problems=problems)
    # the frozen teacher in bf16 on GPUs (it is only read), fp32 on the CPU (bf16 matmuls are slow there)
    teacher = load_model(ckpt, dtype=torch.bfloat16 if cuda else torch.float32, device=device).requires_grad_(False).eval()
    student = load_model(ckpt, dtype=torch.float32, device=device).requires_grad_(True).train()
    if state is None:
        ec, importance = _elastic_start(cfg, student, budgets, train_ds, device)
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
        shard(student, teacher, cuda)  # the router stays whole on every process; its gradients are averaged in _step
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
    return _Run(cfg, rank, world, device, fsdp, why_fsdp, arch, budgets, teacher, student, router, em, module, opt,
                sched, g_data, g_budget, g_gumbel, ec, importance, history), start


def _elastic_start(cfg: TrainConfig, student: NemotronH, budgets: tuple[Budget, ...], train_ds: TokenDataset,
                   device: str) -> tuple[ElasticConfig, dict]:
    """Importance, permutation (of ``student``, in place) and search space; every process alike (same
    data, same result). Returns the elastic config (every budget resolved to the parent until the end)
    and the importance scores and depth order."""
    arch = student.arch
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
    return ec, importance


def _step(run: _Run, step: int, train_ds: TokenDataset) -> list[dict]:
    """One optimizer step of the curriculum; appends its micro-batches' records to the history and
    returns them."""
    cfg, budgets, world, rank, device = run.cfg, run.budgets, run.world, run.rank, run.device
    student, router, fsdp, module = run.student, run.router, run.fsdp, run.module
    stage = cfg.stage1 if step < cfg.stage1.steps else cfg.stage2
    weights = torch.tensor(stage.weights or [1.0] * len(budgets), dtype=torch.float64)
    batch = train_ds.batch(run.g_data, cfg.batch_size, stage.context)[0]
    # annealed within stage 1: stage 2 trains the architectures the router has settled on, which
    # are the ones deployed (the final temperature and logit scale hold through stage 2)
    tau = anneal(step, cfg.stage1.steps, *cfg.tau)
    scale = anneal(step, cfg.stage1.steps, *cfg.logit_scale)
    # every step mixes budgets: one budget per micro-batch, drawn with the stage's weights, and the
    # gradients of all micro-batches accumulated into one optimizer step; each process computes
    # its share of every micro-batch (at least one sequence)
    micro = batch.tensor_split(min(cfg.micro_batches or len(budgets), cfg.batch_size // world))
    run.opt.zero_grad(set_to_none=True)
    records = []
    for m, chunk in enumerate(micro):
        x = chunk.tensor_split(world)[rank].to(device)
        b = int(torch.multinomial(weights, 1, generator=run.g_budget))
        last = m == len(micro) - 1
        if fsdp:  # FSDP2 reduce-scatters the gradients once, after the last micro-batch
            student.set_requires_gradient_sync(last)
        with contextlib.nullcontext() if world == 1 or fsdp or last else module.no_sync():
            with torch.no_grad():
                t_logits = run.teacher(x)
            s_logits, cost, choice = module(x, b, tau, scale, run.g_gumbel)
            kd = forward_kl(t_logits, s_logits)
            cost_loss = router_cost(cost, choice, run.arch, run.ec, budgets[b].target_parameters, cfg.budget_dead_zone)
            # gradients are averaged over processes: this process's sequences count x.shape[0] / batch,
            # times world to undo the average; the cost is the same on every process
            (kd * (x.shape[0] * world / batch.shape[0]) +
             cfg.router_weight * cost_loss * (chunk.shape[0] / batch.shape[0])).backward()
        kd_mean = kd.detach()
        if world > 1:  # the micro-batch's mean over all its sequences (NCCL reduces CUDA tensors only)
            t = (kd_mean * x.shape[0]).reshape(1).to(device)
            torch.distributed.all_reduce(t)
            kd_mean = t[0] / chunk.shape[0]
        records.append({"step": step, "micro_batch": m, "budget": budgets[b].name, "kd": kd_mean.item(),
                        "cost": cost_loss.item(), "params": choice.spec.parameters(run.arch),
                        "tokens": chunk.shape[0] * stage.context})
    run.history.extend(records)
    if fsdp and world > 1:  # the router is not sharded: average its gradients here
        for p_ in router.parameters():
            if p_.grad is not None:
                torch.distributed.all_reduce(p_.grad)
                p_.grad /= world
    torch.nn.utils.clip_grad_norm_(list(student.parameters()), cfg.grad_clip)
    run.opt.step()
    run.sched.step()
    return records


def _save_state(run: _Run, step: int, work: Path, state_path: Path) -> None:
    """The whole training state after ``step`` steps, written atomically by rank 0 (a collective:
    every process calls it)."""
    model_sd, opt_sd = _full_state(run.em, run.opt)  # every process takes part; rank 0 holds the whole
    if run.rank == 0:
        work.mkdir(parents=True, exist_ok=True)
        _atomic_save({
            "format": 2, "step": step,
            "student": {k.removeprefix("student."): v for k, v in model_sd.items() if k.startswith("student.")},
            "router": {k.removeprefix("router."): v for k, v in model_sd.items() if k.startswith("router.")},
            "optimizer": opt_sd, "scheduler": run.sched.state_dict(),
            "g_data": run.g_data.get_state(), "g_budget": run.g_budget.get_state(),
            "g_gumbel": run.g_gumbel.get_state(), "elastic_config": run.ec.to_json(), "importance": run.importance,
            "history": run.history, "config": asdict(run.cfg), "world_size": run.world, "fsdp": run.fsdp,
        }, state_path)


def _finish(run: _Run, val_ds: TokenDataset, train_s: float, source: Path, out: Path, *, force: bool,
            sources: list, work: Path) -> dict:
    """The end of a run: resolve every budget, evaluate, write the elastic checkpoint, and raise
    :class:`BudgetMissError` when a budget landed outside the tolerance. Returns the summary."""
    cfg, arch, ec, router, student, world = run.cfg, run.arch, run.ec, run.router, run.student, run.world
    history = run.history
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
        "steps": cfg.total_steps, "tokens": tokens, "world_size": world, "fsdp": run.fsdp, "fsdp_reason": run.why_fsdp,
        "train_seconds": round(train_s, 1),
        "parent_val_loss": eval_loss(run.teacher, val_ds, val_ctx, cfg.eval_batches),
        "budgets": {},
    }
    for b in run.budgets:
        spec = SliceSpec.from_json(ec.resolved[b.name], arch)
        summary["budgets"][b.name] = {
            "target_parameters": b.target_parameters, "parameters": spec.parameters(arch),
            "val_loss": eval_loss(student, val_ds, val_ctx, cfg.eval_batches, spec=spec),
            # the tokens this budget's micro-batches saw (all processes): what training it alone costs at equal tokens
            "tokens": sum(r.get("tokens", 0) for r in history if r["budget"] == b.name),
            # the resolver's log-probability against each row's argmax (its parameters too)
            **resolution.get(b.name, {}),
        }
    model_sd, _ = _full_state(run.em)
    if run.rank == 0:
        whole = student
        if run.fsdp:  # the gathered weights in a plain model for the writer
            with torch.device("meta"):
                whole = NemotronH(arch)
            whole.load_state_dict({k.removeprefix("student."): v for k, v in model_sd.items()
                                   if k.startswith("student.")}, assign=True)
        write_elastic_checkpoint(whole, ec, router, run.importance, source, out, force=force,
                                 training={"config": asdict(cfg), **summary}, sources=sources)
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
    """Restore the optimizer from a saved state: format 2 (the whole state, parameter names as keys)
    into any layout, format 1 (``opt.state_dict()``, parameter positions as keys) into an unsharded
    model."""
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
