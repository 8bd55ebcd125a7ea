"""The training memory plan (trainer/memory.py) against real models: parameter counts from the
modules themselves, FSDP shards from ``torch.chunk`` (what ``fully_shard`` splits by), and
activations from the tensors autograd really saves in a forward and a training micro-step."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from elastic.slicer.formats.arch import Arch
from elastic.slicer.formats.elastic_format import Budget, ElasticConfig
from elastic.slicer.formats.spec import SliceSpec
from elastic.slicer.nn.model import build_model
from elastic.slicer.formats.rules import tensor_rules
from elastic.trainer import elastic as elastic_module
from elastic.trainer import memory
from elastic.trainer.elastic import Router, default_search_space, elastic_forward, sample
from elastic.trainer.memory import HEADROOM, gpus_needed, train_memory, use_fsdp
from elastic.trainer.train import Stage, TrainConfig, forward_kl
from trainer_fixtures import TINY

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_12B = ROOT / "examples" / "nemotron-elastic-12b"
GIB = 2**30

ARCHS = {
    "tiny": TINY,
    "wide": {**TINY, "hidden_size": 64, "mamba_num_heads": 8, "mamba_head_dim": 16, "ssm_state_size": 16,
             "chunk_size": 16, "intermediate_size": 256, "vocab_size": 512},
    "attention-heavy": {**TINY, "hybrid_override_pattern": "M*M-*-", "chunk_size": 32, "ssm_state_size": 4,
                        "num_attention_heads": 8, "head_dim": 16, "vocab_size": 1024, "tie_word_embeddings": True},
}


def arch_of(name: str) -> Arch:
    return Arch.from_config(ARCHS[name])


def cfg_for(batch: int, context: int, micro: int = 1, **over) -> TrainConfig:
    return TrainConfig(batch_size=batch, micro_batches=micro, stage1=Stage(1, context),
                       stage2=Stage(1, context, (0.5, 0.3, 0.2)), **over)


def record_narrow_copies(monkeypatch) -> list[int]:
    """Record, from now on, the bytes of each copy the elastic forward's ``_narrow`` returns (a view
    shares its parameter's storage and is not recorded); returns the list it appends to."""
    made: list[int] = []
    narrow = elastic_module._narrow

    def recording(t, axes):
        out = narrow(t, axes)
        if out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr():
            made.append(out.untyped_storage().nbytes())
        return out

    monkeypatch.setattr(elastic_module, "_narrow", recording)
    return made


def test_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import elastic.trainer.memory"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def real_router(arch: Arch, cfg: TrainConfig) -> Router:
    """The router train() builds: default_search_space over ``drop_layers`` droppable layers."""
    dims = default_search_space(arch, list(range(min(cfg.drop_layers, arch.num_hidden_layers))), cfg.per_layer_mamba)
    return Router(dims, len(cfg.budgets))


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("per_layer_mamba,drop_layers", [(False, 2), (True, 0)])
def test_router_count_is_the_real_routers(name, per_layer_mamba, drop_layers):
    arch = arch_of(name)
    cfg = TrainConfig(per_layer_mamba=per_layer_mamba, drop_layers=drop_layers)
    assert memory.router_parameters(arch, cfg) == sum(p.numel() for p in real_router(arch, cfg).parameters())


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("world,fsdp,cuda", [(1, False, False), (4, False, True), (3, True, True), (8, True, False)])
def test_states_are_the_real_models_tensors(name, world, fsdp, cuda):
    """Parameters/gradients/optimizer are 4/4/8 bytes per element of the student and router, the
    teacher 2 (CUDA) or 4 bytes per element of the parent. Under FSDP a rank holds, per tensor, the
    first of ``torch.chunk(t, world)`` (``fully_shard`` pads every chunk to that size), the router whole."""
    arch, cfg = arch_of(name), TrainConfig()
    model = build_model(arch, device="meta")  # parameters() lists a tied LM head once
    per_rank = (lambda t: torch.chunk(t, world, dim=0)[0].numel()) if fsdp else (lambda t: t.numel())
    student = sum(per_rank(p) for p in model.parameters())
    router = sum(p.numel() for p in real_router(arch, cfg).parameters())
    m = train_memory(arch, cfg, world, cuda=cuda, fsdp=fsdp)
    assert (m.parameters, m.gradients, m.optimizer) == (4 * (student + router), 4 * (student + router),
                                                       8 * (student + router))
    assert m.teacher == (2 if cuda else 4) * student
    assert m.parallelism == ("fsdp" if fsdp else "ddp" if world > 1 else "single")
    assert m.total == sum(b for _, b, _ in m.terms()) and all(how for _, _, how in m.terms())


class SavedBytes:
    """Bytes of the distinct storages autograd saves for the backward, parameters left out
    (a narrowed parameter is a view of it: no memory of its own)."""

    def __init__(self, params):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in self.params:
            self.storages.setdefault(s.data_ptr(), s.nbytes())
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def part(m, name: str) -> int:
    return dict((n, b) for n, b, _ in m.parts)[name]


def forward_saved_bytes(model, ids: torch.Tensor) -> int:
    rec = SavedBytes(model.parameters())
    with torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
        model(ids)
    return rec.total


@pytest.mark.parametrize("name,batch,context", [("tiny", 2, 32), ("wide", 1, 128), ("attention-heavy", 2, 64)])
def test_layer_activations_are_what_a_forward_saves(name, batch, context):
    """The per-layer formulas against a real CPU forward of the student, one layer kind at a time.
    Attention and MLP layers are exact; Mamba layers leave out per-head scalars and index tensors
    (measured 1-2.5% under). Within 5%, so a formula that misses one tensor of its layer's width
    (in_proj's output alone is ~10% of a Mamba layer's) fails."""
    for pattern in ("MMM", "***", "---"):
        arch = Arch.from_config({**ARCHS[name], "hybrid_override_pattern": pattern})
        ids = torch.randint(0, arch.vocab_size, (batch, context), generator=torch.Generator().manual_seed(0))
        measured = forward_saved_bytes(build_model(arch, seed=0), ids)
        estimate = part(train_memory(arch, cfg_for(batch, context), 1, cuda=False, fsdp=False), "layers")
        assert 0.95 <= estimate / measured <= 1.05, (pattern, estimate, measured)


def elastic_setup(arch: Arch, cfg: TrainConfig, pick: int | None):
    """The student, router and elastic config train() builds (no layer droppable). ``pick``: the
    router forced to that choice (1: second largest) in every dimension."""
    total = arch.param_counts()["total"]
    budgets = tuple(Budget(n, round(f * total)) for n, f in cfg.budgets)
    ec = ElasticConfig(budgets, default_search_space(arch, [], False),
                       {b.name: SliceSpec.full(arch).to_json(arch) for b in budgets})
    router = Router(ec.dimensions, len(budgets))
    if pick is not None:
        with torch.no_grad():
            for d in ec.dimensions:
                out = router.mlps[d.name][2]
                out.weight.zero_()
                out.bias.zero_()
                out.bias.view(-1, len(d.choices))[:, min(pick, len(d.choices) - 1)] = 100.0  # beats any Gumbel noise
    return build_model(arch, seed=0), router, ec


def student_step(arch, cfg, ids, budget: int, pick: int | None, t_logits=None):
    """The student's elastic forward (and the distillation loss against ``t_logits``) under a
    recorder of saved tensors. Returns (recorder, choice, student logits)."""
    student, router, ec = elastic_setup(arch, cfg, pick)
    rec = SavedBytes([*student.parameters(), *router.parameters()])
    total = arch.param_counts()["total"]
    with torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
        choice = sample(router, ec, arch, budget, 1.0, 1.0, torch.Generator().manual_seed(0),
                        full=ec.budgets[budget].target_parameters >= total)
        s_logits = elastic_forward(student, ec, choice, ids)
        if t_logits is not None:
            forward_kl(t_logits, s_logits)
    if pick is not None:
        assert choice.spec.parameters(arch) < total  # a real sub-budget: index-selected copies
    return rec, choice, s_logits


def elastic_forward_saved_bytes(arch, cfg, ids, pick: int) -> tuple[int, SliceSpec]:
    rec, choice, _ = student_step(arch, cfg, ids, 1, pick)
    return rec.total, choice.spec


def micro_step_bytes(arch: Arch, cfg: TrainConfig, budget: int, pick: int | None) -> int:
    """What one training micro-step holds when its backward starts: every tensor autograd saved in
    the student's elastic forward and the distillation loss, plus the two logits tensors the loop
    keeps. ``pick``: force that choice in every dimension, else the budget's own (the 100% budget
    is pinned to the parent)."""
    # the micro-batch train() cuts (one process): the first (largest) part of the batch
    n_micro = min(cfg.micro_batches or len(cfg.budgets), cfg.batch_size)
    ids = torch.randint(0, arch.vocab_size, (cfg.batch_size, cfg.stage1.context)).tensor_split(n_micro)[0]
    assert memory.micro_batch(cfg, 1) == (n_micro, ids.shape[0])
    with torch.no_grad():
        t_logits = build_model(arch, seed=0)(ids)
    rec, _, s_logits = student_step(arch, cfg, ids, budget, pick, t_logits)
    return rec.total + t_logits.nbytes + s_logits.nbytes


@pytest.mark.parametrize("name", ["attention-heavy"])
def test_activations_of_a_training_micro_step(name):
    """The whole activation term against a real micro-step on CPU (batch 5 in 2 micro-batches: 3
    sequences). A smaller budget's step (weight copies and mask inputs at the child's sizes) must not
    exceed the plan, which counts them at the parent's. The 100% budget's step (pinned to the parent:
    no copies, constant masks) against the plan of a 100%-only run within 0.75x-1.5x: the plan adds
    the distillation's transient full-vocabulary tensors (7 logits-sized tensors at the peak, 4 held
    into the backward), which saved tensors do not show."""
    arch = arch_of(name)
    cfg = cfg_for(5, 32, micro=2)
    plan = train_memory(arch, cfg, 1, cuda=False, fsdp=False).activations
    assert micro_step_bytes(arch, cfg, 1, pick=1) <= plan
    only_full = replace(cfg, budgets=(("100%", 1.0),))
    full_plan = train_memory(arch, only_full, 1, cuda=False, fsdp=False)
    assert part(full_plan, "weight copies") == part(full_plan, "masks") == 0
    full = micro_step_bytes(arch, only_full, 0, None)
    assert 0.75 <= full_plan.activations / full <= 1.5, (full_plan.activations, full)


@pytest.mark.parametrize("batch,micro,world", [(8, 0, 1), (8, 0, 8), (8, 0, 2), (5, 2, 1), (12, 5, 4), (64, 3, 8)])
def test_micro_batch_is_what_the_loop_cuts(batch, micro, world):
    """The loop in train.py: the step's batch in min(micro or budgets, batch // world) micro-batches,
    each split among the processes; the plan takes the largest share any process computes."""
    cfg = TrainConfig(batch_size=batch, micro_batches=micro)
    n = min(micro or len(cfg.budgets), batch // world)
    shares = [x.shape[0] for chunk in torch.arange(batch).tensor_split(n) for x in chunk.tensor_split(world)]
    assert memory.micro_batch(cfg, world) == (n, max(shares))


@pytest.mark.parametrize("name", ["tiny", "wide", "attention-heavy"])
def test_weight_copies_are_what_the_elastic_forward_index_selects(name, monkeypatch):
    """The plan's copied tensors are those the slicing rules keep in more than one range on an axis
    (``_narrow`` index-selects them; every other tensor is a view). The copies a smaller child's
    elastic forward makes (the second-largest choice everywhere, which splits every head range) lie
    between the plan at the child's sizes and the plan at the parent's (an upper bound)."""
    arch, cfg = arch_of(name), cfg_for(2, 32)
    made = record_narrow_copies(monkeypatch)
    ids = torch.randint(0, arch.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    _, spec = elastic_forward_saved_bytes(arch, cfg, ids, pick=1)
    split = {r.source for r in tensor_rules(arch, spec) if any(len(ranges) > 1 for ranges in r.axes)}
    planned = {f"backbone.layers.{i}.{n}" for i, layer in enumerate(arch.layers)
               for n in arch.layer_tensor_shapes(i) if n in memory.COPIED.get(layer.kind, ())}
    assert split == planned
    child = part(train_memory(spec.child_arch(arch), cfg, 1, cuda=False, fsdp=False), "weight copies")
    plan = part(train_memory(arch, cfg, 1, cuda=False, fsdp=False), "weight copies")
    assert 0 < child <= sum(made) <= plan, (child, sum(made), plan)


@pytest.mark.parametrize("name", ["tiny", "wide", "attention-heavy"])
def test_masks_are_what_the_mask_multiplies_save(name):
    """What a smaller child's elastic forward saves beyond the same child's plain forward, per two
    more sequences (weight copies and the router's tensors do not grow with the batch), is what the
    masks' multiplies keep: exactly the plan's masks at the child's sizes; at the parent's, more."""
    arch, cfg = arch_of(name), cfg_for(2, 32)

    def extra(batch: int) -> tuple[int, SliceSpec]:
        ids = torch.randint(0, arch.vocab_size, (batch, 32), generator=torch.Generator().manual_seed(0))
        elastic, spec = elastic_forward_saved_bytes(arch, cfg, ids, pick=1)
        return elastic - forward_saved_bytes(build_model(spec.child_arch(arch), seed=0), ids), spec

    (two, spec), (four, _) = extra(2), extra(4)
    child = part(train_memory(spec.child_arch(arch), cfg, 1, cuda=False, fsdp=False), "masks")
    assert four - two == child > 0
    assert child < part(train_memory(arch, cfg, 1, cuda=False, fsdp=False), "masks")


def test_activation_checkpointing_keeps_layer_inputs_and_one_layer():
    arch = arch_of("wide")
    cfg = cfg_for(4, 64)
    plain = train_memory(arch, cfg, 1, cuda=False, fsdp=False)
    ckpt = train_memory(arch, replace(cfg, activation_checkpointing=True), 1, cuda=False, fsdp=False)
    inputs = arch.num_hidden_layers * 4 * 64 * arch.hidden_size * 4  # B T d x fp32, per layer
    assert inputs < part(ckpt, "layers") < part(plain, "layers")
    assert part(ckpt, "logits") == part(plain, "logits")
    # the blocks' weight copies and mask inputs are made again in the backward, one block at a time
    assert 0 < part(ckpt, "weight copies") < part(plain, "weight copies")
    assert 4 * 64 * arch.hidden_size * 4 < part(ckpt, "masks") < part(plain, "masks")  # the embedding's stay


def test_fsdp_on_cuda_computes_in_bf16():
    """Under FSDP on CUDA the student's activations and copies are bf16; DDP keeps fp32."""
    arch, cfg = arch_of("wide"), cfg_for(2, 32)
    ddp = train_memory(arch, cfg, 2, cuda=True, fsdp=False, kernels=False)
    fsdp = train_memory(arch, cfg, 2, cuda=True, fsdp=True, kernels=False)
    assert part(fsdp, "weight copies") * 2 == part(ddp, "weight copies")
    assert part(fsdp, "masks") * 2 == part(ddp, "masks")
    assert part(fsdp, "layers") < part(ddp, "layers") and part(fsdp, "logits") == part(ddp, "logits")
    assert ddp.working == ddp.gradients  # DDP's buckets: a second copy of the gradients


def test_use_fsdp_decisions():
    arch, cfg = arch_of("tiny"), cfg_for(2, 32)
    ddp = train_memory(arch, cfg, 4, cuda=True, fsdp=False).total
    for setting in ("auto", "on", "off"):
        on, why = use_fsdp(setting, 1, arch, 1, True, cfg)
        assert not on and "nothing to shard" in why
    assert use_fsdp("on", 4, arch, 10**15, True, cfg)[0] is True
    assert use_fsdp("off", 4, arch, 1, True, cfg)[0] is False
    fits_exactly = math.ceil(ddp / HEADROOM)
    assert use_fsdp("auto", 4, arch, fits_exactly, True, cfg)[0] is False
    on, why = use_fsdp("auto", 4, arch, fits_exactly - 2, True, cfg)
    assert on and "DDP plan" in why
    on, why = use_fsdp("auto", 4, arch, fits_exactly - 2, True)  # without cfg: the states alone
    assert not on and "activations not counted" in why
    on, why = use_fsdp("auto", 4, arch, None, False, cfg)  # CPU processes: no device size to plan against
    assert not on and "CPU" in why
    with pytest.raises(ValueError):
        use_fsdp("yes", 4, arch, 1, True, cfg)


def test_gpus_needed_is_the_fewest_that_fit_and_falls_with_gpu_size():
    """Only process counts the batch divides among (the trainer refuses the others)."""
    arch, cfg = Arch.from_file(EXAMPLE_12B), TrainConfig(batch_size=16)
    needed = [gpus_needed(arch, cfg, gib * GIB) for gib in (24, 40, 48, 64, 80, 96, 141, 192, 1024)]
    first = next(i for i, n in enumerate(needed) if n is not None)
    assert None not in needed[first:] and needed[first:] == sorted(needed[first:], reverse=True)
    assert needed[-1] == 1  # None (too small at any count) only for the smallest cards
    n = gpus_needed(arch, cfg, 80 * GIB)
    assert 1 < n <= 16 and 16 % n == 0
    assert train_memory(arch, cfg, n, cuda=True, fsdp=True).fits(80 * GIB)
    assert not any(train_memory(arch, cfg, w, cuda=True, fsdp=w > 1).fits(80 * GIB) for w in range(1, n) if 16 % w == 0)
    assert gpus_needed(arch, cfg, 2**20) is None


def test_the_12b_example_on_8_x_80gb():
    """The issue's acceptance: FSDP (DDP would need every state whole on every rank), and it fits."""
    arch, cfg = Arch.from_file(EXAMPLE_12B), TrainConfig()
    fsdp, why = use_fsdp(cfg.fsdp, 8, arch, 80 * GIB, True, cfg)
    m = train_memory(arch, cfg, 8, cuda=True, fsdp=fsdp)
    assert fsdp and "auto" in why and m.fits(80 * GIB)
    assert not train_memory(arch, cfg, 8, cuda=True, fsdp=False).fits(80 * GIB)
