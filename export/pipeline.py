"""``elastic export`` as one library call: graphs, checks, parity, engines, README — written atomically.

Example:
    >>> summary = export_model("./model-50", "./model-50-onnx", format="all", target=get_profile("orin-nano-8gb"))
    >>> summary["files"], summary["unsupported_ops"], summary["parity"]["ok"]
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elastic.profiles.progress import Progress, quiet
from elastic.slicer.errors import ElasticError, Hint
from elastic.slicer.slice import PASSTHROUGH_FILES
from elastic.slicer.planning.memory import DEFAULT_EXPORT_CONTEXT

from .layout import CHECKSUMS, MANIFEST, README, SCRIPT, checksums

FORMATS = ("onnx", "tensorrt", "all")
# files a runtime needs beside the graphs: the config (eos) and the files a slice carries (the tokenizer
# in any of its forms, the chat template, the generation config)
PASSTHROUGH = ("config.json", *PASSTHROUGH_FILES)


def untraced_layers(arch) -> str | None:
    """Why elastic export cannot trace ``arch`` (its MoE layers), or None when it can."""
    moe = [i for i, layer in enumerate(arch.layers) if layer.kind == "moe"]
    if not moe:
        return None
    # the reference MoE layer runs only the experts some token chose: a data-dependent loop
    return (f"layers {moe} are MoE layers, which elastic export does not trace yet (the expert dispatch depends "
            "on the tokens); serve MoE slices with transformers or vLLM")


def _open(model_dir: str | Path, dtype: str):
    """(checkpoint, torch dtype of the graphs): the checkpoint is opened and validated, not loaded."""
    from elastic.slicer.storage.reader import Checkpoint

    from elastic.slicer.formats.precision import GRAPHS, lookup

    from .deps import EXPORTER, require

    p = lookup(dtype, GRAPHS, "ONNX graph dtype")  # bfloat16 engines are built from float32 graphs
    require(*EXPORTER)
    import torch

    return Checkpoint.open(model_dir, require_weights=True), getattr(torch, p.torch)


@dataclass(frozen=True)
class ExportResult:
    """What ``export_model`` wrote: the directory, and its manifest (``export_manifest.json``)."""

    out: Path
    manifest: dict[str, Any]

    @property
    def tensorrt(self) -> dict[str, Any] | None:
        """The engine build or its script: ``built``, ``settings``, ``shapes``, ``script``, ..."""
        return self.manifest.get("tensorrt")

    def to_json(self) -> dict[str, Any]:
        """`elastic export --json`: the manifest's keys (``out``, ``format``, ``dtype``, ``opset``,
        ``parity``, ``tensorrt``, ``files``, ...)."""
        return dict(self.manifest)


def export_model(
    model_dir: str | Path,
    out: str | Path,
    *,
    format: str = "onnx",
    target=None,
    precision: str = "auto",
    max_batch: int = 1,
    max_context: int = DEFAULT_EXPORT_CONTEXT,
    dtype: str = "float32",
    opset: int | None = None,
    parity: bool = True,
    external_data: bool | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """Export a dense model directory for an edge runtime.

    Writes ``prefill.onnx`` / ``decode.onnx`` and the ``weights.bin`` both share, checks them
    with ``onnx.checker`` and against TensorRT's operator matrix, compares ONNX Runtime with the
    PyTorch reference, and for ``format`` "tensorrt"/"all" builds the engines (TensorRT + GPU
    present) or writes ``build_engines.sh``. Everything goes to a temporary directory beside
    ``out``, renamed into place at the end: a failure leaves ``out`` as it was.

    Args:
        model_dir: a dense nemotron_h checkpoint (e.g. from ``elastic slice``).
        out: the export directory; must not exist unless ``force``.
        format: "onnx" (graphs only), "tensorrt" (graphs + engines or the script), "all" (both,
            and the script even when the engines were built, to rebuild on another device).
        target: the device the engines are for: the ``Target`` its caller decided
            (``elastic.profiles.target.resolve_target``: a profile, or the GPU ``--gpu`` picks), a
            ``DeviceProfile``, or None: generic engine settings (nothing is detected here).
        precision: TensorRT precision: "auto" or any spelling of bfloat16 / float16 / float32.
        max_batch, max_context: the largest shapes the engines accept.
        dtype: dtype of the graphs' weights: "float32", or "float16" (half the files; the parity
            check is for float32 only: float16 rounds differently in each runtime).
        opset: ONNX opset (default 18).
        parity: compare ONNX Runtime with PyTorch (float32 only); a mismatch refuses the export.
        external_data: kept for earlier callers: the weights always go once to ``weights.bin``,
            shared by the graphs (False is refused).
        progress: ``progress(stage, done, total, message=...)`` (``elastic.profiles.progress``):
            "open", "trace", "write weights" (tensors), "optimise", "check onnx", "check operators",
            "parity", "build engine" (engines), "checksums"; a stage without a size has total None.

    Returns:
        ``out``, ``files``, ``opset``, ``exporter``, ``external_data``, ``unsupported_ops``,
        ``tensorrt_check`` (per-graph reports), ``parity`` (max abs diffs; None when skipped),
        ``tensorrt`` (engine metadata; None for format "onnx"), and the model's description.

    Raises:
        CheckpointError / ConfigError: ``model_dir`` is not a loadable checkpoint.
        MissingDependencyError: onnx / onnxscript / onnxruntime are not installed.
        ElasticError: ``out`` exists, bad options, or the graphs disagree with PyTorch.
        DiskFullError: the export does not fit on the disk of ``out`` (refused before writing when
            the free space says so; else when the disk fills up, tracing included), with the size
            of a float export and the free space. Nothing of the export is kept.
    """
    from elastic.slicer.storage.outputs import check_output

    from .trt import engine_settings

    dtype = _graph_dtype(format, dtype)  # any spelling; canonical from here on
    model_files = [p for p in Path(model_dir).iterdir() if p.is_file()] if Path(model_dir).is_dir() else [model_dir]
    check_output(out, force=force, source_files=model_files)  # before the slow part (the writer checks again)
    ckpt, torch_dtype, q = _open_exportable(model_dir, dtype, progress or quiet)
    settings = (engine_settings(target, precision, max_batch, max_context,
                                quantized=q.layout.format.precision if q else None) if format != "onnx" else None)
    summary = _write_export(out, ckpt, torch_dtype, q, settings, model_files, format=format, dtype=dtype, opset=opset,
                            parity=parity, external_data=external_data, force=force, progress=progress)
    _let_script_run(out)
    return ExportResult(Path(out), summary)


def _open_exportable(model_dir: str | Path, dtype: str, say: Progress):
    """(checkpoint, torch dtype of the graphs, Q/DQ plan or None) once MoE layers, which are not traced, are refused."""
    from .qdq import plan as qdq_plan

    say("open", 0, None, message=f"opening {model_dir}")
    ckpt, torch_dtype = _open(model_dir, dtype)  # validated, not loaded
    why = untraced_layers(ckpt.arch)
    if why:
        raise ElasticError(f"{model_dir}: {why}")
    return ckpt, torch_dtype, qdq_plan(ckpt, torch_dtype)  # a None plan: a float checkpoint, plain float graphs


def _write_export(out: str | Path, ckpt, torch_dtype, q, settings, model_files: list, *, format: str, dtype: str,
                  opset: int | None, parity: bool, external_data: bool | None, force: bool,
                  progress: Progress | None) -> dict[str, Any]:
    """The export written atomically (graphs, checks, parity, engines or script, README, checksums); its manifest."""
    from elastic.slicer.storage.outputs import MARKER
    from elastic.slicer.storage.writer import ShardedWriter

    from .graphs import state_tensors
    from .onnx_export import DEFAULT_OPSET, check_onnx, write_graphs
    from .qdq import quantized_source
    from .weights import checkpoint_source, release_memory
    from .readme import render
    from .trt import build_or_script, check_export

    say = progress or quiet
    weights = checkpoint_source(ckpt)
    arch = ckpt.arch
    copied = [ckpt.root / f for f in PASSTHROUGH if (ckpt.root / f).is_file()]
    with ShardedWriter(out, force=force, source_files=model_files, kind="export") as w:
        tmp = w.tmp
        if q is None:  # weights.bin in the graph dtype; refused now when it cannot fit
            w.expect(export_disk_bytes(arch.param_counts()["total"], dtype) + sum(f.stat().st_size for f in copied))
        info = write_graphs(arch, tmp, weights=weights, dtype=torch_dtype, opset=opset or (q.opset if q else DEFAULT_OPSET),
                            external_data=external_data, progress=progress, qdq=q,
                            quantized=quantized_source(ckpt, q) if q else None)
        release_memory()  # the tracer's graphs and the write buffers, before the checks and the parity run
        say("check onnx", 0, None, message="onnx.checker")
        check_onnx(tmp)
        say("check operators", 0, None, message="checking operators against TensorRT's ONNX parser")
        compat = check_export(tmp)
        result = None
        if parity and dtype == "float32":
            say("parity", 0, None, message="comparing ONNX Runtime with PyTorch")
            result = _parity(ckpt, tmp, info, weights, torch_dtype, q)
        trt = build_or_script(tmp, settings, always_script=format == "all", progress=progress) if settings else None
        for f in copied:
            w.add_file(f)
        summary = _summary(out, ckpt, format, dtype, info, q, compat, result, parity, trt)
        w.add_text(README, render(summary, state_tensors(arch), dtype))
        summary["files"] = sorted([*(p.name for p in tmp.iterdir()), MANIFEST, MARKER, CHECKSUMS])
        w.add_json(MANIFEST, summary)
        say("checksums", 0, None, message="checksums")
        w.add_text(CHECKSUMS, checksums(tmp))
    return summary


def _let_script_run(out: str | Path) -> None:
    """Make the engine build script executable: the writer gives every file 0666 & ~umask."""
    if (Path(out) / SCRIPT).is_file():
        umask = os.umask(0)
        os.umask(umask)
        (Path(out) / SCRIPT).chmod(0o777 & ~umask)


def _graph_dtype(format: str, dtype: str) -> str:
    """The graphs' dtype, canonical ("float32"), once ``format`` and ``dtype`` are checked."""
    from elastic.slicer.formats.precision import GRAPHS, lookup

    if format not in FORMATS:
        raise ElasticError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if lookup(dtype).name == "bfloat16":
        raise ElasticError("ONNX graphs are written in float32 or float16 (what the parity check and the ONNX "
                           "Runtime generation here run); TensorRT builds bfloat16 engines from float32 graphs",
                           hint=Hint("dtype", "keep float32 graphs and ask for a bf16 engine precision"))
    return lookup(dtype, GRAPHS, "ONNX graph dtype").name


def export_disk_bytes(parameters: int, dtype: str = "float32") -> int:
    """The disk a float export of a model of ``parameters`` takes: ``weights.bin``, every parameter
    once in the graphs' ``dtype`` (the graphs, README and tokenizer are small beside it; TensorRT
    engines, where built, come on top)."""
    from elastic.slicer.formats.precision import GRAPHS, lookup

    return int(parameters * lookup(dtype, GRAPHS, "ONNX graph dtype").bytes)


def _parity(ckpt, tmp: Path, info: dict, weights, torch_dtype, q) -> dict[str, Any]:
    """weights.bin read back against the checkpoint, then ONNX Runtime against PyTorch; raises
    ElasticError when either differs (nothing of the export is kept)."""
    from .parity import QDQ_MEAN_TOLERANCE, QDQ_TOLERANCE, check_parity, shared_model
    from .runtime import OnnxGenerator
    from .weights import release_memory, verify_weights

    release_memory(trim_threshold=True)  # what PyTorch frees during the check goes back to the OS at once
    # one memory map of weights.bin for ONNX Runtime and the model; no arena kept beside PyTorch's activations
    gen = OnnxGenerator(tmp)
    floats = {n: v for n, v in gen.weights.items() if n not in info["qdq"]}  # Q/DQ bytes: parity checks them
    bad = verify_weights(floats, weights, torch_dtype)
    release_memory()
    if bad:
        raise ElasticError(f"weights.bin differs from the checkpoint in {len(bad)} tensor(s) (nothing was "
                           "written); this is a bug, please report it", problems=bad[:20])
    if q is None:
        result = check_parity(shared_model(ckpt.arch, gen.weights, weights, torch_dtype), tmp, generator=gen)
    else:
        # Q/DQ graphs: against the reference loader, which dequantizes each Linear and fake-quantizes
        # W8A8 inputs as the graphs' Q/DQ do. Memory is not flat here: the dequantized model is held
        # in float32 beside ONNX Runtime's sessions (a quantized export is small; the float path stays flat).
        from elastic.slicer.nn.model import load_model

        result = check_parity(load_model(ckpt, dtype=torch_dtype), tmp, generator=gen, tolerance=QDQ_TOLERANCE,
                              mean_tolerance=QDQ_MEAN_TOLERANCE)
    del gen
    if not result["ok"]:
        raise ElasticError(
            "the ONNX graphs disagree with the PyTorch model (nothing was written): max |logit diff| "
            f"prefill {result['prefill_max_abs_diff']:.2e}, decode {result['decode_max_abs_diff']:.2e}"
            + (f", chunked prefill {result['chunked_prefill_max_abs_diff']:.2e}"
               if result.get("chunked_prefill_max_abs_diff") is not None else "")
            + (f", mean {result['mean_abs_diff']:.2e} (at most {result['mean_tolerance']:g})"
               if result.get("mean_tolerance") is not None else "") + ", "
            f"greedy tokens {'equal' if result['greedy_tokens_equal'] else 'different'} "
            f"(tolerance {result['tolerance']:g}); this is a bug, please report it",
            hint=Hint("parity", "to export anyway, skip the check", False))
    return result


def _summary(out, ckpt, format: str, dtype: str, info: dict, q, compat: dict, result, parity: bool,
             trt) -> dict[str, Any]:
    """export_manifest.json, less its file list."""
    arch = ckpt.arch
    return {
        "out": str(Path(out)),
        "model_dir": str(ckpt.root),
        "format": format,
        "dtype": dtype,
        "parameters": arch.param_counts()["total"],
        "layer_pattern": arch.layer_pattern,
        "opset": info["opset"],
        "quantization": ({"quant_algo": q.layout.quant_algo, "precision": q.layout.format.precision,
                          "weight_type": q.weight_type, "activations": q.activations,
                          "group_size": q.layout.group_size if q.weight_type == "INT4" else None,
                          "qdq_linears": len(q.modules)} if q else None),
        "exporter": info["exporter"],
        "external_data": info["external_data"],
        "io": info["io"],
        "unsupported_ops": compat["unsupported_ops"],
        "tensorrt_check": compat,
        "parity": result,
        "parity_skipped": None if result else ("--no-parity" if not parity else
                                               f"{dtype} graphs: parity is checked on float32 graphs only"),
        "tensorrt": trt,
    }


def export_onnx(model_dir: str | Path, out_dir: str | Path, **kwargs) -> ExportResult:
    """:func:`export_model` with ``format="onnx"``: the graphs, checked, with a README."""
    return export_model(model_dir, out_dir, format="onnx", **kwargs)


def check_only(path: str | Path, *, dtype: str = "float32", opset: int | None = None,
               progress: Progress | None = None) -> dict[str, Any]:
    """The TensorRT operator check alone, writing nothing (progress as in :func:`export_model`).

    Args:
        path: an export directory (its graphs are checked as they are) or a model directory
            (exported to a temporary directory first, which is then removed).

    Returns:
        :func:`elastic.export.trt.check_export`'s report plus ``path`` and ``opset``.
    """
    from .deps import require
    from .runtime import is_export_dir
    from .trt import check_export

    require("onnx")
    path = Path(path)
    if is_export_dir(path):
        report = check_export(path)
        opsets = {r["opset"] for r in report["graphs"].values()}
        return {"path": str(path), "opset": opsets.pop() if len(opsets) == 1 else sorted(opsets), **report}
    from .onnx_export import DEFAULT_OPSET, write_graphs

    from .qdq import plan as qdq_plan, quantized_source
    from .weights import checkpoint_source

    ckpt, torch_dtype = _open(path, dtype)
    tmp = Path(tempfile.mkdtemp(prefix=".elastic-check-"))
    try:
        q = qdq_plan(ckpt, torch_dtype)
        info = write_graphs(ckpt.arch, tmp, weights=checkpoint_source(ckpt), dtype=torch_dtype,
                            opset=opset or (q.opset if q else DEFAULT_OPSET), progress=progress, qdq=q,
                            quantized=quantized_source(ckpt, q) if q else None)
        return {"path": str(path), "opset": info["opset"], **check_export(tmp)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

