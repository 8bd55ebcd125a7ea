"""ONNX graphs of a dense model: ``prefill.onnx``, ``decode.onnx`` and ``extend.onnx`` (a chunked
prefill's later chunks; see ``elastic.export.graphs``).

Exported with ``torch.onnx.export(dynamo=True)`` at opset 18 (why: see :data:`DEFAULT_OPSET`),
with dynamic batch, sequence and past length, traced on a ``meta`` model: the graphs reference one
shared ``weights.bin`` (ONNX external data), written once from the checkpoint, one tensor at a time
(``elastic.export.weights``).

Example:
    >>> ckpt = Checkpoint.open("./model-50", require_weights=True)
    >>> info = write_graphs(ckpt.arch, Path("./out"), weights=checkpoint_source(ckpt))
    >>> info["files"]
    ['prefill.onnx', 'decode.onnx', 'extend.onnx', 'weights.bin']
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from elastic.profiles.progress import Progress, quiet
from elastic.slicer.errors import ElasticError, debug_enabled
from elastic.slicer.nn.model import NemotronH

from .graphs import DecodeGraph, ExtendGraph, PrefillGraph, state_tensors
from .layout import DECODE, EXTEND, PAST, PARAM_PREFIX, PREFILL, PRESENT, TRANSPOSED, WEIGHTS, param_of

GRAPHS = (PREFILL, DECODE, EXTEND)  # every graph an export writes

# TensorRT 10.x's parser takes opsets 9..20 (onnx-tensorrt docs/operators.md); 18 is the opset
# torch's dynamo exporter emits natively (no version conversion) and predates ops TensorRT 10.3
# cannot parse (RMSNormalization and Attention arrive in opset 23).
DEFAULT_OPSET = 18
FLOAT_OPSET_RANGE = (18, 20)  # float graphs: the dynamo exporter's lowest opset .. TensorRT 10.0-10.3's highest
# Q/DQ graphs of an int4 (AWQ) checkpoint need opset 21: ONNX's INT4 type and DequantizeLinear's
# block_size arrive there. TensorRT imports INT4 blocked DequantizeLinear from 10.0 (onnx-tensorrt
# docs/Changelog.md, "TensorRT 10.0 EA": INT4 quantization; docs/operators.md lists INT4 for
# DequantizeLinear) although that matrix states opsets 9..20; the 10.15 matrix states 9..24, and
# NVIDIA Model Optimizer emits its INT4 ONNX for TensorRT at opset 21 (modelopt/onnx/utils.py,
# QDQ_PRECISION_MIN_OPSET). So 21 is allowed for Q/DQ graphs only (export/qdq.py picks it for int4).
OPSET_RANGE = (18, 21)
# bfloat16 graphs are not offered: ONNX Conv takes bfloat16 only from opset 22, beyond TensorRT 10.3's
# parser; TensorRT builds bf16 engines from float32 graphs (--bf16) instead


def graph_io(model: NemotronH) -> dict[str, dict[str, list[str]]]:
    """Input and output names of each graph, in order."""
    states = state_tensors(model.arch)
    stateful = {"inputs": ["input_ids"] + [PAST + s.name for s in states],
                "outputs": ["logits"] + [PRESENT + s.name for s in states]}
    return {
        "prefill": {"inputs": ["input_ids"], "outputs": ["logits"] + [PRESENT + s.name for s in states]},
        "decode": stateful,
        "extend": stateful,
    }


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress and logs warnings (torchvision absent...); a library does not."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _example_inputs(arch, dtype, batch: int = 3) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Prefill ids and a decode state of the right shapes (sizes > 1: torch.export specialises 0 and 1;
    the prefill length is not what the parity check uses, so a baked-in size shows)."""
    ids = torch.zeros((batch, arch.chunk_size + 3), dtype=torch.long)
    past = tuple(torch.zeros(s.dims(batch, 5), dtype=torch.float32 if s.float32 else dtype, device="meta")
                 for s in state_tensors(arch))  # with the meta model's weights: one device
    return ids, past


def _export_one(module: torch.nn.Module, args: tuple, names: dict[str, list[str]], dynamic_shapes: dict,
                 opset: int) -> Any:
    """One graph traced on a ``meta`` model (no weights in memory), unoptimised: its initializers are
    exactly the model's parameters, named ``model.<parameter>``.

    No TorchScript fallback: torch 2.13's TorchScript exporter cannot convert SDPA with
    ``enable_gqa`` and traces the GQA reshapes of a restated attention into a wrong decode graph.
    """
    try:
        with _quiet(), torch.no_grad():
            prog = torch.onnx.export(module, args, None, dynamo=True, dynamic_shapes=dynamic_shapes,
                                     input_names=names["inputs"], output_names=names["outputs"], opset_version=opset,
                                     optimize=False)
    except Exception as e:  # torch.export or the ONNX translation refused something
        raise ElasticError(f"torch.onnx.export (dynamo) failed on {type(module).__name__}: {type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else ''} (ELASTIC_DEBUG=1 shows the "
                           "traceback)") from e
    return prog.model


FOLD_LIMIT = 256  # elements: parameters up to this size may be folded into graph constants (A_log, D, ...)

def _fold_weight_transposes(graph) -> None:
    """``Transpose(W, perm=[1, 0])`` of a parameter W becomes an initializer ``W.T`` stored transposed
    (a Linear's weight: the MatMul reads it directly; nothing is transposed at load time)."""
    import onnx_ir as ir

    made: dict[str, Any] = {}
    for node in list(graph):
        if node.op_type != "Transpose" or len(node.inputs) != 1:
            continue
        src = node.inputs[0]
        perm = node.attributes.get("perm")
        if (src is None or src.name not in graph.initializers or src.shape is None or len(src.shape) != 2
                or perm is None or list(perm.value) != [1, 0]):
            continue
        name = src.name + TRANSPOSED
        if name not in made:
            rows, cols = src.shape
            placeholder = ir.ExternalTensor(WEIGHTS, 0, 0, src.dtype, shape=ir.Shape([cols, rows]), name=name)
            made[name] = ir.Value(name=name, shape=ir.Shape([cols, rows]), type=src.type, const_value=placeholder)
            graph.register_initializer(made[name])  # the placeholder is replaced once weights.bin is written
        node.outputs[0].replace_all_uses_with(made[name])
        graph.remove(node, safe=True)
        if not src.uses():
            graph.initializers.pop(src.name)


def _entries(graphs, raw: set[str] = frozenset()) -> list:
    """One entry per initializer of ``graphs``; those in ``raw`` (Q/DQ tensors, export/qdq.py) are
    written as their source gives them, keyed by the initializer name without the prefix."""
    from .weights import Entry

    out: dict[str, Entry] = {}
    for g in graphs:
        for name in g.graph.initializers:
            if not name.startswith(PARAM_PREFIX):
                raise ElasticError(f"the exported graph has an initializer {name!r} that is not a parameter of the "
                                   "model; this is a bug, please report it")
            if name in raw:
                out.setdefault(name, Entry(name, name.removeprefix(PARAM_PREFIX), False, raw=True))
                continue
            out.setdefault(name, Entry(name, *param_of(name)))
    return list(out.values())


def trace(arch, dtype: torch.dtype, opset: int, which: str) -> Any:
    """One graph (``PREFILL``, ``DECODE`` or ``EXTEND``) traced on a ``meta`` model of ``arch``: onnx_ir, no weights."""
    from torch.export import Dim

    from elastic.slicer.nn.model import build_model

    meta = build_model(arch, dtype=dtype, device="meta").eval()
    io_names = graph_io(meta)
    ids, past = _example_inputs(arch, dtype)
    batch = Dim("batch")
    if which == PREFILL:
        return _export_one(PrefillGraph(meta), (ids,), io_names["prefill"], {"input_ids": {0: batch, 1: Dim("seq")}},
                           opset)
    past_len = Dim("past")
    state_dims = tuple({0: batch, 2: past_len} if s.kind in ("key", "value") else {0: batch}
                       for s in state_tensors(arch))
    if which == EXTEND:  # several tokens after a past: seq >= 2 (torch.export specialises 1)
        return _export_one(ExtendGraph(meta), (ids, *past), io_names["extend"],
                           {"input_ids": {0: batch, 1: Dim("seq")}, "past": state_dims}, opset)
    return _export_one(DecodeGraph(meta), (ids[:, :1], *past), io_names["decode"],
                       {"input_ids": {0: batch}, "past": state_dims}, opset)


def save_traced(graph, path: Path) -> None:
    """Save a traced graph without weights: every initializer a placeholder reference into weights.bin."""
    import onnx_ir as ir

    for value in graph.graph.initializers.values():
        value.const_value = ir.ExternalTensor(WEIGHTS, 0, 0, value.dtype, shape=value.shape, name=value.name,
                                              base_dir=path.parent)
    ir.save(graph, path)


def _trace_in_child(arch, dtype: torch.dtype, opset: int, which: str, out_dir: Path):
    """Start tracing ``which`` in another Python process (tracing is single-threaded Python: two
    graphs trace in about the time of one where there are two cores)."""
    import json
    import subprocess
    import sys

    path = out_dir / f".{which}.traced"
    args = {"config": arch.to_config(), "dtype": str(dtype).removeprefix("torch."), "opset": opset, "which": which,
            "path": str(path)}
    proc = subprocess.Popen([sys.executable, "-m", "elastic.export.trace_child", json.dumps(args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, path


def _child_graph(child, out_dir: Path) -> Any:
    """Wait for :func:`_trace_in_child` and load its graph (placeholders for the weights)."""
    import onnx_ir as ir

    proc, path = child
    _, err = proc.communicate()
    try:
        if proc.returncode:
            last = [line for line in err.strip().splitlines() if line.strip()]
            raise ElasticError(f"tracing the {path.name.strip('.').removesuffix('.traced')} graph failed: "
                               f"{last[-1] if last else f'exit {proc.returncode}'}"
                               + ("\n" + err if debug_enabled() else
                                  " (ELASTIC_DEBUG=1 shows the traceback)"))
        return ir.load(path)
    finally:
        path.unlink(missing_ok=True)


# Traced graphs hold no weights (placeholders into weights.bin) and depend only on the architecture,
# the dtype, the opset, the exporter's versions and the code traced: a second export of the same
# architecture (fit-my-gpu run again, another context or target) loads them instead of tracing
# (tens of seconds of the export's time). The cache lives in $ELASTIC_CACHE_DIR (default
# $XDG_CACHE_HOME/elastic, else ~/.cache/elastic); ELASTIC_CACHE_DIR=off turns it off.
TRACED_SOURCES = ("slicer/nn", "export/graphs.py", "export/layout.py", "export/onnx_export.py")


def _graph_cache(arch, dtype: torch.dtype, opset: int) -> Path | None:
    """This architecture's cache directory of traced graphs, or None when caching is off."""
    import hashlib
    import json
    import os
    from importlib.metadata import PackageNotFoundError, version

    root = os.environ.get("ELASTIC_CACHE_DIR")
    if root is not None and root.strip().lower() in ("", "0", "off", "no", "false"):
        return None
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "elastic"
    h = hashlib.sha256(json.dumps([arch.to_config(), str(dtype), opset], sort_keys=True, default=str).encode())
    for pkg in ("torch", "onnxscript", "onnx-ir", "onnx"):
        try:
            h.update(f"{pkg}={version(pkg)}".encode())
        except PackageNotFoundError:
            h.update(pkg.encode())
    top = Path(__file__).resolve().parent.parent
    for rel in TRACED_SOURCES:  # the code that is traced: a change of it traces again
        for f in sorted((top / rel).rglob("*.py")) if (top / rel).is_dir() else [top / rel]:
            h.update(f.name.encode() + (f.read_bytes() if f.is_file() else b""))
    return Path(root) / "onnx-graphs" / h.hexdigest()[:32]


def _drop_trace_metadata(g) -> None:
    """The exporter's stack traces and FX dumps: 1.5 kB a node, local paths."""
    for node in g.graph.all_nodes():
        for key in [k for k in node.metadata_props if k != "namespace"]:
            del node.metadata_props[key]


def _cached_graphs(arch, dtype: torch.dtype, opset: int, out_dir: Path) -> dict[str, Any] | None:
    """Every graph from the cache (their initializers placeholders into ``out_dir``'s weights.bin), or None."""
    import onnx_ir as ir

    where = _graph_cache(arch, dtype, opset)
    if where is None or not all((where / name).is_file() for name in GRAPHS):
        return None
    try:
        graphs = {name: ir.load(where / name) for name in GRAPHS}
    except Exception:  # a damaged entry (a disk filled while it was written): trace again
        return None
    for g in graphs.values():
        for value in g.graph.initializers.values():
            value.const_value = ir.ExternalTensor(WEIGHTS, 0, 0, value.dtype, shape=value.shape, name=value.name,
                                                  base_dir=out_dir)
    return graphs


def _cache_graphs(graphs: dict[str, Any], arch, dtype: torch.dtype, opset: int) -> None:
    """Keep freshly traced graphs for the next export of this architecture; a cache that cannot be
    written is no error (the export does not depend on it)."""
    import os
    import tempfile

    where = _graph_cache(arch, dtype, opset)
    if where is None:
        return
    try:
        where.mkdir(parents=True, exist_ok=True)
        for name, g in graphs.items():
            _drop_trace_metadata(g)
            fd, tmp = tempfile.mkstemp(dir=where, prefix=f".{name}.")
            os.close(fd)
            save_traced(g, Path(tmp))  # placeholders only: never a weight
            os.replace(tmp, where / name)  # whole files only, for a process reading beside us
    except OSError:
        return


def _traced_graphs(arch, dtype: torch.dtype, opset: int, out_dir: Path, say: Progress) -> dict[str, Any]:
    """Every graph, unoptimised, weights as placeholders: from the cache, else traced (the decode and
    extend graphs in other processes, beside the prefill) and kept in the cache."""
    graphs = _cached_graphs(arch, dtype, opset, out_dir)
    if graphs is not None:
        say("trace", 0, None, message="exporting the prefill, decode and extend graphs (traced before: from the cache)")
        return graphs
    say("trace", 0, None, message="exporting the prefill, decode and extend graphs (in three processes)")
    children = {name: _trace_in_child(arch, dtype, opset, name, out_dir) for name in (DECODE, EXTEND)}
    try:
        prefill = trace(arch, dtype, opset, PREFILL)
        graphs = {PREFILL: prefill, **{name: _child_graph(child, out_dir) for name, child in children.items()}}
    except BaseException:
        for proc, path in children.values():
            proc.kill()
            proc.wait()
            path.unlink(missing_ok=True)
        raise
    _cache_graphs(graphs, arch, dtype, opset)
    # as the next export will load them (the optimiser names nodes by a counter that a graph traced in
    # this process has advanced): the first export writes the same bytes as every later one
    return _cached_graphs(arch, dtype, opset, out_dir) or graphs


def write_graphs(model, out_dir: Path, *, weights: Callable[[str], torch.Tensor] | None = None,
                 dtype: torch.dtype | None = None, opset: int | None = None, external_data: bool | None = None,
                 progress: Progress | None = None, qdq=None,
                 quantized: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """Export ``prefill.onnx`` and ``decode.onnx`` into the existing directory ``out_dir``, with their
    weights once in ``weights.bin``.

    The graphs are traced on a ``meta`` model, so tracing holds no weights; ``weights.bin`` is then
    written one tensor at a time from ``weights`` (in the graph dtype; a Linear weight the graphs use
    transposed is stored transposed), and every graph points into it. Memory stays near one tensor
    plus the exporter's own; disk is the weights once plus three small graphs.

    Args:
        model: the architecture (``Arch``), or a loaded reference model (its parameters are then the
            weights and its dtype the graph dtype, unless given).
        weights: ``get(parameter_name) -> tensor``, e.g. ``elastic.export.weights.checkpoint_source``.
        dtype: the graphs' float dtype (float32 or float16).
        opset: ONNX opset: default 18 (float graphs, within :data:`FLOAT_OPSET_RANGE`), or the
            Q/DQ plan's (``qdq.opset``); within :data:`OPSET_RANGE`.
        external_data: kept for callers of the earlier API: weights are always in ``weights.bin``;
            False is refused.
        progress: ``progress(stage, done, total, message=...)``: "trace", "write weights" (tensors),
            "optimise".
        qdq: an ``elastic.export.qdq.QdqPlan`` (a quantized checkpoint): each quantized Linear's
            weight is stored quantized and dequantized in the graph; ``quantized`` is then
            ``elastic.export.qdq.quantized_source`` (its tensors' bytes), ``weights`` gives the rest.

    Returns:
        ``files`` (written, relative to out_dir), ``opset``, ``external_data`` (True), ``exporter``
        ("dynamo"), ``io`` (names of each graph's inputs and outputs), ``weight_bytes``.
    """
    import onnx_ir as ir

    from elastic.slicer.nn.model import build_model

    from .weights import write_weights

    opset = _checked_opset(opset, qdq, quantized, external_data)
    arch, weights, dtype = _model_weights(model, weights, dtype)
    say = progress or quiet
    io_names = graph_io(build_model(arch, dtype=dtype, device="meta"))

    graphs = _traced_graphs(arch, dtype, opset, out_dir, say)
    raw: set[str] = set()
    for g in graphs.values():
        _fold_weight_transposes(g.graph)
        if qdq is not None:
            from .qdq import rewrite

            raw |= rewrite(g.graph, qdq)
    entries = _entries(graphs.values(), raw)

    say("write weights", 0, len(entries), message="writing the weights once, shared by the graphs")
    placed = write_weights(out_dir / WEIGHTS, entries, weights, dtype, progress=progress, raw=quantized)
    for g in graphs.values():
        for name, value in g.graph.initializers.items():
            p = placed[name]
            value.const_value = ir.ExternalTensor(WEIGHTS, p.offset, p.length, value.dtype, shape=ir.Shape(p.shape),
                                                  name=name, base_dir=out_dir)
    say("optimise", 0, None, message="optimising and writing the graphs")
    _optimise_and_save(graphs, out_dir)
    return {
        "files": [*graphs, WEIGHTS],
        "opset": opset,
        "external_data": True,
        "exporter": "dynamo",
        "io": io_names,
        "weight_bytes": sum(p.length for p in placed.values()),
        "qdq": sorted(raw),
    }


def _checked_opset(opset: int | None, qdq, quantized, external_data: bool | None) -> int:
    """The opset to write (given, else the Q/DQ plan's, else the default), once it and the options are checked."""
    opset = opset or (qdq.opset if qdq is not None else DEFAULT_OPSET)
    lo, hi = OPSET_RANGE if qdq is not None else FLOAT_OPSET_RANGE
    if not lo <= opset <= hi:
        raise ElasticError(f"opset {opset} is outside {lo}..{hi}: torch's dynamo exporter starts at {lo}, TensorRT "
                           f"10's ONNX parser stops at {hi}" + (" for these graphs" if qdq is not None else ""))
    if qdq is not None and opset < qdq.opset:
        raise ElasticError(f"{qdq.layout.quant_algo} Q/DQ graphs need opset {qdq.opset} or newer (asked: {opset})")
    if qdq is not None and quantized is None:
        raise ElasticError("write_graphs with a Q/DQ plan needs quantized=elastic.export.qdq.quantized_source(...)")
    if external_data is False:
        raise ElasticError("weights are always written once to weights.bin, shared by the graphs (the graphs "
                           "alone stay small); external_data=False is not offered")
    return opset


def _model_weights(model, weights: Callable[[str], torch.Tensor] | None,
                   dtype: torch.dtype | None) -> tuple[Any, Callable[[str], torch.Tensor], torch.dtype]:
    """(arch, weights, graph dtype) of ``write_graphs``'s model: an ``Arch``, or a loaded model's own."""
    if isinstance(model, NemotronH):
        arch = model.arch
        dtype = dtype or next(model.parameters()).dtype
        if weights is None:
            params = dict(model.named_parameters())
            weights = lambda name: params[name].detach()  # noqa: E731
    else:
        arch = model
    if weights is None:
        raise ElasticError("write_graphs needs the weights: a loaded model or weights=get(name)")
    return arch, weights, dtype or torch.float32


def _optimise_and_save(graphs: dict[str, Any], out_dir: Path) -> None:
    """Optimise each graph (never folding a weight into it), stamp it as elastic's, and save it."""
    import onnx_ir as ir
    from onnxscript.optimizer import optimize_ir

    def should_fold(node) -> bool | None:  # a weight is never copied into a graph by folding
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            return False  # Q/DQ stay: they are the quantization TensorRT builds from
        big = any(v is not None and v.is_initializer() and isinstance(v.const_value, ir.ExternalTensor)
                  and v.const_value.size > FOLD_LIMIT for v in node.inputs)
        return False if big else None

    for g in graphs.values():
        with _quiet():
            optimize_ir(g, should_fold=should_fold)  # folds small constants (A = -exp(A_log), ...)
        g.producer_name, g.producer_version = "elastic", _version()
        _drop_trace_metadata(g)
    for name, g in graphs.items():
        ir.save(g, out_dir / name)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("elastic")
    except Exception:
        return "0"


def check_onnx(out_dir: Path, files: tuple[str, ...] = GRAPHS) -> None:
    """``onnx.checker`` (with shape inference) on each graph, by path so external data and > 2 GiB work.

    Raises:
        ElasticError: a graph is invalid (a bug in the export: the message says which graph and why).
    """
    import onnx

    problems = []
    for name in files:
        try:
            onnx.checker.check_model(str(out_dir / name), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            problems.append(f"{name}: {str(e).strip().splitlines()[0]}")
    if problems:
        raise ElasticError("the exported graphs fail onnx.checker (nothing was written)", problems=problems)
