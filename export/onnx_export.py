"""ONNX graphs of a dense model: ``prefill.onnx`` and ``decode.onnx`` (see ``elastic.export.graphs``).

Exported with ``torch.onnx.export(dynamo=True)`` at opset 18 (why: see :data:`DEFAULT_OPSET`),
with dynamic batch, sequence and past length. Weights stay inside each graph while they are small;
above :data:`INLINE_LIMIT` both graphs reference one shared ``weights.bin`` (ONNX external data:
a protobuf cannot exceed 2 GiB, and the two graphs hold the same weights, so one copy on disk).

Example:
    >>> model = load_model("./model-50", dtype=torch.float32)
    >>> info = write_graphs(model, Path("./out"))  # into an existing directory
    >>> info["files"]
    ['prefill.onnx', 'decode.onnx']
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from elastic.slicer.errors import ElasticError
from elastic.slicer.nn.model import NemotronH

from .graphs import DecodeGraph, PrefillGraph, state_tensors
from .layout import DECODE, PAST, PREFILL, PRESENT, WEIGHTS

# TensorRT 10.x's parser takes opsets 9..20 (onnx-tensorrt docs/operators.md); 18 is the opset
# torch's dynamo exporter emits natively (no version conversion) and predates ops TensorRT 10.3
# cannot parse (RMSNormalization and Attention arrive in opset 23).
DEFAULT_OPSET = 18
OPSET_RANGE = (18, 20)  # the dynamo exporter's lowest opset .. TensorRT 10's highest
INLINE_LIMIT = 1 << 30  # weight bytes above which graphs use external data (protobuf limit: 2 GiB)
SMALL_TENSOR = 1024  # tensors below this stay inside the graph even with external data
# bfloat16 graphs are not offered: ONNX Conv takes bfloat16 only from opset 22, beyond TensorRT 10.3's
# parser; TensorRT builds bf16 engines from float32 graphs (--bf16) instead


def graph_io(model: NemotronH) -> dict[str, dict[str, list[str]]]:
    """Input and output names of both graphs, in order."""
    states = state_tensors(model.arch)
    return {
        "prefill": {"inputs": ["input_ids"], "outputs": ["logits"] + [PRESENT + s.name for s in states]},
        "decode": {"inputs": ["input_ids"] + [PAST + s.name for s in states],
                   "outputs": ["logits"] + [PRESENT + s.name for s in states]},
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


def _export_one(module: torch.nn.Module, args: tuple, names: dict[str, list[str]], dynamic_shapes: dict,
                opset: int) -> Any:
    """One graph with torch.onnx's dynamo exporter, as an onnx_ir model.

    No TorchScript fallback: torch 2.13's TorchScript exporter cannot convert SDPA with
    ``enable_gqa`` and traces the GQA reshapes of a restated attention into a wrong decode graph.
    """
    try:
        with _quiet(), torch.no_grad():
            prog = torch.onnx.export(module, args, None, dynamo=True, dynamic_shapes=dynamic_shapes,
                                     input_names=names["inputs"], output_names=names["outputs"], opset_version=opset)
    except Exception as e:  # torch.export or the ONNX translation refused something
        raise ElasticError(f"torch.onnx.export (dynamo) failed on {type(module).__name__}: {type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else ''} (ELASTIC_DEBUG=1 shows the "
                           "traceback)") from e
    return prog.model


def _example_inputs(model: NemotronH, batch: int = 3) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Prefill ids and a decode state from a real prefill (sizes > 1: torch.export specialises 0 and 1)."""
    seq = model.arch.chunk_size + 3  # not what the parity check uses (2 chunks + 3): a baked-in size shows
    ids = torch.randint(0, model.arch.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = PrefillGraph(model)(ids)
    return ids, tuple(out[1:])


def write_graphs(model: NemotronH, out_dir: Path, *, opset: int = DEFAULT_OPSET, external_data: bool | None = None,
                 progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Export ``model`` as ``prefill.onnx`` and ``decode.onnx`` into the existing directory ``out_dir``.

    Args:
        model: the reference model (``elastic.slicer.nn.model.load_model``), in the dtype the graphs should have.
        opset: ONNX opset, within :data:`OPSET_RANGE`.
        external_data: put weights in a shared ``weights.bin``; None decides by size (:data:`INLINE_LIMIT`).
        progress: called with a short message before each stage.

    Returns:
        ``files`` (written, relative to out_dir), ``opset``, ``external_data``, ``exporter``
        ("dynamo"), ``io`` (names of each graph's inputs and outputs), ``weight_bytes``.
    """
    from torch.export import Dim

    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        raise ElasticError(f"opset {opset} is outside {OPSET_RANGE[0]}..{OPSET_RANGE[1]}: torch's dynamo exporter "
                           f"starts at {OPSET_RANGE[0]}, TensorRT 10's ONNX parser stops at {OPSET_RANGE[1]}")
    say = progress or (lambda msg: None)
    model = model.eval()
    states = state_tensors(model.arch)
    io_names = graph_io(model)
    ids, past = _example_inputs(model)
    batch, seq, past_len = Dim("batch"), Dim("seq"), Dim("past")

    say("exporting prefill graph")
    prefill = _export_one(PrefillGraph(model), (ids,), io_names["prefill"], {"input_ids": {0: batch, 1: seq}}, opset)
    say("exporting decode graph")
    state_dims = tuple({0: batch, 2: past_len} if s.kind in ("key", "value") else {0: batch} for s in states)
    decode = _export_one(DecodeGraph(model), (ids[:, :1], *past), io_names["decode"],
                         {"input_ids": {0: batch}, "past": state_dims}, opset)

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = weight_bytes > INLINE_LIMIT if external_data is None else external_data
    say("writing " + ("graphs with shared external weights" if external else "graphs"))
    graphs = {PREFILL: prefill, DECODE: decode}
    for g in graphs.values():
        g.producer_name, g.producer_version = "elastic", _version()
        for node in g.graph.all_nodes():  # the exporter's stack traces and FX dumps: 1.5 kB a node, local paths
            for key in [k for k in node.metadata_props if k != "namespace"]:
                del node.metadata_props[key]
    files = _save(graphs, out_dir, external)
    return {
        "files": files,
        "opset": opset,
        "external_data": external,
        "exporter": "dynamo",
        "io": io_names,
        "weight_bytes": weight_bytes,
    }


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("elastic")
    except Exception:
        return "0"


def _save(graphs: dict[str, Any], out_dir: Path, external: bool) -> list[str]:
    """Save onnx_ir models; with ``external``, every large initializer goes to one shared
    ``weights.bin`` once (the same bytes in both graphs are stored once), aligned for mmap."""
    import onnx_ir as ir

    if not external:
        for name, g in graphs.items():
            ir.save(g, out_dir / name)
        return list(graphs)
    stored: dict[tuple[bytes, int], int] = {}  # (sha256, length) -> offset in weights.bin
    with open(out_dir / WEIGHTS, "wb") as f:
        for name, g in graphs.items():
            for value in g.graph.initializers.values():
                t = value.const_value
                if t is None or t.nbytes < SMALL_TENSOR:
                    continue
                data = t.tobytes()
                key = (hashlib.sha256(data).digest(), len(data))
                if key not in stored:
                    align = 65536 if len(data) >= 1 << 20 else 64  # page-aligned large tensors can be mmapped
                    f.write(b"\0" * (-f.tell() % align))
                    stored[key] = f.tell()
                    f.write(data)
                value.const_value = ir.ExternalTensor(WEIGHTS, stored[key], len(data), t.dtype, shape=t.shape,
                                                      name=value.name, base_dir=out_dir)
                del data
        f.flush()
    for name, g in graphs.items():
        ir.save(g, out_dir / name)
    return [*graphs, WEIGHTS]


def check_onnx(out_dir: Path, files: tuple[str, ...] = (PREFILL, DECODE)) -> None:
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
