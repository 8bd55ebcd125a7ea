"""The portable form: a slice with per-layer widths written as a stock ``nemotron_h`` model by
zero-padding every layer of a kind to one width. No torch here (the block padding works on numpy
arrays and on torch tensors alike, without importing torch).

Why it is exact (DESIGN.md section 10):
- MLP (and MoE expert / shared expert) neurons: zero rows of ``up_proj`` give a zero pre-activation,
  relu2(0) = 0, and zero columns of ``down_proj`` add nothing to the output;
- attention query heads: a zero query row makes every score 0, the head averages its values, and
  the zero ``o_proj`` columns of that head drop the result. Added heads go at the end of each KV
  group, so every kept head keeps its KV head (head h reads KV head h // (heads / kv_heads)).
Not exact, so refused:
- Mamba sizes: the gated RMSNorm normalises groups of ``mamba_num_heads * mamba_head_dim / n_groups``
  channels and divides by that count; added zero channels change every output;
- routed experts (a zero gate row still scores sigmoid(0) and gets tokens), KV heads, hidden size.

Runtimes that build every MLP from one global width (DESIGN.md section 10; docs/runtime-facts.md):
TensorRT Edge-LLM, TensorRT-LLM (a list-valued width is indexed by layer, not by MLP ordinal) and
sglang. transformers (with the shipped code), vLLM (NVIDIA's Puzzle form) and llama.cpp (elastic's
GGUF writer) take per-layer widths.

Example:
    >>> p = portable_form(child_arch, "stock", pad_multiple=128)
    >>> p.arch.config_form(), [(x.layer, x.before, x.after) for x in p.pads]
    ('nemotron_h', [(1, 192, 256), (3, 128, 256)])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Iterator

from elastic.profiles.units import MIB
from elastic.slicer.errors import ConfigError, Hint
from elastic.slicer.formats.arch import FORM_STOCK, Arch, LayerArch

FORMS = ("auto", "stock", "puzzle")  # --form: auto decides from the runtime; puzzle = compact, as sliced
# runtimes that take one MLP width for the whole model (see the module docstring), and the others
ONE_WIDTH_RUNTIMES = ("edgellm", "tensorrt-llm", "sglang")
PER_LAYER_RUNTIMES = ("transformers", "vllm", "llama.cpp")
RUNTIMES = ONE_WIDTH_RUNTIMES + PER_LAYER_RUNTIMES
# per-layer fields padding may raise, by layer kind; MLP/MoE widths may also be rounded up
PADDED = {"mlp": ("intermediate_size",), "attention": ("num_attention_heads",),
          "moe": ("moe_intermediate_size", "moe_shared_expert_intermediate_size")}
ROUNDED = ("intermediate_size", "moe_intermediate_size", "moe_shared_expert_intermediate_size")
MAMBA_NOT_EXACT = ("zero-padding a Mamba layer is not exact: its gated RMSNorm normalises groups of "
                   "mamba_num_heads * mamba_head_dim / n_groups channels and divides by that count, so added zero "
                   "channels change every output")
ZERO_BLOCK_BYTES = 16 * MIB  # zeros are yielded in pieces of at most this many bytes

Inserts = tuple[tuple[int, int], ...]  # (position on the compact axis, zeros inserted there), sorted


@dataclass(frozen=True)
class TensorPad:
    """Zeros inserted into one tensor along ``axis``: ``inserts`` at positions of the compact axis."""

    axis: int
    inserts: Inserts

    def shape(self, compact: tuple[int, ...]) -> tuple[int, ...]:
        out = list(compact)
        out[self.axis] += sum(n for _, n in self.inserts)
        return tuple(out)


@dataclass(frozen=True)
class LayerPad:
    """One padded size: child layer ``layer`` (``kind``), its ``field`` from ``before`` to ``after``."""

    layer: int
    kind: str
    field: str
    before: int
    after: int

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "kind": self.kind, "field": self.field, "from": self.before, "to": self.after}


@dataclass(frozen=True)
class Portable:
    """How a slice is written: ``arch`` (what its config.json describes), the padded sizes, and the
    zeros each padded tensor gets (keyed by the child's tensor name)."""

    arch: Arch
    compact: Arch  # the slice as cut, before any padding
    requested: str  # the --form asked for
    runtime: str | None
    pad_multiple: int | None
    pads: tuple[LayerPad, ...] = ()
    tensors: dict[str, TensorPad] = field(default_factory=dict, hash=False)

    def shape(self, name: str, compact: tuple[int, ...]) -> tuple[int, ...]:
        pad = self.tensors.get(name)
        return compact if pad is None else pad.shape(compact)

    def blocks(self, name: str, blocks: Iterable[Any], compact: tuple[int, ...]) -> Iterable[Any]:
        """``blocks`` of the compact tensor (pieces along axis 0), with this tensor's zeros inserted."""
        pad = self.tensors.get(name)
        return blocks if pad is None else pad_blocks(blocks, pad, compact)

    def cost(self) -> int:
        """Parameters the padding adds (all zeros)."""
        return self.arch.param_counts()["total"] - self.compact.param_counts()["total"]

    def to_json(self, bytes_per_parameter: float) -> dict[str, Any]:
        """The manifest's ``form``: what was asked, the config form written, each padded size and its cost."""
        added = self.cost()
        total = self.compact.param_counts()["total"]
        return {
            "requested": self.requested,
            "runtime": self.runtime,
            "config_form": self.arch.config_form(),
            "compact_config_form": self.compact.config_form(),
            "pad_multiple": self.pad_multiple,
            "padding": [p.to_json() for p in self.pads],
            "cost": {"parameters": added, "bytes": int(added * bytes_per_parameter),
                     "fraction": added / total if total else 0.0},
        }


def resolve_form(form: str = "auto", runtime: str | None = None) -> str:
    """"stock" or "puzzle" from ``--form`` and ``--runtime``: auto is stock for a runtime that takes
    one MLP width (:data:`ONE_WIDTH_RUNTIMES`), else the compact form ("puzzle")."""
    if form not in FORMS:
        raise ConfigError(f"unknown form {form!r}; choose one of {', '.join(FORMS)}")
    if runtime is not None and runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if form == "auto":
        return "stock" if runtime in ONE_WIDTH_RUNTIMES else "puzzle"
    return form


def portable_form(child: Arch, form: str = "auto", pad_multiple: int | None = None, runtime: str | None = None,
                  quantized: bool = False) -> Portable:
    """How to write ``child`` (a slice's architecture) in ``form``.

    Args:
        child: the slice as cut (its per-layer sizes).
        form: "stock": one size per layer kind, every MLP / MoE width and attention head count
            padded with zeros to the largest; "puzzle": as cut (the compact form); "auto": stock
            when ``runtime`` takes one MLP width, else puzzle.
        pad_multiple: round every MLP and MoE width up to a multiple of this (int4 AWQ's group of
            128), in either form.
        runtime: the runtime the slice is for (:data:`RUNTIMES`), for "auto".
        quantized: the source is quantized: its packed blocks are copied, never padded.

    Raises:
        ConfigError: the form cannot hold the slice exactly (per-layer Mamba sizes, routed expert
            counts or KV heads), a quantized slice would need padding, or a bad option.
    """
    resolved = resolve_form(form, runtime)
    if pad_multiple is not None and (isinstance(pad_multiple, bool) or not isinstance(pad_multiple, int)
                                     or pad_multiple < 1):
        raise ConfigError(f"the pad multiple must be a positive integer, found {pad_multiple!r}")
    if resolved == "stock":
        _refuse_stock(child)
    targets = _targets(child, stock=resolved == "stock", multiple=pad_multiple)
    pads, tensors, layers = [], {}, list(child.layers)
    for k, layer in enumerate(child.layers):
        want = targets(layer)
        changed = {f: v for f, v in want.items() if v != getattr(layer, f)}
        if not changed:
            continue
        pads += [LayerPad(k, layer.kind, f, getattr(layer, f), v) for f, v in changed.items()]
        tensors.update(_layer_tensors(child, k, layer, want))
        layers[k] = replace(layer, **changed)
    if pads and quantized:
        raise ConfigError(
            "this quantized slice would need zero padding (" + _describe(pads) + "), and elastic does not pad packed "
            "quantized blocks", hint=Hint("precision", "slice the float checkpoint in the padded form, then quantize "
                                          "that slice (or keep the compact form)"))
    arch = child.with_layers(tuple(layers)) if pads else child
    assert resolved != "stock" or arch.config_form() == FORM_STOCK, "stock padding left per-layer sizes"
    return Portable(arch=arch, compact=child, requested=form, runtime=runtime, pad_multiple=pad_multiple,
                    pads=tuple(pads), tensors=tensors)


def _describe(pads) -> str:
    shown = ", ".join(f"layer {p.layer} {p.field} {p.before} -> {p.after}" for p in pads[:4])
    return shown + (f" and {len(pads) - 4} more" if len(pads) > 4 else "")


def _refuse_stock(child: Arch) -> None:
    """Raise ConfigError, with every reason, when zero padding cannot make ``child`` stock exactly."""
    problems = []

    def sizes(kind: str, f) -> list[str]:
        return [f"layer {i}: {f(layer)}" for i, layer in enumerate(child.layers) if layer.kind == kind]

    if not child.uniform("mamba"):
        problems.append("Mamba layers of different sizes (" + ", ".join(sizes(
            "mamba", lambda x: f"{x.mamba_num_heads} heads x {x.mamba_head_dim}")) + "): " + MAMBA_NOT_EXACT)
    if len({x.num_key_value_heads for x in child.layers if x.kind == "attention"}) > 1:
        problems.append("attention layers with different KV head counts (" + ", ".join(sizes(
            "attention", lambda x: f"{x.num_key_value_heads} KV heads")) + "): KV heads are never padded")
    if len({x.n_routed_experts for x in child.layers if x.kind == "moe"}) > 1:
        problems.append("MoE layers with different numbers of routed experts (" + ", ".join(sizes(
            "moe", lambda x: f"{x.n_routed_experts} experts")) + "): a zero expert is not exact (its zero gate row "
            "still scores sigmoid(0) = 0.5 and the router sends tokens to it)")
    if problems:
        raise ConfigError(
            "the stock form (one size per layer kind) cannot hold this slice exactly: it is in elastic's extension "
            "form, and only MLP widths, MoE expert widths and attention query heads can be zero-padded",
            problems=problems,
            hint=Hint("spec", "slice sizes that keep one Mamba size (a budget trained without per-layer Mamba sizes) "
                              "to write the stock form, or keep the compact form, which transformers loads with the "
                              "shipped modeling code"))


def _targets(child: Arch, stock: bool, multiple: int | None):
    """A function from a layer to the size of each field padding may raise: the largest of its kind
    (stock), else its own; rounded up to ``multiple`` for the MLP/MoE widths."""
    top = {f: max((getattr(x, f) for x in child.layers if x.kind == kind), default=0)
           for kind, fields in PADDED.items() for f in fields}

    def target(layer: LayerArch) -> dict[str, int]:
        out = {}
        for f in PADDED.get(layer.kind, ()):
            v = top[f] if stock else getattr(layer, f)
            if multiple and f in ROUNDED:
                v = -(-v // multiple) * multiple
            out[f] = v
        return out

    return target


def _layer_tensors(child: Arch, k: int, layer: LayerArch, want: dict[str, int]) -> dict[str, TensorPad]:
    """The zeros each tensor of child layer ``k`` gets for the sizes ``want``."""
    pre = f"backbone.layers.{k}.mixer."
    out: dict[str, TensorPad] = {}

    def ffn(prefix: str, before: int, after: int) -> None:  # up (F, in) rows, down (out, F) columns
        if after == before:
            return
        tail = ((before, after - before),)
        out[f"{prefix}up_proj.weight"] = TensorPad(0, tail)
        out[f"{prefix}down_proj.weight"] = TensorPad(1, tail)
        if child.mlp_bias:
            out[f"{prefix}up_proj.bias"] = TensorPad(0, tail)

    if layer.kind == "mlp":
        ffn(pre, layer.intermediate_size, want["intermediate_size"])
    elif layer.kind == "moe":
        for j in range(layer.n_routed_experts):
            ffn(f"{pre}experts.{j}.", layer.moe_intermediate_size, want["moe_intermediate_size"])
        ffn(f"{pre}shared_experts.", layer.moe_shared_expert_intermediate_size,
            want["moe_shared_expert_intermediate_size"])
    elif layer.kind == "attention" and want["num_attention_heads"] != layer.num_attention_heads:
        kv, hd = layer.num_key_value_heads, child.head_dim
        have, need = layer.num_attention_heads // kv, want["num_attention_heads"] // kv  # query heads per KV group
        # q rows / o columns: [group 0: kept heads, zero heads | group 1: ...]
        inserts = tuple(((g + 1) * have * hd, (need - have) * hd) for g in range(kv))
        out[f"{pre}q_proj.weight"] = TensorPad(0, inserts)
        out[f"{pre}o_proj.weight"] = TensorPad(1, inserts)
    return out


# ---- zeros into streamed blocks ------------------------------------------------------------------


def _zeros(like, shape: tuple[int, ...]):
    """Zeros of ``like``'s type and dtype (a numpy array or a torch tensor): zero bits are 0.0 in
    every float format, and in the raw bits the slicer copies."""
    if type(like).__module__.startswith("numpy"):
        import numpy as np

        return np.zeros(shape, dtype=like.dtype)
    import torch  # a torch block: torch is already imported

    return torch.zeros(shape, dtype=like.dtype)


def _cat(pieces: list, axis: int):
    if type(pieces[0]).__module__.startswith("numpy"):
        import numpy as np

        return np.concatenate(pieces, axis=axis)
    import torch

    return torch.cat(pieces, dim=axis)


def _insert(block, axis: int, inserts: Inserts, offset: int = 0):
    """``block`` with zeros inserted along ``axis`` (>= 1) at ``inserts`` (positions of the compact axis)."""
    pieces, start = [], 0
    for at, n in inserts:
        pieces.append(block[(slice(None),) * axis + (slice(start, at - offset),)])
        shape = list(block.shape)
        shape[axis] = n
        pieces.append(_zeros(block, tuple(shape)))
        start = at - offset
    pieces.append(block[(slice(None),) * axis + (slice(start, None),)])
    return _cat(pieces, axis)


def _zero_rows(like, rows: int, row_shape: tuple[int, ...]) -> Iterator[Any]:
    per_row = max(1, math.prod(row_shape) * like.dtype.itemsize)  # numpy and torch dtypes both say itemsize
    step = max(1, ZERO_BLOCK_BYTES // per_row)
    for r in range(0, rows, step):
        yield _zeros(like, (min(step, rows - r), *row_shape))


def pad_blocks(blocks: Iterable[Any], pad: TensorPad, compact: tuple[int, ...]) -> Iterator[Any]:
    """Yield ``blocks`` (consecutive pieces of a compact tensor along axis 0) with ``pad``'s zeros:
    inserted into every block for an inner axis, between (or after) the blocks for axis 0."""
    if pad.axis > 0:
        for block in blocks:
            yield _insert(block, pad.axis, pad.inserts)
        return
    pending, row, last = list(pad.inserts), 0, None
    for block in blocks:
        last, n, start = block, block.shape[0], 0
        while pending and pending[0][0] < row + n:
            at, count = pending.pop(0)
            if at - row > start:
                yield block[start:at - row]
            yield from _zero_rows(block, count, tuple(block.shape[1:]))
            start = at - row
        if start < n:
            yield block[start:]
        row += n
    assert last is not None, "a padded tensor had no data"
    for at, count in pending:  # at the end of the tensor
        assert at == row, f"an insert at {at} past the end ({row})"
        yield from _zero_rows(last, count, tuple(last.shape[1:]))
