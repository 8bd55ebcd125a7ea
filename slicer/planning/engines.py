"""Which engine runs a budget on a device, in which weights precision and config form: the options
``elastic plan`` weighs (budget x precision x engine). No torch here.

A device's engines are its profile's ``engines``, preferred first (profiles/data/host.toml
``[engines]``: Jetson: TensorRT Edge-LLM, llama.cpp; RTX and datacenter cards: vLLM, TensorRT-LLM,
llama.cpp; the CPU host: llama.cpp). What each takes (DESIGN.md section 10):

- ``edgellm`` (TensorRT Edge-LLM): float layers in fp16 only; the quantized precisions the profile's
  ``runtimes`` table lists for it (Orin: int8, int4; Thor: fp8, nvfp4, int4), the table
  ``export.edgellm.edgellm_device`` reads too; one MLP width (the padded stock form, padded to 128
  for int4); int4 is AWQ with group 128, every quantized Linear's input a multiple of 128 and its
  output of 64; MoE layers only as nvfp4.
- ``vllm``: bf16 / fp16 / fp32; Model Optimizer checkpoints whose quant_algo vLLM reads
  (``slicer.quant.runtimes.VLLM_ALGOS``: fp8, nvfp4) where the device runs them; per-layer widths.
- ``tensorrt-llm``: bf16 / fp16 / fp32; ``TRTLLM_ALGOS`` (fp8, nvfp4, int4 AWQ with a group of 64
  or 128; int8 weight-only when pinned); one MLP width.
- ``llama.cpp``: a GGUF in the plan's float precision, then q8_0, q6_k, q5_k_m, q4_k_m; what
  ``slicer.formats.llama_cpp.gguf_problems`` refuses (no attention layer, ...) it cannot hold.

The runtime overhead of every engine is the profile's ``runtime_overhead_gib`` (the tables hold no
per-engine term): each option's ``why`` says it is an estimate.

Example:
    >>> [(o.engine, o.weights.short) for o in engine_options(child, target, pr, PLAN_WEIGHTS)]
    [('edgellm', 'fp16'), ('edgellm', 'int8'), ('edgellm', 'int4'), ('llama.cpp', 'bf16'), ...]
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from elastic.slicer.errors import ConfigError
from elastic.slicer.formats.arch import Arch
from elastic.slicer.formats.llama_cpp import gguf_problems
from elastic.slicer.formats.padding import ONE_WIDTH_RUNTIMES, portable_form
from elastic.slicer.formats.precision import (BFLOAT16, FLOAT16, FLOAT32, GGUF_QUANTIZED, INT4, INT8_WO, NVFP4,
                                              QUANT_RANKING, Precision, supported)
from elastic.slicer.quant.runtimes import TRTLLM_ALGOS, TRTLLM_AWQ_GROUPS, VLLM_ALGOS

EDGELLM_INT4_GROUP = 128  # Edge-LLM's INT4 is AWQ with groups of 128 along the input
EDGELLM_INT4_ALIGN = 64  # its default INT4 GEMM plugin needs output rows in multiples of 64


@dataclass(frozen=True)
class Engine:
    name: str  # the --runtime name (slicer.formats.padding.RUNTIMES)
    title: str  # as people and the device tables' ``runtimes`` spell it
    floats: tuple[Precision, ...]  # float weights it runs, preferred first
    algos: tuple[str, ...] | None  # Model Optimizer quant_algos it reads (None: its own rule below)

    @property
    def one_width(self) -> bool:
        """It takes one MLP width: a slice for it is written in the padded stock form."""
        return self.name in ONE_WIDTH_RUNTIMES


ENGINES = {e.name: e for e in (
    Engine("edgellm", "TensorRT Edge-LLM", (FLOAT16,), None),
    Engine("vllm", "vLLM", (BFLOAT16, FLOAT16, FLOAT32), VLLM_ALGOS),
    Engine("tensorrt-llm", "TensorRT-LLM", (BFLOAT16, FLOAT16, FLOAT32), TRTLLM_ALGOS),
    Engine("llama.cpp", "llama.cpp", (BFLOAT16, FLOAT16, FLOAT32), None),
)}


@dataclass(frozen=True)
class EngineOption:
    """One (engine, weights precision) for one budget on one target."""

    engine: str
    weights: Precision
    base: Precision  # the float precision of everything not quantized (Edge-LLM: fp16)
    arch: Arch  # as the engine loads it (padded to one MLP width where it needs one)
    form: str  # "stock" (padded where needed) or "as cut"
    refused: str | None  # why the engine cannot hold the model at this precision
    why: str


def device_engines(target) -> tuple[str, ...]:
    """The engines of ``target`` (a fit.Target), preferred first: its profile's, else its kind's."""
    names = tuple(target.engines)
    if not names:
        from elastic.profiles.devices import kind_engines

        names = kind_engines(target.kind)
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        raise ConfigError(f"the device tables name engine(s) {', '.join(unknown)} for {target.name}, which the "
                          f"planner does not know; it knows {', '.join(ENGINES)}: fix profiles/data/*.toml")
    return names


def pin_engine(name: str | None, target) -> tuple[str, ...]:
    """The engines to plan with: all of ``target``'s, or the one ``--runtime name`` pins.

    Raises:
        ConfigError: an engine the planner does not know, or one that does not run on ``target``.
    """
    names = device_engines(target)
    if name is None:
        return names
    key = name.strip().lower()
    if key not in ENGINES:
        raise ConfigError(f"unknown runtime {name!r}; the planner knows {', '.join(ENGINES)}: choose one of "
                          f"{target.name}'s engines ({', '.join(names)}) with --runtime")
    if key not in names:
        raise ConfigError(f"{ENGINES[key].title} does not run on {target.name} ({target.kind}): its engines are "
                          f"{', '.join(names)}; choose one of them with --runtime, or leave --runtime out")
    return (key,)


def _quantized(e: Engine, target, pinned: bool) -> tuple[Precision, ...]:
    """The quantized weights ``e`` runs on ``target``, best first."""
    if e.name == "llama.cpp":
        return GGUF_QUANTIZED
    if e.name == "edgellm":  # the device table's word, as export.edgellm reads it
        return tuple(q for q in QUANT_RANKING if e.title in target.runtimes.get(q.short, ()))
    ranking = (*QUANT_RANKING, INT8_WO) if pinned else QUANT_RANKING  # int8 weight-only only when asked
    return tuple(q for q in ranking if q.quant_algo in e.algos and supported(q, target))


def engine_precisions(e: Engine, target, base: Precision, pinned: tuple[Precision, ...] | None) -> tuple[Precision, ...]:
    """The weights precisions ``e`` is planned at on ``target``: its float one (the plan's ``base``
    where the engine runs it, else its own), then its quantized ones; only ``pinned`` when given."""
    floats = tuple(f for f in e.floats if supported(f, target) or e.name == "llama.cpp")
    runs = (*floats, *_quantized(e, target, pinned is not None))
    if pinned is not None:
        return tuple(p for p in pinned if p in runs)
    first = base if base in floats else floats[0]
    return (first, *_quantized(e, target, False))


def _edgellm_problem(arch: Arch, p: Precision) -> str | None:
    """What Edge-LLM refuses of ``arch`` at ``p`` (beyond one MLP width), or None."""
    from elastic.slicer.planning.memory import _quantized_linear

    if any(layer.kind == "moe" for layer in arch.layers) and p is not NVFP4:
        return f"TensorRT Edge-LLM runs Nemotron-H MoE experts only as NVFP4, not {p.short}"
    if p is INT4:
        bad = [f"{name} {shape}" for name, shape in arch.tensor_shapes().items() if _quantized_linear(name)
               and (shape[-1] % EDGELLM_INT4_GROUP or shape[-2] % EDGELLM_INT4_ALIGN)]
        if bad:
            return (f"TensorRT Edge-LLM's int4 (AWQ group {EDGELLM_INT4_GROUP}) needs Linear inputs in multiples of "
                    f"{EDGELLM_INT4_GROUP} and outputs of {EDGELLM_INT4_ALIGN}: " + ", ".join(bad[:3])
                    + (" ..." if len(bad) > 3 else ""))
    return None


def _problem(e: Engine, arch: Arch, p: Precision) -> str | None:
    """Why ``e`` cannot hold ``arch`` (as it loads it) at ``p``, or None."""
    from elastic.slicer.planning.memory import block_problem

    if e.name == "llama.cpp":
        problems = gguf_problems(arch)
        return "llama.cpp: " + "; ".join(problems) if problems else None
    if e.name == "edgellm":
        why = _edgellm_problem(arch, p)
        if why:
            return why
    if e.name == "tensorrt-llm" and p is INT4:
        from elastic.slicer.planning.memory import _int4_group, int4_hidden

        group = _int4_group(arch.with_layers(arch.layers, int4_hidden(arch)).tensor_shapes())
        if group not in TRTLLM_AWQ_GROUPS:
            return (f"AWQ group {group}: TensorRT-LLM's int4 GEMMs take groups of "
                    f"{' or '.join(map(str, TRTLLM_AWQ_GROUPS))}")
    return block_problem(arch, p.name)


def engine_option(name: str, child: Arch, p: Precision, base: Precision, target) -> EngineOption:
    """Engine ``name`` running ``child`` (a budget as cut) at ``p`` on ``target``."""
    e = ENGINES[name]
    arch, form, refused = child, "as cut", None
    if e.one_width:
        multiple = EDGELLM_INT4_GROUP if (e.name == "edgellm" and p is INT4) else None
        try:
            port = portable_form(child, "stock", pad_multiple=multiple, runtime=name)
            arch, form = port.arch, "stock" + (f", +{port.cost():,} zero parameters of padding" if port.pads else "")
        except ConfigError as err:
            refused = f"{e.title} takes one size per layer kind: {err.message}"
    refused = refused or _problem(e, arch, p)
    where = "the CPU host" if target.kind == "cpu" else target.name
    why = (f"{e.title}: {p.short} on {where} ({form}{_int4_padding(arch, p, base)}; overhead: the profile's "
           f"estimate, not measured for {e.title})")
    return EngineOption(name, p, base if (p.quantized or p in GGUF_QUANTIZED) else p, arch, form, refused, why)


def _int4_padding(arch: Arch, p: Precision, base: Precision) -> str:
    """", hidden 56 zero-padded to 64 for int4 AWQ group 64 (8 as cut)" when the int4 slice pads (else "")."""
    if p is not INT4:
        return ""
    from elastic.slicer.planning.memory import _int4_group, int4_hidden

    d = int4_hidden(arch, base.name)
    if d == arch.hidden_size:
        return ""
    as_cut, padded = _int4_group(arch.tensor_shapes()), _int4_group(arch.with_layers(arch.layers, d).tensor_shapes())
    return (f", hidden {arch.hidden_size} zero-padded to {d} for int4 AWQ group {padded} ({as_cut} as cut: its "
            "scales would outweigh the 4-bit savings)")


def engine_options(child: Arch, target, base: Precision, allowed: tuple[Precision, ...],
                   pinned: tuple[Precision, ...] | None = None, runtime: str | None = None) -> list[EngineOption]:
    """Every (engine, precision) to plan ``child`` at on ``target``, preferred first: the device's
    engines in order (or the ``runtime`` pinned), each at its precisions best first
    (:func:`engine_precisions`), those ``allowed`` only."""
    out = []
    for name in pin_engine(runtime, target):
        e = ENGINES[name]
        own = FLOAT16 if e.name == "edgellm" else base  # Edge-LLM computes its float layers in fp16
        for p in engine_precisions(e, target, base, pinned):
            if p in allowed:
                out.append(engine_option(name, child, p, own, target))
    return out


def with_base(pr, base: Precision):
    """Plan precisions ``pr`` (fit.Precisions) with the float base ``base`` (a KV cache that followed
    the base follows it)."""
    if base is pr.base:
        return pr
    return replace(pr, base=base, kv=base if pr.kv is pr.base else pr.kv)
