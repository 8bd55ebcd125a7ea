"""The memory one training process needs (``elastic train --dry-run``). No torch here.

Per rank, in bytes, for the loop in ``trainer/train.py`` (a plan, not a measurement):

- ``parameters``: the student's fp32 master weights plus the router's;
- ``gradients``: fp32, one per parameter;
- ``optimizer``: AdamW's two fp32 states per parameter;
- ``teacher``: the frozen parent, bf16 on CUDA, fp32 on CPU;
- ``working``: what the parallelism adds: DDP's gradient buckets (a second fp32 copy of the
  gradients), or under FSDP the gathered (unsharded) parameters of the root and of two blocks
  (the one computing and the one prefetched), student and teacher, plus the unsharded gradients
  waiting for their reduce-scatter;
- ``activations``: what one micro-batch keeps for the backward: the layers' saved tensors (an MoE
  layer's for each token's top-k experts), the copies of weights the elastic forward makes, the
  inputs of the router's soft masks, and the full-vocabulary logits of the distillation.

The router is counted over :func:`default_search_space`, which lives here (no torch) and is the one
``trainer/elastic.py`` and ``train()`` build the real router from.

FSDP shards every tensor along dim 0 as ``fully_shard`` does: each rank holds
``ceil(rows / world)`` rows (the last rank's padding counted). The router is counted unsharded
(it is a few million parameters). A plan fits a device when its total is at most
:data:`HEADROOM` of it: the rest is for the CUDA context, NCCL buffers and the allocator's
fragmentation, which this plan does not model.

Example:
    >>> arch = Arch.from_file("examples/nemotron-elastic-12b")
    >>> m = train_memory(arch, TrainConfig(), 8, cuda=True, fsdp=True)
    >>> m.total / GIB, m.fits(80 * GIB)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from elastic.profiles.units import GIB, MIB, gib
from elastic.slicer.errors import ConfigError
from elastic.slicer.formats.arch import Arch
from elastic.slicer.formats.elastic_format import Dimension

F32, BF16 = 4, 2
HEADROOM = 0.9  # a plan fits when its total is at most this share of the device's memory
ROUTER_HIDDEN = 256  # the width of each router MLP (trainer/elastic.py's Router)
# full-vocabulary fp32 tensors alive at the distillation's peak (train.forward_kl): teacher and student
# logits, the student's log-softmax and exp(teacher log-softmax) (saved for the backward), plus the
# teacher's log-softmax, (t - s) and their product while forward_kl runs
LOGIT_COPIES = 7
# the tensors elastic.slicer.nn.masked.narrow index-selects (copies) when a child keeps fewer units: those whose
# kept ranges are not one block (slicer/formats/rules.py: Mamba heads kept per group, each head's first
# channels, so [z | x | B | C | dt] rows; query heads kept per KV group). Everything else, and every
# hidden axis, is a prefix: a view
COPIED = {
    "mamba": ("mixer.in_proj.weight", "mixer.in_proj.bias", "mixer.conv1d.weight", "mixer.conv1d.bias", "mixer.A_log",
              "mixer.D", "mixer.dt_bias", "mixer.norm.weight", "mixer.out_proj.weight"),
    "attention": ("mixer.q_proj.weight", "mixer.o_proj.weight"),
    # routed experts kept per routing group: the gate's rows (one block when n_group is 1, see copied());
    # each kept expert's own tensors are prefixes (views), renumbered by name only
    "moe": ("mixer.gate.weight", "mixer.gate.e_score_correction_bias"),
}
# the MoE gates' correction bias: a float32 buffer (persistent, not trained; slicer/nn/model.py KEEP_FP32):
# student and teacher hold it whole, with no gradient and no optimizer state
FROZEN = ".e_score_correction_bias"
TERMS = ("parameters", "gradients", "optimizer", "teacher", "working", "activations")


# ---- the search space: one construction, for the router train() builds and for its count here ----


def _steps(top: int, unit: int, fractions=(1.0, 0.75, 0.5)) -> tuple[int, ...]:
    """Sizes ``top * f`` rounded down to a multiple of ``unit`` (at least one unit), largest first."""
    out = []
    for f in fractions:
        v = max(unit, int(top * f) // unit * unit)
        if v not in out:
            out.append(v)
    return tuple(out)


def default_search_space(arch: Arch, droppable: list[int], per_layer_mamba: bool = False) -> tuple[Dimension, ...]:
    """Choices down to about half of every width, and keep/drop for the ``droppable`` layers.

    FFN widths are chosen per layer (NVIDIA's Puzzle format and vLLM hold them per layer); Mamba and
    attention sizes once for all their layers, unless ``per_layer_mamba`` (then per layer, and the
    slices load only in transformers, through the modeling file elastic ships). MoE layers: one
    expert count and expert and shared-expert widths for all of them.

    Example:
        >>> [d.name for d in default_search_space(Arch.from_file("slicer/moe_demo_checkpoint"), [])]
        ['hidden_size', 'mamba_num_heads', 'mamba_head_dim', 'num_attention_heads', 'n_routed_experts', ...]
    """
    shared = not per_layer_mamba
    idx = lambda kind: tuple(i for i, layer in enumerate(arch.layers) if layer.kind == kind)  # noqa: E731
    d = arch.hidden_size
    dims = [Dimension("hidden_size", _steps(d, 8 if d >= 16 else 1, (1.0, 0.875, 0.75, 0.625, 0.5)))]
    mamba, attn, mlp, moe = idx("mamba"), idx("attention"), idx("mlp"), idx("moe")
    if mamba:
        first = arch.layers[mamba[0]]
        dims.append(Dimension("mamba_num_heads", _steps(first.mamba_num_heads, arch.n_groups), mamba, shared))
        dims.append(Dimension("mamba_head_dim", _steps(first.mamba_head_dim, 1), mamba, shared))
    if attn:
        first = arch.layers[attn[0]]
        dims.append(Dimension("num_attention_heads", _steps(first.num_attention_heads, first.num_key_value_heads), attn,
                              shared))
    if mlp:
        dims.append(Dimension("intermediate_size", _steps(arch.layers[mlp[0]].intermediate_size, 8,
                                                          (1.0, 0.75, 0.5, 0.25)), mlp))
    if moe:  # one expert count and widths per budget for all MoE layers (what runtimes take)
        first = arch.layers[moe[0]]
        # every routing group keeps the same count, and top-k must stay reachable
        least = -(-arch.num_experts_per_tok // arch.topk_group) * arch.n_group
        experts = (tuple(e for e in _steps(first.n_routed_experts, arch.n_group) if e >= least)
                   or (first.n_routed_experts,))
        dims.append(Dimension("n_routed_experts", experts, moe, shared))
        # finer width steps than the dense layers': one shared choice moves every expert of every MoE layer,
        # so coarse steps leave no nested model near a budget's target
        fine = (1.0, 0.875, 0.75, 0.625, 0.5)
        for name in ("moe_intermediate_size", "moe_shared_expert_intermediate_size"):
            size = getattr(first, name)
            dims.append(Dimension(name, _steps(size, 8 if size >= 16 else 1, fine), moe, shared))
    if droppable:
        dims.append(Dimension("depth", ("keep", "drop"), tuple(sorted(droppable))))
    return tuple(dims)


@dataclass(frozen=True)
class TrainMemory:
    """Bytes one training process holds at its peak, term by term."""

    parallelism: str  # "ddp", "fsdp" or "single" (one process)
    world: int  # processes, one GPU each
    parameters: int  # student + router master weights, fp32
    gradients: int  # fp32
    optimizer: int  # AdamW: exp_avg and exp_avg_sq, fp32
    teacher: int  # the frozen parent
    working: int  # DDP buckets, or FSDP's gathered parameters and unsharded gradients
    activations: int  # one micro-batch: layers + weight copies + masks + logits (see ``parts``)
    how: dict[str, str] = field(default_factory=dict, compare=False)  # term -> how it was computed
    parts: tuple[tuple[str, int, str], ...] = ()  # the activations, (name, bytes, how) each

    @property
    def total(self) -> int:
        return sum(getattr(self, t) for t in TERMS)

    def terms(self) -> list[tuple[str, int, str]]:
        """Every term as (name, bytes, how it was computed), in the order the CLI prints them."""
        return [(t, getattr(self, t), self.how.get(t, "")) for t in TERMS]

    def fits(self, device_bytes: int) -> bool:
        """True when the total is at most :data:`HEADROOM` of ``device_bytes``."""
        return self.total <= HEADROOM * device_bytes


def _copies_how(arch: Arch, n_copies: int, c: int, ckpt: bool, only_full: bool) -> str:
    """How the weight copies term of the activations was computed."""
    if only_full:
        return "none: every budget is the parent itself, nothing is narrowed"
    copies_how = (f"{_count(n_copies)} weights x {c} B: what the elastic forward index-selects for a smaller "
                  "child, at the parent's sizes (an upper bound): Mamba in_proj, conv1d, A_log, D, dt_bias, gated "
                  "norm and out_proj (heads kept per group); attention q_proj and o_proj (query heads per KV "
                  "group)" + ("; MoE gate rows and correction bias (experts kept per routing group)"
                              if copied(arch, "moe") and any(x.kind == "moe" for x in arch.layers) else "")
                  + ". MLP, experts, embedding and LM head are narrowed views")
    if ckpt:
        copies_how += "; with checkpointing one block's at a time (made again in the backward)"
    return copies_how


def train_memory(arch: Arch, cfg: Any, world: int, *, cuda: bool, fsdp: bool,
                 kernels: bool | None = None) -> TrainMemory:
    """The per-rank memory of ``elastic train`` with ``cfg`` on ``world`` processes.

    Args:
        arch: the parent (only its config is read).
        cfg: a ``TrainConfig`` (read: budgets, stage1/stage2, batch_size, micro_batches,
            drop_layers, per_layer_mamba, activation_checkpointing).
        world: processes, one device each.
        cuda: on GPUs (teacher in bf16) or on CPUs (everything fp32).
        fsdp: FSDP2 (sharded, student computing in bf16 on CUDA) rather than DDP; with
            ``world == 1`` and not ``fsdp``, one plain process.
        kernels: the fused Mamba kernels (mamba_ssm) run the scan; None: on CUDA when the
            config lets them (``time_step_limit`` (0, inf), as ``Mamba2Mixer._scan`` requires).

    Returns:
        a :class:`TrainMemory`; ``terms()`` says how each number was computed.
    """
    if world < 1:
        raise ValueError(f"world is {world}; need at least one process")
    parallelism = "fsdp" if fsdp else ("ddp" if world > 1 else "single")
    c = BF16 if cuda and fsdp else F32  # the student's compute dtype (FSDP MixedPrecisionPolicy param_dtype)
    if kernels is None:
        kernels = cuda and tuple(arch.time_step_limit) == (0.0, math.inf)

    n_router = router_parameters(arch, cfg)
    states, how = _states(arch, world, cuda=cuda, fsdp=fsdp, n_router=n_router)

    # activations of one micro-batch
    n_micro, B = micro_batch(cfg, world)
    stages = [s for s in (cfg.stage1, cfg.stage2) if s.steps] or [cfg.stage1, cfg.stage2]
    T = max(s.context for s in stages)
    tokens = B * T
    V = arch.vocab_size
    ckpt = bool(cfg.activation_checkpointing)
    layers, layers_how = _layers(arch, c, kernels, B, T, ckpt)
    if kernels and any(layer.kind == "mamba" for layer in arch.layers):
        layers_how += (f"; fused mamba_ssm scan assumed (elastic[kernels]), the pure-PyTorch scan would need "
                       f"{gib(_layers(arch, c, False, B, T, ckpt)[0], 1)}")
    elif any(layer.kind == "mamba" for layer in arch.layers):
        layers_how += "; pure-PyTorch SSD scan (fp32 chunk tensors)"
    only_full = _only_full(cfg)
    n_copies = weight_copy_elements(arch, cfg)
    copies = n_copies * c
    copies_how = _copies_how(arch, n_copies, c, ckpt, only_full)
    per_token = mask_elements(arch, cfg)
    masks = tokens * per_token * c
    if only_full:
        masks_how = "none: every budget is the parent itself, whose masks are constants (nothing saved for them)"
    else:
        blocks = "one layer's (recomputed in the backward)" if ckpt else "every layer's"
        masks_how = (f"B_m {B} x T {T} x {_count(per_token)} per token x {c} B: each soft mask multiplies an "
                     f"activation and keeps it for the mask's gradient: the embedding rows (hidden "
                     f"{arch.hidden_size}) and {blocks} output-projection input (Mamba heads x head_dim, attention "
                     "heads x head_dim, MLP width"
                     + ("; MoE: per top-k expert its down_proj input and output, the shared expert's down_proj "
                        "input, and a droppable layer's output" if any(x.kind == "moe" for x in arch.layers) else "")
                     + "), at the parent's sizes (an upper bound)")
    logits = LOGIT_COPIES * tokens * V * F32
    parts = (
        ("layers", layers, layers_how),
        ("weight copies", copies, copies_how),
        ("masks", masks, masks_how),
        ("logits", logits, f"{LOGIT_COPIES} x B_m {B} x T {T} x vocab {V} x 4 B (teacher, student, log-softmaxes, "
                           "KL terms in fp32)"),
    )
    how["activations"] = (f"one micro-batch: B_m = ceil(ceil(batch {cfg.batch_size} / {n_micro} micro-batches) / "
                          f"{world} process{'es' * (world > 1)}) = {B} sequence{'s' * (B > 1)} at T = {T}"
                          f"{', activation checkpointing' if ckpt else ''}: layers + weight copies + masks + logits")
    return TrainMemory(parallelism=parallelism, world=world, **states, activations=sum(p[1] for p in parts),
                       how=how, parts=parts)


def use_fsdp(setting: str, world: int, arch: Arch, device_bytes: int | None, cuda: bool,
             cfg: Any | None = None) -> tuple[bool, str]:
    """Whether to shard with FSDP, and why (one decision, used by the trainer and the dry run).

    Args:
        setting: "on", "off" or "auto" (on when several processes and the DDP plan would not fit
            in :data:`HEADROOM` of ``device_bytes``).
        world: processes. One process never shards (there is nothing to shard across).
        device_bytes: memory of each process's device; None (CPU processes, which share the host's
            RAM): "auto" keeps DDP.
        cfg: the training settings for the DDP plan's activations; None counts the DDP plan's
            states alone (parameters, gradients, optimizer, teacher, buckets).

    Returns:
        (fsdp, reason), e.g. ``(True, "auto: the DDP plan needs 215.3 GiB per rank, more than 90% of 80.0 GiB")``.
    """
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"fsdp setting {setting!r}; need auto, on or off")
    if world <= 1:
        why = "one process: FSDP has nothing to shard across"
        return False, (f"--fsdp on ignored: {why}" if setting == "on" else why)
    if setting == "on":
        return True, "--fsdp on"
    if setting == "off":
        return False, "--fsdp off: DDP, every rank holds everything"
    if device_bytes is None:
        return False, "auto: no device memory to plan against (CPU processes): DDP"
    if cfg is not None:
        need, what = train_memory(arch, cfg, world, cuda=cuda, fsdp=False).total, "the DDP plan"
    else:
        need = sum(_states(arch, world, cuda=cuda, fsdp=False, n_router=0)[0].values())
        what = "the DDP plan's states (activations not counted)"
    limit = HEADROOM * device_bytes
    if need > limit:
        return True, f"auto: {what} needs {gib(need, 1)} per rank, more than {HEADROOM:.0%} of {gib(device_bytes, 1)}"
    return False, f"auto: {what} needs {gib(need, 1)} per rank, within {HEADROOM:.0%} of {gib(device_bytes, 1)}: DDP"


def gpus_needed(arch: Arch, cfg: Any, gpu_bytes: int, *, max_gpus: int = 1024) -> int | None:
    """The fewest GPUs of ``gpu_bytes`` each whose plan fits (one GPU: a plain process; more: FSDP),
    activation checkpointing as in ``cfg``; None when none up to ``max_gpus`` does.

    Only process counts the step's ``batch_size`` divides among are tried (the trainer refuses the
    others); a linear scan, as more processes also shrink each one's micro-batch.
    """
    for w in range(1, min(max_gpus, cfg.batch_size) + 1):
        if cfg.batch_size % w == 0 and train_memory(arch, cfg, w, cuda=True, fsdp=w > 1).fits(gpu_bytes):
            return w
    return None


GPU_SIZES = tuple(n * GIB for n in (24, 48, 80, 141))  # the cards the dry run sizes a run for


@dataclass(frozen=True)
class TrainPlan:
    """What ``elastic train --dry-run`` reports: the per-rank memory on ``world`` devices of
    ``device_bytes`` each, the parallelism and why, and how many GPUs of each size a run needs."""

    memory: TrainMemory
    cfg: Any  # the TrainConfig planned for
    parameters: int  # the parent's
    reason: str  # why this parallelism (``use_fsdp``)
    device_bytes: int
    cuda: bool  # planned for GPUs (False: one CPU process in the host's RAM)
    fits: bool  # memory.total <= HEADROOM x device_bytes
    gpus_needed: tuple[tuple[int, int | None], ...]  # (GPU bytes, fewest GPUs or None), ``device_bytes`` first


def plan_training(arch: Arch, cfg: Any, world: int, device_bytes: int, *, cuda: bool = True,
                  sizes: tuple[int, ...] = GPU_SIZES, max_gpus: int = 1024) -> TrainPlan:
    """The dry run: ``use_fsdp`` decides the parallelism (``cfg.fsdp``), ``train_memory`` counts it,
    ``gpus_needed`` sizes the run for ``device_bytes`` (on CUDA) and each of ``sizes``.

    Raises:
        ConfigError: ``cfg.batch_size`` does not divide among ``world`` processes.

    Example:
        >>> p = plan_training(Arch.from_file("examples/nemotron-elastic-12b"), TrainConfig(), 8, 80 * GIB)
        >>> p.memory.parallelism, p.fits, dict(p.gpus_needed)[80 * GIB]
    """
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size (--batch-size) is {cfg.batch_size}: sequences per step in all processes; it "
                          f"must divide among the {world} processes, as training requires")
    fsdp, reason = use_fsdp(cfg.fsdp, world, arch, device_bytes, cuda, cfg)
    memory = train_memory(arch, cfg, world, cuda=cuda, fsdp=fsdp)
    wanted = ([device_bytes] if cuda else []) + [b for b in sizes if not (cuda and b == device_bytes)]
    needed = tuple((b, gpus_needed(arch, cfg, b, max_gpus=max_gpus)) for b in wanted)
    return TrainPlan(memory, cfg, arch.param_counts()["total"], reason, device_bytes, cuda, memory.fits(device_bytes),
                     needed)


# ---- the pieces ---------------------------------------------------------------------------------


def micro_batch(cfg: Any, world: int) -> tuple[int, int]:
    """(micro-batches per step, sequences one process computes in the largest), as the loop in
    ``trainer/train.py`` cuts them: the step's ``batch_size`` sequences (all processes together)
    split into ``min(micro_batches or budgets, batch_size // world)`` micro-batches, each split
    among the processes (``tensor_split``: the first parts are the largest)."""
    n = max(1, min(cfg.micro_batches or len(cfg.budgets), cfg.batch_size // world))
    largest = -(-cfg.batch_size // n)  # ceil
    return n, -(-largest // world)


def _states(arch: Arch, world: int, *, cuda: bool, fsdp: bool, n_router: int) -> tuple[dict[str, int], dict[str, str]]:
    """Every term but the activations, in bytes, and how each was computed."""
    shard = world if fsdp else 1
    c = BF16 if cuda and fsdp else F32
    tb = BF16 if cuda else F32  # the teacher's dtype
    shapes = arch.tensor_shapes()
    frozen = sum(math.prod(s) for name, s in shapes.items() if name.endswith(FROZEN))  # fp32 buffers, whole
    shapes = {name: s for name, s in shapes.items() if not name.endswith(FROZEN)}  # the trained parameters
    n_student = sum(math.prod(s) for s in shapes.values())
    local = sum(_shard(s, shard) for s in shapes.values())  # student (and teacher) elements on this rank
    per = f"/ {world} ranks, each tensor's rows split, ceil" if fsdp and world > 1 else "on every rank"
    counts = f"(student {_count(n_student)} + router {_count(n_router)})"
    buffers = f" + {_count(frozen)} MoE gate correction-bias buffer elements x 4 B (not trained)" if frozen else ""
    how = {
        "parameters": f"{counts} params x 4 B fp32 master weights, {per}{buffers}",
        "gradients": f"{counts} x 4 B fp32, {per}",
        "optimizer": f"{counts} x 8 B (AdamW exp_avg + exp_avg_sq, fp32), {per}",
        "teacher": f"{_count(n_student)} x {tb} B ({'bf16' if tb == BF16 else 'fp32'}), {per}{buffers}",
    }
    root = sum(math.prod(s) for n, s in shapes.items() if not n.startswith("backbone.layers."))
    block = max(sum(math.prod(s) for s in arch.layer_tensor_shapes(i).values()) for i in range(len(arch.layers)))
    if fsdp:
        # FSDP2 keeps the root (embeddings, final norm, LM head) gathered through the step; blocks are
        # gathered one at a time with the next prefetched, in the compute dtype. Gradients come out
        # unsharded in the compute dtype: the root's wait through the whole backward, a block's for
        # its reduce-scatter, for which they are cast to fp32
        gathered = (root + 2 * block) * (c + tb)
        grads = (root + block) * c + block * F32
        working = gathered + grads
        how["working"] = (f"gathered: (root {_count(root)} + 2 x largest block {_count(block)}) x ({c} B student + "
                          f"{tb} B teacher) = {gib(gathered, 1)}; unsharded gradients before their reduce-scatter: "
                          f"(root + block) x {c} B + block x 4 B fp32 = {gib(grads, 1)}")
    elif world > 1:
        working = (n_student + n_router) * F32
        how["working"] = "DDP gradient buckets: a second fp32 copy of every gradient (gradient_as_bucket_view off)"
    else:
        working = 0
        how["working"] = "one process: nothing gathered, no buckets"
    n = local + n_router  # the router is counted whole on every rank
    terms = {"parameters": (n + frozen) * F32, "gradients": n * F32, "optimizer": n * 2 * F32,
             "teacher": local * tb + frozen * F32, "working": working}
    return terms, how


def router_parameters(arch: Arch, cfg: Any) -> int:
    """Parameters of ``trainer.elastic.Router`` over :func:`default_search_space` as ``train()`` builds
    it (``drop_layers`` droppable layers): per dimension Linear(budgets -> 256) + Linear(256 -> outputs)."""
    nb, h = len(cfg.budgets), ROUTER_HIDDEN
    droppable = list(range(min(cfg.drop_layers, len(arch.layers))))  # which ones does not change the count
    return sum(nb * h + h + h * d.router_outputs + d.router_outputs
               for d in default_search_space(arch, droppable, cfg.per_layer_mamba))


def weight_copy_elements(arch: Arch, cfg: Any) -> int:
    """Elements of the weight copies one elastic forward makes, at the parent's sizes (a smaller
    child copies less; the matrices, conv1d's weight, D and the gated norm's weight are saved for
    the backward, biases, A_log and dt_bias only alive while their block computes).

    ``trainer.elastic.nested_forward`` narrows each tensor inside its block: a view (no copy, and
    under FSDP the gathered storage is freed and gathered again for the backward) when it keeps one
    range per axis, an ``index_select`` copy otherwise: the :func:`copied` tensors of Mamba,
    attention and MoE layers. The router's masks multiply activations (:func:`mask_elements`), not
    weights. With only the 100% budget (pinned to the parent) nothing is narrowed; with activation
    checkpointing the blocks' copies are made again in the backward, one block at a time.
    """
    if _only_full(cfg):
        return 0
    per_block = [sum(math.prod(shape) for name, shape in arch.layer_tensor_shapes(i).items()
                     if name in copied(arch, layer.kind))
                 for i, layer in enumerate(arch.layers)]
    return max(per_block, default=0) if cfg.activation_checkpointing else sum(per_block)


def copied(arch: Arch, kind: str) -> tuple[str, ...]:
    """The :data:`COPIED` tensors of a layer of ``kind`` in ``arch``: an MoE gate's rows are one block
    (a view) when its experts form one routing group (``n_group`` 1), so nothing is copied there."""
    if kind == "moe" and arch.n_group == 1:
        return ()
    return COPIED.get(kind, ())


def mask_elements(arch: Arch, cfg: Any) -> int:
    """Elements per token the soft masks' multiplies keep for the backward, at the parent's sizes.

    ``trainer.elastic.nested_forward`` multiplies the looked-up embedding rows (hidden size) and each
    layer's output-projection input (Mamba heads x head_dim, attention heads x head_dim, MLP width)
    by the router's mask; with a sample that carries a gradient the multiply saves that input (the
    product goes on to the projection, which saves its input masked or not). An MoE
    layer (``trainer.elastic._layer_masks``) multiplies, for each of a token's top-k experts, the
    expert's down_proj input (expert width) and its output (the experts' hidden-side width), and the
    shared expert's down_proj input; when it may be dropped (one of the ``drop_layers`` candidates,
    counted for the first MoE layers: an upper bound) its whole output (hidden size) as well. With
    only the 100% budget the masks are constants: nothing is saved. With activation checkpointing
    one block's inputs are alive at a time (the embedding's throughout).
    """
    if _only_full(cfg):
        return 0
    widths = []
    droppable_moe = min(cfg.drop_layers, len(arch.layers))  # depth candidates that may be MoE layers
    for layer in arch.layers:
        if layer.kind == "mamba":
            widths.append(layer.mamba_num_heads * layer.mamba_head_dim)
        elif layer.kind == "attention":
            widths.append(layer.num_attention_heads * arch.head_dim)
        elif layer.kind == "mlp":
            widths.append(layer.intermediate_size)
        else:  # moe
            inner = arch.moe_latent_size or arch.hidden_size
            depth = arch.hidden_size if droppable_moe > 0 else 0
            droppable_moe -= 1
            widths.append(arch.num_experts_per_tok * (layer.moe_intermediate_size + inner)
                          + layer.moe_shared_expert_intermediate_size + depth)
    return arch.hidden_size + (max(widths, default=0) if cfg.activation_checkpointing else sum(widths))


def _only_full(cfg: Any) -> bool:
    """Every budget is 100%: each step is the parent itself (``sample(full=True)``), nothing narrowed
    and the masks constants."""
    return all(share >= 1 for _, share in cfg.budgets)


def _shard(shape: tuple[int, ...], world: int) -> int:
    """Elements of one rank's shard: ``fully_shard`` splits dim 0 into ``world`` equal (padded) chunks."""
    return -(-shape[0] // world) * math.prod(shape[1:])


def _norm(d: int, c: int) -> int:
    """RMSNorm (model.py), per token: the fp32 input and the normalised x saved by the two
    multiplies (2 d x 4), the rsqrt (4), and the output in the compute dtype, which the
    following Linear saves (d x c)."""
    return 2 * d * F32 + F32 + d * c


def _layers(arch: Arch, c: int, kernels: bool, B: int, T: int, ckpt: bool) -> tuple[int, str]:
    """Bytes the model's layers keep for the backward of one (B, T) micro-batch, and how."""
    tokens, d = B * T, arch.hidden_size
    per_layer = [_layer_tokens_bytes(arch, i, c, kernels) * tokens + _layer_fixed_bytes(arch, i, T, c)
                 for i in range(len(arch.layers))]
    outside = tokens * (8 + _norm(d, c))  # input ids (int64) + the final norm (its output is lm_head's input)
    if ckpt:
        return (outside + len(arch.layers) * tokens * d * c + max(per_layer),
                f"B_m {B} x T {T} tokens x hidden {d} x {c} B (each of {len(arch.layers)} layers' input) + one layer "
                f"recomputed in full ({gib(max(per_layer), 1)})")
    return outside + sum(per_layer), f"B_m {B} x T {T} tokens x bytes saved per token ({_kinds_how(arch, c, kernels)})"


def _layer_tokens_bytes(arch: Arch, i: int, c: int, kernels: bool) -> int:
    """Bytes layer ``i`` saves for the backward per token, read off ``slicer/nn/model.py``
    (checked against the saved tensors of a real forward by tests/test_train_memory.py)."""
    layer, d = arch.layers[i], arch.hidden_size
    if layer.kind == "mamba":
        H, P, G, N = layer.mamba_num_heads, layer.mamba_head_dim, arch.n_groups, arch.ssm_state_size
        I, conv = H * P, H * P + 2 * G * N
        n = _norm(d, c)
        n += (2 * I + 2 * G * N + H) * c  # in_proj output [z|x|B|C|dt]: z is saved (the gate's silu), so all of it
        # gated norm: silu(z), y * silu(z), the normalised product (fp32; plus fp32 copies of y and z when
        # computing in bf16), its cast and out_proj's input (compute dtype)
        n += (2 if c == F32 else 4) * I * F32 + 2 * I * c
        if kernels:
            # causal_conv1d: its contiguous input and its output [x|B|C]; mamba_chunk_scan_combined saves
            # its inputs (views of those) and its output y, plus dA_cumsum (fp32, H per token)
            return n + 2 * conv * c + I * c + H * F32
        # F.conv1d over the K-1 padded input, its output (silu's input), silu's output
        n += 3 * conv * c
        # ssd_chunked (ssd.py, fp32): dt's softplus and clamp inputs, padded dt, the two decay
        # exponentials (5 H); padded x, the einsums' copies of x*dt (within and across chunks), y (4 I);
        # per chunk position the decay matrix L, C.B and L*(C.B) (3 H x chunk); B and C repeated to
        # the heads and the einsums' operand copies (6 H x N); the chunk states and the entering
        # states (2 H x P x N / chunk)
        Q = arch.chunk_size
        return n + F32 * (5 * H + 4 * I + 3 * H * Q + 6 * H * N + 2 * H * P * N // Q)
    if layer.kind == "attention":
        q, kv = layer.num_attention_heads * arch.head_dim, layer.num_key_value_heads * arch.head_dim
        # q, k, v projections and SDPA's output (flash/efficient attention: no T x T scores), its
        # log-sum-exp per head (fp32); the output's (b, l, heads, hd) layout feeds o_proj as a view
        return _norm(d, c) + (2 * q + 2 * kv) * c + layer.num_attention_heads * F32
    if layer.kind == "mlp":
        # relu(up_proj(x)) (saved by square) and its square (down_proj's input)
        return _norm(d, c) + 2 * layer.intermediate_size * c
    if layer.kind == "moe":
        return _norm(d, c) + _moe_tokens_bytes(arch, layer, c)
    raise AssertionError(f"layer {i} is {layer.kind}: no such layer kind")


def _moe_tokens_bytes(arch: Arch, layer: Any, c: int) -> int:
    """Bytes an MoE mixer (``slicer/nn/model.py`` MoE and TopkRouter) saves per token, after its pre-norm."""
    d, E, k = arch.hidden_size, layer.n_routed_experts, arch.num_experts_per_tok
    Fe, Fs = layer.moe_intermediate_size, layer.moe_shared_expert_intermediate_size
    inner = arch.moe_latent_size or d  # the routed experts' width on the hidden side
    # the gate, in fp32: its input (a copy when computing in bf16), the sigmoid scores (E), the top-k ids
    # (int64, saved by the gather of the chosen scores); with norm_topk_prob the chosen scores and their sum,
    # which the division saves. The choice itself (scores + bias, the group-limited top-k over n_group groups)
    # yields only indices: nothing differentiable depends on it, so what it saves is freed with the forward
    n = (d * F32 if c != F32 else 0) + E * F32 + k * 8 + ((k + 1) * F32 if arch.norm_topk_prob else 0)
    # each of the token's k (token, expert) pairs: the gathered expert input, relu(up_proj) (saved by the square)
    # and the square (down_proj's input), the expert's output and its routing weight (fp32; saved by their
    # product), the product (fp32, saved by index_add_), and the pair's (token, slot) ids (int64)
    n += k * (2 * inner * c + 2 * Fe * c + F32 + inner * F32 + 2 * 8)
    if arch.moe_latent_size:
        n += inner * c  # fc2_latent_proj's input
    return n + 2 * Fs * c  # the shared expert: relu(up_proj) and its square


def _layer_fixed_bytes(arch: Arch, i: int, T: int, c: int = F32) -> int:
    """Per layer and micro-batch, independent of the batch: attention's (T, T) causal mask
    (bool; counted at 4 B, the float bias it may become on CUDA); an MoE gate's fp32 copy of its
    weight (E x hidden) when computing in bf16 (its router runs in fp32)."""
    layer = arch.layers[i]
    if layer.kind == "attention":
        return T * T * F32
    if layer.kind == "moe" and c != F32:
        return layer.n_routed_experts * arch.hidden_size * F32
    return 0


def _kinds_how(arch: Arch, c: int, kernels: bool) -> str:
    """ "28 mamba 3.9 MiB, ..." : per token, summed over the layers of each kind."""
    seen: dict[str, list[int]] = {}
    for i, layer in enumerate(arch.layers):
        n_b = seen.setdefault(layer.kind, [0, 0])
        n_b[0] += 1
        n_b[1] += _layer_tokens_bytes(arch, i, c, kernels)
    return ", ".join(f"{n} {kind} {b / MIB:.2f} MiB" for kind, (n, b) in seen.items())


def _count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)
