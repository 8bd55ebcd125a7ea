"""The plan's memory terms for ONNX Runtime (``footprint(..., engine="onnxruntime")``): the arena that
ONNX Runtime grows, and what the terms count. bench/plan_accuracy.py measures them against ONNX Runtime
running float32 exports of 47M to 660M parameters at 512 and 4096 tokens."""

import pytest

from elastic.slicer.formats.arch import Arch
from elastic.slicer.planning.describe import DEMO_CHECKPOINT
from elastic.slicer.planning.memory import (Workload, footprint, kv_cache_bytes, memory_basis, ort_arena_bytes,
                                            ssm_state_bytes)

MIB = 2**20


@pytest.mark.parametrize("live,arena", [
    (1, 1 * MIB),                      # the first region
    (MIB, MIB),
    (MIB + 1, 3 * MIB),                # 1 + 2
    (100 * MIB, 127 * MIB),            # 1 + 2 + ... + 64
    (1100 * MIB, 2047 * MIB),          # 1 + ... + 512 = 1023, then a region of 1 GiB
    (3000 * MIB, 1023 * MIB + 2 * 1024 * MIB),  # regions stop doubling at 1 GiB
])
def test_arena_is_regions_doubling_from_one_mib(live, arena):
    assert ort_arena_bytes(live) == arena


@pytest.mark.parametrize("context", [64, 4096])
def test_terms_hold_the_weights_file_one_state_and_the_arena(context):
    arch = Arch.from_file(DEMO_CHECKPOINT)
    w = Workload(context=context, batch=1, dtype="float32", prefill_chunk=512, margin=0.0)
    t = footprint(arch, w, overhead_bytes=123, engine="onnxruntime")
    assert t["weights"] == 4 * arch.param_counts()["total"]  # weights.bin, float32
    assert t["kv_cache"] == kv_cache_bytes(arch, context, 1, "float32")
    assert t["ssm_state"] == ssm_state_bytes(arch, 1, "float32", "float32")
    arena = t["kv_cache"] + t["ssm_state"] + t["activations"]
    assert arena == ort_arena_bytes(arena) and t["activations"] > 0  # the arena's regions, whole
    assert t["overhead"] != 123  # ONNX Runtime's own, measured, not the device profile's
    assert t["total"] == sum(v for k, v in t.items() if k != "total")


def test_attention_scores_grow_with_the_context():
    """Four heads x chunk x context float32 tensors and one bool one (softmax, the Where and its two
    temporaries, IsNaN): a long context outgrows the Mamba layers' peak."""
    arch = Arch.from_config({"model_type": "nemotron_h", "vocab_size": 512, "hidden_size": 256,
                             "hybrid_override_pattern": "M*", "mamba_num_heads": 8, "mamba_head_dim": 32,
                             "n_groups": 1, "ssm_state_size": 16, "conv_kernel": 4, "chunk_size": 64,
                             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                             "intermediate_size": 512})
    arena = {}
    for c in (8192, 32768):
        t = footprint(arch, Workload(context=c, batch=1, dtype="float32", prefill_chunk=512, margin=0.0), 0,
                      engine="onnxruntime")
        arena[c] = t["kv_cache"] + t["ssm_state"] + t["activations"]
        assert arena[c] >= 17 * 4 * 512 * c  # 4 x 4 bytes + 1 per score
    assert arena[32768] > 3 * arena[8192]


def test_basis_says_measured():
    assert memory_basis("onnxruntime").startswith("measured model: ONNX Runtime")
