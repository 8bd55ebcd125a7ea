"""Write examples/nemotron-elastic-12b: a config-only elastic checkpoint with the real shape of the
Nemotron Elastic 12B parent (Nemotron Nano 12B v2) and budgets 12B, 9B and 6B.

    python examples/make_nemotron_elastic_12b.py

No weights: `elastic plan -c examples/nemotron-elastic-12b --target NAME` plans a deployment
before downloading 24 GB. How the nested sizes are chosen: the search space below offers, per
dimension, the parent's size and a few smaller ones (multiples of the group / KV-head counts, as
the router's choices must be); for each budget we take the homogeneous choice whose parameter
count is closest to the target, preferring (on ties within 1%) to keep the hidden size and depth —
the order the paper's router settles on, which trims FFN and Mamba width before embedding
channels and layers. The result is the router's `resolved` choice; there is no router file.
"""

import itertools
import json
from pathlib import Path

from elastic.slicer.formats.arch import Arch
from elastic.slicer.formats.elastic_format import Budget, Dimension, ElasticConfig
from elastic.slicer.formats.spec import SliceSpec

OUT = Path(__file__).parent / "nemotron-elastic-12b"
CONFIG = {  # Nemotron Nano 12B v2, NVIDIA's config form (DESIGN.md section 3)
    "architectures": ["NemotronHForCausalLM"],
    "model_type": "nemotron_h",
    "vocab_size": 131072,
    "hidden_size": 5120,
    "hybrid_override_pattern": "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-",
    "num_hidden_layers": 62,
    "intermediate_size": 20480,
    "mamba_num_heads": 128,
    "mamba_head_dim": 80,
    "n_groups": 8,
    "ssm_state_size": 128,
    "conv_kernel": 4,
    "chunk_size": 128,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "mlp_hidden_act": "relu2",
    "mamba_hidden_act": "silu",
    "layer_norm_epsilon": 1e-5,
    "use_bias": False,
    "use_conv_bias": True,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "time_step_limit": [0.0, float("inf")],
    "max_position_embeddings": 131072,
    "dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 12,
    "pad_token_id": 0,
}
TARGETS = {"12B": 12_000_000_000, "9B": 9_000_000_000, "6B": 6_000_000_000}


def main() -> None:
    arch = Arch.from_config(CONFIG)
    kinds = {k: [i for i, layer in enumerate(arch.layers) if layer.kind == k] for k in ("mamba", "attention", "mlp")}
    # depth: the last Mamba/MLP pairs are droppable (the attention layers stay)
    droppable = tuple(sorted(kinds["mamba"][-2:] + kinds["mlp"][-2:]))
    space = (
        Dimension("hidden_size", (5120, 4480, 4096, 3584)),
        # one Mamba and attention size for all their layers (shared), as the trainer's default space
        Dimension("mamba_num_heads", (128, 112, 96, 80), tuple(kinds["mamba"]), shared=True),
        Dimension("mamba_head_dim", (80, 64), tuple(kinds["mamba"]), shared=True),
        Dimension("num_attention_heads", (40, 32, 24), tuple(kinds["attention"]), shared=True),
        Dimension("intermediate_size", (20480, 15680, 12288, 10240), tuple(kinds["mlp"])),
        Dimension("depth", ("keep", "drop"), droppable),
    )
    candidates = []
    for d, h, p, a, f, n_drop in itertools.product(*(dim.choices for dim in space[:5]), (0, 2, 4)):
        dropped = set(droppable[len(droppable) - n_drop:]) if n_drop else set()
        layers = []
        for i, layer in enumerate(arch.layers):
            if i in dropped:
                layers.append({"index": i, "keep": False})
            elif layer.kind == "mamba":
                layers.append({"index": i, "mamba_num_heads": h, "mamba_head_dim": p})
            elif layer.kind == "attention":
                layers.append({"index": i, "num_attention_heads": a})
            else:
                layers.append({"index": i, "intermediate_size": f})
        spec = {"hidden_size": d, "layers": layers}
        n = SliceSpec.from_json(spec, arch).parameters(arch)
        # preference when counts are within 1%: wider hidden, fewer dropped layers, wider Mamba
        candidates.append((n, (-d, n_drop, -h, -p, -a, -f), SliceSpec.from_json(spec, arch).to_json(arch)))
    resolved = {}
    for name, target in TARGETS.items():
        if name == "12B":
            resolved[name] = SliceSpec.full(arch).to_json(arch)
            continue
        close = [c for c in candidates if abs(c[0] - target) <= 0.01 * target] or \
            [min(candidates, key=lambda c: abs(c[0] - target))]
        resolved[name] = min(close, key=lambda c: c[1])[2]
    budgets = tuple(Budget(name, arch.param_counts()["total"] if name == "12B" else t) for name, t in TARGETS.items())
    ec = ElasticConfig(budgets, space, resolved)
    ElasticConfig.from_json(json.loads(json.dumps(ec.to_json())), arch)
    OUT.mkdir(exist_ok=True)
    (OUT / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (OUT / "elastic_config.json").write_text(json.dumps(ec.to_json(), indent=2) + "\n")
    for name in TARGETS:
        child = SliceSpec.from_json(resolved[name], arch).child_arch(arch)
        sizes = {k: v for k, v in resolved[name].items() if k == "hidden_size"}
        print(f"{name}: {child.param_counts()['total']:,} parameters, hidden {sizes['hidden_size']}, "
              f"{child.num_hidden_layers} layers, {child.layer_pattern}")
        print("   ", {f: sorted({getattr(l, f) for l in child.layers if l.kind == k})
                     for k, fs in (("mamba", ("mamba_num_heads", "mamba_head_dim")), ("attention", ("num_attention_heads",)),
                                   ("mlp", ("intermediate_size",))) for f in fs})


if __name__ == "__main__":
    main()
