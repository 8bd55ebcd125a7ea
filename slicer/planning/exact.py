"""Memory budgets for the resolver, and ``elastic plan --fit exact``: any architecture, not only
the trained budgets. No torch here.

``memory_cost`` states ``planning.memory.footprint`` in the form the integer program of
``formats/resolve.py`` holds, per hidden size: the tensors outside the layers (embeddings, final
norm, LM head), the residual stream and the chunk's logits, and the runtime overhead; per kept layer
its weights (at the weights precision, quantized ones with their scales), its KV cache and its SSM
state; the largest kept layer's prefill activations once; all of it times 1 + margin. The program's
answer is checked against ``footprint`` itself (an int4 group chosen over the whole model, the
margin's rounding) and solved again where they differ.

Example:
    >>> cost = memory_cost(parent, Workload(weights="int4"), overhead_bytes=0, max_bytes=6 * 2**30)
    >>> r = resolve(ec.dimensions, parent, logp, [cost])
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace
from typing import Sequence

from elastic.profiles.units import binary
from elastic.slicer.errors import ConfigError
from elastic.slicer.formats.arch import Arch, LayerArch
from elastic.slicer.formats.resolve import Cost, Resolution, UnreachableBudget, nearest, parameter_cost, resolve
from elastic.slicer.formats.safetensors import DTYPES
from elastic.slicer.formats.precision import lookup
from elastic.slicer.planning.memory import (Workload, _attention_context_bytes, _layer_activation_bytes, dtype_bytes,
                                            footprint, gguf_quantized, gguf_tensor_bytes, kv_cache_bytes,
                                            ssm_state_bytes, stream_bytes, weight_tensors)


def memory_cost(parent: Arch, w: Workload, overhead_bytes: int, max_bytes: float = math.inf,
                min_bytes: float = 0.0, engine: str | None = None) -> Cost:
    """``footprint(child, w, overhead_bytes, engine)["total"]`` in ``[min_bytes, max_bytes]``, as a
    :class:`~elastic.slicer.formats.resolve.Cost`. ``w`` has its precisions set (no "auto"). The
    program's terms are the reference model's; an engine's own sizing (llama.cpp's) is the exact
    value every answer is checked against (the resolver narrows its window where they differ)."""
    s, t = dtype_bytes(w.dtype), min(w.prefill_chunk, w.context)
    weights = w.weights or w.dtype

    p = lookup(weights)

    def tensor_bytes(arch: Arch, inside: bool) -> int:
        if gguf_quantized(p):  # llama.cpp's own types: bytes per weight, no safetensors dtype
            return sum(gguf_tensor_bytes(name, shape, p) for name, shape in arch.tensor_shapes().items()
                       if name.startswith("backbone.layers.") == inside)
        tensors = weight_tensors(arch, weights, w.dtype)
        return sum(math.prod(shape) * DTYPES[dt][1] for name, (dt, shape) in tensors.items()
                   if name.startswith("backbone.layers.") == inside)

    @functools.lru_cache(maxsize=None)
    def one(d: int, la: LayerArch) -> Arch:
        return parent.with_layers((la,), d)

    @functools.lru_cache(maxsize=None)
    def root(d: int) -> float:
        return tensor_bytes(one(d, parent.layers[0]), inside=False) + stream_bytes(one(d, parent.layers[0]), w) \
            + overhead_bytes

    @functools.lru_cache(maxsize=None)
    def layer(d: int, la: LayerArch) -> float:
        a = one(d, la)
        return (tensor_bytes(a, inside=True) + kv_cache_bytes(a, w.context, w.batch, w.kv or w.dtype)
                + ssm_state_bytes(a, w.batch, w.dtype, w.state))

    def peak(d: int, la: LayerArch) -> float:
        return _layer_activation_bytes(one(d, la), 0, t, w.batch, s) + _attention_context_bytes(one(d, la), 0, t, w, s)

    return Cost("bytes", root=root, layer=layer, peak=peak, factor=1 + w.margin, lo=min_bytes, hi=max_bytes,
                exact=lambda spec: footprint(spec.child_arch(parent), w, overhead_bytes, engine)["total"])


def default_memory(parent: Arch) -> Cost:
    """The memory a size like ``--budget 6GiB`` means for ``elastic slice``: the plan's terms at the
    default workload (``Workload()``: bfloat16, context 8192, batch 1, margin 5%), no device overhead."""
    return memory_cost(parent, Workload(), 0)


def resolve_bytes(dims: Sequence, parent: Arch, logp: dict, max_bytes: int, tolerance: float, *,
                  keep_attention: bool, what: str) -> Resolution:
    """The best architecture under ``logp`` whose memory (:func:`default_memory`) is at most
    ``max_bytes`` and at least ``1 - tolerance`` of it (``elastic slice --budget 6GiB``).

    Raises:
        UnreachableBudget: none is; names the nearest memory and its parameters.
    """
    cost = replace(default_memory(parent), lo=max_bytes * (1 - tolerance), hi=max_bytes)
    r = resolve(dims, parent, logp, [cost], keep_attention=keep_attention)
    if r is not None:
        return r
    near = nearest(dims, parent, [cost], keep_attention=keep_attention)
    raise UnreachableBudget(
        f"budget {what!r}: no architecture of the search space needs between {binary(cost.lo)} and "
        f"{binary(max_bytes)} (the plan's memory at its default workload: bf16, context 8192, batch 1); the nearest "
        f"needs {binary(near.values[0])} ({near.parameters:,} parameters)", near)


def largest_fitting(dims: Sequence, parent: Arch, cost: Cost, *, keep_attention: bool) -> Resolution | None:
    """The architecture with the most parameters whose memory (``cost``) fits; None when none does."""
    total = parent.param_counts()["total"]
    want = parameter_cost(parent, total, total)  # as close to the parent as the memory lets it
    try:
        return nearest(dims, parent, [want, cost], keep_attention=keep_attention)
    except ConfigError:  # nothing fits
        return None


def exact_fit(dims: Sequence, parent: Arch, logp_at, cost: Cost, tolerance: float, *,
              keep_attention: bool) -> Resolution | None:
    """The router's favourite among the architectures that fit: the largest parameter count that
    fits (``largest_fitting``), then the architecture of highest log-probability (``logp_at(size)``,
    the router's scores interpolated at that size) within ``tolerance`` below it that fits too.
    None when nothing fits."""
    top = largest_fitting(dims, parent, cost, keep_attention=keep_attention)
    if top is None:
        return None
    size = top.parameters
    r = resolve(dims, parent, logp_at(size), [parameter_cost(parent, size * (1 - tolerance), size), cost],
                keep_attention=keep_attention)
    return r or top
