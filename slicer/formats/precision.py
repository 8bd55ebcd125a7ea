"""The one precision vocabulary: every name a user may type for a precision, and everything the
product needs to know about it (bytes per element, safetensors code, torch dtype, TensorRT flag,
which device capability it needs). No torch here.

Every command's option and the TUI's control are built from this table; outputs write the
canonical ``name`` (``"bfloat16"``) except where a tool's own vocabulary is the short one
(TensorRT engine settings: ``"bf16"``).

Example:
    >>> lookup("bf16").name, lookup("half").bytes, lookup("FP32").safetensors
    ('bfloat16', 2, 'F32')
"""

from __future__ import annotations

from dataclasses import dataclass

from elastic.profiles.devices import PRECISION_NEEDS
from elastic.slicer.errors import ConfigError

AUTO = "auto"  # let the device decide: bfloat16 where it has it, else float16, else float32
KEEP = "keep"  # keep what the checkpoint stores


@dataclass(frozen=True)
class Precision:
    name: str  # canonical, as JSON outputs and config.json write it
    short: str  # NVIDIA's / TensorRT's spelling, and what the CLI shows
    aliases: tuple[str, ...]  # other spellings users type
    bytes: float  # per element (a quantized weight: its stored value alone, scales excluded)
    safetensors: str  # dtype code in safetensors headers (quantized: of the packed weight tensor)
    torch: str  # attribute of the torch module (quantized: of the packed weight tensor)
    trt_flag: str  # trtexec flag ("" for the default fp32)
    # ---- quantized weights only (Model Optimizer's unified Hugging Face checkpoint) ----
    quantized: bool = False
    scale_bytes: float = 0.0  # bytes of block scales per quantized weight element (per-tensor scalars excluded)
    block: int | None = None  # elements along the input dimension that share one scale (None: per tensor)
    modelopt_config: str | None = None  # the modelopt.torch.quantization config that produces it
    quant_algo: str | None = None  # hf_quant_config.json's quantization.quant_algo
    # ---- GGUF (llama.cpp) ----
    gguf_ftype: str | None = None  # llama.cpp's file type (LLAMA_FTYPE_<this>, gguf.LlamaFileType.<this>)

    @property
    def needs(self) -> str | None:
        """The device capability it needs (a ``profiles.devices.Capability`` field), None: every
        device runs it. Decided by the one table ``profiles.devices.PRECISION_NEEDS``."""
        return PRECISION_NEEDS.get(self.short)

    @property
    def spellings(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.name, self.short, *self.aliases)))


FLOAT32 = Precision("float32", "fp32", ("f32", "float"), 4, "F32", "float32", "", gguf_ftype="ALL_F32")
FLOAT16 = Precision("float16", "fp16", ("f16", "half"), 2, "F16", "float16", "--fp16", gguf_ftype="MOSTLY_F16")
BFLOAT16 = Precision("bfloat16", "bf16", (), 2, "BF16", "bfloat16", "--bf16", gguf_ftype="MOSTLY_BF16")
# a raw float8 cast (no scales): how an F8_E4M3 tensor reads; quantized fp8 weights are FP8 below
FLOAT8 = Precision("float8", "float8", ("float8_e4m3fn", "f8"), 1, "F8_E4M3", "float8_e4m3fn", "--fp8")
# Quantized weights, as NVIDIA Model Optimizer 0.47 exports them (checked on CPU: FP8 weight F8_E4M3 with
# scalar F32 weight_scale and input_scale; W4A16 AWQ weight U8 [out/2, in] with F32 weight_scale
# [out, in/128] and pre_quant_scale [in]); embeddings, lm_head and Mamba conv1d stay unquantized.
FP8 = Precision("fp8", "fp8", ("w8a8_fp8",), 1, "F8_E4M3", "float8_e4m3fn", "--fp8",
                quantized=True, modelopt_config="FP8_DEFAULT_CFG", quant_algo="FP8")
INT8 = Precision("int8", "int8", ("int8_sq", "w8a8", "smoothquant"), 1, "I8", "int8", "--int8",
                 quantized=True, modelopt_config="INT8_SMOOTHQUANT_CFG", quant_algo="W8A8_SQ_PER_CHANNEL")
INT8_WO = Precision("int8_wo", "int8_wo", ("w8a16", "int8_weight_only"), 1, "I8", "int8", "--int8",
                    quantized=True, modelopt_config="INT8_WEIGHT_ONLY_CFG", quant_algo="W8A16")
INT4 = Precision("int4", "int4", ("int4_awq", "w4a16", "awq"), 0.5, "U8", "uint8", "--int4",
                 quantized=True, scale_bytes=4 / 128, block=128, modelopt_config="INT4_AWQ_CFG", quant_algo="W4A16_AWQ")
NVFP4 = Precision("nvfp4", "nvfp4", ("fp4",), 0.5, "U8", "uint8", "--fp4",
                  quantized=True, scale_bytes=1 / 16, block=16, modelopt_config="NVFP4_DEFAULT_CFG", quant_algo="NVFP4")
# llama.cpp's quantized GGUF types, made by llama.cpp's own quantizer (``llama_model_quantize``); bytes per
# weight from its block sizes (ggml-common.h: q8_0 34 B / 32, q6_K 210 B / 256, q5_K 176 B / 256, q4_K 144 B /
# 256); the _M mixes give some tensors the next larger K type, so they are a little larger in all.
Q8_0 = Precision("q8_0", "q8_0", ("gguf_q8_0",), 34 / 32, "", "", "", gguf_ftype="MOSTLY_Q8_0")
Q6_K = Precision("q6_k", "q6_k", ("gguf_q6_k",), 210 / 256, "", "", "", gguf_ftype="MOSTLY_Q6_K")
Q5_K_M = Precision("q5_k_m", "q5_k_m", ("gguf_q5_k_m",), 176 / 256, "", "", "", gguf_ftype="MOSTLY_Q5_K_M")
Q4_K_M = Precision("q4_k_m", "q4_k_m", ("gguf_q4_k_m",), 144 / 256, "", "", "", gguf_ftype="MOSTLY_Q4_K_M")
ALL = (FLOAT32, FLOAT16, BFLOAT16, FLOAT8, FP8, INT8, INT8_WO, INT4, NVFP4, Q8_0, Q6_K, Q5_K_M, Q4_K_M)
# what a GGUF is written in: floats directly, the rest by llama.cpp's quantizer
GGUF = (FLOAT32, FLOAT16, BFLOAT16, Q8_0, Q6_K, Q5_K_M, Q4_K_M)
QUANTIZED = (FP8, INT8, INT8_WO, INT4, NVFP4)
# what weights can be sliced to and planned with, best first (FLOAT8 is a raw cast, not offered for weights)
WEIGHTS = (BFLOAT16, FLOAT16, FLOAT32)
# What `elastic plan --precision` takes for the weights (a float one is also the base precision of every
# unquantized tensor; a quantized one keeps the base float for those). WEIGHTS stays what slicing writes.
# llama.cpp's quantized types, best first (what the planner tries on llama.cpp after the float precision)
GGUF_QUANTIZED = (Q8_0, Q6_K, Q5_K_M, Q4_K_M)
PLAN_WEIGHTS = (BFLOAT16, FLOAT16, FLOAT32, FP8, NVFP4, INT8, INT8_WO, INT4, *GGUF_QUANTIZED)
# The order the planner tries quantized weights in when nothing pins them, after the device's float
# precision: fp8 (8-bit, per-tensor scales), then nvfp4 (Blackwell's native 4-bit format, fp8 scales per
# 16 elements), int8 SmoothQuant (W8A8), int4 AWQ (W4A16, group 128). Never below int4 unless pinned;
# int8_wo (weight-only, the same bytes as int8) only when pinned.
QUANT_RANKING = (FP8, NVFP4, INT8, INT4)
# what the attention KV cache can be held in (float32 only with float32 weights)
KV = (BFLOAT16, FLOAT16, FP8, FLOAT32)
# what the Mamba SSM state can be held in (float32 unless asked: it accumulates over the whole sequence)
STATE = (FLOAT32, BFLOAT16, FLOAT16)
# what ONNX graphs are written in (TensorRT builds fp16/bf16 engines from float32 graphs)
GRAPHS = (FLOAT32, FLOAT16)
# what TensorRT engines are built in
ENGINES = (BFLOAT16, FLOAT16, FLOAT32)

_BY_SPELLING = {s.lower(): p for p in ALL for s in p.spellings}


def lookup(text: str, allowed: tuple[Precision, ...] = ALL, what: str = "precision") -> Precision:
    """The precision a spelling names ("bf16", "BFloat16", "half", ...).

    Raises:
        ConfigError: unknown spelling, or one this use does not take (the message lists what it takes).
    """
    p = _BY_SPELLING.get(str(text).strip().lower())
    if p is None or p not in allowed:
        names = ", ".join(f"{q.name} ({'/'.join(q.spellings[1:])})" for q in allowed)
        why = "unknown" if p is None else "not available here"
        raise ConfigError(f"{what} {text!r} is {why}; use one of {names}")
    return p


def spellings(allowed: tuple[Precision, ...], *extra: str) -> list[str]:
    """Every accepted spelling of ``allowed``, plus ``extra`` words such as "auto" or "keep"."""
    return [*extra, *(s for p in allowed for s in p.spellings)]


def by_safetensors(code: str) -> Precision | None:
    return next((p for p in ALL if p.safetensors == code), None)


def supported(p: Precision, device) -> bool:
    """Whether ``device`` (a Target, a DeviceProfile or a detected Device: anything with a
    ``caps`` capability set) runs ``p``; a device without one runs only what needs nothing."""
    caps = getattr(device, "caps", None)
    return p.needs is None if caps is None else caps.runs(p.short)


def choose(requested: str | None, device, allowed: tuple[Precision, ...] = WEIGHTS) -> tuple[Precision, str | None]:
    """The precision to use on ``device`` and a note when it differs from the request.

    ``None``/"auto": the first of ``allowed`` the device runs (bfloat16, float16, float32). An
    explicit precision the device lacks falls back the same way, with a note saying so.
    """
    name = getattr(device, "name", "this device")
    if requested in (None, AUTO):
        for p in allowed:
            if supported(p, device):
                return p, None if p is allowed[0] else f"{name} has no {allowed[0].name}: using {p.name}"
        return FLOAT32, f"{name} runs none of {', '.join(p.name for p in allowed)}: using float32"
    p = lookup(requested, allowed)
    if supported(p, device):
        return p, None
    fallback, _ = choose(AUTO, device, allowed)
    return fallback, f"{name} has no {p.name} support: falling back to {fallback.name}"
