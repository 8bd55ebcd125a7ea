"""The tiny dense parent and token shards the trainer tests share."""

from __future__ import annotations

from pathlib import Path

from elastic.slicer.formats.arch import Arch
from elastic.slicer.nn.model import build_model, save_model
from elastic.trainer.data import build_token_shards, stdlib_corpus
from elastic.trainer.tokenizer import load_tokenizer

TINY = {"model_type": "nemotron_h", "vocab_size": 256, "hidden_size": 32, "hybrid_override_pattern": "M-M*-",
        "mamba_num_heads": 4, "mamba_head_dim": 8, "n_groups": 2, "ssm_state_size": 8, "chunk_size": 8,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 64}


def make_parent_and_tokens(root: Path, max_bytes: int) -> Path:
    """root/parent (TINY, seed 0) and root/tokens (the stdlib corpus, its tokenizer). Returns root."""
    save_model(build_model(Arch.from_config(TINY), seed=0), root / "parent")
    build_token_shards(stdlib_corpus(max_bytes=max_bytes), load_tokenizer(root / "parent"), root / "tokens")
    return root
