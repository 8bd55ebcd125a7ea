"""Which runtimes load a slice, and why not: the ``runtimes`` of ``slice_manifest.json``.

Each rule is what that runtime's source does with the config form the slice is written in
(``Arch.config_form``); docs/runtime-facts.md holds the facts with file and line, and the claims
are checked against the real clients where they run here: transformers and llama.cpp's converter
(tests/test_runtimes.py, bench/llama_cpp_check.py). No torch here.

Example:
    >>> runtime_support(child_arch, config, tokenizer_config, llama_cpp_tokenizer(root / "tokenizer.json"))
    {"transformers": {"loads": True, "how": ...}, "vllm": {...}, "sglang": {...}, "llama.cpp": {...}}
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from elastic.slicer.formats.arch import FORM_EXTENSION, FORM_PUZZLE, FORM_STOCK, Arch
from elastic.slicer.formats.llama_cpp import LLAMA_CPP, gguf_arch, gguf_problems

LLAMA_CPP_TOKENIZERS = Path(__file__).parent / "llama_cpp_tokenizers.json"
LLAMA_CPP_HOW = ("convert_hf_to_gguf.py, run with the transformers llama.cpp pins (4.57.6: transformers 5 adds MoE "
                 "defaults to the config and the converter then writes a MoE model)")
# transformers 5.23's generate() asks the cache's attention layers for the mask sizes (checked on CPU)
NO_ATTENTION_GENERATE = (
    "; without an attention layer its generate() fails in transformers 5.23 (ValueError: get_mask_sizes can only "
    "be called on Attention layers: the cache asks an attention layer for the mask sizes); a plain forward "
    "works (use_cache=False), or slice a budget that keeps an attention layer")
REMOTE_CODE_TOKENIZER = (
    "; AutoTokenizer needs trust_remote_code=True as well (transformers 5 loads the model config before the "
    "tokenizer and asks before running a config class it does not know), or load the tokenizer with "
    "PreTrainedTokenizerFast.from_pretrained(dir)")


# what each runtime does with a slice that ships no tokenizer (no tokenizer.json, tokenizer.model,
# or vocab.json + merges.txt): none of them can turn text into its token ids or back
NO_TOKENIZER = {
    "transformers": "no tokenizer: the model loads, AutoTokenizer fails; token ids in and out only",
    "vllm": "no tokenizer: vLLM loads one when it starts; serve with --skip-tokenizer-init for token ids in and out "
            "only",
    "sglang": "no tokenizer: sglang loads one when it starts; launch with --skip-tokenizer-init for token ids in and "
              "out only",
    "onnxruntime": "no tokenizer: the graphs run on token ids only (`elastic generate` refuses it)",
}
NO_TOKENIZER_GGUF = "no tokenizer: llama.cpp's converter writes the GGUF vocabulary from the tokenizer files"


def without_tokenizer(runtimes: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``runtimes`` for a slice without a tokenizer: no entry claims text; llama.cpp cannot convert it."""
    out = {}
    for name, r in runtimes.items():
        if name not in NO_TOKENIZER:
            if not r["loads"] and "no tokenizer" in r["why"]:  # said already (llama.cpp itself)
                out[name] = r
            else:
                out[name] = _no(f"{r['why']}; {NO_TOKENIZER_GGUF}" if not r["loads"] else NO_TOKENIZER_GGUF)
        elif r["loads"]:
            out[name] = {**r, "how": f"{r['how']}; {NO_TOKENIZER[name]}", "text": False}
        else:
            out[name] = r
    return out


def llama_cpp_tokenizer(tokenizer_json: Path | None) -> dict | None:
    """What bench/llama_cpp_check.py observed of this tokenizer with llama.cpp's converter, if anything."""
    if tokenizer_json is None or not tokenizer_json.is_file():
        return None
    known = json.loads(LLAMA_CPP_TOKENIZERS.read_text())
    entry = known["tokenizers"].get(hashlib.sha256(tokenizer_json.read_bytes()).hexdigest())
    return None if entry is None else {**entry, "llama_cpp": known["llama_cpp"]}


def _yes(how: str) -> dict[str, Any]:
    return {"loads": True, "how": how}


def _no(why: str) -> dict[str, Any]:
    return {"loads": False, "why": why}


def llama_cpp_support(arch: Arch, gguf_tokenizer: str | None) -> dict[str, Any]:
    """llama.cpp itself, through elastic's own GGUF writer (``elastic export --format gguf``): the
    runtime's rules (:func:`elastic.slicer.formats.llama_cpp.gguf_problems`) and the tokenizer's."""
    problems = gguf_problems(arch) + ([gguf_tokenizer] if gguf_tokenizer else [])
    if problems:
        return _no("; ".join(problems))
    return _yes(f"after `elastic export DIR --format gguf` ({gguf_arch(arch)}; f32/f16/bf16, or q8_0/q6_k/q5_k_m/"
                f"q4_k_m made by llama.cpp's quantizer; {LLAMA_CPP})")


def _transformers(form: str) -> dict[str, Any]:
    """transformers' answer for a slice written in config form ``form``."""
    # transformers 5: nemotron_h is built in; the other two forms are classes only the shipped files
    # define, which AutoConfig runs only with trust_remote_code (configuration_auto.py, from_pretrained)
    if form == FORM_STOCK:
        return _yes("AutoModelForCausalLM / NemotronHForCausalLM, stock nemotron_h config, no remote code")
    name = "NVIDIA's Puzzle form (per-layer MLP widths)" if form == FORM_PUZZLE else \
        "elastic's extension form (per-layer Mamba/attention sizes)"
    return _yes(f"AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True): {name}, "
                "modeling file included" + REMOTE_CODE_TOKENIZER)


def _vllm(form: str) -> dict[str, Any]:
    """vLLM's answer for a slice written in config form ``form``."""
    # vLLM 0.33: architectures[0] NemotronHPuzzleForCausalLM is registered to the nemotron_h model
    # (model_executor/models/registry.py:186-187); a model_type vLLM has no class for goes through
    # AutoConfig with its --trust-remote-code (transformers_utils/config.py:342-470); per-layer sizes
    # come from get_nemotron_h_config_for_layer for MLP/MoE/attention layers, never for Mamba
    # layers (model_executor/models/nemotron_h.py:278-313, 377-402)
    if form == FORM_STOCK:
        return _yes("nemotron_h")
    if form == FORM_PUZZLE:
        return _yes("NemotronHPuzzleForCausalLM (vLLM's nemotron_h model, per-layer MLP widths through "
                    "get_nemotron_h_config_for_layer); serve with --trust-remote-code, vLLM has no config class "
                    "for nemotron_h_puzzle")
    return _no("NemotronHElasticForCausalLM (per-layer Mamba/attention sizes) is elastic's extension, not "
               "an architecture vLLM registers; vLLM's nemotron_h model sizes every Mamba layer from the "
               "global mamba_num_heads/mamba_head_dim. Slice a budget with one Mamba and attention size "
               "(train without --per-layer-mamba)")


def _sglang(form: str) -> dict[str, Any]:
    """sglang's answer for a slice written in config form ``form``."""
    # sglang 0.5.23: MLP layers read the global intermediate_size (srt/models/nemotron_h.py:529-561),
    # and its Puzzle loader sizes experts with max() over moe blocks, which fails without one
    # (srt/configs/nemotron_h.py:550-559); Mamba sizes are global (:425-439)
    if form == FORM_STOCK:
        return _yes("nemotron_h")
    if form == FORM_PUZZLE:
        return _no("sglang builds MLP layers from the global intermediate_size (it does not read per-layer "
                   "MLP widths from block_configs), and its Puzzle loader needs at least one MoE block")
    return _no("sglang takes one global Mamba size and one global FFN width; this slice has per-layer "
               "sizes (elastic's extension form)")


def _onnxruntime(arch: Arch) -> dict[str, Any]:
    """ONNX Runtime's answer: the graphs of ``elastic export``, which does not trace MoE layers."""
    # ONNX Runtime runs the graphs elastic export writes from our reference model, which builds
    # every layer at its own size whatever the form (tests/test_export.py checks it against ORT)
    if any(layer.kind == "moe" for layer in arch.layers):  # export/pipeline.py refuses them
        return _no("`elastic export` does not trace MoE layers yet (the reference model's expert "
                   "dispatch depends on the tokens)")
    return _yes("after `elastic export DIR`: ONNX prefill/decode graphs with explicit state")


def _llama_cpp_converter(arch: Arch, form: str, config: dict, tokenizer_config: dict | None,
                         tokenizer: dict | None) -> dict[str, Any]:
    """llama.cpp's converter's answer (convert_hf_to_gguf.py): the form, Mamba sizes and the tokenizer."""
    # llama.cpp (convert_hf_to_gguf.py, conversion/nemotron.py): the architecture name picks the
    # converter; NemotronHPuzzleForCausalLM is its MoE Puzzle converter (:514-596)
    reasons = []
    if form == FORM_PUZZLE:
        reasons.append("NemotronHPuzzleForCausalLM goes to the converter's MoE Puzzle model, which requires MoE keys "
                       "(KeyError: 'moe_shared_expert_intermediate_size') and writes no MLP widths; its dense "
                       "nemotron_h model takes one global FFN width")
    elif form == FORM_EXTENSION:
        reasons.append("the converter has no NemotronHElasticForCausalLM (elastic's extension form); its nemotron_h "
                       "model takes one global size per layer kind")
    head = config.get("mamba_d_head", 64)
    for layer in arch.layers:
        if layer.kind == "mamba" and layer.mamba_intermediate % head:
            reasons.append(f"mamba_num_heads * mamba_head_dim = {layer.mamba_intermediate} is not a multiple of "
                           f"mamba_d_head ({head}), which llama.cpp's converter asserts")
            break
    # transformers picks the tokenizer class from tokenizer_config.json, under llama.cpp's pinned 4.57.6
    tok_class = (tokenizer_config or {}).get("tokenizer_class")
    if tok_class not in (None, "PreTrainedTokenizerFast"):
        reasons.append(f"tokenizer_config.json's tokenizer_class {tok_class!r} is not one transformers 4.x (which "
                       "the converter runs on) knows; PreTrainedTokenizerFast is")
    if tokenizer is not None and not tokenizer["registered"]:
        reasons.append(f"the converter does not recognise this tokenizer's pre-tokenizer (chkhsh {tokenizer['chkhsh']}, "
                       f"{tokenizer['llama_cpp']}); register it with llama.cpp's convert_hf_to_gguf_update.py "
                       f"(pre-tokenizer {tokenizer['pre']!r}) before converting")
    how = LLAMA_CPP_HOW if tokenizer is not None else (
        LLAMA_CPP_HOW + "; the converter must also recognise the tokenizer's pre-tokenizer (a hash of its output), "
        "unchecked here: bench/llama_cpp_check.py checks it")
    return _no("; ".join(reasons)) if reasons else _yes(how)


def runtime_support(arch: Arch, config: dict, tokenizer_config: dict | None = None,
                    tokenizer: dict | None = None, quant_group: int | None = None,
                    has_tokenizer: bool = True, gguf_tokenizer: str | None = None) -> dict[str, dict[str, Any]]:
    """The ``runtimes`` entry of a slice's manifest: per runtime ``{"loads": True, "how": ...}`` or
    ``{"loads": False, "why": ...}``.

    Args:
        arch: the slice's architecture; its ``config_form()`` decides most answers.
        config: the config.json written (``mamba_d_head`` matters to llama.cpp; a
            ``quantization_config`` routes to ``elastic.slicer.quant.runtimes``).
        tokenizer_config: the tokenizer_config.json copied beside it, if any.
        tokenizer: :func:`llama_cpp_tokenizer`'s observation of the tokenizer, if any.
        has_tokenizer: False when the slice ships no tokenizer (see :func:`without_tokenizer`).
        gguf_tokenizer: why the tokenizer cannot go into a GGUF, if it cannot
            (:func:`elastic.slicer.formats.llama_cpp.gguf_tokenizer_problem`).
        quant_group: a quantized slice's group size (hf_quant_config.json's ``group_size``, which
            Model Optimizer 0.47 leaves out of config.json's ``quantization_config``).
    """
    form = arch.config_form()
    out: dict[str, dict[str, Any]] = {
        "transformers": _transformers(form), "vllm": _vllm(form), "sglang": _sglang(form),
        "onnxruntime": _onnxruntime(arch),
        "llama.cpp converter": _llama_cpp_converter(arch, form, config, tokenizer_config, tokenizer),
    }
    out["llama.cpp"] = llama_cpp_support(arch, gguf_tokenizer)
    if not any(layer.kind == "attention" for layer in arch.layers):
        out["transformers"] = {**out["transformers"], "how": out["transformers"]["how"] + NO_ATTENTION_GENERATE}
    if config.get("quantization_config"):  # a quantized slice: what the runtimes read of its format
        from elastic.slicer.quant.runtimes import quantized_runtime_support

        out = quantized_runtime_support(arch, config, out, group=quant_group)
    return out if has_tokenizer else without_tokenizer(out)
