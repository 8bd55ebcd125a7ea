"""MoE slicing: rules, spec validation, active parameters, NVIDIA's vocabulary, the Star Elastic example.

Oracles: the child Arch's own tensor layout (``layer_tensor_shapes``, written apart from the rules),
transformers' parameter count on the meta device, hand counts, explicit per-group index lists, and
a transformers-saved MoE checkpoint sliced on disk and loaded back by transformers.
"""

import math
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from elastic.cli.main import app
from elastic.slicer.errors import ConfigError
from elastic.slicer.formats.arch import FORM_PUZZLE, FORM_STOCK, Arch
from elastic.slicer.formats.elastic_format import (Budget, Dimension, ElasticConfig, resolve_budget, route,
                                                   spec_from_choices, synthetic_router)
from elastic.slicer.formats.rules import kept_experts, tensor_rules
from elastic.slicer.formats.spec import SliceSpec

from conftest import tiny_config

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "nemotron-labs-3-elastic-30b-a3b"
runner = CliRunner()


def moe_config(**over) -> dict:
    """A tiny hybrid with Mamba, MoE, attention and MLP layers; 8 experts in 2 routing groups, top-2."""
    return tiny_config(**{"hybrid_override_pattern": "ME*E-M", "n_routed_experts": 8, "moe_intermediate_size": 12,
                          "moe_shared_expert_intermediate_size": 20, "num_experts_per_tok": 2, "n_group": 2,
                          "topk_group": 1, **over})


def moe_layers(arch: Arch) -> list[int]:
    return [i for i, layer in enumerate(arch.layers) if layer.kind == "moe"]


# ---- rules against the child's own layout -------------------------------------------------------

ARCHS = {
    "grouped": moe_config(),
    "one group": moe_config(n_group=1),
    "biases": moe_config(mlp_bias=True),
    "latent": moe_config(moe_latent_size=16, mlp_bias=True),
}
SPECS = [
    {"hidden_size": 24, "layers": [{"index": 1, "n_routed_experts": 4, "moe_intermediate_size": 8},
                                   {"index": 3, "moe_shared_expert_intermediate_size": 10}]},
    {"hidden_size": 32, "layers": [{"index": 1, "n_routed_experts": 6, "moe_intermediate_size": 12,
                                    "moe_shared_expert_intermediate_size": 1}, {"index": 3, "keep": False}]},
    {"hidden_size": 16, "layers": [{"index": 1, "keep": False}, {"index": 3, "n_routed_experts": 2}]},
]


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("k", range(len(SPECS)))
def test_rules_give_the_child_layout(name, k):
    parent = Arch.from_config(ARCHS[name])
    data = SPECS[k]
    if k == 2 and parent.n_group == 2:  # 2 experts in 2 groups: 1 per group, fewer than top-2 in one group
        data = {**data, "layers": [data["layers"][0], {"index": 3, "n_routed_experts": 4}]}
    spec = SliceSpec.from_json(data, parent)
    child = spec.child_arch(parent)
    rules = tensor_rules(parent, spec)
    assert {r.name: r.shape for r in rules} == child.tensor_shapes()  # every name and shape
    parent_shapes = parent.tensor_shapes()
    for r in rules:  # each kept range lies inside the parent tensor it comes from
        assert len(r.axes) == len(parent_shapes[r.source])
        assert all(0 <= a < b <= n for ranges, n in zip(r.axes, parent_shapes[r.source]) for a, b in ranges)


def test_latent_width_is_not_elastic():
    parent = Arch.from_config(ARCHS["latent"])
    spec = SliceSpec.from_json({"hidden_size": 16}, parent)
    rules = {r.name: r for r in tensor_rules(parent, spec)}
    assert rules["backbone.layers.1.mixer.experts.0.up_proj.weight"].axes == (((0, 12),), ((0, 16),))  # latent 16
    assert rules["backbone.layers.1.mixer.fc1_latent_proj.weight"].axes == (((0, 16),), ((0, 16),))  # (latent, d)
    assert rules["backbone.layers.1.mixer.fc2_latent_proj.weight"].axes == (((0, 16),), ((0, 16),))  # (d, latent)
    assert rules["backbone.layers.1.mixer.gate.weight"].axes == (((0, 8),), ((0, 16),))


@pytest.mark.parametrize("total, groups, kept, expected", [
    (8, 2, 4, [0, 1, 4, 5]),
    (12, 3, 6, [0, 1, 4, 5, 8, 9]),
    (8, 1, 3, [0, 1, 2]),
    (8, 4, 8, list(range(8))),
])
def test_kept_experts_per_group(total, groups, kept, expected):
    assert kept_experts(total, groups, kept) == expected


def test_rules_renumber_kept_experts():
    parent = Arch.from_config(moe_config(n_routed_experts=12, n_group=3, num_experts_per_tok=2))
    spec = SliceSpec.from_json({"layers": [{"index": 1, "n_routed_experts": 6}]}, parent)
    rules = {r.name: r for r in tensor_rules(parent, spec)}
    for j, e in enumerate([0, 1, 4, 5, 8, 9]):  # the first 2 of each group of 4
        for proj in ("up_proj", "down_proj"):
            assert rules[f"backbone.layers.1.mixer.experts.{j}.{proj}.weight"].source == \
                f"backbone.layers.1.mixer.experts.{e}.{proj}.weight"
    assert "backbone.layers.1.mixer.experts.6.up_proj.weight" not in rules
    assert rules["backbone.layers.1.mixer.gate.weight"].axes[0] == ((0, 2), (4, 6), (8, 10))
    assert rules["backbone.layers.1.mixer.gate.e_score_correction_bias"].axes == (((0, 2), (4, 6), (8, 10)),)
    # the untouched layer 3 keeps every expert under its own number
    assert rules["backbone.layers.3.mixer.experts.11.up_proj.weight"].source.endswith("experts.11.up_proj.weight")


# ---- spec validation ---------------------------------------------------------------------------

def test_spec_validation_reports_every_moe_problem():
    parent = Arch.from_config(moe_config())  # 8 experts, 2 groups, top-2 within 1 group
    with pytest.raises(ConfigError) as e:
        SliceSpec.from_json({"layers": [
            {"index": 1, "n_routed_experts": 3, "moe_intermediate_size": 13},  # not per group; wider than 12
            {"index": 3, "n_routed_experts": 2, "moe_shared_expert_intermediate_size": 0},  # 1 per group < top-2
            {"index": 0, "n_routed_experts": 4},  # a Mamba layer
        ]}, parent)
    text = str(e.value)
    for needle in [
        "layer 1 (moe): n_routed_experts 3 is not a multiple of n_group (2)",
        "layer 1 (moe): moe_intermediate_size must be an integer in 1..12 (the parent's), found 13",
        "layer 3 (moe): n_routed_experts 2 keeps 1 expert(s) in each of n_group (2) routing group(s), but a token "
        "routes to num_experts_per_tok (2) experts within topk_group (1) group(s): keep at least 4",
        "layer 3 (moe): moe_shared_expert_intermediate_size must be an integer in 1..20",
        "layer 0 is mamba: n_routed_experts do not apply",
    ]:
        assert needle in text, needle
    # top-k spread over two groups: 2 groups x 1 expert suffice
    two = Arch.from_config(moe_config(topk_group=2))
    assert SliceSpec.from_json({"layers": [{"index": 1, "n_routed_experts": 2}]}, two).layers[1].n_routed_experts == 2


# ---- parameters ----------------------------------------------------------------------------------

def test_active_parameters_by_hand():
    # one MoE layer, hidden 32, 8 experts of 12, shared 20, latent 16, biases, top-2
    arch = Arch.from_config(moe_config(hybrid_override_pattern="E", moe_latent_size=16, mlp_bias=True))
    expert = 12 * 16 + 12 + 16 * 12 + 16  # up (12, 16) + bias, down (16, 12) + bias
    moe = (32  # pre-norm
           + 8 * 32 + 8  # gate and its correction bias
           + 8 * expert
           + 20 * 32 + 20 + 32 * 20 + 32  # shared expert
           + 16 * 32 + 16 + 32 * 16 + 32)  # latent projections
    counts = arch.param_counts()
    assert counts["moe"] == moe
    assert counts["total"] == moe + 2 * 97 * 32 + 32
    assert counts["active"] == counts["total"] - (8 - 2) * expert  # the gate runs for every token
    dense = Arch.from_config(tiny_config()).param_counts()
    assert dense["active"] == dense["total"]


def test_parent_active_parameters_by_hand():
    arch = Arch.from_file(EXAMPLE)
    c = arch.param_counts()
    assert c["total"] == 31_577_940_288  # also checked against transformers below
    assert c["active"] == c["total"] - 23 * (128 - 6) * (2 * 1856 * 2688)


def hf_count(config: dict) -> tuple[int, int]:
    """(every tensor transformers saves, parameters a token computes with) of a config, on the meta
    device. transformers keeps the gate's correction bias as a buffer and merges experts into
    (E, out, in) parameters; neither changes the counts."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    cfg = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "auto_map")}
    with torch.device("meta"):
        model = NemotronHForCausalLM(NemotronHConfig(**cfg))
    total = sum(t.numel() for t in model.state_dict().values())
    idle = 0
    for module in model.modules():
        if type(module).__name__ == "NemotronHExperts":
            per_expert = module.up_proj[0].numel() + module.down_proj[0].numel()
            idle += (module.num_experts - model.config.num_experts_per_tok) * per_expert
    return total, total - idle


@pytest.mark.heavy
def test_example_budgets_match_transformers_count():
    parent = Arch.from_file(EXAMPLE)
    ec = ElasticConfig.read(EXAMPLE, parent)
    seen = {}
    for b in ec.budgets:
        spec, _ = resolve_budget(EXAMPLE, ec, parent, b.name)
        child = spec.child_arch(parent)
        config = child.to_config()
        assert child.config_form() == FORM_STOCK and "block_configs" not in config
        counts = child.param_counts()
        assert hf_count(config) == (counts["total"], counts["active"]), b.name
        seen[b.name] = counts
    assert seen["30B"]["total"] == parent.param_counts()["total"]
    # NVIDIA reports 23B total / 2.8B active and 12B / 2.0B: within a few %
    for name, (total, active) in {"23B": (23e9, 2.8e9), "12B": (12e9, 2.0e9)}.items():
        assert abs(seen[name]["total"] / total - 1) < 0.03 and abs(seen[name]["active"] / active - 1) < 0.03


# ---- config forms ----------------------------------------------------------------------------------

def test_child_config_forms():
    parent = Arch.from_config(moe_config())
    uniform = SliceSpec.from_json({"layers": [{"index": i, "n_routed_experts": 4, "moe_intermediate_size": 6}
                                              for i in moe_layers(parent)]}, parent).child_arch(parent)
    cfg = uniform.to_config()
    assert uniform.config_form() == FORM_STOCK and "block_configs" not in cfg
    assert (cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["num_experts_per_tok"]) == (4, 6, 2)
    per_layer = SliceSpec.from_json({"layers": [{"index": 1, "n_routed_experts": 4}]}, parent).child_arch(parent)
    cfg = per_layer.to_config()
    assert per_layer.config_form() == FORM_PUZZLE and cfg["model_type"] == "nemotron_h_puzzle"
    assert cfg["block_configs"][1] == {"block_type": "moe", "n_routed_experts": 4, "moe_intermediate_size": 12,
                                       "moe_shared_expert_intermediate_size": 20}
    assert cfg["block_configs"][0] == {"block_type": "mamba"}
    assert Arch.from_config(json.loads(json.dumps(cfg))).layers == per_layer.layers


# ---- NVIDIA's vocabulary ---------------------------------------------------------------------------

NVIDIA = {"hidden_size": 24, "mamba_num_heads": 4, "mamba_head_dim": 5, "num_attention_heads": 2,
          "ffn_hidden_size": 40, "num_moe_experts": 4, "moe_ffn_hidden_size": 10,
          "moe_shared_expert_intermediate_size": 16}


def native_equivalent(parent: Arch, dropped=()) -> dict:
    layers = []
    for i, layer in enumerate(parent.layers):
        if i in dropped:
            layers.append({"index": i, "keep": False})
        else:
            layers.append({"index": i, **{
                "mamba": {"mamba_num_heads": 4, "mamba_head_dim": 5}, "attention": {"num_attention_heads": 2},
                "mlp": {"intermediate_size": 40},
                "moe": {"n_routed_experts": 4, "moe_intermediate_size": 10, "moe_shared_expert_intermediate_size": 16},
            }[layer.kind]})
    return {"hidden_size": 24, "layers": layers}


def test_nvidia_vocabulary_equals_native_spec():
    parent = Arch.from_config(moe_config())
    assert SliceSpec.from_json(NVIDIA, parent) == SliceSpec.from_json(native_equivalent(parent), parent)
    dropped = SliceSpec.from_json({**NVIDIA, "num_layers": 4}, parent, depth_order=[4, 2, 0])
    assert dropped == SliceSpec.from_json(native_equivalent(parent, dropped=(4, 2)), parent)
    assert SliceSpec.from_json({"num_layers": 6, "hidden_size": 32}, parent) == SliceSpec.full(parent)


def test_nvidia_depth_order_from_the_checkpoint(tmp_path):
    from safetensors.numpy import save_file
    import numpy as np

    (tmp_path / "config.json").write_text(json.dumps(moe_config()))
    parent = Arch.from_file(tmp_path)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps({**NVIDIA, "num_layers": 5}))
    with pytest.raises(ConfigError, match="num_layers 5 is below the parent's 6.*importance.safetensors"):
        SliceSpec.from_file(spec_file, parent)
    # as `elastic train` writes it: [[layer, score], ...], least important first
    save_file({"x": np.zeros(1, dtype=np.float32)}, str(tmp_path / "importance.safetensors"),
              metadata={"depth_order": json.dumps([[3, 0.01], [5, 0.02]])})
    assert SliceSpec.from_file(spec_file, parent) == SliceSpec.from_json(native_equivalent(parent, (3,)), parent)
    spec_file.write_text(json.dumps({**NVIDIA, "num_layers": 3}))
    with pytest.raises(ConfigError, match="num_layers 3 drops 3 layers, but the depth order ranks only 2"):
        SliceSpec.from_file(spec_file, parent)


def test_nvidia_vocabulary_problems_in_its_own_terms():
    parent = Arch.from_config(moe_config(hybrid_override_pattern="ME*E"))
    with pytest.raises(ConfigError) as e:
        SliceSpec.from_json({"num_moe_experts": 3, "moe_ffn_hidden_size": 99, "ffn_hidden_size": 8,
                             "num_layers": 9, "hidden_size": 64, "num_experts": 4}, parent)
    text = str(e.value)
    for needle in ["num_moe_experts: n_routed_experts 3 is not a multiple of n_group (2)",
                   "moe_ffn_hidden_size: moe_intermediate_size must be an integer in 1..12",
                   "ffn_hidden_size: the parent has no mlp layers", "num_layers must be an integer in 1..4",
                   "hidden_size must be an integer in 1..32", "unknown keys ['num_experts']"]:
        assert needle in text, needle
    assert text.count("num_moe_experts:") == 1  # one value for both MoE layers: said once
    with pytest.raises(ConfigError, match="cannot be mixed with layers"):
        SliceSpec.from_json({"layers": [], "num_moe_experts": 4}, parent)


# ---- elastic dimensions ----------------------------------------------------------------------------

def elastic_config(parent: Arch, resolved: dict, shared: bool) -> ElasticConfig:
    moe = tuple(moe_layers(parent))
    dims = (Dimension("n_routed_experts", (8, 6, 4), moe, shared),
            Dimension("moe_intermediate_size", (12, 8), moe, shared),
            Dimension("moe_shared_expert_intermediate_size", (20, 10), moe, shared))
    data = ElasticConfig((Budget("full", parent.param_counts()["total"]), Budget("small", 1)), dims,
                         resolved).to_json()
    data["budgets"][1]["target_parameters"] = SliceSpec.from_json(resolved["small"], parent).parameters(parent)
    return ElasticConfig.from_json(json.loads(json.dumps(data)), parent)


@pytest.mark.parametrize("shared", [True, False])
def test_moe_dimensions_route_to_the_resolved_spec(shared):
    parent = Arch.from_config(moe_config())
    small = {"hidden_size": 32, "layers": [
        {"index": 1, "n_routed_experts": 4, "moe_intermediate_size": 8, "moe_shared_expert_intermediate_size": 10},
        {"index": 3, "n_routed_experts": 4 if shared else 6, "moe_intermediate_size": 8,
         "moe_shared_expert_intermediate_size": 10}]}
    ec = elastic_config(parent, {"full": SliceSpec.full(parent).to_json(parent), "small": small}, shared)
    assert [d.rows for d in ec.dimensions] == [1 if shared else 2] * 3
    picks = route(synthetic_router(ec, parent), ec, "small")
    assert SliceSpec.from_json(spec_from_choices(picks, ec, parent), parent) == SliceSpec.from_json(small, parent)


def test_resolved_spec_in_nvidia_vocabulary(tmp_path):
    parent = Arch.from_config(moe_config())
    flat = {"num_moe_experts": 4, "moe_ffn_hidden_size": 8, "moe_shared_expert_intermediate_size": 10}
    ec = elastic_config(parent, {"full": SliceSpec.full(parent).to_json(parent), "small": flat}, True)
    spec, source = resolve_budget(tmp_path, ec, parent, "small")
    assert source == "elastic_config.json"
    assert spec == SliceSpec.from_json({"layers": [
        {"index": i, "n_routed_experts": 4, "moe_intermediate_size": 8, "moe_shared_expert_intermediate_size": 10}
        for i in moe_layers(parent)]}, parent)


def test_search_space_choices_must_be_valid_cuts():
    parent = Arch.from_config(moe_config())
    data = elastic_config(parent, {"full": SliceSpec.full(parent).to_json(parent),
                                   "small": SliceSpec.full(parent).to_json(parent)}, True).to_json()
    data["search_space"][0]["choices"] = [8, 5, 2]  # 5: not per group; 2: fewer than top-2 in one group
    with pytest.raises(ConfigError) as e:
        ElasticConfig.from_json(data, parent)
    assert "choice 5: n_routed_experts 5 is not a multiple of n_group (2)" in str(e.value)
    assert "choice 2: n_routed_experts 2 keeps 1 expert(s)" in str(e.value)


# ---- planning ----------------------------------------------------------------------------------------

def test_plan_json_has_active_parameters():
    r = runner.invoke(app, ["plan", "-c", str(EXAMPLE), "--target", "agx-orin-64gb", "--precision", "bf16",
                            "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    parent = Arch.from_file(EXAMPLE)
    ec = ElasticConfig.read(EXAMPLE, parent)
    assert [b["name"] for b in p["budgets"]] == ["30B", "23B", "12B"]
    for b in p["budgets"]:
        child = resolve_budget(EXAMPLE, ec, parent, b["name"])[0].child_arch(parent)
        counts = child.param_counts()
        assert (b["parameters"], b["active_parameters"]) == (counts["total"], counts["active"])
        assert b["active_parameters"] < b["parameters"]
        # every expert is resident, in bf16; llama.cpp (the engine planned here) holds the 1-D tensors, the
        # Mamba conv1d and the MoE router's gate in float32 (2 bytes more each), listed here by hand
        assert b["runtime"] == "llama.cpp"
        f32 = sum(math.prod(shape) for name, shape in child.tensor_shapes().items()
                  if len(shape) == 1 or "conv1d" in name or name.endswith("mixer.gate.weight"))
        assert b["terms"]["weights"] == 2 * b["parameters"] + 2 * f32
    assert p["chosen"] == "23B"  # 30B needs 59 GiB of bf16 weights alone


def test_quantized_plan_quantizes_every_expert():
    from elastic.slicer.planning.memory import weight_tensors

    arch = Arch.from_config(moe_config())
    tensors = weight_tensors(arch, "fp8", "bf16")
    for e in range(8):
        assert tensors[f"backbone.layers.1.mixer.experts.{e}.up_proj.weight"] == ("F8_E4M3", (12, 32))
        assert f"backbone.layers.1.mixer.experts.{e}.down_proj.weight_scale" in tensors
    assert tensors["backbone.layers.1.mixer.gate.weight"][0] == "BF16"  # the router stays in float


# ---- a real checkpoint, sliced on disk -----------------------------------------------------------------

def test_sliced_moe_checkpoint_loads_in_transformers(tmp_path):
    """transformers saves experts one tensor each (NVIDIA's form); the slice must load back with
    every tensor present and equal to the parent's kept entries, picked here by explicit indices."""
    from safetensors.torch import load_file
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from elastic.slicer.slice import slice_checkpoint

    cfg = moe_config()
    torch.manual_seed(0)
    model = NemotronHForCausalLM(NemotronHConfig(**cfg))
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(torch.randn(t.shape))
    model.save_pretrained(tmp_path / "parent")
    spec = {"hidden_size": 24, "layers": [
        {"index": i, "n_routed_experts": 4, "moe_intermediate_size": 8, "moe_shared_expert_intermediate_size": 10}
        for i in (1, 3)]}
    # `elastic slice --spec FILE` in NVIDIA's vocabulary: the same cut
    (tmp_path / "spec.json").write_text(json.dumps({"hidden_size": 24, "num_moe_experts": 4, "moe_ffn_hidden_size": 8,
                                                    "moe_shared_expert_intermediate_size": 10}))
    slice_checkpoint(tmp_path / "parent", tmp_path / "child", spec=tmp_path / "spec.json")
    child, info = NemotronHForCausalLM.from_pretrained(tmp_path / "child", output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    parent_t = load_file(str(tmp_path / "parent" / "model.safetensors"))
    child_t = load_file(str(tmp_path / "child" / "model.safetensors"))
    kept = torch.tensor([0, 1, 4, 5])  # first 2 experts of each group of 4
    for i in (1, 3):
        pre = f"backbone.layers.{i}.mixer."
        assert torch.equal(child_t[pre + "gate.weight"], parent_t[pre + "gate.weight"][kept, :24])
        assert torch.equal(child_t[pre + "gate.e_score_correction_bias"],
                           parent_t[pre + "gate.e_score_correction_bias"][kept])
        for j, e in enumerate(kept.tolist()):
            assert torch.equal(child_t[pre + f"experts.{j}.up_proj.weight"],
                               parent_t[pre + f"experts.{e}.up_proj.weight"][:8, :24])
            assert torch.equal(child_t[pre + f"experts.{j}.down_proj.weight"],
                               parent_t[pre + f"experts.{e}.down_proj.weight"][:24, :8])
        assert torch.equal(child_t[pre + "shared_experts.up_proj.weight"],
                           parent_t[pre + "shared_experts.up_proj.weight"][:10, :24])
        assert torch.equal(child_t[pre + "shared_experts.down_proj.weight"],
                           parent_t[pre + "shared_experts.down_proj.weight"][:24, :10])
    assert sum(t.numel() for t in child.state_dict().values()) == \
        SliceSpec.from_json(spec, Arch.from_config(cfg)).parameters(Arch.from_config(cfg))
