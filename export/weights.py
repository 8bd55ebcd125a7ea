"""The weights of an export, stored once: ``weights.bin``, written straight from the checkpoint and
shared by ``prefill.onnx``, ``decode.onnx`` and every session that runs them.

- :func:`checkpoint_source`: where each parameter's values come from, one tensor at a time (the
  checkpoint's safetensors for a float checkpoint; the dequantizing loader for a quantized one).
- :func:`write_weights`: every initializer the graphs need, in the graph dtype, each aligned so it
  can be memory-mapped; a Linear weight the graphs use transposed is stored transposed (the graphs
  read it directly, no Transpose node and no second copy at load time).
- :func:`mapped_weights`: the initializers of an export directory as read-only numpy views of one
  memory map of ``weights.bin`` (ONNX Runtime sessions and the parity check's PyTorch model share
  those pages instead of each loading a copy).

Example:
    >>> source = checkpoint_source(Checkpoint.open("./model-50", require_weights=True))
    >>> offsets = write_weights(out / WEIGHTS, entries, source, torch.float32)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elastic.profiles.progress import Progress

from .layout import WEIGHTS

ALIGN_LARGE = 65536  # tensors of 1 MiB and more start on a 64 KiB boundary (mmap-friendly)
ALIGN_SMALL = 64
# ONNX types ONNX Runtime cannot take from a numpy view: FLOAT8E4M3FN..FLOAT8E5M2FNUZ, UINT4, INT4, FLOAT4E2M1
UNSHARED = frozenset({17, 18, 19, 20, 21, 22, 23})


@dataclass(frozen=True)
class Entry:
    """One initializer of the graphs: its name there, the parameter it holds, stored transposed or not."""

    name: str  # the graph's initializer name
    param: str  # the reference model's parameter name (the checkpoint's tensor name); raw: the source's key
    transposed: bool
    raw: bool = False  # a Q/DQ tensor (export/qdq.py): written as its source gives it, no cast


@dataclass(frozen=True)
class Placement:
    offset: int
    length: int
    shape: tuple[int, ...]


def checkpoint_source(ckpt, fold_smoothing: bool = False) -> Callable[[str], Any]:
    """``get(param_name) -> torch.Tensor`` for the reference model's parameters, one at a time.

    A float checkpoint is read tensor by tensor (a tied ``lm_head.weight`` is the embeddings). In a
    quantized one the unquantized tensors are read the same way and a quantized Linear's weight is
    dequantized from its own tensors alone (``elastic.slicer.quant.dequant``), one Linear at a time.

    Args:
        fold_smoothing: for a runtime that feeds the Linear its input unchanged (llama.cpp): fold
            the input's smoothing (SmoothQuant / AWQ ``pre_quant_scale``, which the quantized graph
            applies to the activations) into the weight's input columns, so ``x @ W.T`` is what the
            quantized model computes before its activation rounding.
    """
    q = ckpt.quant

    def get(name: str):
        if name not in ckpt.tensors and name == "lm_head.weight" and ckpt.arch.tie_word_embeddings:
            name = "backbone.embeddings.weight"
        module = name.removesuffix(".weight")
        if q is not None and name.endswith(".weight") and f"{module}.weight_scale" in ckpt.tensors:
            from elastic.slicer.quant.dequant import dequantize_module

            w, inp = dequantize_module(ckpt, module)
            if fold_smoothing and inp is not None and inp.pre_quant_scale is not None:
                w = w * inp.pre_quant_scale.float()[None, :]  # (out, in) * (1, in)
            return w
        return ckpt.read(name)

    return get


def write_weights(path: Path, entries: list[Entry], get: Callable[[str], Any], dtype,
                  progress: Progress | None = None,
                  raw: Callable[[str], Any] | None = None) -> dict[str, Placement]:
    """Write every entry's values to ``path`` in ``dtype``; returns name -> where it is.

    A ``raw`` entry comes from ``raw(e.param) -> (tensor, logical shape)`` and is written byte for
    byte (a quantized weight; INT4 holds two elements per byte, so its shape is not the tensor's).

    ``progress("write weights", tensors written, tensors)`` after each one.

    Memory: one tensor (and its cast/transposed copy) at a time.
    """
    import torch

    out: dict[str, Placement] = {}
    with open(path, "wb") as f:
        for k, e in enumerate(entries):
            if e.raw:
                t, shape = raw(e.param)
                t = t.contiguous()
            else:
                t = get(e.param).to(dtype)
                if e.transposed:
                    t = t.t()
                t = t.contiguous()
                shape = tuple(t.shape)
            data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
            length = t.numel() * t.element_size()
            align = ALIGN_LARGE if length >= 1 << 20 else ALIGN_SMALL
            f.write(b"\0" * (-f.tell() % align))
            out[e.name] = Placement(f.tell(), length, tuple(shape))
            f.write(memoryview(data) if length else b"")
            del t, data
            if progress:
                progress("write weights", k + 1, len(entries))
    return out


def external_initializers(graph_path: Path, all_types: bool = False) -> dict[str, tuple[int, int, int, tuple[int, ...]]]:
    """name -> (offset, length, ONNX data type, shape) of every initializer a graph keeps in ``weights.bin``
    that :func:`mapped_weights` can share with ONNX Runtime (``all_types``: every one). FLOAT8 and INT4
    (Q/DQ weights) are left out: ONNX Runtime makes no OrtValue from their numpy types and reads them
    from ``weights.bin`` itself."""
    import onnx

    model = onnx.load(str(graph_path), load_external_data=False)
    out = {}
    for t in model.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        if t.data_location == onnx.TensorProto.EXTERNAL and info.get("location") == WEIGHTS:
            if all_types or t.data_type not in UNSHARED:
                out[t.name] = (int(info.get("offset", 0)), int(info["length"]), t.data_type, tuple(t.dims))
    return out


def mapped_weights(export_dir: Path, graphs: tuple[str, ...]) -> dict[str, Any]:
    """The external initializers of ``graphs`` as numpy views into one read-only map of ``weights.bin``
    (empty when the export keeps its weights inside the graphs)."""
    import numpy as np
    from onnx.helper import tensor_dtype_to_np_dtype

    path = Path(export_dir) / WEIGHTS
    if not path.is_file():
        return {}
    entries: dict[str, tuple[int, int, int, tuple[int, ...]]] = {}
    for g in graphs:
        entries.update(external_initializers(Path(export_dir) / g))
    if not entries:
        return {}
    whole = np.memmap(path, dtype=np.uint8, mode="r")
    views = {}
    for name, (offset, length, dtype, shape) in entries.items():
        views[name] = whole[offset:offset + length].view(tensor_dtype_to_np_dtype(dtype)).reshape(shape)
    return views


def verify_weights(views: dict[str, Any], get: Callable[[str], Any], dtype) -> list[str]:
    """The initializers whose bytes in ``weights.bin`` differ from the source tensor (cast to
    ``dtype``, transposed where the graphs use it so): an independent check of what was written,
    one tensor at a time, so that the parity check (which runs the reference model over these same
    bytes) still compares against the checkpoint."""
    import warnings

    import torch

    from .layout import param_of

    bad = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.from_numpy on the read-only map
        for name, view in views.items():
            param, transposed = param_of(name)
            want = get(param).to(dtype)
            if transposed:
                want = want.t()
            got = torch.from_numpy(view)
            if got.shape != want.shape or not torch.equal(got, want):
                bad.append(name)
    return bad


MMAP_THRESHOLD = 1 << 18  # bytes: glibc's M_MMAP_THRESHOLD while an export runs its parity check


def release_memory(trim_threshold: bool = False) -> None:
    """Give freed memory back to the OS between stages (the tracer's graphs, one-tensor buffers):
    glibc keeps freed blocks below its mmap threshold in the heap, which would count against the
    next stage's peak. ``trim_threshold``: from now on, blocks of MMAP_THRESHOLD bytes and more are
    mapped and unmapped on their own (the activations of a parity run, freed layer after layer,
    would otherwise stay in the heap). :func:`elastic.slicer.nn.model.release_free_memory`."""
    from elastic.slicer.nn.model import release_free_memory

    release_free_memory(MMAP_THRESHOLD if trim_threshold else None)
