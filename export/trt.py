"""TensorRT: an operator check that needs no TensorRT, and the engine build (or a ``trtexec`` script).

- :func:`check_graph` walks every node of an ONNX graph against ``tensorrt_ops.toml`` (TensorRT's
  ONNX-parser support matrix, as data): unknown or unsupported operators, data types outside the
  operator's list, inputs that must be initializers, attribute values, the opset range.
- :func:`build_or_script` builds ``prefill.engine`` / ``decode.engine`` with the TensorRT 10
  Python API where ``tensorrt`` imports and a CUDA GPU is present; elsewhere it writes
  ``build_engines.sh`` (the same build with ``trtexec``) to run on the target device. Either way
  ``engine_meta.json`` records what was (or was not) built, for which device and shapes.

Example:
    >>> report = check_export("./model-50-onnx")
    >>> report["unsupported_ops"]
    []
    >>> build_or_script("./model-50-onnx", engine_settings(get_profile("orin-nano-8gb")))["built"]
    False
"""

from __future__ import annotations

import functools
import importlib.util
import json
import shlex
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from elastic.profiles.progress import Progress, quiet
from elastic.profiles.devices import CAPABILITY_WORDS, DeviceProfile
from elastic.profiles.target import Target
from elastic.profiles.units import GIB, MIB
from elastic.slicer.errors import ElasticError, Hint
from elastic.slicer.planning.memory import DEFAULT_EXPORT_CONTEXT

from .layout import DECODE, ENGINE_META, ENGINES, PREFILL, SCRIPT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

TABLE = Path(__file__).with_name("tensorrt_ops.toml")
GENERIC, GENERIC_WORKSPACE = "generic", GIB  # no device known: generic settings, a 1 GiB workspace
MIN_WORKSPACE = 256 * MIB
DEFAULT_MAX_CONTEXT = DEFAULT_EXPORT_CONTEXT  # tokens per sequence the engines accept unless asked for more
TUNED_SEQ = 512  # the sequence length TensorRT tunes kernels for (at most half the context)

# onnx TensorProto.DataType -> the type names of TensorRT's matrix
_TYPE_NAMES = {1: "FP32", 2: "UINT8", 3: "INT8", 6: "INT32", 7: "INT64", 9: "BOOL", 10: "FP16", 11: "DOUBLE",
               16: "BF16", 17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8", 22: "INT4"}
# which tensors carry "the op's type" (default: input 0); ONNX signatures, not TensorRT facts
_TYPED_INPUTS = {"Where": (1, 2), "Range": (0,)}
_TYPED_OUTPUTS = {"Constant": (0,), "ConstantOfShape": (0,), "Cast": (0,), "CastLike": (0,), "EyeLike": (0,),
                  "RandomNormal": (0,), "RandomUniform": (0,)}
_NO_TYPED_INPUT = {"Constant", "ConstantOfShape", "RandomNormal", "RandomUniform", "Shape", "Size"}

# Q/DQ forms of a quantized export (export/qdq.py) and the TensorRT version that imports each
# (onnx-tensorrt docs/Changelog.md: per-axis Q/DQ "TensorRT 8.0"; FP8 "TensorRT 9.0 GA"; INT4
# quantization "TensorRT 10.0 EA"; docs/operators.md 10.x: DequantizeLinear INT8/FP8/INT4,
# QuantizeLinear from FP32/FP16/BF16, zero points must be 0). (op, quantized type) -> (TensorRT, form)
QDQ_SUPPORT = {
    ("QuantizeLinear", "INT8"): ("8.0", "per-tensor INT8 activations"),
    ("DequantizeLinear", "INT8"): ("8.0", "per-tensor or per-channel INT8"),
    ("QuantizeLinear", "FP8"): ("9.0", "per-tensor FP8 E4M3 activations (runs on compute capability 8.9+)"),
    ("DequantizeLinear", "FP8"): ("9.0", "per-tensor FP8 E4M3"),
    ("DequantizeLinear", "INT4"): ("10.0", "blocked INT4 weights only (block_size, opset 21)"),
}
QDQ_OPSET = 21  # opset of INT4 blocked Q/DQ graphs; TensorRT >= 10.0 imports them (see onnx_export.OPSET_RANGE)


@functools.cache
def load_op_table(path: Path | None = None) -> dict[str, Any]:
    """The operator table (``[meta]`` and ``[ops]``) from ``tensorrt_ops.toml`` (or ``path``)."""
    path = Path(path) if path is not None else TABLE
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ElasticError(f"the TensorRT operator table is unreadable ({e}); reinstall elastic", path=str(path))


def _walk(graph):
    """Every node of a graph and its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _walk(sub)


def _attr_value(attr):
    import onnx

    return onnx.helper.get_attribute_value(attr)


def check_graph(model: Any, table: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check every node of an ONNX model against TensorRT's ONNX-parser support matrix.

    Args:
        model: a path to a .onnx file (external data is not read) or an ``onnx.ModelProto``.
        table: the operator table (default: :func:`load_op_table`).

    Returns:
        ``opset``, ``opset_supported``, ``nodes``, ``ops`` (op -> count), ``unsupported`` (one entry
        per op and reason: ``op``, ``count``, ``reason``, ``nodes`` (up to three names)),
        ``notes`` (restrictions of the ops used that only a real build can check), ``ok``.
    """
    table = table or load_op_table()
    meta, ops = table["meta"], table["ops"]
    model = _with_shapes(model)
    g = model.graph
    nodes = list(_walk(g))
    types, constants = _types_and_constants(g, nodes)

    problems: dict[tuple[str, str], list[str]] = {}

    def refuse(node, reason: str) -> None:
        problems.setdefault((node.op_type, reason), []).append(node.name or node.output[0])

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    opset_ok = opset is not None and meta["min_opset"] <= opset <= meta["max_opset"]
    qdq = _check_qdq(nodes, types, constants, refuse)
    # opset 21 is taken for INT4 blocked Q/DQ graphs only (the one reason to go past the 10.x matrix's 20)
    if not opset_ok and opset == QDQ_OPSET and ("DequantizeLinear", "INT4") in qdq:
        opset_ok = True
    for node in nodes:
        _check_node(node, meta, ops, types, constants, refuse)
    for v in [*g.input, *g.output]:
        tname = _TYPE_NAMES.get(v.type.tensor_type.elem_type)
        if tname is None or tname not in meta["types"]:
            problems.setdefault(("graph I/O", f"{v.name}: type not supported by TensorRT"), []).append(v.name)

    counts = Counter(n.op_type for n in nodes)
    checked = ("const_inputs", "attrs", "forbidden_attrs", "max_outputs")
    notes = [{"op": op, "note": ops[op]["notes"]} for op in sorted(counts)
             if op in ops and ops[op].get("notes") and not any(k in ops[op] for k in checked)]
    unsupported = [{"op": op, "count": len(names), "reason": reason, "nodes": names[:3]}
                   for (op, reason), names in sorted(problems.items())]
    quantized = [{"op": op, "type": t, "count": n, "tensorrt": QDQ_SUPPORT[(op, t)][0],
                  "form": QDQ_SUPPORT[(op, t)][1]} for (op, t), n in sorted(qdq.items()) if (op, t) in QDQ_SUPPORT]
    if quantized and opset == QDQ_OPSET:
        notes.append({"op": "opset", "note": f"opset {opset} (INT4 blocked DequantizeLinear): TensorRT >= 10.0 imports "
                      f"it, beyond the {meta['table_version']} matrix's stated {meta['min_opset']}..{meta['max_opset']}"})
    return {
        "opset": opset,
        "opset_supported": opset_ok,
        "nodes": len(nodes),
        "ops": dict(sorted(counts.items())),
        "unsupported": unsupported,
        "notes": notes,
        "qdq": quantized,
        "min_tensorrt": max((q["tensorrt"] for q in quantized), default=None, key=lambda v: tuple(map(int, v.split(".")))),
        "ok": opset_ok and not unsupported,
    }


def _with_shapes(model: Any):
    """The model (loaded from a path without external data) with ONNX shape inference applied."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = load_graph(model)
    try:
        return onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as e:
        raise ElasticError(f"not a valid ONNX graph ({str(e).strip().splitlines()[0][:200]})") from None


def _types_and_constants(g, nodes: list) -> tuple[dict[str, int], set[str]]:
    """Every tensor's ONNX element type we can tell (graph I/O, inferred values, initializers,
    Constant outputs), and the names of the constant tensors (initializers and Constant outputs)."""
    types: dict[str, int] = {}
    for v in [*g.input, *g.output, *g.value_info]:
        types[v.name] = v.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    constants = {t.name for t in g.initializer}
    for node in nodes:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            constants.update(node.output)
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    return types, constants


def _check_qdq(nodes: list, types: dict[str, int], constants: set[str],
               refuse: Callable[[Any, str], None]) -> dict[tuple[str, str], int]:
    """Every Q/DQ node against the forms TensorRT builds (:data:`QDQ_SUPPORT`); returns the count of
    each (op, quantized type) found."""
    qdq: dict[tuple[str, str], int] = {}
    for node in nodes:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.domain in ("", "ai.onnx"):
            i = 2 if node.op_type == "QuantizeLinear" else 0  # the quantized tensor: y_zero_point / x
            code = types.get(node.input[i], 0) if i < len(node.input) and node.input[i] else 2  # no zero point: UINT8
            tname = _TYPE_NAMES.get(code, str(code))
            key = (node.op_type, tname)
            qdq[key] = qdq.get(key, 0) + 1
            if key not in QDQ_SUPPORT:
                refuse(node, f"{tname} {node.op_type} is not a Q/DQ form TensorRT builds (supported: "
                       + ", ".join(f"{t} {o}" for o, t in QDQ_SUPPORT) + ")")
            attrs = {a.name: _attr_value(a) for a in node.attribute}
            if tname == "INT4" and (node.input[0] not in constants or not attrs.get("block_size")):
                refuse(node, "INT4 must be a blocked (block_size) DequantizeLinear of an initializer: TensorRT "
                       "quantizes weights only to INT4")
    return qdq


def _check_node(node, meta: dict, ops: dict, types: dict[str, int], constants: set[str],
                refuse: Callable[[Any, str], None]) -> None:
    """One node against its row of the operator matrix: domain, support, data types, constant
    inputs, attribute values, outputs."""
    import onnx

    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        refuse(node, f"custom domain {node.domain!r}: TensorRT needs a plugin for it")
        return
    row = ops.get(op)
    if row is None:
        refuse(node, f"not in TensorRT {meta['table_version']}'s operator matrix")
        return
    if not row["supported"]:
        refuse(node, f"not supported by TensorRT {meta['table_version']}'s ONNX parser")
        return
    allowed = set(row.get("types", []))
    typed = [] if op in _NO_TYPED_INPUT else [node.input[i] for i in _TYPED_INPUTS.get(op, (0,))
                                                if i < len(node.input) and node.input[i]]
    typed += [node.output[i] for i in _TYPED_OUTPUTS.get(op, ()) if i < len(node.output)]
    for name in typed:
        code = types.get(name, 0)
        tname = _TYPE_NAMES.get(code, onnx.TensorProto.DataType.Name(code) if code else None)
        if tname is not None and allowed and tname not in allowed:
            refuse(node, f"type {tname} (supported: {', '.join(row['types'])})")
    for i in row.get("const_inputs", []):
        if i < len(node.input) and node.input[i] and node.input[i] not in constants:
            refuse(node, f"input {i} must be an initializer ({row.get('notes', '')})")
    attrs = {a.name: _attr_value(a) for a in node.attribute}
    for name, want in row.get("attrs", {}).items():
        got = attrs.get(name)
        got = got.decode() if isinstance(got, bytes) else got
        if got is not None and got != want:
            refuse(node, f"attribute {name}={got!r} (TensorRT needs {want!r})")
    for name in row.get("forbidden_attrs", []):
        if name in attrs:
            refuse(node, f"attribute {name} is unsupported")
    if "max_outputs" in row and sum(1 for o in node.output[row["max_outputs"]:] if o):
        refuse(node, f"only the first {row['max_outputs']} output(s) are supported")


def check_export(export_dir: str | Path, table: dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`check_graph` on ``prefill.onnx`` and ``decode.onnx`` of an export directory.

    Returns:
        ``tensorrt`` (the table's versions and source), ``graphs`` (file -> report),
        ``unsupported_ops`` (sorted op names that fail anywhere; empty when TensorRT can parse
        both graphs), ``ok``.
    """
    table = table or load_op_table()
    export_dir = Path(export_dir)
    graphs = {name: check_graph(export_dir / name, table) for name in (PREFILL, DECODE)}
    bad = sorted({u["op"] for r in graphs.values() for u in r["unsupported"]}
                 | ({"opset"} if not all(r["opset_supported"] for r in graphs.values()) else set()))
    meta = table["meta"]
    return {
        "tensorrt": {"table": meta["table_version"], "target": meta["target_version"], "source": meta["source"],
                     "opsets": [meta["min_opset"], meta["max_opset"]]},
        "graphs": graphs,
        "unsupported_ops": bad,
        "ok": not bad,
    }


# ---- engines ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineSettings:
    """How to build the engines: for which device, in which precision, for which shapes."""

    device: str  # the device profile name, the detected GPU's name, or GENERIC
    precision: str  # "fp32" | "fp16" | "bf16": TensorRT builder flag (the graphs are float32)
    workspace_bytes: int  # TensorRT's workspace memory-pool limit
    max_batch: int  # sequences per call
    max_context: int  # tokens per sequence: longest prefill, and decode's past length + 1
    opt_batch: int  # the shapes TensorRT tunes kernels for
    opt_seq: int
    source: str  # where the settings came from, for people
    quantized: str | None = None  # "fp8" | "int8" | "int8_wo" | "int4": Q/DQ graphs, built strongly typed

    def shapes(self, dims: dict[str, list[int | str]]) -> dict[str, tuple[list[int], list[int], list[int]]]:
        """(min, opt, max) per input of a graph whose input shapes are ``dims`` (names of dynamic axes)."""
        ranges = {"batch": (1, self.opt_batch, self.max_batch), "seq": (1, self.opt_seq, self.max_context),
                  "past": (1, self.opt_seq, self.max_context - 1)}
        out = {}
        for name, shape in dims.items():
            cols = [ranges[d] if isinstance(d, str) else (d, d, d) for d in shape]
            unknown = [d for d in shape if isinstance(d, str) and d not in ranges]
            if unknown:
                raise ElasticError(f"input {name} has a dynamic axis {unknown[0]!r} that no engine setting bounds")
            out[name] = tuple([c[k] for c in cols] for k in range(3))
        return out


def engine_settings(target: Target | DeviceProfile | str | None = None, precision: str = "auto", max_batch: int = 1,
                    max_context: int = DEFAULT_MAX_CONTEXT, quantized: str | None = None) -> EngineSettings:
    """Settings for the device a plan was made for.

    Args:
        target: the ``elastic.profiles.target.Target`` decided once by the caller
            (``resolve_target``: a profile, or the GPU detected with ``--gpu``), or a
            ``DeviceProfile``, or a profile's name (looked up in the device tables); None: no device
            known, generic settings. Nothing is detected here.
        precision: "auto" or any spelling of bfloat16 / float16 / float32
            (``elastic.slicer.formats.precision``); "auto" is bf16 where the device has it
            (Ampere and newer, Jetson Orin), else fp16, as ``elastic plan`` chooses its dtype.

        quantized: the checkpoint's quantized precision ("fp8", "int8", "int8_wo", "int4") when the
            graphs are Q/DQ graphs: refused where the device cannot run it (fp8 needs Ada, Hopper or
            Blackwell: ``Target.caps.fp8``; int8 ``caps.int8``; int4 ``caps.int4``).

    Workspace: half the device's runtime-overhead allowance (the rest is the CUDA context), at
    least 256 MiB; 1 GiB when nothing is known.

    Raises:
        ElasticError: a CPU profile, a precision the device lacks, or a bad size.
        ProfileError: an unknown profile name.
        TypeError: ``target`` is not a Target, a DeviceProfile, a name or None.
    """
    from elastic.slicer.formats.precision import ENGINES, FLOAT16, choose, lookup, supported

    requested = None if precision in (None, "auto") else lookup(precision, ENGINES, "TensorRT precision")
    if max_batch < 1 or max_context < 2:
        raise ElasticError(f"engine shapes need max_batch >= 1 and max_context >= 2 (got {max_batch}, {max_context})")
    if isinstance(target, str):
        from elastic.profiles.devices import get_profile

        target = get_profile(target)
    if isinstance(target, DeviceProfile):
        target = Target.from_profile(target)
    elif target is not None and not isinstance(target, Target):
        raise TypeError(f"engine_settings takes the Target its caller resolved (profiles.target.resolve_target), "
                        f"a DeviceProfile, a profile name or None, not {type(target).__name__}")
    if target is None:  # nothing known of the device: settings any GPU takes, fp16 unless asked otherwise
        name, source, overhead = GENERIC, "no device given: generic settings", None
        chosen = requested or FLOAT16
    elif target.kind == "cpu" and target.profile:
        raise ElasticError(f"{target.profile!r} is a CPU host: TensorRT needs an NVIDIA GPU; pick a GPU or Jetson "
                           "profile (see `elastic profiles`)")
    elif target.kind == "cpu":  # nothing to build here: settings any GPU takes, fp16 unless asked otherwise
        name, source, overhead = GENERIC, "no GPU here: generic settings", None
        chosen = requested or FLOAT16
    else:
        name = target.profile or target.name
        source = f"profile {target.profile}" if target.profile else f"detected {target.name}"
        overhead = target.overhead_bytes
        auto, _ = choose(None, target, ENGINES)
        if requested is not None and not supported(requested, target):
            raise ElasticError(f"{name} has no {requested.short} support; ask for {auto.short} (what auto picks here)")
        chosen = requested or auto
        if quantized:
            qp = lookup(quantized)
            if not supported(qp, target):
                raise ElasticError(
                    f"{name} cannot run {qp.short} engines: TensorRT builds {qp.short} Q/DQ layers only on "
                    f"{CAPABILITY_WORDS.get(qp.needs, qp.needs)}; slice the model again with a precision this device "
                    f"runs (`elastic plan --target {name}` lists them) or export for another --target",
                    hint=Hint("precision", "re-slice with a precision the device runs"))
    workspace = max(MIN_WORKSPACE, overhead // 2) if overhead else GENERIC_WORKSPACE
    return EngineSettings(device=name, precision=chosen.short, workspace_bytes=workspace, max_batch=max_batch,
                          max_context=max_context, opt_batch=max(1, max_batch // 2) if max_batch > 2 else max_batch,
                          opt_seq=min(TUNED_SEQ, max_context // 2), source=source, quantized=quantized)


def load_graph(path: str | Path):
    """``onnx.load`` without external data; a truncated or corrupt file is an ElasticError naming it."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as e:  # protobuf's parse errors, onnx's own
        raise ElasticError(f"not a valid ONNX file ({type(e).__name__}: {str(e)[:160]}); export it again",
                           path=str(path)) from None
    except OSError as e:
        raise ElasticError(f"cannot read ({e.strerror})", path=str(path)) from None


def input_dims(path: str | Path) -> dict[str, list[int | str]]:
    """Input name -> shape, dynamic axes by name, of an ONNX file (external data not read)."""
    g = load_graph(path).graph
    init = {t.name for t in g.initializer}
    return {i.name: [d.dim_param if d.dim_param else d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in g.input if i.name not in init}


def _dims(shape: list[int]) -> str:
    return "x".join(str(v) for v in shape)  # trtexec's form: 1x2x512x16


def _shape_arg(shapes: dict, k: int) -> str:
    return ",".join(f"{name}:{_dims(s[k])}" for name, s in shapes.items())


def _shape_table(shapes: dict) -> dict[str, dict[str, str]]:
    return {name: {"min": _dims(lo), "opt": _dims(opt), "max": _dims(hi)} for name, (lo, opt, hi) in shapes.items()}


def trtexec_script(export_dir: str | Path, settings: EngineSettings) -> str:
    """A POSIX shell script that builds both engines with ``trtexec`` (TensorRT 10), beside the graphs."""
    export_dir = Path(export_dir)
    from elastic.slicer.formats.precision import lookup

    # Q/DQ graphs are explicitly quantized: TensorRT's "Explicit Quantization" guide says to build them
    # strongly typed, without precision flags (--int8/--fp8/--int4 are for weakly typed networks); the
    # types come from the graph (trtexec --stronglyTyped: TensorRT >= 9.1).
    flag = " --stronglyTyped" if settings.quantized else (" " + lookup(settings.precision).trt_flag).rstrip()
    lines = [
        "#!/bin/sh",
        "# Build the TensorRT engines of this export on the device that will run them: an engine only runs",
        "# on the GPU model and TensorRT version that built it. Written by `elastic export`.",
        (f"# Settings: {settings.source}; precision {settings.precision}; workspace "
         f"{settings.workspace_bytes >> 20} MiB; batch <= {settings.max_batch}; context <= {settings.max_context} tokens."),
        *([f"# Weights: {settings.quantized} Q/DQ graphs, built strongly typed (the graphs' types decide each layer's "
           "precision; no --fp16/--int8/--fp8/--int4)."] if settings.quantized else []),
        "# Needs TensorRT 10 (JetPack 6 ships 10.3). Set TRTEXEC to trtexec's path if it is not on PATH.",
        "set -eu",
        'cd "$(dirname "$0")"',
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
    ]
    for graph in (PREFILL, DECODE):
        shapes = settings.shapes(input_dims(export_dir / graph))
        lines += [
            f'echo "building {ENGINES[graph]} from {graph}"',
            f'"$TRTEXEC" --onnx={graph} --saveEngine={ENGINES[graph]}{flag} \\',
            f"  --memPoolSize=workspace:{settings.workspace_bytes >> 20} \\",  # MiB
            f"  --minShapes={shlex.quote(_shape_arg(shapes, 0))} \\",
            f"  --optShapes={shlex.quote(_shape_arg(shapes, 1))} \\",
            f"  --maxShapes={shlex.quote(_shape_arg(shapes, 2))}",
        ]
    lines.append('echo "done: prefill.engine, decode.engine"')
    return "\n".join(lines) + "\n"


def tensorrt_available() -> tuple[bool, str]:
    """(True, version) when ``tensorrt`` imports and a CUDA GPU is present, else (False, why not)."""
    if importlib.util.find_spec("tensorrt") is None:
        return False, "the tensorrt Python package is not installed"
    try:
        import tensorrt as trt
    except Exception as e:  # a broken install (missing libnvinfer) raises at import
        return False, f"tensorrt does not import ({type(e).__name__}: {e})"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "no CUDA GPU is visible"
    except ImportError:
        return False, "torch is not installed"
    return True, trt.__version__


def build_engines(export_dir: str | Path, settings: EngineSettings,
                  progress: Progress | None = None) -> dict[str, Any]:
    """Build ``prefill.engine`` and ``decode.engine`` with the TensorRT 10 Python API.

    ONNX parser (external data is found beside the graph), builder config with the workspace pool
    limit and the precision flag, one optimization profile spanning :meth:`EngineSettings.shapes`.
    ``progress("build engine", engines built, 2, message=...)`` before each engine.

    Raises:
        ElasticError: the parser refuses a graph (every parser error listed) or the build fails.
    """
    import tensorrt as trt

    export_dir = Path(export_dir)
    say = progress or quiet
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    built = {}
    for k, graph in enumerate((PREFILL, DECODE)):
        say("build engine", k, 2, message=f"building {ENGINES[graph]} with TensorRT {trt.__version__}")
        # TensorRT 10: every network is explicit-batch; Q/DQ graphs are built strongly typed (see trtexec_script)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if settings.quantized else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(export_dir / graph)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise ElasticError(f"TensorRT's ONNX parser refused {graph}", problems=errors, path=str(export_dir))
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
        if settings.quantized:
            pass  # strongly typed: precision flags are not allowed
        elif settings.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif settings.precision == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
        profile = builder.create_optimization_profile()
        shapes = settings.shapes(input_dims(export_dir / graph))
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise ElasticError(f"TensorRT could not build an engine from {graph} (see the TensorRT log above); "
                               "try a smaller context or batch", path=str(export_dir),
                               hint=Hint("context", "build for shorter sequences"))
        with open(export_dir / ENGINES[graph], "wb") as f:
            f.write(blob)  # IHostMemory exposes the buffer protocol
        built[ENGINES[graph]] = _shape_table(shapes)
    say("build engine", len(built), 2)
    return built


def _device_info() -> dict[str, Any]:
    import torch

    i = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(i)
    return {"name": torch.cuda.get_device_name(i), "compute_capability": f"{major}.{minor}"}


def build_or_script(export_dir: str | Path, settings: EngineSettings, *, always_script: bool = False,
                    progress: Progress | None = None) -> dict[str, Any]:
    """Build the engines here when TensorRT and a GPU are present, else write ``build_engines.sh``.

    Writes ``engine_meta.json`` in both cases (``built`` false, with the reason, when not built).

    Returns:
        the engine metadata: ``built``, ``reason`` (why not built, or None), ``tensorrt`` (version or
        None), ``device``, ``settings``, ``shapes`` (engine -> input -> min/opt/max as "1x2x512x16"), ``engines``
        (files), ``script`` (file name or None).
    """
    export_dir = Path(export_dir)
    ok, detail = tensorrt_available()
    shapes = {ENGINES[g]: _shape_table(settings.shapes(input_dims(export_dir / g))) for g in (PREFILL, DECODE)}
    meta: dict[str, Any] = {"built": False, "reason": None, "tensorrt": None, "device": None,
                            "settings": asdict(settings), "shapes": shapes, "engines": [], "script": None}
    if ok:
        build_engines(export_dir, settings, progress)
        meta.update(built=True, tensorrt=detail, device=_device_info(), engines=list(ENGINES.values()))
    else:
        where = "the target device" + (f" ({settings.device})" if settings.device != GENERIC else "")
        meta["reason"] = f"not built here: {detail}. Run {SCRIPT} on {where} to build the engines with trtexec"
    if always_script or not ok:
        script = export_dir / SCRIPT
        script.write_text(trtexec_script(export_dir, settings))
        script.chmod(0o755)
        meta["script"] = SCRIPT
    (export_dir / ENGINE_META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta
