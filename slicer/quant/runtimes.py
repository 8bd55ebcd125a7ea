"""Which runtimes load a quantized slice (Model Optimizer's unified checkpoint), and why not: the
``runtimes`` of a quantized slice's manifest. No torch here.

A quantized slice must pass two tests: the runtime loads its config form at all (the float
slice's claim, ``elastic.slicer.formats.runtimes``), and it reads Model Optimizer checkpoints of
that ``quant_algo``. The facts, from each runtime's source:

- transformers 5.23 has no Model Optimizer quantizer: ``quantizers/auto.py`` has no
  ``"modelopt"`` in ``AUTO_QUANTIZATION_CONFIG_MAPPING``, so ``supports_quant_method`` warns
  "Unknown quantization type, got modelopt ... we will skip the quantization" and the model loads
  the stored fp8/int8 values as plain weights with their scales dropped as unexpected keys
  (checked here: wrong outputs, no error); packed int4/fp4 weights fail on their shapes.
- vLLM (``vllm/model_executor/layers/quantization/modelopt.py``): ``QUANT_ALGOS`` is FP8,
  FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, NVFP4, W4A16_NVFP4, MXFP8, MIXED_PRECISION; any other
  quant_algo raises ValueError in ``ModelOptQuantConfigBase.from_config``. ``ModelOptFp8Config``
  needs compute capability 89. Exclude names are matched after its nemotron_h
  ``hf_to_vllm_mapper`` (``backbone`` -> ``model``), exactly or as fnmatch patterns.
- SGLang (``python/sglang/srt/layers/quantization/modelopt_quant.py``): ``ModelOptFp8Config``
  ("ModelOpt only supports static FP8 quantization in SGLang") and ``ModelOptFp4Config`` (NVFP4).
- TensorRT-LLM, PyTorch backend: ``tensorrt_llm/_torch/modules/linear.py`` ``get_quant_method``
  has FP8 (QDQ), NVFP4, weight-only (W8A16) and W4A16_AWQ (group_size from the checkpoint) linear
  methods and raises "unsupported quant mode" for W8A8 SmoothQuant;
  ``tensorrt_llm/_torch/models/modeling_nemotron_h.py`` registers NemotronHForCausalLM and
  NemotronHPuzzleForCausalLM, rewrites ``backbone`` to ``model`` in exclude_modules, and sizes MLP
  layers from the global ``intermediate_size`` (an int or a per-layer list), never from
  ``block_configs``, which is where the Puzzle form keeps them.
- llama.cpp's converter reads float checkpoints. elastic's ONNX export and its GGUF writer read a
  quantized slice dequantized (checked: ONNX Runtime parity; llama.cpp generation in tests/test_gguf.py).
"""

from __future__ import annotations

from typing import Any

from elastic.slicer.formats.arch import FORM_PUZZLE, FORM_STOCK, Arch

VLLM_ALGOS = ("FP8", "NVFP4")  # of the formats elastic writes, the ones vLLM's ModelOpt loader takes
SGLANG_ALGOS = ("FP8", "NVFP4")
TRTLLM_ALGOS = ("FP8", "NVFP4", "W8A16", "W4A16_AWQ")
TRTLLM_AWQ_GROUPS = (64, 128)  # the group sizes of TensorRT-LLM's int4 weight-only GEMMs


def _yes(how: str) -> dict[str, Any]:
    return {"loads": True, "how": how}


def _no(why: str) -> dict[str, Any]:
    return {"loads": False, "why": why}


def quant_facts(config: dict) -> tuple[str, int | None]:
    """(quant_algo, group size or None) from config.json's ``quantization_config``."""
    qc = config.get("quantization_config") or {}
    algo = str(qc.get("quant_algo") or "").upper()
    group = qc.get("group_size")
    for g in (qc.get("config_groups") or {}).values():  # Model Optimizer writes it per group of targets
        group = group or ((g or {}).get("weights") or {}).get("group_size")
    return algo, group


def quantized_runtime_support(arch: Arch, config: dict, float_claims: dict[str, dict],
                              group: int | None = None) -> dict[str, dict]:
    """The ``runtimes`` of a quantized slice.

    Args:
        arch: the slice's architecture (its config form decides what TensorRT-LLM builds).
        config: the config.json written, with ``quantization_config``.
        float_claims: what ``runtime_support`` says of the same slice in float (the form's claims).
        group: the group size from hf_quant_config.json (default: what config.json says, if anything).
    """
    algo, stated = quant_facts(config)
    group = group or stated
    form = arch.config_form()
    out: dict[str, dict] = {}
    out["transformers"] = _no(
        "transformers 5.23 has no Model Optimizer quantizer: it warns 'Unknown quantization type, got modelopt', "
        "skips the quantization and reads the stored quantized values as plain weights without their scales "
        "(wrong outputs; packed int4/fp4 weights fail to load). Run it with `elastic generate` or a runtime below")

    def serving(name: str, algos: tuple[str, ...], how: str, source: str) -> dict:
        form_claim = float_claims.get(name, {"loads": False, "why": "not checked"})
        if not form_claim["loads"]:
            return form_claim
        if algo not in algos:
            return _no(f"{source} reads Model Optimizer checkpoints with quant_algo {', '.join(algos)} among the "
                       f"formats elastic writes; this slice is {algo}")
        return _yes(f"{how} (quant_algo {algo}, read from hf_quant_config.json); {form_claim['how']}")

    out["vllm"] = serving("vllm", VLLM_ALGOS, "vLLM's ModelOpt quantization (detected from the checkpoint; "
                          "FP8 needs compute capability 8.9+)", "vLLM (quantization/modelopt.py)")
    out["sglang"] = serving("sglang", SGLANG_ALGOS, "SGLang's modelopt quantization",
                            "SGLang (quantization/modelopt_quant.py)")
    if form == FORM_STOCK:
        trt_form = None
    elif form == FORM_PUZZLE:
        trt_form = ("TensorRT-LLM registers NemotronHPuzzleForCausalLM but sizes MLP layers from the global "
                    "intermediate_size, not from block_configs where the Puzzle form keeps per-layer widths")
    else:
        trt_form = "TensorRT-LLM has no NemotronHElasticForCausalLM (elastic's extension form)"
    if trt_form:
        out["tensorrt_llm"] = _no(trt_form)
    elif algo not in TRTLLM_ALGOS:
        out["tensorrt_llm"] = _no(f"TensorRT-LLM's PyTorch backend has no linear method for {algo} "
                                  "(_torch/modules/linear.py get_quant_method: 'unsupported quant mode')")
    elif algo == "W4A16_AWQ" and group not in TRTLLM_AWQ_GROUPS:
        out["tensorrt_llm"] = _no(f"AWQ group size {group}: TensorRT-LLM's int4 weight-only GEMMs take groups of "
                                  f"{' or '.join(map(str, TRTLLM_AWQ_GROUPS))} (a slice this narrow gets a "
                                  "smaller group)")
    else:
        out["tensorrt_llm"] = _yes(f"LLM(model=dir) on the PyTorch backend: NemotronHForCausalLM with quant_algo "
                                   f"{algo} from hf_quant_config.json")
    # elastic export builds its graphs from the reference model, which loads this slice dequantized
    out["onnxruntime"] = _yes("after `elastic export DIR`: ONNX graphs of the dequantized weights (stored in float: "
                              "no memory saving" + (", fp8/int8 activations quantize-dequantized in the graph)"
                                                    if algo in ("FP8", "W8A8_SQ_PER_CHANNEL") else ")"))
    out["llama.cpp converter"] = _no("llama.cpp's converter reads float checkpoints, not Model Optimizer's quantized "
                                     "layout; convert the float slice")
    # elastic's GGUF writer reads the slice through the same dequantizing source as the ONNX export
    engine = float_claims["llama.cpp"]
    out["llama.cpp"] = engine if not engine["loads"] else _yes(
        engine["how"] + "; the quantized weights are dequantized first (llama.cpp quantizes again in its own types)")
    out["elastic"] = _yes("`elastic generate DIR` / `elastic eval DIR`: the reference model dequantizes the weights "
                          + ("and simulates the quantized activations" if algo in ("FP8", "W8A8_SQ_PER_CHANNEL")
                             else "(activations in float)"))
    return out
