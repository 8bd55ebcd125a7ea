"""llama.cpp: a slice as one GGUF file, written with llama.cpp's own writer (the ``gguf`` package)
and, for the K-quants, quantized by llama.cpp's own quantizer (``llama_model_quantize``).

What llama.cpp's runtime reads for Nemotron-H (llama.cpp 0c1e57098, vendored by llama-cpp-python
0.3.36; ``src/models/nemotron-h.cpp``):
- one SSM shape for every Mamba layer (``ssm.conv_kernel``, ``ssm.inner_size``, ``ssm.state_size``,
  ``ssm.time_step_rank`` = heads, ``ssm.group_count``); a layer is Mamba iff its
  ``attention.head_count_kv`` and ``feed_forward_length`` entries are both 0;
- ``feed_forward_length`` per layer (``get_key_or_arr``): MLP widths may differ per layer (NVIDIA's
  Puzzle form); ``attention.head_count`` one value, ``head_count_kv`` per layer;
- ``nemotron_h_moe``: every FFN layer is MoE (``n_expert != 0``), ``expert_feed_forward_length``
  per layer, one ``expert_count`` and one shared-expert width; sigmoid routing with
  ``exp_probs_b``, ``expert_group_count``/``expert_group_used_count``, ``expert_weights_norm``,
  ``expert_weights_scale``;
- tensors as its converter names them (``conversion/nemotron.py``: ``A_log`` -> ``ssm_a`` = -exp,
  ``conv1d`` squeezed, the gated norm as (groups, channels), experts stacked per layer), with 1-D
  tensors, norms, ``ssm_conv1d``, ``ssm_a``/``ssm_d`` and the router kept in float32
  (``conversion/base.py``, the rule ``llama_model_quantize`` applies too).
A model without any attention layer aborts in llama.cpp (``GGML_ASSERT(buffer)`` in its KV cache).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from elastic.profiles.progress import Progress, quiet
from elastic.slicer.errors import ConfigError, ElasticError, Hint, MissingDependencyError
from elastic.slicer.formats.llama_cpp import (LLAMA_CPP, gguf_arch, gguf_problems, gguf_tokenizer_problem,
                                              pre_tokenizer_type)
from elastic.slicer.formats.precision import GGUF, Precision, lookup
from elastic.slicer.planning.memory import gguf_quantized

MANIFEST = "gguf_manifest.json"
# llama.cpp's tokenizer.ggml.token_type values (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def require_gguf():
    """The ``gguf`` package (llama.cpp's writer), or a clear error."""
    try:
        import gguf
    except ImportError:
        raise MissingDependencyError('writing a GGUF needs the gguf package: pip install -e ".[gguf]"') from None
    return gguf


def require_llama_cpp():
    """llama-cpp-python's bindings (llama.cpp's quantizer and runtime), or a clear error."""
    try:
        import llama_cpp
    except ImportError:
        raise MissingDependencyError('llama.cpp is not installed here: pip install -e ".[gguf]" (builds '
                                     "llama-cpp-python from source, a few minutes)") from None
    return llama_cpp


def cpu_has_amx() -> bool:
    """Whether this CPU has Intel AMX (``amx_int8`` in /proc/cpuinfo; False where there is none)."""
    try:
        return " amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def open_llama(llama_cpp, **kwargs):
    """``llama_cpp.Llama(**kwargs)``, without llama.cpp's extra weight buffer types (AMX, repacked
    weights) on a CPU with AMX. There llama.cpp 0c1e57098 (llama-cpp-python 0.3.36) crashed with a
    segmentation fault in ``llama_decode`` on q4_k_m GGUFs (the bundled demo's, and
    bench/plan_accuracy.py's S of 47M parameters; a Xeon with amx_int8); they decode with
    ``use_extra_bufts`` off, and decoded with it on where the CPU had no AMX. The bindings' constructor
    takes no such argument: it reads ``llama_model_default_params()``, which is wrapped for the call."""
    if not cpu_has_amx():
        return llama_cpp.Llama(**kwargs)
    low = llama_cpp.llama_cpp
    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    try:
        return llama_cpp.Llama(**kwargs)
    finally:
        low.llama_model_default_params = default


def gguf_name(p: Precision) -> str:
    """llama.cpp's word for a GGUF precision: f32, f16, bf16, q8_0, ..., q4_k_m."""
    return {"ALL_F32": "f32", "MOSTLY_F16": "f16", "MOSTLY_BF16": "bf16"}.get(p.gguf_ftype, p.short)


@dataclass(frozen=True)
class GgufResult:
    """What :func:`export_gguf` wrote."""

    out: Path
    file: Path
    precision: str  # the GGUF precision asked for ("q4_k_m")
    arch: str  # "nemotron_h" | "nemotron_h_moe"
    bytes: int
    tokenizer_pre: str
    tensor_types: dict[str, int] = field(default_factory=dict)  # GGML type name -> tensors of that type
    fallbacks: dict[str, str] = field(default_factory=dict)  # tensor -> the type llama.cpp used instead

    def to_json(self) -> dict[str, Any]:
        return {"format": "gguf", "out": str(self.out), "file": str(self.file), "precision": self.precision,
                "architecture": self.arch, "bytes": self.bytes, "tokenizer_pre": self.tokenizer_pre,
                "tensor_types": self.tensor_types, "fallbacks": self.fallbacks, "llama_cpp": LLAMA_CPP,
                "next": f"elastic generate {self.file} \"Hello\" --backend llama.cpp"}


def export_gguf(model_dir: str | Path, out: str | Path, *, precision: str | None = None, force: bool = False,
                progress: Progress | None = None) -> GgufResult:
    """Write a dense slice (``elastic slice``: stock, Puzzle or MoE form; float or quantized) as one
    GGUF file that llama.cpp runs.

    Args:
        model_dir: the slice directory (quantized sources are dequantized first, one Linear at a time).
        out: the output directory (new, or with ``force`` an empty one or one elastic wrote).
        precision: f32, f16, bf16 (written directly) or q8_0, q6_k, q5_k_m, q4_k_m (any spelling;
            llama.cpp quantizes a float GGUF); None: the slice's own float dtype.
        progress: ``progress(stage, done, total, message=...)``: "write gguf" (tensors), "quantize gguf".

    Returns:
        A :class:`GgufResult`; ``fallbacks`` names the tensors llama.cpp quantized to another type
        than asked (K-quants need rows that are multiples of 256).

    Raises:
        ConfigError: a model llama.cpp cannot hold, or a tokenizer it cannot take (before writing).
        MissingDependencyError: gguf (or, for the K-quants, llama-cpp-python) is not installed.

    Example:
        >>> export_gguf("./model-75", "./gguf-75", precision="q4_k_m").file
        PosixPath('gguf-75/model-q4_k_m.gguf')
    """
    from elastic.slicer.storage.reader import Checkpoint
    from elastic.slicer.storage.writer import ShardedWriter

    from .weights import checkpoint_source

    gguf = require_gguf()
    ckpt = Checkpoint.open(model_dir, require_weights=True)
    want = lookup(precision, GGUF, "GGUF precision") if precision else _source_precision(ckpt)
    problems = gguf_problems(ckpt.arch)
    if problems:
        raise ConfigError("llama.cpp cannot run this model; nothing was written", problems=problems,
                          path=str(model_dir))
    vocab = read_vocab(ckpt.root, ckpt.arch.vocab_size)  # refused before writing, like the model
    if gguf_quantized(want):  # llama.cpp's own quantizer makes it
        require_llama_cpp()
    name = f"model-{gguf_name(want)}.gguf"
    say = progress or quiet
    with ShardedWriter(out, force=force, source_files=[p for p in ckpt.root.iterdir() if p.is_file()],
                       kind="gguf") as w:
        float_p = _intermediate(ckpt) if gguf_quantized(want) else want
        first = w.tmp / (name if float_p is want else f".float-{gguf_name(float_p)}.gguf")
        write_float_gguf(ckpt, first, float_p, vocab, checkpoint_source(ckpt, fold_smoothing=True), gguf, say)
        if float_p is not want:
            say("quantize gguf", 0, None, message=f"llama.cpp quantizing to {gguf_name(want)}")
            quantize_gguf(first, w.tmp / name, want)
            first.unlink()
        types, fallbacks = tensor_report(w.tmp / name, want)
        result = GgufResult(Path(out), Path(out) / name, gguf_name(want), gguf_arch(ckpt.arch),
                            (w.tmp / name).stat().st_size, vocab.pre, types, fallbacks)
        w.add_json(MANIFEST, {**result.to_json(), "source": str(Path(model_dir).resolve()),
                              "parameters": ckpt.arch.param_counts()["total"]})
    return result


def _source_precision(ckpt) -> Precision:
    """The GGUF float precision of a slice's own dtype (a quantized source: bfloat16)."""
    dtype = ckpt.dtype if ckpt.quant is None else "bfloat16"
    return lookup({"float32": "f32", "float16": "f16"}.get(dtype or "", "bf16"), GGUF)


def _intermediate(ckpt) -> Precision:
    """The float GGUF llama.cpp quantizes from: float32 for a float32 slice (nothing rounded twice),
    else bfloat16 (the slice's own precision, half the temporary disk)."""
    return lookup("f32" if ckpt.dtype == "float32" and ckpt.quant is None else "bf16", GGUF)


# ---------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    types: list[int]
    pre: str  # llama.cpp's pre-tokenizer name


def read_vocab(root: Path, vocab_size: int) -> Vocab:
    """The byte-level BPE vocabulary of ``root/tokenizer.json`` as llama.cpp's ``gpt2`` tokenizer
    model holds it (ids without a token become ``[PAD{i}]``, unused).

    Raises:
        ConfigError: no tokenizer.json, not a byte-level BPE, more tokens than the model's
            vocabulary, or a pre-tokenizer llama.cpp has no type for.
    """
    path = root / "tokenizer.json"
    problem = gguf_tokenizer_problem(root)
    if problem:
        raise ConfigError(f"{problem}; nothing was written", path=str(path))
    tok = json.loads(path.read_text())
    model = tok["model"]
    pre = pre_tokenizer_type(tok, path)
    vocab = dict(model.get("vocab") or {})
    added = {t["id"]: t for t in tok.get("added_tokens") or []}
    for i, t in added.items():
        vocab[t["content"]] = i
    top = max(vocab.values(), default=-1)
    if top >= vocab_size:
        raise ConfigError(f"the tokenizer has token id {top} but the model's vocabulary is {vocab_size}",
                          path=str(path))
    by_id = {i: s for s, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(CONTROL if added[i].get("special") else USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(NORMAL)
    return Vocab(tokens, types, pre)


def _add_vocab(writer, root: Path, vocab: Vocab, gguf) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    # merges, bos/eos/unk/pad ids and add_bos/add_eos, read by llama.cpp's own gguf package
    gguf.SpecialVocab(root, load_merges=True, n_vocab=len(vocab.tokens)).add_to_gguf(writer)


# ---------------------------------------------------------------- metadata and tensors


def _add_hparams(writer, arch, name: str, gguf) -> None:
    """The model's keys, as llama.cpp's nemotron_h loader reads them (see the module docstring)."""
    layers = arch.layers
    mamba = next((layer for layer in layers if layer.kind == "mamba"), None)
    attn = next(layer for layer in layers if layer.kind == "attention")
    moe = [layer for layer in layers if layer.kind == "moe"]
    writer.add_name(name)
    writer.add_block_count(len(layers))
    writer.add_context_length(int(arch.raw.get("max_position_embeddings") or 2**20))
    writer.add_embedding_length(arch.hidden_size)
    writer.add_vocab_size(arch.vocab_size)
    ffn = [layer.intermediate_size if layer.kind == "mlp" else layer.moe_intermediate_size if layer.kind == "moe"
           else 0 for layer in layers]
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(attn.num_attention_heads)
    writer.add_head_count_kv([layer.num_key_value_heads if layer.kind == "attention" else 0 for layer in layers])
    writer.add_key_length(arch.head_dim)
    writer.add_value_length(arch.head_dim)
    writer.add_layer_norm_eps(arch.layer_norm_epsilon)
    writer.add_layer_norm_rms_eps(arch.layer_norm_epsilon)
    if mamba is not None:
        writer.add_ssm_conv_kernel(arch.conv_kernel)
        writer.add_ssm_state_size(arch.ssm_state_size)
        writer.add_ssm_group_count(arch.n_groups)
        writer.add_ssm_inner_size(mamba.mamba_intermediate)
        writer.add_ssm_time_step_rank(mamba.mamba_num_heads)
    if moe:
        writer.add_expert_count(moe[0].n_routed_experts)
        writer.add_expert_used_count(arch.num_experts_per_tok)
        widths = {layer.moe_intermediate_size for layer in moe}
        if len(widths) == 1:
            writer.add_expert_feed_forward_length(widths.pop())
        else:  # per layer (Puzzle): llama.cpp reads it with get_key_or_arr; gguf 0.19's helper takes one int
            writer.add_array(gguf.Keys.LLM.EXPERT_FEED_FORWARD_LENGTH.format(arch=writer.arch), ffn)
        writer.add_expert_shared_feed_forward_length(moe[0].moe_shared_expert_intermediate_size)
        writer.add_expert_shared_count(1)
        writer.add_expert_weights_norm(arch.norm_topk_prob)
        writer.add_expert_weights_scale(arch.routed_scaling_factor)
        writer.add_expert_group_count(arch.n_group)
        writer.add_expert_group_used_count(arch.topk_group)
        if arch.moe_latent_size:
            writer.add_moe_latent_size(arch.moe_latent_size)


# our tensor name under backbone.layers.N. -> llama.cpp's under blk.N.
_LAYER_NAMES = {
    "norm.weight": "attn_norm.weight",
    "mixer.in_proj.weight": "ssm_in.weight", "mixer.conv1d.weight": "ssm_conv1d.weight",
    "mixer.conv1d.bias": "ssm_conv1d.bias", "mixer.A_log": "ssm_a", "mixer.D": "ssm_d",
    "mixer.dt_bias": "ssm_dt.bias", "mixer.norm.weight": "ssm_norm.weight", "mixer.out_proj.weight": "ssm_out.weight",
    "mixer.q_proj.weight": "attn_q.weight", "mixer.k_proj.weight": "attn_k.weight",
    "mixer.v_proj.weight": "attn_v.weight", "mixer.o_proj.weight": "attn_output.weight",
    "mixer.up_proj.weight": "ffn_up.weight", "mixer.down_proj.weight": "ffn_down.weight",
    "mixer.up_proj.bias": "ffn_up.bias", "mixer.down_proj.bias": "ffn_down.bias",
    "mixer.gate.weight": "ffn_gate_inp.weight", "mixer.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mixer.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mixer.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    "mixer.fc1_latent_proj.weight": "ffn_latent_down.weight", "mixer.fc2_latent_proj.weight": "ffn_latent_up.weight",
}


def gguf_tensors(arch, get: Callable[[str], Any]) -> Iterator[tuple[str, tuple[int, ...], Callable[[], Any]]]:
    """(llama.cpp name, numpy shape, a function giving the float32 numpy array) for every tensor,
    in the order llama.cpp's converter writes them; nothing is read until its function is called."""
    import torch

    def read(name: str, fn=lambda t: t):
        return lambda: fn(get(name).to(torch.float32)).contiguous().numpy()

    yield "token_embd.weight", (arch.vocab_size, arch.hidden_size), read("backbone.embeddings.weight")
    for i, layer in enumerate(arch.layers):
        ours = f"backbone.layers.{i}."
        for key, shape in arch.layer_tensor_shapes(i).items():
            if ".experts." in key:
                continue
            name, fn = f"blk.{i}.{_LAYER_NAMES[key]}", lambda t: t
            if key == "mixer.conv1d.weight":  # (C, 1, K) -> (C, K)
                shape, fn = (shape[0], shape[2]), lambda t: t.squeeze(1)
            elif key == "mixer.A_log":  # llama.cpp holds A = -exp(A_log), one column
                shape, fn = (shape[0], 1), lambda t: -torch.exp(t).reshape(-1, 1)
            elif key == "mixer.D":
                shape, fn = (shape[0], 1), lambda t: t.reshape(-1, 1)
            elif key == "mixer.norm.weight":  # the gated RMSNorm's groups
                shape, fn = (arch.n_groups, shape[0] // arch.n_groups), lambda t: t.reshape(arch.n_groups, -1)
            yield name, shape, read(ours + key, fn)
        if layer.kind == "moe":
            E, inner, Fe = layer.n_routed_experts, arch.moe_latent_size or arch.hidden_size, layer.moe_intermediate_size
            for proj, shape in (("up_proj", (E, Fe, inner)), ("down_proj", (E, inner, Fe))):
                names = [f"{ours}mixer.experts.{e}.{proj}.weight" for e in range(E)]
                yield (f"blk.{i}.ffn_{proj.split('_')[0]}_exps.weight", shape,
                       lambda names=names: torch.stack([get(n).to(torch.float32) for n in names]).numpy())
    yield "output_norm.weight", (arch.hidden_size,), read("backbone.norm_f.weight")
    if not arch.tie_word_embeddings:  # tied: llama.cpp reads token_embd for the output too
        yield "output.weight", (arch.vocab_size, arch.hidden_size), read("lm_head.weight")


def keeps_float32(name: str, shape: tuple[int, ...]) -> bool:
    """Tensors llama.cpp keeps in float32 whatever the file type (conversion/base.py's rule): 1-D ones,
    norms, anything not named ``.weight`` (ssm_a, ssm_d, biases), the conv and the MoE router."""
    return (len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight")
            or ".ssm_conv1d." in name or ".ffn_gate_inp." in name)


def write_float_gguf(ckpt, path: Path, p: Precision, vocab: Vocab, get, gguf, say: Progress) -> None:
    """Write ``path`` in float precision ``p`` (f32, f16 or bf16), one tensor in memory at a time."""
    import numpy as np

    arch = ckpt.arch
    qtype = {"ALL_F32": gguf.GGMLQuantizationType.F32, "MOSTLY_F16": gguf.GGMLQuantizationType.F16,
             "MOSTLY_BF16": gguf.GGMLQuantizationType.BF16}[p.gguf_ftype]
    writer = gguf.GGUFWriter(path, gguf_arch(arch))
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_file_type(getattr(gguf.LlamaFileType, p.gguf_ftype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hparams(writer, arch, ckpt.root.name, gguf)
    _add_vocab(writer, ckpt.root, vocab, gguf)
    tensors = list(gguf_tensors(arch, get))
    types = {}
    for name, shape, _ in tensors:
        t = gguf.GGMLQuantizationType.F32 if keeps_float32(name, shape) else qtype
        types[name] = t
        n = int(np.prod(shape))
        if t == gguf.GGMLQuantizationType.BF16:
            writer.add_tensor_info(name, (*shape[:-1], shape[-1] * 2), np.dtype(np.uint8), n * 2, raw_dtype=t)
        else:
            dt = np.dtype(np.float32 if t == gguf.GGMLQuantizationType.F32 else np.float16)
            writer.add_tensor_info(name, shape, dt, n * dt.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for k, (name, shape, load) in enumerate(tensors):
        say("write gguf", k, len(tensors), message=f"writing {path.name}")
        data = load()
        assert data.shape == tuple(shape), (name, data.shape, shape)
        writer.write_tensor_data(gguf.quants.quantize(data, types[name]))
    writer.close()
    say("write gguf", len(tensors), len(tensors), message=f"writing {path.name}")


def quantize_gguf(src: Path, dst: Path, p: Precision) -> None:
    """Quantize a float GGUF with llama.cpp's own quantizer (``llama_model_quantize``)."""
    import ctypes

    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{p.gguf_ftype}")
    params.nthread = os.cpu_count() or 1
    silence_llama_cpp(llama_cpp)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise ElasticError(f"llama.cpp's quantizer failed ({rc}) making {gguf_name(p)} from {src.name}",
                           hint=Hint("precision", "write a float GGUF (f32, f16, bf16) instead", value="f16"))


def tensor_report(path: Path, p: Precision) -> tuple[dict[str, int], dict[str, str]]:
    """(tensors per GGML type, the weights llama.cpp quantized to another type than ``p``'s main
    one), read back from the file itself. Float32 tensors llama.cpp always keeps are not fallbacks."""
    gguf = require_gguf()
    reader = gguf.GGUFReader(path)
    main = {"ALL_F32": "F32", "MOSTLY_F16": "F16", "MOSTLY_BF16": "BF16", "MOSTLY_Q8_0": "Q8_0",
            "MOSTLY_Q6_K": "Q6_K", "MOSTLY_Q5_K_M": "Q5_K", "MOSTLY_Q4_K_M": "Q4_K"}[p.gguf_ftype]
    # the _M mixes give some tensors a larger K type on purpose (llama.cpp's llama_tensor_get_type)
    mixed = {"Q5_K": {"Q6_K"}, "Q4_K": {"Q5_K", "Q6_K"}}.get(main, set())
    types: dict[str, int] = {}
    fallbacks = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        types[kind] = types.get(kind, 0) + 1
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        if kind != main and kind not in mixed and not keeps_float32(t.name, shape):
            fallbacks[t.name] = kind
    return dict(sorted(types.items())), fallbacks


_SILENT = []  # the no-op log callback handed to llama.cpp, kept alive: llama.cpp holds its pointer


def silence_llama_cpp(llama_cpp) -> None:
    """Stop llama.cpp's own log lines (its loader and quantizer print to stderr; elastic reports
    progress itself and ``--json`` owns stdout). ELASTIC_DEBUG=1 keeps them."""
    from elastic.profiles.errors import debug_enabled

    if debug_enabled() or _SILENT:
        return
    _SILENT.append(llama_cpp.llama_log_callback(lambda level, text, user: None))
    llama_cpp.llama_log_set(_SILENT[0], None)
