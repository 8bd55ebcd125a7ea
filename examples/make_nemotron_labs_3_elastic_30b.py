"""Write examples/nemotron-labs-3-elastic-30b-a3b: a config-only elastic checkpoint with the real
shape of NVIDIA's Star Elastic parent (Nemotron 3 Nano 30B-A3B, DESIGN.md section 9) and budgets
30B (the parent), 23B and 12B.

    python examples/make_nemotron_labs_3_elastic_30b.py

No weights: `elastic plan -c examples/nemotron-labs-3-elastic-30b-a3b --target NAME` plans a
deployment before downloading 63 GB. How the nested sizes are chosen (the folder's README.md says
it with the numbers): the search space offers, along the axes NVIDIA names (embedding channels,
Mamba heads, attention heads, routed experts, expert and shared-expert widths), the parent's size
and a few smaller steps, each a valid cut (Mamba heads a multiple of the 8 groups, query heads of
the 2 KV heads, experts never fewer than top-6 can route to); every dimension is shared by all
layers of its kind, and depth is not elastic (NVIDIA keeps all 52 layers). For each budget we take,
among all combinations, the largest model whose total parameters stay under NVIDIA's reported
total and whose active parameters stay under NVIDIA's reported active count (ties: more active).
The result is the router's `resolved` choice, written in NVIDIA's flat vocabulary (docs/elastic-format.md:
`num_moe_experts`, `moe_ffn_hidden_size`, ...); there is no router file.
"""

import itertools
import json
from pathlib import Path

from elastic.slicer.formats.arch import Arch
from elastic.slicer.formats.elastic_format import Budget, Dimension, ElasticConfig
from elastic.slicer.formats.spec import SliceSpec

OUT = Path(__file__).parent / "nemotron-labs-3-elastic-30b-a3b"
CONFIG = {  # NVIDIA-Nemotron-3-Nano-30B-A3B, NVIDIA's config form
    "architectures": ["NemotronHForCausalLM"],
    "model_type": "nemotron_h",
    "vocab_size": 131072,
    "hidden_size": 2688,
    "hybrid_override_pattern": "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
    "num_hidden_layers": 52,
    "intermediate_size": 1856,  # unused: there is no MLP layer (NVIDIA's config carries it)
    "mamba_num_heads": 64,
    "mamba_head_dim": 64,
    "n_groups": 8,
    "ssm_state_size": 128,
    "conv_kernel": 4,
    "chunk_size": 128,
    "num_attention_heads": 32,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "n_routed_experts": 128,
    "moe_intermediate_size": 1856,
    "moe_shared_expert_intermediate_size": 3712,
    "n_shared_experts": 1,
    "num_experts_per_tok": 6,
    "n_group": 1,
    "topk_group": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "moe_latent_size": None,
    "mlp_hidden_act": "relu2",
    "mamba_hidden_act": "silu",
    "layer_norm_epsilon": 1e-5,
    "use_bias": False,
    "use_conv_bias": True,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "time_step_limit": [0.0, float("inf")],
    "max_position_embeddings": 262144,
    "dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
# NVIDIA's reported sizes of the nested models: (total, active) parameters
TARGETS = {"30B": None, "23B": (23_000_000_000, 2_800_000_000), "12B": (12_000_000_000, 2_000_000_000)}
CHOICES = {  # the parent's size first; every dimension shared by the layers of its kind
    "hidden_size": (2688, 2560, 2304, 2048),
    "mamba_num_heads": (64, 56, 48, 40),
    "num_attention_heads": (32, 24, 16),
    "n_routed_experts": (128, 112, 96, 80, 64),
    "moe_intermediate_size": (1856, 1536, 1280, 1024, 768),
    "moe_shared_expert_intermediate_size": (3712, 3072, 2688, 1856),
}


def search_space(arch: Arch) -> tuple[Dimension, ...]:
    layers = {k: tuple(i for i, layer in enumerate(arch.layers) if layer.kind == k) for k in ("mamba", "attention", "moe")}
    kind = {"mamba_num_heads": "mamba", "num_attention_heads": "attention"}
    return tuple(Dimension(name, choices) if name == "hidden_size" else
                 Dimension(name, choices, layers[kind.get(name, "moe")], shared=True)
                 for name, choices in CHOICES.items())


def spec_json(arch: Arch, pick: dict) -> dict:
    """A native spec giving every layer of a kind the picked sizes."""
    fields = {"mamba": ("mamba_num_heads",), "attention": ("num_attention_heads",),
              "moe": ("n_routed_experts", "moe_intermediate_size", "moe_shared_expert_intermediate_size")}
    return {"hidden_size": pick["hidden_size"],
            "layers": [{"index": i, **{f: pick[f] for f in fields[layer.kind]}} for i, layer in enumerate(arch.layers)]}


# our field -> NVIDIA's key (Model Optimizer / Megatron-LM), for the resolved specs
NVIDIA_NAMES = {"hidden_size": "hidden_size", "mamba_num_heads": "mamba_num_heads",
                "num_attention_heads": "num_attention_heads", "n_routed_experts": "num_moe_experts",
                "moe_intermediate_size": "moe_ffn_hidden_size",
                "moe_shared_expert_intermediate_size": "moe_shared_expert_intermediate_size"}


def choose(arch: Arch, total: int, active: int) -> tuple[dict, dict]:
    """The largest homogeneous choice with total <= ``total`` and active <= ``active`` parameters:
    (the pick, its spec in NVIDIA's flat form)."""
    best = None
    for values in itertools.product(*CHOICES.values()):
        pick = dict(zip(CHOICES, values))
        counts = SliceSpec.from_json(spec_json(arch, pick), arch).child_arch(arch).param_counts()
        if counts["total"] <= total and counts["active"] <= active:
            key = (counts["total"], counts["active"])
            if best is None or key > best[0]:
                best = (key, pick)
    assert best is not None, "no choice meets the targets"
    pick = best[1]
    flat = {NVIDIA_NAMES[f]: v for f, v in pick.items()}
    assert SliceSpec.from_json(flat, arch) == SliceSpec.from_json(spec_json(arch, pick), arch)
    return pick, flat


def main() -> None:
    arch = Arch.from_config(CONFIG)
    resolved, budgets = {}, []
    for name, target in TARGETS.items():
        if target is None:  # the parent itself
            resolved[name] = SliceSpec.full(arch).to_json(arch)
            budgets.append(Budget(name, arch.param_counts()["total"]))
            continue
        pick, resolved[name] = choose(arch, *target)
        budgets.append(Budget(name, target[0]))
        print(f"{name}: {pick}")
    ec = ElasticConfig(tuple(budgets), search_space(arch), resolved)
    ElasticConfig.from_json(json.loads(json.dumps(ec.to_json())), arch)  # what we write must read back
    OUT.mkdir(exist_ok=True)
    (OUT / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (OUT / "elastic_config.json").write_text(json.dumps(ec.to_json(), indent=2) + "\n")
    for name in TARGETS:
        counts = SliceSpec.from_json(resolved[name], arch).child_arch(arch).param_counts()
        print(f"{name}: {counts['total']:,} total, {counts['active']:,} active parameters")


if __name__ == "__main__":
    main()
