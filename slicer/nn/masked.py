"""The masked (elastic) forward: a nested model computed inside its parent, without slicing files.

The parent's parameters are narrowed to the kept entries (``index_select`` along the slicing
rules, not multiplication by zero), and the dense forward of the child's architecture runs on
them. Smaller budgets therefore cost less compute, gradients reach the parent's parameters, and
the result equals the physically sliced child by construction of the shared rules (tests check it
against an independent zero-mask computation and against the sliced files).

Example:
    >>> logits = masked_forward(parent, spec, input_ids)     # == load_model(sliced_dir)(input_ids)
"""

from __future__ import annotations

import functools

import torch

from elastic.slicer.formats.arch import Arch
from elastic.slicer.nn.model import Cache, NemotronH
from elastic.slicer.formats.rules import indices, tensor_rules
from elastic.slicer.formats.spec import SliceSpec


@functools.lru_cache(maxsize=64)
def child_module(parent_arch: Arch, spec: SliceSpec) -> NemotronH:
    """The module tree of the nested model ``spec`` cuts from ``parent_arch``, on ``meta`` (no weights:
    a forward runs it with the parent's narrowed tensors); one per (arch, spec), cached."""
    with torch.device("meta"):
        return NemotronH(spec.child_arch(parent_arch))


def masked_params(parent: NemotronH, spec: SliceSpec) -> dict[str, torch.Tensor]:
    """The child's parameters (and the MoE routers' bias buffers), gathered from the parent's (differentiable)."""
    params = {**dict(parent.named_parameters()), **dict(parent.named_buffers())}
    return {rule.name: narrow(params[rule.source], rule.axes) for rule in tensor_rules(parent.arch, spec)}


def narrow(t: torch.Tensor, axes) -> torch.Tensor:
    """``t`` restricted to a rule's kept ranges per axis (differentiable): one prefix or block is a
    view, several ranges an ``index_select`` copy."""
    for dim, ranges in enumerate(axes):
        if ranges != ((0, t.shape[dim]),):
            if len(ranges) == 1:
                t = t.narrow(dim, ranges[0][0], ranges[0][1] - ranges[0][0])
            else:
                t = t.index_select(dim, torch.tensor(indices(ranges), device=t.device))
    return t


def masked_forward(parent: NemotronH, spec: SliceSpec, input_ids: torch.Tensor, cache: Cache | None = None,
                   last_only: bool = False) -> torch.Tensor:
    """Logits of the nested model ``spec`` of ``parent`` (same contract as ``NemotronH.forward``).

    A ``cache`` must come from ``new_masked_cache`` (the child's layer count).
    """
    child = child_module(parent.arch, spec)
    return torch.func.functional_call(child, masked_params(parent, spec), (input_ids,),
                                      {"cache": cache, "last_only": last_only})


def new_masked_cache(spec: SliceSpec) -> Cache:
    return Cache(len(spec.kept_layers()))
