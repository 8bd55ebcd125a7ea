"""Issue 22: what a new user hit. The training dry run of an MoE parent (one search space for the
router and its memory plan), config values that silently change the model, an empty slice spec,
and absurd contexts and batches in a memory plan."""

from __future__ import annotations

import json
import math
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from elastic.cli.main import app
from elastic.slicer.errors import ConfigError
from elastic.slicer.formats.arch import Arch
from elastic.slicer.formats.elastic_format import Budget, ElasticConfig
from elastic.slicer.formats.rules import tensor_rules
from elastic.slicer.formats.safetensors import read_header
from elastic.slicer.formats.spec import SliceSpec
from elastic.slicer.nn.model import build_model
from elastic.trainer import elastic as elastic_module
from elastic.trainer import memory
from elastic.trainer.elastic import Router, default_search_space, elastic_forward, sample
from elastic.trainer.memory import plan_training, train_memory
from elastic.trainer.train import TrainConfig
from test_train_memory import cfg_for, part, record_narrow_copies

ROOT = Path(__file__).resolve().parent.parent
MOE_DEMO = ROOT / "slicer" / "moe_demo_checkpoint"
DEMO = ROOT / "slicer" / "demo_checkpoint"
EXAMPLES = sorted(p for p in (ROOT / "examples").iterdir() if (p / "config.json").is_file())
runner = CliRunner()

# a small MoE parent in the demo's shape: two routing groups (the gate's rows are copied when experts
# are trimmed), norm_topk_prob, and one without groups and with a latent width
MOE = {"model_type": "nemotron_h", "vocab_size": 128, "hidden_size": 32, "hybrid_override_pattern": "ME*E",
       "mamba_num_heads": 4, "mamba_head_dim": 8, "n_groups": 2, "ssm_state_size": 8, "chunk_size": 8,
       "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "n_routed_experts": 8,
       "moe_intermediate_size": 24, "moe_shared_expert_intermediate_size": 40, "num_experts_per_tok": 2,
       "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5}
MOE_ARCHS = {"grouped": MOE,
             "latent": {**MOE, "n_group": 1, "moe_latent_size": 16, "norm_topk_prob": False, "num_experts_per_tok": 3}}


def tensor_elements(path: Path, skip: str | None = None) -> int:
    """Elements of every tensor of a safetensors file (its header alone), those ending in ``skip`` left out."""
    header = read_header(path)[0]
    return sum(math.prod(v["shape"]) for k, v in header.items()
               if k != "__metadata__" and not (skip and k.endswith(skip)))


def saved_bytes(run, params) -> tuple[int, object]:
    """Bytes of the distinct storages autograd keeps for the backward once ``run()`` has returned,
    parameters left out, and what ``run`` returned. Only what is still alive counts: a node that
    nothing differentiable depends on (the MoE gate's top-k choice of indices) is freed with the
    forward, and a freed storage's address may be reused by a later one."""
    own = {q.untyped_storage().data_ptr() for q in params}
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((weakref.ref(t), t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    alive = {ptr: n for ref, ptr, n in saved if ref() is not None and ptr not in own}
    return sum(alive.values()), out


def forward_bytes(arch: Arch, ids: torch.Tensor) -> int:
    model = build_model(arch, seed=0)
    return saved_bytes(lambda: model(ids), model.parameters())[0]


def elastic_bytes(arch: Arch, cfg: TrainConfig, ids: torch.Tensor):
    """What a smaller child's elastic forward keeps, and the child: the router forced to the second-largest
    choice of every width and to keep every layer, over the search space ``train()`` builds (its
    first ``cfg.drop_layers`` MoE layers droppable)."""
    moe = [i for i, layer in enumerate(arch.layers) if layer.kind == "moe"][:cfg.drop_layers]
    total = arch.param_counts()["total"]
    budgets = tuple(Budget(n, round(f * total)) for n, f in cfg.budgets)
    ec = ElasticConfig(budgets, default_search_space(arch, moe), {b.name: SliceSpec.full(arch).to_json(arch)
                                                                  for b in budgets})
    student, router = build_model(arch, seed=0), Router(ec.dimensions, len(budgets))
    with torch.no_grad():
        for d in ec.dimensions:
            out = router.mlps[d.name][2]
            out.weight.zero_()
            out.bias.zero_()
            out.bias.view(-1, len(d.choices))[:, 0 if d.name == "depth" else min(1, len(d.choices) - 1)] = 100.0

    def run():
        choice = sample(router, ec, arch, 1, 1.0, 1.0, torch.Generator().manual_seed(0))
        return choice, elastic_forward(student, ec, choice, ids)

    n, (choice, _) = saved_bytes(run, [*student.parameters(), *router.parameters()])
    assert choice.spec.kept_layers() == list(range(len(arch.layers)))
    return n, choice.spec


# ---- 2. the training dry run of an MoE parent --------------------------------------------------------


@pytest.mark.parametrize("parent", [MOE_DEMO, ROOT / "examples" / "nemotron-labs-3-elastic-30b-a3b"])
def test_train_dry_run_of_an_moe_parent(parent):
    """`elastic train --dry-run` on an MoE parent plans (it stopped at "has no MoE layers")."""
    r = runner.invoke(app, ["train", "--parent", str(parent), "--dry-run", "--gpus", "8", "--gpu-memory", "80GB",
                            "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["per_rank"]["total"] > 0 and "moe" in plan["how"]["layers"]


def test_moe_demo_plan_counts_the_checkpoint_and_its_router():
    """The MoE demo was trained by `elastic train` with the settings in its training.json: the plan's
    states are its tensors (model.safetensors) and its router's (router.safetensors), counted from
    the files' headers. The gates' correction bias is a buffer: held, never trained."""
    c = json.loads((MOE_DEMO / "training.json").read_text())["config"]
    cfg = TrainConfig(budgets=tuple(tuple(b) for b in c["budgets"]), drop_layers=c["drop_layers"],
                      per_layer_mamba=c["per_layer_mamba"])
    model = tensor_elements(MOE_DEMO / "model.safetensors")
    trained = tensor_elements(MOE_DEMO / "model.safetensors", skip=".e_score_correction_bias")
    router = tensor_elements(MOE_DEMO / "router.safetensors")
    assert 0 < trained < model
    p = plan_training(Arch.from_file(MOE_DEMO), cfg, 1, 2**34, cuda=False)
    m = p.memory
    assert memory.router_parameters(Arch.from_file(MOE_DEMO), cfg) == router
    assert (m.parameters, m.gradients, m.optimizer) == (4 * (model + router), 4 * (trained + router),
                                                       8 * (trained + router))
    assert m.teacher == 4 * model and p.fits


def test_one_search_space_for_the_router_and_its_plan():
    """No copy: the trainer's search space is the plan's, and the count is the real Router's."""
    assert elastic_module.default_search_space is memory.default_search_space
    for name, config in MOE_ARCHS.items():
        arch = Arch.from_config(config)
        for drop, per_layer in ((0, False), (2, True)):
            cfg = TrainConfig(drop_layers=drop, per_layer_mamba=per_layer)
            dims = default_search_space(arch, list(range(drop)), per_layer)
            assert {"n_routed_experts", "moe_intermediate_size"} <= {d.name for d in dims}
            real = sum(p.numel() for p in Router(dims, len(cfg.budgets)).parameters())
            assert memory.router_parameters(arch, cfg) == real, name


@pytest.mark.heavy
@pytest.mark.parametrize("name", MOE_ARCHS)
def test_moe_layer_activations_are_what_a_forward_saves(name):
    """The MoE layers' per-token formula against the tensors a real CPU forward keeps for its
    backward: exact for MoE layers alone; in the hybrid pattern within the 5% the dense kinds are
    held to (test_train_memory.py)."""
    for pattern, tolerance in (("EEE", 0.0), (MOE_ARCHS[name]["hybrid_override_pattern"], 0.05)):
        arch = Arch.from_config({**MOE_ARCHS[name], "hybrid_override_pattern": pattern})
        ids = torch.randint(0, arch.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        measured = forward_bytes(arch, ids)
        estimate = part(train_memory(arch, cfg_for(2, 32), 1, cuda=False, fsdp=False), "layers")
        assert abs(estimate / measured - 1) <= tolerance, (pattern, estimate, measured)


@pytest.mark.heavy
@pytest.mark.parametrize("name,drop", [("grouped", 0), ("grouped", 2), ("latent", 1)])
def test_moe_masks_and_weight_copies_are_what_the_elastic_forward_makes(name, drop, monkeypatch):
    """A smaller child's elastic forward keeps, per two more sequences beyond the same child's plain
    forward, exactly the plan's masks at the child's sizes (each routed expert's down_proj input and
    output, the shared expert's down_proj input, and a droppable MoE layer's whole output); the
    tensors it index-selects are the plan's copied ones (an MoE gate's rows only with routing
    groups), within the plan's weight copies."""
    arch, cfg = Arch.from_config(MOE_ARCHS[name]), cfg_for(2, 32, drop_layers=drop)
    made = record_narrow_copies(monkeypatch)

    def extra(batch: int):
        ids = torch.randint(0, arch.vocab_size, (batch, 32), generator=torch.Generator().manual_seed(0))
        elastic, spec = elastic_bytes(arch, cfg, ids)
        return elastic - forward_bytes(spec.child_arch(arch), ids), spec

    (two, spec), (four, _) = extra(2), extra(4)
    child = part(train_memory(spec.child_arch(arch), cfg, 1, cuda=False, fsdp=False), "masks")
    assert four - two == child > 0
    assert child < part(train_memory(arch, cfg, 1, cuda=False, fsdp=False), "masks")
    split = {r.source for r in tensor_rules(arch, spec) if any(len(ranges) > 1 for ranges in r.axes)}
    planned = {f"backbone.layers.{i}.{n}" for i, layer in enumerate(arch.layers)
               for n in arch.layer_tensor_shapes(i) if n in memory.copied(arch, layer.kind)}
    assert split == planned
    assert any(".gate." in n for n in planned) == (arch.n_group > 1)
    assert 0 < sum(made) / 2 <= part(train_memory(arch, cfg, 1, cuda=False, fsdp=False), "weight copies")


def test_moe_depth_mask_is_counted_for_the_droppable_moe_layers():
    """A droppable MoE layer's keep mask multiplies its whole output (a dense layer's folds into its
    width mask): hidden size more per token for each MoE layer that may be among ``drop_layers``."""
    arch = Arch.from_config(MOE)
    base = memory.mask_elements(arch, TrainConfig(drop_layers=0))
    assert memory.mask_elements(arch, TrainConfig(drop_layers=1)) == base + arch.hidden_size
    assert memory.mask_elements(arch, TrainConfig(drop_layers=4)) == base + 2 * arch.hidden_size  # two MoE layers


# ---- 9a. config values that silently change the model ---------------------------------------------


def demo_config(**over) -> dict:
    return {**json.loads((DEMO / "config.json").read_text().replace("Infinity", "1e999")), **over}


@pytest.mark.parametrize("limit", [[0.0, 0.0], [0.5, 0.5], [0.1, 0.01], [-1.0, 1.0], [float("nan"), 1.0],
                                   [0.0, float("nan")], [0.0, -1.0], [float("inf"), float("inf")], [0.0], "0.0"])
def test_time_step_limit_must_be_a_range(limit):
    """dt is clamped to time_step_limit in prefill and decode: a range of one value ([0, 0] freezes
    every Mamba state), a reversed, negative or NaN one is refused, naming what is valid."""
    with pytest.raises(ConfigError) as e:
        Arch.from_config(demo_config(time_step_limit=limit))
    assert any("time_step_limit" in p and "0 <= low < high" in p for p in e.value.problems)


@pytest.mark.parametrize("limit", [[0.0, math.inf], [0.0, {"__float__": "Infinity"}], [0, "Infinity"],
                                   [0.001, 0.1]])
def test_time_step_limit_forms_in_the_wild_are_read(limit):
    assert Arch.from_config(demo_config(time_step_limit=limit)).time_step_limit[0] < math.inf


def test_a_frozen_time_step_limit_is_not_copied_into_a_slice(tmp_path):
    """The issue's reproduction: the demo with time_step_limit [0, 0] sliced with exit 0 and the
    value copied into the child (whose generation it changed). Now refused; nothing written."""
    src = tmp_path / "src"
    shutil.copytree(DEMO, src)
    (src / "config.json").write_text(json.dumps(demo_config(time_step_limit=[0.0, 0.0])))
    r = runner.invoke(app, ["slice", "-c", str(src), "--budget", "50%", "--out", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    assert "time_step_limit" in r.stderr and not (tmp_path / "out").exists()


def test_every_config_problem_is_listed_at_once():
    """An alias that disagrees with its key (transformers takes mamba_n_groups over n_groups, elastic
    n_groups: two models), an activation the MoE experts do not use, and a frozen dt clamp: one
    ConfigError naming each."""
    moe = json.loads((MOE_DEMO / "config.json").read_text().replace("Infinity", "1e999"))
    bad = {**moe, "mamba_n_groups": 4,
           "mlp_hidden_act": "silu", "time_step_limit": [0.0, 0.0], "rms_norm_eps": 1e-6}
    with pytest.raises(ConfigError) as e:
        Arch.from_config(bad)
    text = "\n".join(e.value.problems)
    for word in ("mamba_n_groups", "mlp_hidden_act", "time_step_limit", "rms_norm_eps"):
        assert word in text, word
    assert len(e.value.problems) == 4
    # an alias equal to its key (however it is spelled) is one setting, read as before
    same = {**moe, "mamba_n_groups": moe["n_groups"], "mamba_dt_limit": [0, {"__float__": "Infinity"}],
            "rms_norm_eps": 1.0e-05}
    assert Arch.from_config(same) == Arch.from_config(moe)


def test_transformers_reads_the_alias_the_parser_refuses():
    """The oracle for the alias rule: transformers' config takes mamba_n_groups over n_groups."""
    from transformers import NemotronHConfig

    assert NemotronHConfig(hybrid_override_pattern="M", n_groups=8, mamba_n_groups=4).n_groups == 4


@pytest.mark.parametrize("path", [DEMO, MOE_DEMO, *EXAMPLES], ids=lambda p: p.name)
def test_real_configs_stay_accepted(path):
    arch = Arch.from_file(path)
    assert arch.time_step_limit == (0.0, math.inf)


# ---- 9b. a slice spec that specifies nothing ------------------------------------------------------


@pytest.mark.parametrize("spec", [{}, {"layers": []}, {"name": "small"}])
def test_an_empty_spec_is_refused_with_an_example(spec, tmp_path):
    """`elastic slice --spec` of {} wrote the whole parent with exit 0; now a ConfigError that says
    what a spec holds, with an example that is itself valid for this parent."""
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    r = runner.invoke(app, ["slice", "-c", str(MOE_DEMO), "--spec", str(path), "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "specifies nothing" in r.stderr and not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="hidden_size and/or layers"):
        SliceSpec.from_file(path, Arch.from_file(MOE_DEMO))


@pytest.mark.parametrize("path", [DEMO, MOE_DEMO, *EXAMPLES], ids=lambda p: p.name)
def test_the_example_in_the_message_is_a_valid_spec(path):
    from elastic.slicer.formats.spec import example_spec

    parent = Arch.from_file(path)
    spec = SliceSpec.from_json(example_spec(parent), parent)
    assert spec.parameters(parent) < parent.param_counts()["total"]


def test_specs_that_say_something_are_still_read():
    """Partial specs are the format (sizes left out keep the parent's); keeping the parent whole on
    purpose is said with its hidden size; unknown keys stay refused, as they were."""
    parent = Arch.from_file(MOE_DEMO)
    assert SliceSpec.from_json({"hidden_size": parent.hidden_size}, parent).is_full(parent)
    assert SliceSpec.from_json({"layers": [{"index": 0, "mamba_head_dim": 8}]}, parent).layers[0].mamba_head_dim == 8
    with pytest.raises(ConfigError, match="unknown keys"):
        SliceSpec.from_json({"bogus": 1}, parent)
    with pytest.raises(ConfigError, match="unknown keys"):
        SliceSpec.from_json({"hidden_size": 32, "hidden": 16}, parent)


# ---- 9c. absurd contexts and batches ----------------------------------------------------------------


@pytest.mark.parametrize("over,setting", [({"context": 999999999999999999999}, "context"), ({"context": 0}, "context"),
                                          ({"context": 2**24 + 1}, "context"), ({"batch": 2**16 + 1}, "batch"),
                                          ({"batch": 2.5}, "batch"), ({"context": True}, "context"),
                                          ({"prefill_chunk": 0}, "prefill_chunk"), ({"margin": -0.1}, "margin"),
                                          ({"margin": float("nan")}, "margin")])
def test_a_workload_out_of_range_is_refused_by_the_library(over, setting):
    from elastic.slicer.planning.memory import Workload

    with pytest.raises(ConfigError) as e:
        Workload(**over)
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(setting)
    if setting in ("context", "batch"):
        assert e.value.hint.setting == setting


def test_the_bounds_themselves_are_planned():
    from elastic.slicer.planning.fit import plan, target_from_profile
    from elastic.profiles.devices import get_profile
    from elastic.slicer.planning.memory import MAX_BATCH, MAX_CONTEXT, Workload

    p = plan(DEMO, target_from_profile(get_profile("orin-nano-8gb")), Workload(context=MAX_CONTEXT, batch=1))
    assert p.workload.context == MAX_CONTEXT
    Workload(context=1, batch=MAX_BATCH, prefill_chunk=1, margin=0)


def test_plan_cli_refuses_an_absurd_context():
    """The issue's reproduction: a garbage table with exit 0; now the library's refusal, exit 2."""
    r = runner.invoke(app, ["plan", "--context", "999999999999999999999"])
    assert r.exit_code == 2 and "context" in r.stderr and "budget" not in r.stdout


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_a_dtype_torch_does_not_know_is_refused(key):
    """Found by the 3,000-case fuzz run: config.json with dtype 'abc' sliced with exit 0 into a
    config transformers cannot load (it loads the weights in that dtype)."""
    with pytest.raises(ConfigError) as e:
        Arch.from_config(demo_config(**{key: "abc"}))
    assert any(key in p and "bfloat16" in p for p in e.value.problems)
    assert Arch.from_config(demo_config(**{key: "bfloat16"})).hidden_size == 64
