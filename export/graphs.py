"""The graphs an edge runtime runs, as flat-tensor wrappers around the reference model.

``elastic.slicer.nn.model`` keeps decode state in a Python ``Cache``; an exported graph needs it as named
tensors. :class:`PrefillGraph` (token ids -> logits + the state of every layer) and
:class:`DecodeGraph` (one token per sequence + that state -> logits + the new state) build a
``Cache`` from their tensor inputs, call the reference model's own layers, and return the cache's
tensors in a fixed order: the graphs compute what ``NemotronH.forward`` computes, with the same code.
:class:`ExtendGraph` (a chunk of several tokens + that state -> the last position's logits + the new
state; from an empty state: zeros, keys and values of no position) lets a runtime prefill a prompt in
chunks: its memory then grows with the chunk, not with the prompt.

State tensors, per layer i (MLP layers keep none):

====================  =========================  ============================
name                  shape                      dtype
====================  =========================  ============================
``conv_state.{i}``    (batch, conv_dim, K-1)     model dtype
``ssm_state.{i}``     (batch, H, P, N)           float32
``key.{i}``           (batch, kv_heads, t, hd)   model dtype
``value.{i}``         (batch, kv_heads, t, hd)   model dtype
====================  =========================  ============================

Graph inputs carry the prefix ``past_``, outputs ``present_``; decode's ``present_key.{i}`` has
the past length plus one, extend's the past length plus the chunk's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from elastic.slicer.formats.arch import Arch
from elastic.slicer.nn.model import Cache, KVState, MambaState, NemotronH


@dataclass(frozen=True)
class StateTensor:
    """One recurrent state tensor of one layer, as a graph input/output."""

    name: str  # "conv_state.3"; in the graphs "past_conv_state.3" / "present_conv_state.3"
    layer: int  # index of the layer in the (sliced) model
    kind: str  # "conv_state" | "ssm_state" | "key" | "value"
    shape: tuple[int | str, ...]  # "batch" / "past" / "seq" mark dynamic axes
    float32: bool  # always float32 (the SSM state); else the model's dtype

    def dims(self, batch: int, past: int) -> tuple[int, ...]:
        """The concrete shape for ``batch`` sequences holding ``past`` tokens."""
        return tuple(batch if d == "batch" else past if d in ("past", "seq") else d for d in self.shape)


def state_tensors(arch: Arch) -> list[StateTensor]:
    """Every state tensor of the model, in graph order (by layer; conv before ssm, key before value)."""
    out: list[StateTensor] = []
    for i, layer in enumerate(arch.layers):
        if layer.kind == "mamba":
            H, P = layer.mamba_num_heads, layer.mamba_head_dim
            conv_dim = H * P + 2 * arch.n_groups * arch.ssm_state_size
            out.append(StateTensor(f"conv_state.{i}", i, "conv_state", ("batch", conv_dim, arch.conv_kernel - 1), False))
            out.append(StateTensor(f"ssm_state.{i}", i, "ssm_state", ("batch", H, P, arch.ssm_state_size), True))
        elif layer.kind == "attention":
            kv = layer.num_key_value_heads
            out.append(StateTensor(f"key.{i}", i, "key", ("batch", kv, "past", arch.head_dim), False))
            out.append(StateTensor(f"value.{i}", i, "value", ("batch", kv, "past", arch.head_dim), False))
    return out


_FIELD = {"conv_state": "conv", "ssm_state": "ssm", "key": "k", "value": "v"}  # MambaState / KVState fields


def cache_tensors(cache: Cache, states: list[StateTensor]) -> list[torch.Tensor]:
    """The tensors of ``cache`` in the order of ``states`` (the graphs' state outputs)."""
    return [getattr(cache.layers[s.layer], _FIELD[s.kind]) for s in states]


def _unflatten(model: NemotronH, states: list[StateTensor], tensors: tuple[torch.Tensor, ...]) -> Cache:
    by_name = {s.name: t for s, t in zip(states, tensors, strict=True)}
    cache = model.new_cache()
    for s in states:
        i = s.layer
        if s.kind == "conv_state":
            cache.layers[i] = MambaState(conv=by_name[s.name], ssm=by_name[f"ssm_state.{i}"])
        elif s.kind == "key":
            cache.layers[i] = KVState(k=by_name[s.name], v=by_name[f"value.{i}"])
    return cache


class PrefillGraph(nn.Module):
    """``input_ids`` (batch, seq) int64 -> ``logits`` (batch, seq, vocab) float32, then every state."""

    def __init__(self, model: NemotronH):
        super().__init__()
        self.model = model
        self.states = state_tensors(model.arch)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = self.model.new_cache()
        logits = self.model(input_ids, cache=cache)
        return (logits, *cache_tensors(cache, self.states))


class DecodeGraph(nn.Module):
    """``input_ids`` (batch, 1) int64 and the past state -> ``logits`` (batch, 1, vocab) and the new state."""

    last_only = False  # logits of every input position (one, here)

    def __init__(self, model: NemotronH):
        super().__init__()
        self.model = model
        self.states = state_tensors(model.arch)

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = _unflatten(self.model, self.states, past)
        logits = self.model(input_ids, cache=cache, last_only=self.last_only)
        return (logits, *cache_tensors(cache, self.states))


class ExtendGraph(DecodeGraph):
    """``input_ids`` (batch, seq) with seq >= 2 and the past state -> the last position's ``logits``
    (batch, 1, vocab) and the new state: the next chunk of a chunked prefill (the Mamba layers take
    their scan path from the past state, the attention layers see the past keys). The decode graph's
    code; what differs is the traced input length and that only the last position's logits are made."""

    last_only = True
