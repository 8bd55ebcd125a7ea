"""What llama.cpp's runtime can hold, decided without torch or llama.cpp: the rules ``elastic export
--format gguf`` refuses by (before writing) and the slice manifest's llama.cpp entry says.

Checked against llama.cpp 0c1e57098 (the one llama-cpp-python 0.3.36 vendors): ``src/models/nemotron-h.cpp``
reads one SSM shape and one attention head count for every layer, ``feed_forward_length`` per layer,
one ``expert_count`` and one shared-expert width; a model with no attention layer aborts in its KV
cache (``GGML_ASSERT(buffer)``); in ``nemotron_h_moe`` every FFN layer is MoE.
"""

from __future__ import annotations

import json
from pathlib import Path

from elastic.slicer.errors import ConfigError

LLAMA_CPP = "llama.cpp 0c1e57098 (llama-cpp-python 0.3.36)"


def gguf_arch(arch) -> str:
    """The llama.cpp architecture a model is written as: ``nemotron_h_moe`` when it has MoE layers."""
    return "nemotron_h_moe" if any(layer.kind == "moe" for layer in arch.layers) else "nemotron_h"


def gguf_problems(arch) -> list[str]:
    """Why llama.cpp's runtime cannot hold this model (empty: it can), every reason collected."""
    kinds = [layer.kind for layer in arch.layers]
    problems = []
    if "attention" not in kinds:
        problems.append("it has no attention layer: llama.cpp aborts on such a model (GGML_ASSERT(buffer) in its KV "
                        "cache, src/llama-kv-cache.cpp); slice a budget that keeps one")
    if not arch.uniform("mamba"):
        problems.append("its Mamba layers differ in heads or head size: llama.cpp reads one SSM shape for every "
                        "layer (ssm.inner_size, ssm.time_step_rank; src/models/nemotron-h.cpp)")
    if not arch.uniform("attention"):
        problems.append("its attention layers differ in heads: llama.cpp's nemotron_h reads one attention.head_count")
    if "moe" in kinds and "mlp" in kinds:
        problems.append("it mixes MLP and MoE layers: in nemotron_h_moe every FFN layer is MoE (n_expert != 0)")
    moe = [layer for layer in arch.layers if layer.kind == "moe"]
    if len({layer.n_routed_experts for layer in moe}) > 1:
        problems.append("its MoE layers keep different numbers of experts: llama.cpp reads one expert_count")
    if len({layer.moe_shared_expert_intermediate_size for layer in moe}) > 1:
        problems.append("its shared experts differ in width: llama.cpp reads one expert_shared_feed_forward_length")
    if arch.use_bias:
        problems.append("its Mamba in_proj/out_proj have biases, which llama.cpp's nemotron_h has no tensor for")
    return problems


def pre_tokenizer_type(tok: dict, path: Path) -> str:
    """llama.cpp's pre-tokenizer type for a tokenizer.json, read from its own pre-tokenizer definition.

    GPT-2's byte-level pre-tokenizer (``ByteLevel`` with its built-in regex, no prefix space) is
    llama.cpp's ``gpt-2`` (``LLAMA_VOCAB_PRE_TYPE_GPT2``, src/llama-vocab.cpp). Any other definition
    is refused with what it is: llama.cpp's converter identifies those by a hash of the tokenizer's
    output, which needs the tokenizer's own entry in llama.cpp.
    """
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"
    what = pre.get("type") or "none"
    if what == "Sequence":
        what = "Sequence of " + ", ".join(p.get("type", "?") for p in pre.get("pretokenizers") or [])
    raise ConfigError(f"its pre-tokenizer ({what}) is not GPT-2's byte-level one, the only definition elastic maps "
                      "to a llama.cpp pre-tokenizer type by itself; convert it with llama.cpp's "
                      "convert_hf_to_gguf.py, which knows registered tokenizers by their hash", path=str(path))


def gguf_tokenizer_problem(root: Path) -> str | None:
    """Why ``root``'s tokenizer cannot go into a GGUF (None: it can): no tokenizer.json, not a BPE, or
    a pre-tokenizer llama.cpp has no type for (:func:`pre_tokenizer_type`)."""
    path = Path(root) / "tokenizer.json"
    if not path.is_file():
        return "no tokenizer.json: a GGUF carries its tokenizer"
    try:
        tok = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"tokenizer.json cannot be read ({e})"
    kind = (tok.get("model") or {}).get("type")
    if kind != "BPE":
        return f"the tokenizer is {kind!r}, not a BPE: only byte-level BPE tokenizers are written to GGUF here"
    try:
        pre_tokenizer_type(tok, path)
    except ConfigError as e:
        return e.message
    return None
