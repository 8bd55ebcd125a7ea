"""Rebuild the bundled demo checkpoint (slicer/demo_checkpoint): a tiny elastic Nemotron-H.

    python examples/make_demo_checkpoint.py [--out slicer/demo_checkpoint] [--force]

Synthetic: random weights (not ordered by importance) and a router constructed to pick the
resolved budgets, until ``elastic train`` produces a trained one. Budgets "100%", "75%" and
"50%" of the parameters, the smaller two chosen from the search space as the closest to their
target. Deterministic: the same command writes byte-identical files. Small shards on purpose,
so the default checkpoint exercises the sharded (index) loading path.
"""

import argparse
import itertools
import json
from pathlib import Path

import torch
from safetensors.numpy import save_file

from slicer.arch import Arch
from slicer.elastic_format import CONFIG_NAME, ROUTER_NAME, Budget, Dimension, ElasticConfig, synthetic_router
from slicer.model import build_model, save_model
from slicer.spec import SliceSpec

DEMO_CONFIG = {
    "model_type": "nemotron_h",
    "architectures": ["NemotronHForCausalLM"],
    "vocab_size": 256,  # byte-level until a trained tokenizer ships
    "hidden_size": 64,
    "hybrid_override_pattern": "M-M*-M-",
    "num_hidden_layers": 7,
    "mamba_num_heads": 8,
    "mamba_head_dim": 16,
    "n_groups": 2,
    "ssm_state_size": 16,
    "conv_kernel": 4,
    "chunk_size": 16,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 256,
    "mlp_hidden_act": "relu2",
    "mamba_hidden_act": "silu",
    "layer_norm_epsilon": 1e-5,
    "time_step_limit": [0.0, float("inf")],
    "use_conv_bias": True,
    "use_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
MAMBA, ATTENTION, MLP = [0, 2, 5], [3], [1, 4, 6]
SEARCH_SPACE = (
    Dimension("hidden_size", (64, 56, 48, 40)),
    Dimension("mamba_num_heads", (8, 6, 4), tuple(MAMBA)),
    Dimension("mamba_head_dim", (16, 12, 8), tuple(MAMBA)),
    Dimension("num_attention_heads", (4, 2), tuple(ATTENTION)),
    Dimension("intermediate_size", (256, 192, 128, 64), tuple(MLP)),
    Dimension("depth", ("keep", "drop"), (5, 6)),
)


def closest_spec(arch: Arch, target: int) -> dict:
    """The homogeneous spec from the search space whose parameter count is closest to target."""
    best = None
    for d, h, p, a, f, drop in itertools.product(
        *(dim.choices for dim in SEARCH_SPACE[:5]), [(), (6,), (5, 6)]
    ):
        layers = [{"index": i, "mamba_num_heads": h, "mamba_head_dim": p} for i in MAMBA]
        layers += [{"index": i, "num_attention_heads": a} for i in ATTENTION]
        layers += [{"index": i, "intermediate_size": f} for i in MLP]
        layers = [e if e["index"] not in drop else {"index": e["index"], "keep": False} for e in layers]
        spec = {"hidden_size": d, "layers": sorted(layers, key=lambda e: e["index"])}
        n = SliceSpec.from_json(spec, arch).parameters(arch)
        if best is None or abs(n - target) < best[0]:
            best = (abs(n - target), spec)
    return best[1]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="slicer/demo_checkpoint")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    arch = Arch.from_config(DEMO_CONFIG)
    total = arch.param_counts()["total"]
    budgets, resolved = [], {}
    for name, frac in (("100%", 1.0), ("75%", 0.75), ("50%", 0.5)):
        budgets.append(Budget(name, round(total * frac)))
        resolved[name] = SliceSpec.full(arch).to_json(arch) if frac == 1.0 else closest_spec(arch, round(total * frac))
    ec = ElasticConfig(tuple(budgets), SEARCH_SPACE, resolved)
    ElasticConfig.from_json(ec.to_json(), arch)  # validate before writing anything
    model = build_model(arch, dtype=torch.float32, seed=1234)
    save_model(model, args.out, max_shard_bytes=600_000, force=args.force)
    out = Path(args.out)
    (out / CONFIG_NAME).write_text(json.dumps(ec.to_json(), indent=2) + "\n")
    save_file(synthetic_router(ec, arch), str(out / ROUTER_NAME), metadata={"format": "np"})
    (out / ROUTER_NAME).chmod(0o644)
    for b in budgets:
        n = SliceSpec.from_json(resolved[b.name], arch).parameters(arch)
        print(f"{b.name:>5}: {n:,} parameters (target {b.target_parameters:,})")
    print(f"wrote {out}")
