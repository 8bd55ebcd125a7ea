"""The memory a model needs on a device (DESIGN.md section 7). No torch here.

Every term is a byte count that ``elastic plan`` shows:

- ``weights``: parameters x bytes of the dtype;
- ``kv_cache``: 2 (K and V) x attention layers x KV heads x head_dim x context x batch x bytes;
- ``ssm_state``: per Mamba layer, the SSM state H x P x N in float32 plus the conv window
  (K-1) x (I + 2GN) in the model dtype, times batch;
- ``activations``: the peak of one prefill chunk of ``prefill_chunk`` tokens (the largest
  layer's transient tensors, the residual stream, and the chunk's float32 logits);
- ``overhead``: the runtime's own memory (CUDA context and cuBLAS/TensorRT workspace on a GPU,
  the torch runtime on a CPU), from the device profile;
- ``margin``: a safety fraction of everything above.

The activation term follows the tensors the reference implementation (``elastic.slicer.nn.model``) keeps
alive at its peak; ``bench/plan_accuracy.py`` checks the total against a measured run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from elastic.slicer.formats.arch import Arch
from elastic.slicer.formats.precision import lookup

F32 = 4


@dataclass(frozen=True)
class Workload:
    """What the model will be asked to do."""

    context: int = 8192  # tokens held per sequence (prompt + generated)
    batch: int = 1  # sequences decoded together
    dtype: str = "bfloat16"  # weights, activations and KV cache
    prefill_chunk: int = 512  # prompt tokens per forward (caps the activation peak)
    margin: float = 0.05  # safety fraction on top of everything else


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a precision, by any of its spellings (``formats.precision``)."""
    return int(lookup(dtype).bytes)


def kv_cache_bytes(arch: Arch, context: int, batch: int, dtype: str) -> int:
    per_token = sum(2 * layer.num_key_value_heads * arch.head_dim for layer in arch.layers if layer.kind == "attention")
    return per_token * context * batch * dtype_bytes(dtype)


def ssm_state_bytes(arch: Arch, batch: int, dtype: str) -> int:
    s = dtype_bytes(dtype)
    total = 0
    for layer in arch.layers:
        if layer.kind == "mamba":
            H, P, N = layer.mamba_num_heads, layer.mamba_head_dim, arch.ssm_state_size
            conv_dim = H * P + 2 * arch.n_groups * N
            total += H * P * N * F32 + (arch.conv_kernel - 1) * conv_dim * s
    return total * batch


def _layer_activation_bytes(arch: Arch, i: int, t: int, batch: int, s: int) -> int:
    """Peak transient bytes inside layer i's forward for a chunk of t tokens (reference model)."""
    layer, d = arch.layers[i], arch.hidden_size
    bt = batch * t
    norm = bt * d * (s + 2 * F32)  # pre-norm output and its float32 temporaries
    if layer.kind == "mamba":
        H, P, G, N, K = layer.mamba_num_heads, layer.mamba_head_dim, arch.n_groups, arch.ssm_state_size, arch.conv_kernel
        I, T = H * P, arch.chunk_size
        conv_dim = I + 2 * G * N
        t_pad = math.ceil(t / T) * T
        proj = bt * (2 * I + 2 * G * N + H) * s  # in_proj output [z | x | B | C | dt]
        conv = batch * conv_dim * (2 * (t + K - 1) + t) * s  # padded input, conv output, silu
        scan = batch * t_pad * (2 * H * N + 3 * H * P + 2 * H) * F32  # B/C per head, x, x*dt, y, dt
        decay = 3 * batch * H * t_pad * T * F32  # within-chunk decay matrix, scores and their product
        gate = 3 * bt * I * F32  # gated RMSNorm in float32
        return norm + proj + max(conv, scan + decay, gate + bt * I * s)
    if layer.kind == "attention":
        # fused attention (flash on CPU, fused MHA in TensorRT) never holds the t x context scores
        A, KV, hd = layer.num_attention_heads, layer.num_key_value_heads, arch.head_dim
        return norm + bt * (A + 2 * KV) * hd * s + bt * A * hd * s  # q, k, v and the output
    # mlp: up projection, its square, the product
    return norm + 3 * bt * layer.intermediate_size * s


def activation_bytes(arch: Arch, w: Workload) -> int:
    s = dtype_bytes(w.dtype)
    t = min(w.prefill_chunk, w.context)
    layers = max((_layer_activation_bytes(arch, i, t, w.batch, s) for i in range(len(arch.layers))), default=0)
    residual = 2 * w.batch * t * arch.hidden_size * s  # the stream in and out of the layer
    logits = w.batch * t * arch.vocab_size * (F32 + s)  # the chunk's logits (and their float32 copy)
    return layers + residual + logits


def footprint(arch: Arch, w: Workload, overhead_bytes: int) -> dict[str, int]:
    """Every term in bytes, plus ``total``. ``overhead_bytes`` comes from the device profile."""
    terms = {
        "weights": arch.param_counts()["total"] * dtype_bytes(w.dtype),
        "kv_cache": kv_cache_bytes(arch, w.context, w.batch, w.dtype),
        "ssm_state": ssm_state_bytes(arch, w.batch, w.dtype),
        "activations": activation_bytes(arch, w),
        "overhead": overhead_bytes,
    }
    terms["margin"] = int(w.margin * sum(terms.values()))
    terms["total"] = sum(terms.values())
    return terms


def max_context(arch: Arch, w: Workload, overhead_bytes: int, usable_bytes: int) -> int:
    """The longest context (a multiple of 256) whose footprint fits ``usable_bytes``; 0 if none."""
    from dataclasses import replace

    lo, hi = 0, 1 << 22  # 4M tokens
    while hi - lo > 256:
        mid = (lo + hi) // 2 // 256 * 256 or 256
        if footprint(arch, replace(w, context=mid), overhead_bytes)["total"] <= usable_bytes:
            lo = mid
        else:
            hi = mid
    return lo if lo and footprint(arch, replace(w, context=lo), overhead_bytes)["total"] <= usable_bytes else 0
