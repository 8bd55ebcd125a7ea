"""The training loop: turn a dense parent into an elastic checkpoint (DESIGN.md section 6).

importance -> permutation -> search space -> router + elastic forward -> two-stage curriculum with
forward-KL distillation from the frozen parent -> elastic checkpoint v1 (the slicer reads it as is).

Runs on CPU, on one GPU, and under ``torchrun`` (DDP; gloo on CPU, NCCL on GPU). Training state is
saved atomically every ``save_every`` steps to the work directory; ``resume=True`` continues
exactly (same batches, same Gumbel noise, same losses).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from slicer.checkpoint import Checkpoint, ShardedWriter
from slicer.elastic_format import CONFIG_NAME, ROUTER_NAME, Budget, ElasticConfig
from slicer.errors import ConfigError
from slicer.masked import masked_forward
from slicer.model import NemotronH, load_model, write_model
from slicer.slice import PASSTHROUGH_FILES
from slicer.spec import SliceSpec

from .data import TokenDataset
from .elastic import Router, anneal, default_search_space, elastic_forward, expected_params, sample
from .importance import depth_order, width_importance
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
    router_weight: float = 1.0  # weight of |expected params - target| / parent params
    tau: tuple[float, float] = (1.0, 0.05)  # Gumbel-softmax temperature, annealed
    logit_scale: tuple[float, float] = (1.0, 10.0)  # router logit scale, annealed
    importance_batches: int = 8
    drop_layers: int = 2  # least important layers the router may drop
    save_every: int = 50
    eval_batches: int = 8
    seed: int = 0

    @property
    def total_steps(self) -> int:
        return self.stage1.steps + self.stage2.steps


class ElasticModule(nn.Module):
    """Student (the parent being made elastic) + router, one module so DDP syncs both."""

    def __init__(self, student: NemotronH, router: Router, ec: ElasticConfig):
        super().__init__()
        self.student, self.router, self.ec = student, router, ec

    def forward(self, ids, budget: int, tau: float, scale: float, gen):
        choice = sample(self.router, self.ec, self.student.arch, budget, tau, scale, gen,
                        full=self.ec.budgets[budget].target_parameters >= self.student.arch.param_counts()["total"])
        logits = elastic_forward(self.student, self.ec, choice, ids)
        return logits, expected_params(self.student.arch, self.ec, choice.probs), choice


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
        logits = model(x) if spec is None else masked_forward(model, spec, x)
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        n += y.numel()
    model.train(was)
    return total / max(1, n)


def train(parent_dir: str | Path, data_dir: str | Path, out: str | Path, cfg: TrainConfig = TrainConfig(), *,
          work_dir: str | Path | None = None, resume: bool = False, force: bool = False,
          progress: Callable[[int, int, dict], None] | None = None, stop_after: int | None = None) -> dict:
    """Build an elastic checkpoint at ``out`` from the dense ``parent_dir``.

    Args:
        parent_dir: a nemotron_h checkpoint with weights (its tokenizer files are carried over).
        data_dir: token shards from ``trainer.data.build_token_shards`` (train and val splits).
        out: the elastic checkpoint to write (must not exist unless ``force``).
        work_dir: where training state goes (default ``<out>.work``); ``resume`` continues from it.
        progress: called as ``progress(step, total, {"loss": ..., "budget": name, ...})``.
        stop_after: stop (state saved) after this many steps, for tests of resuming.

    Returns:
        a summary: steps, tokens, validation loss per budget and of the parent, resolved sizes.
    """
    rank, world = _dist()
    out = Path(out)
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".work")
    if out.exists() and not force:
        raise ConfigError("already exists; pass --force to replace it", path=str(out))
    if len(cfg.budgets) < 1 or any(not 0 < f <= 1 for _, f in cfg.budgets):
        raise ConfigError("budgets need a share of the parent's parameters in (0, 1]")
    for stage in (cfg.stage1, cfg.stage2):
        if stage.weights is not None and len(stage.weights) != len(cfg.budgets):
            raise ConfigError(f"stage weights {stage.weights} need one weight per budget ({len(cfg.budgets)})")
    ckpt = Checkpoint.open(parent_dir, require_weights=True)
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    teacher = load_model(ckpt, dtype=torch.float32, device=device).requires_grad_(False).eval()
    student = load_model(ckpt, dtype=torch.float32, device=device).requires_grad_(True).train()
    arch = ckpt.arch
    total_params = arch.param_counts()["total"]
    train_ds, val_ds = TokenDataset(data_dir, "train"), TokenDataset(data_dir, "val")
    data_vocab = train_ds.meta.get("tokenizer", {}).get("vocab_size", 0)
    if data_vocab > arch.vocab_size:
        raise ConfigError(f"the data's tokenizer has {data_vocab} tokens, the parent's vocabulary only "
                          f"{arch.vocab_size}: tokenize with the parent's tokenizer", path=str(data_dir))
    state_path = work / STATE_NAME
    state = torch.load(state_path, weights_only=False) if resume and state_path.is_file() else None
    if resume and state is None:
        raise ConfigError(f"nothing to resume: no {STATE_NAME}", path=str(work))

    budgets = tuple(Budget(name, round(f * total_params)) for name, f in cfg.budgets)
    if state is None:  # importance, permutation, search space
        g = torch.Generator().manual_seed(cfg.seed + 7)
        calib = [train_ds.batch(g, cfg.batch_size, cfg.stage1.context)[0].to(device) for _ in range(cfg.importance_batches)]
        scores = width_importance(student, calib)
        permute_(student, orders(student, scores))
        depth = depth_order(student, calib[:2], candidates=range(arch.num_hidden_layers), steps=cfg.drop_layers)
        dims = default_search_space(arch, [j for j, _ in depth])
        full = SliceSpec.full(arch).to_json(arch)
        ec = ElasticConfig(budgets, dims, {b.name: full for b in budgets})
        importance = {"scores": {k: v.clone() for k, v in scores.items()}, "depth": depth}
        start = 0
    else:
        student.load_state_dict(state["student"])
        ec = ElasticConfig.from_json(state["elastic_config"], arch)
        importance, start = state["importance"], state["step"]
    with torch.random.fork_rng(devices=[]):  # the same router for the same seed, whatever ran before
        torch.manual_seed(cfg.seed)
        router = Router(ec.dimensions, len(budgets)).to(device)
    module: nn.Module = ElasticModule(student, router, ec)
    if world > 1:
        module = nn.parallel.DistributedDataParallel(module, find_unused_parameters=True,
                                                     device_ids=[torch.device(device).index] if device != "cpu" else None)
    opt = torch.optim.AdamW([
        {"params": list(student.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": list(router.parameters()), "lr": cfg.router_lr, "weight_decay": 0.0},
    ])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    g_data = torch.Generator().manual_seed(cfg.seed + 1000 * (rank + 1))
    g_budget, g_gumbel = torch.Generator().manual_seed(cfg.seed + 1), torch.Generator().manual_seed(cfg.seed + 2)
    history: list[dict] = []
    if state is not None:
        router.load_state_dict(state["router"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        g_data.set_state(state["g_data"][rank] if isinstance(state["g_data"], list) else state["g_data"])
        g_budget.set_state(state["g_budget"])
        g_gumbel.set_state(state["g_gumbel"])
        history = state["history"]

    def save_state(step: int) -> None:
        gd = [g_data.get_state()]
        if world > 1:  # every rank's data stream, so a resume on the same world size is exact
            gd = [torch.empty_like(gd[0]) for _ in range(world)]
            torch.distributed.all_gather(gd, g_data.get_state())
        if rank == 0:
            work.mkdir(parents=True, exist_ok=True)
            _atomic_save({
                "step": step, "student": student.state_dict(), "router": router.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "g_data": gd if world > 1 else gd[0], "g_budget": g_budget.get_state(), "g_gumbel": g_gumbel.get_state(),
                "elastic_config": ec.to_json(), "importance": importance, "history": history, "config": asdict(cfg),
            }, state_path)

    end = cfg.total_steps if stop_after is None else min(cfg.total_steps, stop_after)
    t0 = time.perf_counter()
    for step in range(start, end):
        stage = cfg.stage1 if step < cfg.stage1.steps else cfg.stage2
        weights = torch.tensor(stage.weights or [1.0] * len(budgets), dtype=torch.float64)
        b = int(torch.multinomial(weights, 1, generator=g_budget))
        x = train_ds.batch(g_data, cfg.batch_size, stage.context)[0].to(device)
        tau = anneal(step, cfg.total_steps, *cfg.tau)
        scale = anneal(step, cfg.total_steps, *cfg.logit_scale)
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits, cost, choice = module(x, b, tau, scale, g_gumbel)
        kd = forward_kl(t_logits, s_logits)
        cost_loss = (cost - budgets[b].target_parameters).abs() / total_params
        loss = kd + cfg.router_weight * cost_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(student.parameters()), cfg.grad_clip)
        opt.step()
        sched.step()
        rec = {"step": step, "budget": budgets[b].name, "kd": kd.item(), "cost": cost_loss.item(),
               "params": choice.spec.parameters(arch)}
        if world > 1:
            t = torch.tensor([rec["kd"]])
            torch.distributed.all_reduce(t)
            rec["kd"] = float(t) / world
        history.append(rec)
        if progress:
            progress(step + 1, cfg.total_steps, rec)
        if (step + 1) % cfg.save_every == 0 or step + 1 == end:
            save_state(step + 1)
    train_s = time.perf_counter() - t0

    if end < cfg.total_steps:  # stopped early on purpose: the state is saved, nothing else
        return {"stopped_at": end, "history": history}
    # resolve each budget with the router's argmax and write the elastic checkpoint
    resolved = {}
    with torch.no_grad():
        for i, b in enumerate(budgets):
            resolved[b.name] = sample(router, ec, arch, i, 1.0, cfg.logit_scale[1], None,
                                      full=b.target_parameters >= total_params).spec.to_json(arch)
    ec = replace(ec, resolved=resolved)
    ElasticConfig.from_json(ec.to_json(), arch)  # what we write must read back
    tokens_per_step = cfg.batch_size * world
    tokens = sum(tokens_per_step * (cfg.stage1.context if s < cfg.stage1.steps else cfg.stage2.context)
                 for s in range(cfg.total_steps))
    val_ctx = cfg.stage2.context if cfg.stage2.steps else cfg.stage1.context
    summary = {
        "steps": cfg.total_steps, "tokens": tokens, "world_size": world, "train_seconds": round(train_s, 1),
        "parent_val_loss": eval_loss(teacher, val_ds, val_ctx, cfg.eval_batches),
        "budgets": {},
    }
    for b in budgets:
        spec = SliceSpec.from_json(resolved[b.name], arch)
        summary["budgets"][b.name] = {
            "target_parameters": b.target_parameters, "parameters": spec.parameters(arch),
            "val_loss": eval_loss(student, val_ds, val_ctx, cfg.eval_batches, spec=spec),
        }
    if rank == 0:
        write_elastic_checkpoint(student, ec, router, importance, ckpt.root, out, force=force,
                                 training={"config": asdict(cfg), **summary})
    if world > 1:
        torch.distributed.barrier()
    return summary


def write_elastic_checkpoint(model: NemotronH, ec: ElasticConfig, router: Router, importance: dict,
                             source: Path, out: Path, force: bool = False, training: dict | None = None) -> Path:
    """Write an elastic checkpoint v1 atomically: weights, config, elastic_config, router,
    importance scores, the source's tokenizer files, and a training summary."""
    from safetensors.numpy import save as st_save

    scores = {k: v.float().numpy() for k, v in importance["scores"].items()}
    with ShardedWriter(out, force=force) as w:
        write_model(w, model)
        w.add_json(CONFIG_NAME, ec.to_json())
        (w.tmp / ROUTER_NAME).write_bytes(st_save(router.numpy_state(), metadata={"format": "np"}))
        (w.tmp / "importance.safetensors").write_bytes(st_save(scores, metadata={
            "depth_order": json.dumps(importance["depth"])}))
        w.add_files_from(source, PASSTHROUGH_FILES)
        if training is not None:
            w.add_json("training.json", training)
    return out
