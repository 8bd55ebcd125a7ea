"""Rebuild the bundled demo checkpoint (slicer/demo_checkpoint): a tiny random Nemotron-H.

    python examples/make_demo_checkpoint.py [--out slicer/demo_checkpoint]

Deterministic: the same command writes byte-identical files. Small shards on purpose, so the
default checkpoint exercises the sharded (index) loading path.
"""

import argparse

import torch

from slicer.arch import Arch
from slicer.model import build_model, save_model

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

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="slicer/demo_checkpoint")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    model = build_model(Arch.from_config(DEMO_CONFIG), dtype=torch.float32, seed=1234)
    save_model(model, args.out, max_shard_bytes=600_000, force=args.force)
    print(f"wrote {args.out}")
