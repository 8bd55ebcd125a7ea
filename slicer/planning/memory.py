"""The memory a model needs on a device (DESIGN.md section 7). No torch here.

Every term is a byte count that ``elastic plan`` shows, for one (weights, KV cache, SSM state)
precision triple on top of the base float precision ``Workload.dtype``:

- ``weights``: the bytes of every tensor of the checkpoint as it would be stored
  (:func:`weight_tensors`): float weights are parameters x bytes; quantized weights are Model
  Optimizer's unified checkpoint, with its scales, and the unquantized tensors in the base precision;
- ``kv_cache``: 2 (K and V) x attention layers x KV heads x head_dim x context x batch x bytes of
  the KV precision;
- ``ssm_state``: per Mamba layer, the SSM state H x P x N in the state precision (float32 unless
  asked) plus the conv window (K-1) x (I + 2GN) in the base precision, times batch;
- ``activations``: the peak of one prefill chunk of ``prefill_chunk`` tokens (the largest
  layer's transient tensors, the residual stream, and the chunk's float32 logits), in the base
  precision whatever the weights (a W8A8 runtime's int8/fp8 GEMM inputs are smaller: an upper bound);
- ``overhead``: the runtime's own memory (CUDA context and cuBLAS/TensorRT workspace on a GPU,
  the torch runtime on a CPU), from the device profile;
- ``margin``: a safety fraction of everything above.

The activation term follows the tensors the reference implementation (``elastic.slicer.nn.model``) keeps
alive at its peak; ``bench/plan_accuracy.py`` checks the total against a measured run.

The engine that runs the model sizes some terms its own way: for llama.cpp (``footprint(...,
engine="llama.cpp")``) every term is the buffer llama.cpp allocates (:func:`llama_cpp_terms`: the GGUF's
per-tensor types, its f16 KV cache rounded to 256 tokens, float32 recurrent state, and the compute
buffer its graph allocator reserves, ``planning.llama_graph``), checked against llama.cpp's own report
by bench/plan_accuracy.py and tests/test_plan_engines_memory.py. :func:`memory_basis` says, for each
engine, whether its terms are measured here or an estimate, and from what.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from elastic.profiles.units import MIB
from elastic.slicer.errors import ConfigError, Hint
from elastic.slicer.formats.arch import Arch
from elastic.slicer.formats.precision import FP8, GGUF, INT4, INT8, INT8_WO, NVFP4, Precision, lookup
from elastic.slicer.formats.safetensors import DTYPES
from elastic.slicer.formats.values import is_int
from elastic.slicer.quant.layout import weight_group

F32 = 4
# The reference process holds more than a layer's live tensors at its peak: glibc keeps freed chunks for
# reuse, and the matmuls' packing buffers are no tensors. bench/plan_accuracy.py, its S, M and L at 512
# tokens, peak anonymous memory less the weights, state and overhead, over the live tensors: 1.87-2.13x on
# an earlier CI machine, 1.64-1.68x on a Xeon with AMX (PyTorch's CPU kernels differ by instruction set).
# 1.8 lies between: against either machine's runs the total is then within 4.8% (REFERENCE_WORST).
HEAP_FACTOR = 1.8
# The longest context a plan takes: 16M tokens. Not the config's max_position_embeddings: Nemotron-H has
# no position embedding (position comes from its Mamba layers), so that number is what a model was
# trained or served at, not a limit of the architecture, and it is often absent (transformers then
# assumes 4096). 2**24 is 16x the 1M-token contexts Nemotron-H models are served at and 4x the longest
# context ``max_context`` searches; beyond it the terms describe no deployment (a context of 10**21 once
# printed a KV cache of 10**14 GiB beside a budget that "fits").
MAX_CONTEXT = 2**24
# The most sequences a plan decodes together: serving runtimes schedule hundreds to a few thousand at once.
MAX_BATCH = 2**16


DEFAULT_CONTEXT = 8192  # the plan's context when none is given (plan, fit-my-gpu, the TUI)
DEFAULT_PREFILL_CHUNK = 512  # prompt tokens per forward the plan assumes when none is given
DEFAULT_EXPORT_CONTEXT = 4096  # tokens per sequence an exported engine accepts unless asked for more


@dataclass(frozen=True)
class Workload:
    """What the model will be asked to do, and in which precisions.

    One ``dtype`` alone means weights, activations and KV cache in it, the SSM
    state in float32. ``weights`` and ``kv`` set those two apart from it. Given to
    ``fit.plan``, "auto" (or None) in any of them lets the plan decide for the device.

    Raises:
        ConfigError: a context, batch or prefill chunk that is not a whole number in its range
            (1..:data:`MAX_CONTEXT` tokens, 1..:data:`MAX_BATCH` sequences), or a margin outside
            0..1, every problem listed (:func:`workload_problems`): every front end (CLI, TUI,
            export) builds a Workload, so all get the same refusal.
    """

    context: int = DEFAULT_CONTEXT  # tokens held per sequence (prompt + generated)
    batch: int = 1  # sequences decoded together
    dtype: str = "bfloat16"  # the base float precision: activations, conv window, unquantized tensors
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # prompt tokens per forward (caps the activation peak)
    margin: float = 0.05  # safety fraction on top of everything else
    weights: str | None = None  # weights precision (float or quantized); None: dtype
    kv: str | None = None  # attention KV cache precision; None: dtype
    state: str = "float32"  # Mamba SSM state precision

    def __post_init__(self) -> None:
        problems = workload_problems(self)
        if problems:
            setting = problems[0][0]
            hint = (Hint(setting, f"give a {setting} of at most {LIMITS[setting]:,}", value=LIMITS[setting])
                    if setting in ("context", "batch") else None)
            raise ConfigError(f"invalid workload to plan ({len(problems)} problem{'s' * (len(problems) > 1)})",
                              problems=[text for _, text in problems], hint=hint)


LIMITS = {"context": MAX_CONTEXT, "batch": MAX_BATCH, "prefill_chunk": MAX_CONTEXT}  # each a whole number in 1..
_WHAT = {"context": "tokens per sequence, prompt + output", "batch": "sequences decoded together",
         "prefill_chunk": "prompt tokens per forward"}


def workload_problems(w: Workload) -> list[tuple[str, str]]:
    """Every way ``w``'s sizes are out of range, as (setting, what is wrong): context, batch and
    prefill chunk whole numbers in 1..:data:`LIMITS`, the margin a number in 0..1."""
    out = []
    for name, top in LIMITS.items():
        v = getattr(w, name)
        if not is_int(v) or not 1 <= v <= top:
            why = (f"no deployment holds more than {top:,} (2**{top.bit_length() - 1}), and past it the memory terms "
                   "describe none" if is_int(v) and v > top else "it counts whole things, at least one")
            out.append((name, f"{name} ({_WHAT[name]}) must be a whole number in 1..{top:,}, found {v!r:.40}: {why}"))
    m = w.margin
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not (math.isfinite(m) and 0 <= m <= 1):
        out.append(("margin", f"margin (a safety fraction on top of every term) must be a number in 0..1, "
                              f"found {m!r:.40}"))
    return out


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a precision, by any of its spellings (``formats.precision``); a whole
    number of bytes (activations and caches are never 4-bit)."""
    b = lookup(dtype).bytes
    assert b == int(b), f"{dtype} has no whole bytes per element"
    return int(b)


def layer_state_bytes(arch: Arch, i: int, context: int, batch: int, s: int, st: int = F32) -> int:
    """What layer i keeps between forwards: an attention layer's K and V for ``context`` tokens at ``s``
    bytes per element; a Mamba layer's SSM state (H x P x N) at ``st`` and its conv window at ``s``;
    nothing for the others."""
    layer = arch.layers[i]
    if layer.kind == "attention":
        return 2 * layer.num_key_value_heads * arch.head_dim * context * batch * s
    if layer.kind == "mamba":
        H, P, N = layer.mamba_num_heads, layer.mamba_head_dim, arch.ssm_state_size
        conv_dim = H * P + 2 * arch.n_groups * N
        return batch * (H * P * N * st + (arch.conv_kernel - 1) * conv_dim * s)
    return 0


def kv_cache_bytes(arch: Arch, context: int, batch: int, dtype: str) -> int:
    """K and V of every attention layer at ``dtype`` (an fp8 cache's per-layer scalar scales left out)."""
    s = dtype_bytes(dtype)
    return sum(layer_state_bytes(arch, i, context, batch, s) for i, layer in enumerate(arch.layers)
               if layer.kind == "attention")


def ssm_state_bytes(arch: Arch, batch: int, dtype: str, state: str = "float32") -> int:
    """The SSM state (H x P x N) at ``state`` plus the conv window at ``dtype``, per sequence x batch."""
    s, st = dtype_bytes(dtype), dtype_bytes(state)
    return sum(layer_state_bytes(arch, i, 0, batch, s, st) for i, layer in enumerate(arch.layers)
               if layer.kind == "mamba")


# ---- weights ------------------------------------------------------------------------------------
#
# Which tensors Model Optimizer quantizes. Its presets (nvidia-modelopt 0.47: FP8_DEFAULT_CFG,
# INT8_SMOOTHQUANT_CFG, INT8_WEIGHT_ONLY_CFG, INT4_AWQ_CFG, NVFP4_DEFAULT_CFG in
# modelopt/torch/quantization/config.py, loaded from modelopt_recipes/configs/ptq/presets/model/*.yaml)
# put a weight quantizer on every quantizable module and then import
# modelopt_recipes/configs/ptq/units/default_disabled_quantizers.yaml, which turns off "*lm_head*",
# "*mixer.conv1d*", "*router*", "*mlp.gate.*" and every nn.Embedding. In a Nemotron-H checkpoint that
# leaves quantized: Mamba in_proj/out_proj, attention q/k/v/o_proj, MLP up/down_proj and an MoE
# layer's routed experts (one Linear each on disk) and shared experts (checked against `elastic slice`
# of the MoE demo by tests/test_issue22_quant_plan.py; latent projections not checked). Routed experts
# get no smoothing: transformers 5.23 holds them as 3-D parameters that Model Optimizer quantizes with
# one input quantizer shared by all experts and no AWQ / SmoothQuant scale, so no pre_quant_scale is
# written for them. Unquantized, in the base float precision: the embeddings
# (nn.Embedding: a table lookup, no GEMM to speed up) and lm_head (kept out by name: the logits are
# the output), the Mamba conv1d (kept out by name: a 4-tap depthwise filter), the norms, A_log, D
# and dt_bias (parameters of non-Linear modules: nothing attaches a quantizer to them), the MoE
# router, and every bias. MAMBA_MOE_FP8_CONSERVATIVE_CFG would also keep the Mamba projections and
# the attention projections unquantized; the presets planned here do not.
QUANTIZED_LINEARS = ("mixer.in_proj", "mixer.out_proj", "mixer.q_proj", "mixer.k_proj", "mixer.v_proj",
                     "mixer.o_proj", "mixer.up_proj", "mixer.down_proj", "mixer.shared_experts.up_proj",
                     "mixer.shared_experts.down_proj", "mixer.fc1_latent_proj", "mixer.fc2_latent_proj")
MOE_EXPERTS = ("mixer.experts.up_proj", "mixer.experts.down_proj")  # (E, out, in): E Linears
EXPERT_LINEARS = ("up_proj", "down_proj")  # mixer.experts.{e}.{up,down}_proj.weight: NVIDIA's on-disk form
# Linears that read the pre-norm's output together with another: AWQ's export folds their
# pre_quant_scale into that norm's weight (modelopt/torch/export/unified_export_hf.py, fuse_prequant_layernorm)
SHARED_INPUT = ("mixer.q_proj", "mixer.k_proj", "mixer.v_proj")


def quantized_linear(name: str, shape: tuple[int, ...], p: Precision, base: Precision,
                     shared_input: bool = False, group: int | None = None,
                     smoothed: bool = True) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The tensors Model Optimizer 0.47's ``export_hf_checkpoint`` writes for one Linear weight
    ``name`` (ending in ".weight", or an MoE expert stack) of ``shape`` [..., out, in] at ``p``:
    name -> (safetensors dtype, shape). Checked on CPU for fp8, int8, int8_wo, int4 and nvfp4 by
    tests/test_precision_plan.py. Scales are float32 except nvfp4's per-block fp8 scales and the
    pre_quant_scale (AWQ / SmoothQuant smoothing), which is in the base precision; ``smoothed``
    False (a routed expert): no smoothing, no pre_quant_scale. ``group``: int4's AWQ group.

    Example:
        >>> quantized_linear("x.weight", (512, 256), INT4, BFLOAT16)["x.weight_scale"]
        ('F32', (512, 2))
    """
    *lead, out, inn = shape
    L = tuple(lead)
    stem = name[: -len(".weight")] if name.endswith(".weight") else name
    w = f"{stem}.weight" if name.endswith(".weight") else name
    if p is FP8:  # per-tensor scales
        return {w: ("F8_E4M3", shape), f"{stem}.weight_scale": ("F32", ()), f"{stem}.input_scale": ("F32", ())}
    if p is INT8:  # per-output-channel weight scale, per-tensor activation scale, SmoothQuant's smoothing
        out_t = {w: ("I8", shape), f"{stem}.weight_scale": ("F32", (*L, out)), f"{stem}.input_scale": ("F32", ())}
        if smoothed:
            out_t[f"{stem}.pre_quant_scale"] = (base.safetensors, (inn,))
        return out_t
    if p is INT8_WO:
        return {w: ("I8", shape), f"{stem}.weight_scale": ("F32", (*L, out))}
    if p is INT4:  # two 4-bit values per byte along out; one float32 scale per group (128) of inputs
        g = group or INT4.block
        out_t = {w: ("U8", (*L, -(-out // 2), inn)), f"{stem}.weight_scale": ("F32", (*L, out, -(-inn // g)))}
        if smoothed and not shared_input:
            out_t[f"{stem}.pre_quant_scale"] = (base.safetensors, (inn,))
        return out_t
    if p is NVFP4:  # two 4-bit values per byte along in (padded to 16); fp8 scale per 16, float32 per tensor
        blocks = -(-inn // NVFP4.block)
        return {w: ("U8", (*L, out, blocks * NVFP4.block // 2)), f"{stem}.weight_scale": ("F8_E4M3", (*L, out, blocks)),
                f"{stem}.weight_scale_2": ("F32", ()), f"{stem}.input_scale": ("F32", ())}
    raise AssertionError(f"{p.name} is not a quantized weights format")


def weight_tensors(arch: Arch, weights: str, base: str | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor of ``arch``'s checkpoint with its weights at ``weights``: name -> (safetensors
    dtype, shape). Float ``weights``: every tensor in it. Quantized: Model Optimizer's unified
    checkpoint (:func:`quantized_linear`), every unquantized tensor in ``base`` (bf16 or fp16).

    Example:
        >>> sum(math.prod(s) * DTYPES[d][1] for d, s in weight_tensors(arch, "int4", "bf16").values())
    """
    p = lookup(weights)
    b = lookup(base) if base is not None else p
    if not p.quantized:
        return {name: (p.safetensors, shape) for name, shape in arch.tensor_shapes().items()}
    if p is INT4:
        arch = arch.with_layers(arch.layers, int4_hidden(arch, b.name))
    return _quantized_tensors(arch, p, b)


def int4_hidden(arch: Arch, base: str = "bfloat16") -> int:
    """The hidden size ``elastic slice --precision int4`` writes ``arch`` with: as cut, or zero-padded
    (``slicer.quantize.hidden_pad``) up to a multiple of 16, 32, 64 or 128 where that lets the AWQ group
    grow enough to save bytes (the fewest bytes of :func:`weight_tensors` win; as cut on a tie). A
    model int4 cannot hold as cut is left as cut (and refused: :func:`block_problem`).

    Example:
        >>> int4_hidden(demo_75)  # hidden 56: group 8 as cut, 64 padded to 64
        64
    """
    from elastic.slicer.errors import ConfigError

    b = lookup(base)
    d = arch.hidden_size
    try:
        weight_group(arch.tensor_shapes(), INT4)
    except ConfigError:
        return d
    size = lambda a: sum(math.prod(s) * DTYPES[t][1] for t, s in _quantized_tensors(a, INT4, b).values())  # noqa: E731
    best, fewest = d, size(arch)
    for multiple in (16, 32, 64, 128):
        padded = -(-d // multiple) * multiple
        if padded == d:
            continue
        try:
            n = size(arch.with_layers(arch.layers, padded))
        except ConfigError:
            continue
        if n < fewest:
            best, fewest = padded, n
    return best


def _quantized_tensors(arch: Arch, p: Precision, b: Precision) -> dict[str, tuple[str, tuple[int, ...]]]:
    """:func:`weight_tensors` of ``arch`` as it is written (int4: already padded)."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    shapes = arch.tensor_shapes()
    group = _int4_group(shapes) if p is INT4 else None
    for name, shape in shapes.items():
        linear = _quantized_linear(name)
        if linear:
            out.update(quantized_linear(name, shape, p, b, shared_input=linear in SHARED_INPUT, group=group,
                                        smoothed=linear not in MOE_EXPERTS))
        else:
            out[name] = (b.safetensors, shape)
    return out


def _int4_group(shapes: dict[str, tuple[int, ...]]) -> int:
    """The AWQ group ``elastic slice --precision int4`` uses for this model (``slicer.quant.layout``:
    128 when every input width allows it, else the largest power of two that divides them all)."""
    from elastic.slicer.errors import ConfigError

    try:
        return weight_group(shapes, INT4)
    except ConfigError:
        return INT4.block  # it cannot be quantized to int4 at all; block_problem says so


def _quantized_linear(name: str) -> str | None:
    """The Linear ("mixer.q_proj") whose weight ``name`` is, when Model Optimizer quantizes it."""
    if not name.startswith("backbone.layers."):
        return None  # embeddings, norm_f, lm_head
    key = name.split(".", 3)[-1]  # "mixer.q_proj.weight"
    if key in MOE_EXPERTS:
        return key
    parts = key.split(".")  # one routed expert: ["mixer", "experts", "7", "up_proj", "weight"]
    if len(parts) == 5 and parts[:2] == ["mixer", "experts"] and parts[2].isdigit() and parts[3] in EXPERT_LINEARS \
            and parts[4] == "weight":
        return f"mixer.experts.{parts[3]}"
    stem, _, leaf = key.rpartition(".")
    return stem if leaf == "weight" and stem in QUANTIZED_LINEARS else None


def gguf_quantized(p: Precision) -> bool:
    """Whether ``p`` is one of llama.cpp's quantized GGUF types (q8_0 ... q4_k_m), not a float."""
    return p in GGUF and not p.safetensors


def _gguf_breakdown(arch: Arch, p: Precision) -> dict[str, int]:
    """The weights of ``arch`` as a GGUF of llama.cpp type ``p`` (quantized or float): every tensor
    at the type llama.cpp gives it (:func:`gguf_tensor_types`); "quantized" the quantized ones,
    "float" those it keeps in float32 (and, in a float GGUF, the rest at ``p``)."""
    parts = {"quantized": 0, "scales": 0, "float": 0}
    for kind, n in gguf_tensor_types(arch, p).values():
        parts["float" if kind in ("f32", "f16", "bf16") else "quantized"] += n
    return parts


def gguf_keeps_float32(name: str, shape: tuple[int, ...]) -> bool:
    """Tensors llama.cpp keeps in float32 in any GGUF, by their checkpoint names: 1-D ones, norms, the
    conv, the MoE router (the float writer's rule, export/gguf.keeps_float32, and what llama.cpp's
    quantizer leaves alone: src/llama-quant.cpp, tensor_allows_quantization)."""
    return len(shape) <= 1 or not name.endswith(".weight") or "norm" in name or ".conv1d." in name or ".gate." in name


def gguf_tensor_bytes(name: str, shape: tuple[int, ...], p: Precision) -> int:
    """The bytes of one tensor at llama.cpp's main type for ``p`` (its row-width fallback included),
    without the _M mixes' per-layer choices (:func:`gguf_tensor_types` has them): the per-layer cost
    ``planning.exact`` sums, where layers are priced one at a time."""
    if gguf_keeps_float32(name, shape):
        return 4 * math.prod(shape)
    return ggml_bytes(_fallback(GGUF_MAIN_TYPE[p.name], shape[-1]), shape)


# ---- llama.cpp: what it allocates (llama.cpp 0c1e57098, vendored in llama-cpp-python 0.3.36) -------
#
# llama.cpp reports four buffers when it loads a model and makes a context, and the plan's terms for
# the llama.cpp engine are those buffers, each computed the way llama.cpp sizes it:
# - weights ("model buffer size", src/llama-model.cpp load_tensors; CPU + CPU_REPACK): every tensor at
#   the type its GGUF holds. The quantizer picks the type per tensor (src/llama-quant.cpp,
#   llama_tensor_get_type_impl): the file type's main type, but the output matrix gets Q6_K (Q8_0 in a
#   q8_0 file), and in the _M mixes attn_v and ffn_down get Q6_K in the layers `use_more_bits` picks;
#   a row width that is not a multiple of the type's block falls back (tensor_type_fallback:
#   Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0, then F16).
# - KV cache ("KV buffer size", src/llama-kv-cache.cpp, llama_kv_cache constructor): K and V of each
#   attention layer, n_embd_k_gqa x kv_size x n_stream at type_k/type_v (f16 unless -ctk/-ctv),
#   kv_size = n_ctx_seq, the context rounded up to 256 (src/llama-context.cpp), one stream per sequence.
# - recurrent state ("RS buffer size", src/llama-memory-recurrent.cpp): per Mamba layer one row per
#   sequence of r (the conv window, hparams.n_embd_r: (d_conv - 1) x (d_inner + 2 n_group d_state)) and
#   s (the SSM state, n_embd_s: d_state x d_inner), both float32 whatever the plan's state precision
#   (src/llama-model.cpp create_memory passes GGML_TYPE_F32).
# - compute + output buffers (src/llama-context.cpp sched_reserve, output_reserve): the graph for a
#   full ubatch of 512 tokens with one output per token, reserved at load; see llama_cpp_compute_bytes.

LLAMA_UBATCH = 512  # llama.cpp's n_batch / n_ubatch default: the graph it reserves compute memory for
LLAMA_CTX_PAD = 256  # the context is rounded up to a multiple of this (llama_context constructor)
# GGML types: (elements per block, bytes per block) (ggml/src/ggml-common.h)
GGML_TYPES = {"f32": (1, 4), "f16": (1, 2), "bf16": (1, 2), "q8_0": (32, 34), "q5_0": (32, 22), "q5_1": (32, 24),
              "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210)}
GGUF_FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}  # tensor_type_fallback
# the file type's main type (llama_ftype_get_default_type), by Precision.name
GGUF_MAIN_TYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "q8_0": "q8_0", "q6_k": "q6_k",
                  "q5_k_m": "q5_k", "q4_k_m": "q4_k"}


def ggml_bytes(kind: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``shape`` (rows along the last axis) at GGML type ``kind``."""
    block, size = GGML_TYPES[kind]
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


def _fallback(kind: str, ncols: int) -> str:
    """llama.cpp's type for a row of ``ncols`` when ``kind``'s blocks do not tile it."""
    if ncols % GGML_TYPES[kind][0] == 0:
        return kind
    kind = GGUF_FALLBACK.get(kind, kind)
    return kind if ncols % GGML_TYPES[kind][0] == 0 else "f16"


def _more_bits(i: int, n: int) -> bool:
    """llama-quant.cpp's use_more_bits: the first and last eighth of the layers, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _gguf_category(name: str) -> str:
    """llama-quant.cpp's tensor_get_category of the GGUF tensor a checkpoint tensor becomes."""
    if name == "lm_head.weight":
        return "output"
    if name == "backbone.embeddings.weight":
        return "token_embd"
    leaf = name.rsplit(".", 2)[-2]  # "v_proj" in "...mixer.v_proj.weight"
    return {"v_proj": "attn_v", "k_proj": "attn_k", "q_proj": "attn_q", "o_proj": "attn_output",
            "up_proj": "ffn_up", "down_proj": "ffn_down"}.get(leaf, "other")


def gguf_tensor_types(arch: Arch, p: Precision) -> dict[str, tuple[str, int]]:
    """Every checkpoint tensor of ``arch`` in a GGUF of ``p`` (f32 / f16 / bf16 or one of llama.cpp's
    quantized types): name -> (GGML type, bytes), as llama.cpp's quantizer chooses
    (llama_tensor_get_type_impl; the comment above this function says which rules apply)."""
    main = GGUF_MAIN_TYPE[p.name]
    shapes = arch.tensor_shapes()
    n_layer = len(arch.layers)
    moe = [layer.n_routed_experts for layer in arch.layers if layer.kind == "moe"]
    n_expert = max(moe, default=0)
    n_attn_v = sum(1 for n in shapes if _gguf_category(n) == "attn_v")
    i_attn_v = i_ffn_down = 0
    out = {}
    for name, shape in shapes.items():  # in layer order, as the GGUF holds them
        if gguf_keeps_float32(name, shape):
            out[name] = ("f32", 4 * math.prod(shape))
            continue
        kind, cat = main, _gguf_category(name)
        if not gguf_quantized(p):
            out[name] = (kind, ggml_bytes(kind, shape))
            continue
        if cat == "output":
            kind = "q8_0" if shape[-1] % GGML_TYPES[kind][0] or kind == "q8_0" else "q6_k"
        elif cat == "attn_v":
            if p.name in ("q4_k_m", "q5_k_m") and _more_bits(i_attn_v, n_attn_v):
                kind = "q6_k"
            if n_expert == 8:
                kind = "q8_0"
            i_attn_v += 1
        elif cat == "attn_k" and n_expert == 8:
            kind = "q8_0"
        elif cat == "ffn_down":
            i = int(name.split(".")[2]) if n_expert > 1 else i_ffn_down  # MoE: the layer, else a count
            if p.name in ("q4_k_m", "q5_k_m") and _more_bits(i, n_layer):
                kind = "q6_k"
            i_ffn_down += 1
        elif cat == "attn_output" and n_expert == 8 and p.name == "q4_k_m":
            kind = "q5_k"
        kind = _fallback(kind, shape[-1])
        out[name] = (kind, ggml_bytes(kind, shape))
    return out


def llama_cpp_kv_bytes(arch: Arch, context: int, batch: int, kv: str) -> int:
    """llama.cpp's KV buffer: K and V per attention layer, the context rounded up to 256 per sequence,
    at the plan's KV precision (llama.cpp's default, f16, for bf16/fp16; -ctk/-ctv f32 for fp32;
    q8_0, its 8-bit cache, for fp8)."""
    size = {1: 34 / 32}.get(dtype_bytes(kv), dtype_bytes(kv))
    ctx = -(-context // LLAMA_CTX_PAD) * LLAMA_CTX_PAD
    per_token = sum(2 * layer.num_key_value_heads * arch.head_dim for layer in arch.layers if layer.kind == "attention")
    return int(per_token * ctx * batch * size)


def llama_cpp_state_bytes(arch: Arch, batch: int) -> int:
    """llama.cpp's RS buffer: per Mamba layer and sequence the conv window and the SSM state, in float32."""
    total = 0
    for layer in arch.layers:
        if layer.kind == "mamba":
            I, G, N = layer.mamba_num_heads * layer.mamba_head_dim, arch.n_groups, arch.ssm_state_size
            total += ((arch.conv_kernel - 1) * (I + 2 * G * N) + N * I) * F32
    return total * max(1, batch)


def llama_cpp_compute_bytes(arch: Arch, context: int, batch: int) -> int:
    """llama.cpp's compute buffer (sched_reserve: the graph of one full ubatch of 512 tokens, one
    output per token, flash attention on as llama.cpp's tools default to on the CPU), replayed through
    ggml's allocator by ``planning.llama_graph``, plus its output buffer (output_reserve: one row of
    float32 logits per sequence). Its largest parts: the ubatch's logits (n_vocab x 512 x 4 bytes),
    the attention mask (context x 512 x 2 bytes), and the largest layer's transient tensors."""
    from elastic.slicer.planning.llama_graph import compute_buffer_bytes

    return compute_buffer_bytes(arch, context, LLAMA_UBATCH, batch) + arch.vocab_size * F32 * batch


# What each engine's terms rest on (the plan's JSON rows carry it as "memory_basis"). llama.cpp and the
# reference run here and are measured by bench/plan_accuracy.py; the GPU engines cannot run here, so
# their terms are the checkpoint's layout and the model's shapes, and what the engine itself adds is
# said in words: vLLM claims gpu_memory_utilization (0.9 by default) of the GPU and fills what its
# weights and activation profile leave with KV-cache blocks; TensorRT-LLM gives the KV cache
# free_gpu_memory_fraction (0.9 by default) of what is free after the engine loads; Edge-LLM's engine
# holds the KV cache and Mamba state for the maximum lengths it was built with.
ESTIMATE = ("estimate: not measured for {title} (it needs an NVIDIA GPU): weights from Model Optimizer's checkpoint "
            "layout, KV cache and Mamba state from the model's shapes, activations from the reference model's "
            "peak, overhead from the device profile; {own}")
ENGINE_OWN = {
    "vllm": "vLLM itself claims gpu_memory_utilization (0.9) of the GPU and fills the rest with KV-cache blocks",
    "tensorrt-llm": "TensorRT-LLM gives its KV cache free_gpu_memory_fraction (0.9) of the memory left free",
    "edgellm": "TensorRT Edge-LLM's engine holds KV cache and state for the lengths it was built with",
}
LLAMA_CPP_WORST = 0.002  # bench/plan_accuracy.py, llama.cpp 0c1e57098: worst |predicted - measured| / measured
# bench/plan_accuracy.py, the PyTorch reference (S, M, L x 512, 4096 tokens), on the two machines above
REFERENCE_WORST = 0.048
ORT_WORST = 0.035  # bench/plan_accuracy.py, ONNX Runtime 1.32 (S, M, L x 512, 4096 tokens, float32 graphs)
MEMORY_BASIS = {
    "llama.cpp": f"measured model: llama.cpp's own buffers (model, KV, RS, compute + output) against these terms in "
                 f"bench/plan_accuracy.py (4 sizes x 2 contexts x bf16/q8_0/q4_k_m, worst error "
                 f"{LLAMA_CPP_WORST:.1%}; MoE compute buffers estimated); overhead: the device profile's estimate",
    "reference": f"measured model: the PyTorch reference's peak anonymous memory in bench/plan_accuracy.py (3 sizes "
                 f"x 2 contexts, worst error {REFERENCE_WORST:.1%}); activations: the tensors alive at each layer's "
                 f"peak (checked by a tracer in tests/test_memory_live.py), 1.8 times over for the heap",
    "onnxruntime": f"measured model: ONNX Runtime's weights.bin pages and peak anonymous memory in "
                   f"bench/plan_accuracy.py (3 sizes x 2 contexts, worst error {ORT_WORST:.1%}); the arena "
                   f"ONNX Runtime grows (regions doubling from 1 MiB) to hold its peak; its own memory measured",
}


def memory_basis(engine: str | None) -> str:
    """What the plan's terms for ``engine`` rest on: a model measured against that engine here, or an
    estimate (and from what)."""
    if (engine or "reference") in MEMORY_BASIS:
        return MEMORY_BASIS[engine or "reference"]
    title = {"vllm": "vLLM", "tensorrt-llm": "TensorRT-LLM", "edgellm": "TensorRT Edge-LLM"}.get(engine, engine)
    return ESTIMATE.format(title=title, own=ENGINE_OWN.get(engine, "the engine's own memory not known"))


def llama_cpp_terms(arch: Arch, w: Workload) -> dict[str, int]:
    """The plan's terms for llama.cpp (weights, kv_cache, ssm_state, activations), each the buffer
    llama.cpp allocates for it (see the comment above :data:`LLAMA_UBATCH`)."""
    return {"weights": sum(n for _, n in gguf_tensor_types(arch, lookup(w.weights or w.dtype)).values()),
            "kv_cache": llama_cpp_kv_bytes(arch, w.context, w.batch, w.kv or w.dtype),
            "ssm_state": llama_cpp_state_bytes(arch, w.batch),
            "activations": llama_cpp_compute_bytes(arch, w.context, w.batch)}


def weights_breakdown(arch: Arch, weights: str, base: str | None = None, engine: str | None = None) -> dict[str, int]:
    """The weights term in three parts: ``quantized`` (the packed Linear weights), ``scales``
    (their scales and smoothing vectors) and ``float`` (everything kept in the base precision).
    A llama.cpp quantized type (q4_k_m, ...): :func:`_gguf_breakdown`."""
    p = lookup(weights)
    if gguf_quantized(p) or (engine == "llama.cpp" and p in GGUF):
        return _gguf_breakdown(arch, p)
    parts = {"quantized": 0, "scales": 0, "float": 0}
    for name, (dt, shape) in weight_tensors(arch, weights, base).items():
        n = math.prod(shape) * DTYPES[dt][1]
        if not p.quantized:
            parts["float"] += n
        elif name.endswith("_scale") or name.endswith("_scale_2"):
            parts["scales"] += n
        elif dt in ("F8_E4M3", "I8", "U8"):
            parts["quantized"] += n
        else:
            parts["float"] += n
    return parts


def weights_bytes(arch: Arch, weights: str, base: str | None = None) -> int:
    """The weights term: the bytes of :func:`weight_tensors` (for a float precision, parameters x
    bytes). ``base``: the float precision of the unquantized tensors (default: ``weights`` itself).

    Example:
        >>> weights_bytes(arch, "bf16") == 2 * arch.param_counts()["total"]
        True
    """
    return sum(weights_breakdown(arch, weights, base).values())


def block_problem(arch: Arch, weights: str) -> str | None:
    """Why ``elastic slice --precision`` cannot write ``arch`` at ``weights``, or None: the rule the
    slicer applies before it quantizes (``slicer.quant.layout.weight_group``), asked here too, so a
    plan offers a format exactly where a slice can write it. int4 (AWQ) packs whole groups of 128,
    else of the largest power of two down to 8 that divides every quantized Linear's input width;
    nvfp4 needs input widths that are multiples of 16."""
    from elastic.slicer.errors import ConfigError

    p = lookup(weights)
    if not p.quantized:
        return None
    try:
        weight_group(arch.tensor_shapes(), p)
    except ConfigError as e:
        return "; ".join([e.message, *e.problems[:3], *(["..."] if len(e.problems) > 3 else [])])
    return None


def _layer_activation_bytes(arch: Arch, i: int, t: int, batch: int, s: int) -> int:
    """Peak transient bytes inside layer i's forward for a chunk of t tokens (reference model): the
    tensors alive at its peak (tests/test_memory_live.py counts them with a dispatch-mode tracer on
    the reference model itself), times :data:`HEAP_FACTOR`."""
    return int(HEAP_FACTOR * _layer_live_bytes(arch, i, t, batch, s))


def _layer_live_bytes(arch: Arch, i: int, t: int, batch: int, s: int) -> int:
    layer, d = arch.layers[i], arch.hidden_size
    bt = batch * t
    norm = bt * d * (s + 2 * F32)  # pre-norm output and its float32 temporaries
    if layer.kind == "mamba":
        # alive at the chunked scan's last einsum (slicer/nn/ssd.py), the mixer's peak: the pre-norm
        # output; in_proj's [z | x | B | C | dt]; the conv's padded input and output; x padded, x*dt,
        # einsum's contiguous copy of it and two einsum outputs (float32, plus x's float32 copy below
        # float32); B and C per head, padded, and einsum's copy of one; the decay matrix and the
        # scores; the chunk states, the states with the entering one and their decayed sums
        H, P, G, N, K = layer.mamba_num_heads, layer.mamba_head_dim, arch.n_groups, arch.ssm_state_size, arch.conv_kernel
        I, T = H * P, arch.chunk_size
        conv_dim = I + 2 * G * N
        t_pad = math.ceil(t / T) * T
        c = t_pad // T
        proj = bt * (2 * I + 2 * G * N + H) * s
        conv = batch * conv_dim * (2 * t + K - 1) * s
        xs = batch * t_pad * I * F32 * 5 + (bt * I * F32 if s != F32 else 0)
        bc = 3 * batch * t_pad * H * N * F32
        decay = 2 * batch * H * t_pad * T * F32
        states = batch * (3 * c + 2) * H * P * N * F32
        gate = bt * I * F32 * 4  # y, then the gated RMSNorm's float32 temporaries
        return bt * d * s + proj + max(conv + xs + bc + decay + states, gate + bt * I * s)
    if layer.kind == "attention":
        # fused attention (flash on CPU, fused MHA in TensorRT) never holds the t x context scores
        A, KV, hd = layer.num_attention_heads, layer.num_key_value_heads, arch.head_dim
        return norm + bt * (A + 2 * KV) * hd * s + bt * A * hd * s  # q, k, v and the output
    if layer.kind == "moe":
        # router logits, sigmoid scores and scores + bias in float32; each token's top-k experts (up
        # projection, its square, the product) and their outputs; the shared expert; the float32
        # sum of the routed outputs. An upper bound: a grouped-GEMM runtime holds less.
        E, k, Fe, Fs = layer.n_routed_experts, arch.num_experts_per_tok, layer.moe_intermediate_size, \
            layer.moe_shared_expert_intermediate_size
        inner = arch.moe_latent_size or d
        router = 3 * bt * E * F32
        routed = bt * k * (3 * Fe + inner) * s + bt * inner * (s + F32)
        return norm + router + routed + 3 * bt * Fs * s
    # mlp: the up projection and its squared ReLU
    return norm + 2 * bt * layer.intermediate_size * s


def _attention_context_bytes(arch: Arch, i: int, t: int, w: Workload, s: int) -> int:
    """What attention layer i holds in the reference model that grows with the context: the causal
    mask of the chunk against every cached position (bool, and the float copy scaled_dot_product_attention
    makes of it) and, while torch.cat grows the cache, the layer's K and V twice more (the old tensors and
    the new ones)."""
    layer = arch.layers[i]
    if layer.kind != "attention":
        return 0
    kv = 2 * layer.num_key_value_heads * arch.head_dim * w.context * w.batch * dtype_bytes(w.kv or w.dtype)
    return t * w.context * (1 + s) + 2 * kv


def activation_bytes(arch: Arch, w: Workload) -> int:
    s = dtype_bytes(w.dtype)
    t = min(w.prefill_chunk, w.context)
    layers = max((_layer_activation_bytes(arch, i, t, w.batch, s) + _attention_context_bytes(arch, i, t, w, s)
                  for i in range(len(arch.layers))), default=0)
    return layers + stream_bytes(arch, w)


def stream_bytes(arch: Arch, w: Workload) -> int:
    """What every layer's peak sits on: the residual stream in and out of a layer, and the chunk's
    logits, float32 (the reference model returns float32 logits; below float32, the model's own are
    alive beside their float32 copy)."""
    s, t = dtype_bytes(w.dtype), min(w.prefill_chunk, w.context)
    return 2 * w.batch * t * arch.hidden_size * s + w.batch * t * arch.vocab_size * (F32 + (s if s != F32 else 0))


# ONNX Runtime (``elastic generate --backend onnx``: ``export.runtime.OnnxGenerator``): every tensor has its
# own buffer, freed after its last use, from one BFC arena the process shares. The arena grows by regions of
# 1, 2, 4... MiB, each twice the last and at least the request, up to 1 GiB a region (ONNX Runtime's
# defaults, onnxruntime/core/framework/bfc_arena.cc, kNextPowerOfTwo), and keeps them: its size is that
# series summed until it holds the peak. Its own memory (the onnxruntime import, three sessions' graphs
# and kernels), measured by bench/plan_accuracy.py on its S, M, L (7, 12, 16 layers: 27.5, 31.7, 35.5 MiB):
ORT_FIXED_BYTES = 21 * MIB
ORT_PER_LAYER_BYTES = int(0.9 * MIB)
ORT_REGION_MAX = 1 << 30


def _ort_attention_bytes(arch: Arch, i: int, t: int, context: int, batch: int, s: int) -> int:
    """ONNX Runtime's peak inside attention layer i (the exported graph spells attention out): at the
    Where that zeroes NaN rows after the softmax, the softmax output, its IsNaN mask (bool), the Where's
    output and the two selections ONNX Runtime's Where fills before it merges them into its output
    (onnxruntime/core/providers/cpu/tensor/where_op.cc), each heads x chunk x context; V repeated to
    every query head; q, k, v of the chunk."""
    layer, d = arch.layers[i], arch.hidden_size
    A, KV, hd = layer.num_attention_heads, layer.num_key_value_heads, arch.head_dim
    bt, scores = batch * t, batch * A * t * context
    return bt * d * (s + 2 * F32) + bt * (A + 2 * KV) * hd * s + 4 * scores * s + scores + batch * A * context * hd * s


def ort_arena_bytes(live: int) -> int:
    """The arena ONNX Runtime holds once ``live`` bytes were in it at once: regions of 1, 2, 4... MiB
    (at most 1 GiB each) until their sum holds ``live``."""
    total, region = 0, MIB
    while total < live:
        total += region
        region = min(2 * region, ORT_REGION_MAX)
    return total


def onnxruntime_terms(arch: Arch, w: Workload) -> dict[str, int]:
    """The plan's terms for ONNX Runtime over ``elastic export``'s graphs at ``w.dtype``: weights.bin
    (memory-mapped; all of it once a prompt has read every embedding row), one copy of the KV cache
    and Mamba state (the caller's), the rest of the arena at its peak as ``activations``, and ONNX
    Runtime's own memory as ``overhead``. The peak is at the prompt's last chunk, at the layer where
    one layer's tensors (:func:`_layer_live_bytes`; attention: :func:`_ort_attention_bytes`), the
    residual stream, the past state and the new state of the layers so far are largest together."""
    s, t = dtype_bytes(w.dtype), min(w.prefill_chunk, w.context)
    states = [layer_state_bytes(arch, i, w.context, w.batch, s) for i in range(len(arch.layers))]
    past = sum(states)
    stream = 2 * w.batch * t * arch.hidden_size * s + w.batch * arch.vocab_size * F32
    peak = new = 0
    for i, layer in enumerate(arch.layers):
        new += states[i]  # the new state of layers 0..i
        own = (_ort_attention_bytes(arch, i, t, w.context, w.batch, s) if layer.kind == "attention"
               else _layer_live_bytes(arch, i, t, w.batch, s))
        peak = max(peak, own + stream + past + new)
    kv = kv_cache_bytes(arch, w.context, w.batch, w.dtype)
    ssm = past - kv
    return {"weights": weights_bytes(arch, w.dtype), "kv_cache": kv, "ssm_state": ssm,
            "activations": ort_arena_bytes(peak) - kv - ssm,
            "overhead": ORT_FIXED_BYTES + ORT_PER_LAYER_BYTES * len(arch.layers)}


def footprint(arch: Arch, w: Workload, overhead_bytes: int, engine: str | None = None) -> dict[str, int]:
    """Every term in bytes, plus ``total``. ``overhead_bytes`` comes from the device profile; ``w``
    names its precisions (resolved: no "auto"). ``engine`` "llama.cpp": that engine's own sizing
    (:func:`llama_cpp_terms`, measured by bench/plan_accuracy.py); "onnxruntime": ONNX Runtime's
    (:func:`onnxruntime_terms`, measured there too; its own overhead replaces ``overhead_bytes``);
    any other (or None): the terms above, which follow the reference model (:func:`memory_basis` says
    what each rests on)."""
    if engine == "llama.cpp":
        terms = {**llama_cpp_terms(arch, w), "overhead": overhead_bytes}
    elif engine == "onnxruntime":
        terms = onnxruntime_terms(arch, w)  # its own overhead, measured, in place of the profile's
    else:
        terms = {
            "weights": weights_bytes(arch, w.weights or w.dtype, w.dtype),
            "kv_cache": kv_cache_bytes(arch, w.context, w.batch, w.kv or w.dtype),
            "ssm_state": ssm_state_bytes(arch, w.batch, w.dtype, w.state),
            "activations": activation_bytes(arch, w),
            "overhead": overhead_bytes,
        }
    terms["margin"] = int(w.margin * sum(terms.values()))
    terms["total"] = sum(terms.values())
    return terms


def max_context(arch: Arch, w: Workload, overhead_bytes: int, usable_bytes: int, engine: str | None = None) -> int:
    """The longest context (a multiple of 256) whose footprint fits ``usable_bytes``; 0 if none."""
    from dataclasses import replace

    fits = lambda c: footprint(arch, replace(w, context=c), overhead_bytes, engine)["total"] <= usable_bytes  # noqa: E731
    lo, hi = 0, 1 << 22  # 4M tokens
    while hi - lo > 256:
        mid = (lo + hi) // 2 // 256 * 256 or 256
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo if lo and fits(lo) else 0


# ---- exporting and building where the model runs (bench/export_bench.py measured the export) ----

# `elastic export`'s peak RSS beyond the weights, measured by bench/export_bench.py (torch 2.13, CPU,
# parity on; hidden 1024, vocab 32000): 0.74 GB at 7 layers, 0.91 GB at 28, 1.67 GB at 98: the imports
# and the tracer's fixed cost, plus about 10 MB per layer (the traced graphs, the parity run's activations).
EXPORT_FIXED_BYTES = 640 * MIB
EXPORT_PER_LAYER_BYTES = 10 * MIB
GRAPH_WEIGHT_BYTES = 4  # the graphs hold float32 weights (TensorRT builds bf16/fp16 engines from them)


def export_peak_bytes(arch: Arch) -> int:
    """Peak memory of ``elastic export`` for this model: its float32 weights once (``weights.bin``,
    memory-mapped and shared by ONNX Runtime and the parity check's model) plus the measured fixed
    and per-layer cost."""
    return (arch.param_counts()["total"] * GRAPH_WEIGHT_BYTES + EXPORT_FIXED_BYTES
            + EXPORT_PER_LAYER_BYTES * arch.num_hidden_layers)


def engine_build_bytes(arch: Arch, engine_weight_bytes: int, workspace_bytes: int) -> int:
    """Memory of a TensorRT engine build (an estimate: TensorRT does not run here): the parser holds
    the graphs' float32 weights, the builder the engine's weights (``engine_weight_bytes``, the
    plan's weights term) and the serialized engine once more, plus its workspace."""
    return arch.param_counts()["total"] * GRAPH_WEIGHT_BYTES + 2 * engine_weight_bytes + workspace_bytes
