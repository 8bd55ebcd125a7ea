"""Slicing a quantized checkpoint without dequantizing it: the float slicing rules
(``formats.rules``) of every quantized Linear weight mapped onto the tensors that store it. No torch.

A Linear (out, in) keeps output rows R and input columns C (its float rule's two axes). Each stored
tensor follows those axes at its own resolution (Model Optimizer's unified HF export, checked
against nvidia-modelopt 0.47.0: ``torch/export/quant_utils.py`` ``to_quantized_weight``,
``pack_int4_in_uint8``; ``torch/quantization/qtensor/nvfp4_tensor.py`` ``NVFP4QTensor.quantize``;
see ``layout``):

=====================  =========================================================================
quant_algo             what the kept (R, C) become
=====================  =========================================================================
FP8                    weight (R, C); weight_scale, input_scale: scalars, copied
W8A8_SQ_PER_CHANNEL    weight (R, C); weight_scale (R,); pre_quant_scale (C,); input_scale copied
W8A16                  weight (R, C); weight_scale (R,)
W4A16_AWQ              weight (R/2, C) (two rows per byte: R even-aligned); weight_scale
                       (R, C/group) (C group-aligned); pre_quant_scale (C,)
NVFP4                  weight (R, C/2) and weight_scale (R, C/16) (C aligned to the 16-element
                       blocks); weight_scale_2, input_scale: scalars, copied
=====================  =========================================================================

Per-tensor scalars are kept as the source calibrated them: the kept stored values were quantized
with them, so the slice computes what the source computes on its kept entries (NVIDIA's Star
Elastic card: slicing prunes the weights, not the scales). A kept range that cuts through a packed
byte or a scale block is refused before anything is written: its scale would have to be
recomputed, which means dequantizing. A renumbered exclude list must leave the same Linears
quantized (checked; a pattern such as ``layers.?.mixer.in_proj`` would not).

Module names in ``exclude_modules`` (hf_quant_config.json) and ``ignore`` (config.json) that name a
layer by index are renumbered like the layers; entries for dropped layers are removed.

Example:
    >>> plan = plan_quantized(ckpt, tensor_rules(ckpt.arch, spec), spec)
    >>> [r.name for r in plan.rules if r.name.startswith("backbone.layers.0.mixer.in_proj.")]
    ['backbone.layers.0.mixer.in_proj.weight', 'backbone.layers.0.mixer.in_proj.weight_scale', ...]
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any

from elastic.slicer.errors import ConfigError, Hint
from elastic.slicer.formats.rules import Ranges, TensorRule
from elastic.slicer.formats.spec import SliceSpec
from elastic.slicer.quant.layout import (HF_QUANT_CONFIG, OPTIONAL, QuantLayout, describe, keeps_dtype,
                                         linear_modules)

# leaf -> per stored axis, (the Linear axis it follows, float entries per stored entry); () a scalar.
# "group" is the layout's group size (AWQ's scale groups, NVFP4's 16-element blocks).
LEAVES: dict[str, dict[str, tuple[tuple[str, int | str], ...]]] = {
    "FP8": {"weight": (("out", 1), ("in", 1)), "weight_scale": (), "input_scale": ()},
    "W8A8_SQ_PER_CHANNEL": {"weight": (("out", 1), ("in", 1)), "weight_scale": (("out", 1),), "input_scale": (),
                            "pre_quant_scale": (("in", 1),)},
    "W8A16": {"weight": (("out", 1), ("in", 1)), "weight_scale": (("out", 1),)},
    "W4A16_AWQ": {"weight": (("out", 2), ("in", 1)), "weight_scale": (("out", 1), ("in", "group")),
                  "pre_quant_scale": (("in", 1),)},
    "NVFP4": {"weight": (("out", 1), ("in", 2)), "weight_scale": (("out", 1), ("in", "group")),
              "weight_scale_2": (), "input_scale": ()},
}
# why a kept range must align on an axis, by (quant_algo, axis)
WHY = {
    ("W4A16_AWQ", "out"): "W4A16_AWQ packs output rows 2k and 2k+1 into one byte",
    ("W4A16_AWQ", "in"): "W4A16_AWQ keeps one scale per {g} consecutive inputs of a row",
    ("NVFP4", "in"): "NVFP4 keeps one fp8 scale per block of {g} consecutive inputs of a row",
}
_LAYER = re.compile(r"(?<![A-Za-z0-9_])layers\.([^.]+)")  # the index segment of ".layers.N."


@dataclass(frozen=True)
class QuantPlan:
    """What slicing a quantized checkpoint along one spec writes."""

    rules: tuple[TensorRule, ...]  # every child tensor, in stored elements (packed bytes, scale blocks)
    stored: frozenset[str]  # child tensors copied bit for bit whatever dtype is asked (packed weights, scales)
    layout: QuantLayout  # the child's (exclude list renumbered)
    quantization_config: dict | None  # config.json's, for the child
    hf_quant_config: dict | None  # hf_quant_config.json, for the child


def plan_quantized(ckpt, rules: list[TensorRule], spec: SliceSpec) -> QuantPlan:
    """Map the float ``rules`` of a slice of the quantized Checkpoint ``ckpt`` onto its stored tensors.

    Args:
        ckpt: an opened quantized :class:`~elastic.slicer.storage.reader.Checkpoint` (``ckpt.quant`` set).
        rules: ``tensor_rules(ckpt.arch, spec)``: one rule per float tensor of the child.
        spec: the slice (its kept layers renumber the exclude lists).

    Returns:
        the child's tensors, which of them to copy bit for bit, and its two quantization configs.

    Raises:
        ConfigError: a kept range cuts through a packed byte or a scale block, or an exclude pattern
            names layers in a way renumbering cannot follow (every problem listed, nothing written).
    """
    layout: QuantLayout = ckpt.quant
    linears = set(linear_modules(ckpt.arch.tensor_shapes()))
    quantized = {m for m in linears if layout.is_quantized(m)}
    out: list[TensorRule] = []
    problems: list[str] = []
    for rule in rules:
        if rule.source.removesuffix(".weight") in quantized:  # a quantized Linear's weight
            mapped, bad = linear_rules(layout, rule, ckpt.tensors)
            out += mapped
            problems += bad
        else:  # unquantized: sliced as a float tensor
            out.append(rule)
    qc, hf, child_layout, bad = child_quant_configs(ckpt, spec)
    problems += bad
    for rule in rules if not bad else ():  # the renumbered exclude lists must quantize the same Linears
        src, dst = rule.source.removesuffix(".weight"), rule.name.removesuffix(".weight")
        if src in linears and child_layout.is_quantized(dst) != (src in quantized):
            problems.append(f"{src} is {'' if src in quantized else 'not '}quantized in the source, but the "
                            f"renumbered exclude list says {dst} is {'not ' if src in quantized else ''}quantized")
    if problems:
        raise ConfigError(f"this {layout.quant_algo} checkpoint cannot be sliced along this spec without "
                          f"dequantizing ({len(problems)} problem{'s' * (len(problems) > 1)}): choose sizes that keep "
                          "whole packed bytes and scale blocks, or slice the float checkpoint and quantize the slice",
                          problems=problems, path=str(ckpt.root), hint=Hint("spec", "keep whole scale blocks"))
    stored = frozenset(r.name for r in out if keeps_dtype(r.name, ckpt.tensors[r.source].dtype))
    return QuantPlan(tuple(out), stored, child_layout, qc, hf)


def linear_rules(layout: QuantLayout, rule: TensorRule, present) -> tuple[list[TensorRule], list[str]]:
    """The rules of the stored tensors of one quantized Linear whose float weight follows ``rule``.

    Args:
        layout: the source's layout.
        rule: the float rule of ``{module}.weight``: axes (kept output rows, kept input columns).
        present: the source's tensor names (``pre_quant_scale`` is optional in the layout).

    Returns:
        (rules, problems): problems name the tensor, the kept range and why it cannot be cut there.
    """
    algo, g = layout.quant_algo, layout.group_size
    kept = {"out": rule.axes[0], "in": rule.axes[1]}
    leaves = LEAVES[algo]
    problems = []
    for axis, ranges in kept.items():  # the coarsest resolution any stored tensor has on this axis
        unit = max([_unit(u, g) for dims in leaves.values() for a, u in dims if a == axis], default=1)
        for a, b in ranges:
            cut = a if a % unit else b if b % unit else None
            if cut is not None:
                what = "output rows" if axis == "out" else "input columns"
                lo = cut // unit * unit
                problems.append(f"{rule.source}: kept {what} [{a}, {b}) cut through [{lo}, {lo + unit}): "
                                f"{WHY[(algo, axis)].format(g=g)}")
    if problems:
        return [], problems
    src, dst = rule.source.removesuffix("weight"), rule.name.removesuffix("weight")
    out = []
    for leaf, dims in leaves.items():
        if leaf in OPTIONAL and src + leaf not in present:
            continue
        axes = tuple(stored_ranges(kept[axis], _unit(u, g)) for axis, u in dims)
        out.append(TensorRule(dst + leaf, src + leaf, axes))
    return out, []


def stored_ranges(ranges: Ranges, unit: int) -> Ranges:
    """Kept float ranges -> kept ranges of a stored axis that holds ``unit`` float entries per entry
    (ranges aligned to ``unit``)."""
    return tuple((a // unit, b // unit) for a, b in ranges)


def _unit(u: int | str, group: int | None) -> int:
    return group if u == "group" else u


# ---- the exclude lists ------------------------------------------------------------------------


def renumber(names: list[str], kept_layers: list[int]) -> tuple[list[str], list[str]]:
    """Exclude entries for a child that keeps parent layers ``kept_layers`` (the child's layer k is
    parent layer ``kept_layers[k]``).

    ``backbone.layers.5.mixer.conv1d`` becomes ``backbone.layers.3.mixer.conv1d`` when two layers
    before it are dropped, and goes when layer 5 is; names without a layer index, and patterns whose
    index is a plain wildcard (``backbone.layers.*.mixer.conv1d``), stay.

    Returns:
        (the entries in their order, problems: patterns that match layer indexes partially, such as
        ``layers.1*``, which mean other layers after renumbering).
    """
    new_index = {i: k for k, i in enumerate(kept_layers)}
    out, problems = [], []
    for name in names:
        found = _LAYER.findall(name)
        if not found:
            out.append(name)
            continue
        seg = found[0]
        if len(found) > 1 or (not seg.isdigit() and any(c.isdigit() for c in seg)):
            problems.append(f"exclude entry {name!r} names layers by a pattern on their index; renumbering "
                            "cannot follow it (list the layers one by one)")
            continue
        if not seg.isdigit():
            out.append(name)  # a wildcard over every layer
        elif int(seg) in new_index:
            out.append(_LAYER.sub(f"layers.{new_index[int(seg)]}", name, count=1))
    return out, problems


def child_quant_configs(ckpt, spec: SliceSpec) -> tuple[dict | None, dict | None, QuantLayout, list[str]]:
    """The child's ``quantization_config`` (config.json) and hf_quant_config.json, carried from the
    source with their exclude lists renumbered; the child's layout; the problems renumbering met."""
    kept = spec.kept_layers()
    problems: list[str] = []
    qc = copy.deepcopy(ckpt.config.get("quantization_config"))
    if isinstance(qc, dict) and isinstance(qc.get("ignore"), list):
        qc["ignore"], problems = renumber(qc["ignore"], kept)
    exclude = qc.get("ignore", []) if isinstance(qc, dict) else []
    hf = None
    if (ckpt.root / HF_QUANT_CONFIG).is_file():  # QuantLayout.read has read and checked it
        hf = json.loads((ckpt.root / HF_QUANT_CONFIG).read_text())
        exclude, bad = renumber(hf["quantization"].get("exclude_modules") or [], kept)
        hf["quantization"]["exclude_modules"] = exclude
        problems += [p for p in bad if p not in problems]
    return qc, hf, QuantLayout.from_section({**ckpt.quant.config, "exclude_modules": exclude}), problems


def describe_slice(layout: QuantLayout) -> dict[str, Any]:
    """The ``quantization`` entry of the manifest of a slice cut from a quantized source."""
    return {**describe(layout), "source_quantized": True, "dequantized": False,
            "how": "packed weights and their block or channel scales cut to the kept rows and columns; per-tensor "
                   "scales (input_scale, weight_scale_2, FP8's weight_scale) copied from the source unchanged"}
