"""Importance of every elastic unit, from forward activations on calibration data (DESIGN.md section 6).

Width (one pass, scoped forward hooks that are always removed, float32 sums over batch and
sequence):
- hidden channel: |RMSNorm output| of every norm (the pre-norms and ``norm_f``);
- FFN neuron: |X W_up^T|;
- Mamba head channel / head: |x| from in_proj's x rows; a channel's score sums over heads (every
  head keeps the same channels), a head's over its channels; heads are ranked inside their group;
- attention head: |q| per query head, ranked inside its KV group;
- MoE: an expert by the router-weighted |output| over the tokens routed to it (ranked inside its
  routing group), each expert's neurons by their router-weighted |X W_up^T|, the shared expert's
  neurons as an FFN's.
Depth: normalized MSE of the full model's logits with one more layer removed,
``sum((M_full - M_-j)^2) / sum(M_full^2)``, recomputed after each removal (greedy).

Example:
    >>> scores = width_importance(model, batches)
    >>> order = depth_order(model, batches, candidates=range(len(model.backbone.layers)))
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch

from elastic.slicer.nn.model import NemotronH, routes


@contextmanager
def _hooks(pairs) -> Iterator[None]:
    """Register (module, hook) forward hooks for the duration of the block; always removed."""
    handles = [m.register_forward_hook(h) for m, h in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def width_importance(model: NemotronH, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scores (float32, higher = more important) keyed ``hidden``, ``layers.{i}.heads`` (H,),
    ``layers.{i}.channels`` (P,), ``layers.{i}.attention_heads`` (A,), ``layers.{i}.ffn`` (F,),
    ``layers.{i}.experts`` (E,), ``layers.{i}.expert_ffn`` (E, Fe), ``layers.{i}.shared_ffn`` (Fs,)."""
    arch = model.arch
    # accumulated where the activations are (a CUDA model's hooks see CUDA tensors), returned on the CPU
    acc: dict[str, torch.Tensor] = {"hidden": torch.zeros(arch.hidden_size, device=next(model.parameters()).device)}

    def add(key: str, value: torch.Tensor) -> None:
        acc[key] = acc[key] + value if key in acc else value

    def norm_hook(_m, _inp, out):
        add("hidden", out.float().abs().sum(dim=(0, 1)))

    pairs = [(block.norm, norm_hook) for block in model.backbone.layers] + [(model.backbone.norm_f, norm_hook)]
    for i, block in enumerate(model.backbone.layers):
        mix = block.mixer
        if block.kind == "mamba":
            def mamba_hook(_m, _inp, out, i=i, mix=mix):
                x = out[..., mix.I: 2 * mix.I].float().abs().sum(dim=(0, 1)).view(mix.H, mix.P)  # x rows
                add(f"layers.{i}.heads", x.sum(1))
                add(f"layers.{i}.channels", x.sum(0))
            pairs.append((mix.in_proj, mamba_hook))
        elif block.kind == "attention":
            def attn_hook(_m, _inp, out, i=i, mix=mix):
                q = out.float().abs().sum(dim=(0, 1)).view(mix.heads, mix.head_dim)
                add(f"layers.{i}.attention_heads", q.sum(1))
            pairs.append((mix.q_proj, attn_hook))
        elif block.kind == "moe":
            def moe_hook(m, inp, _out, i=i):
                # router-weighted activations: each routed token counts with the weight the router gave it
                x = inp[0].reshape(-1, inp[0].shape[-1])
                ids, weights = m.gate(x)
                h = m.fc1_latent_proj(x) if m.fc1_latent_proj is not None else x
                E, Fe = len(m.experts), m.experts[0].up_proj.out_features
                experts = torch.zeros(E, device=x.device)
                neurons = torch.zeros(E, Fe, device=x.device)
                for e, token, slot in routes(ids):
                    w = weights[token, slot, None].float()
                    up = m.experts[e].up_proj(h[token]).float().abs() * w  # |X W_up^T|, weighted
                    neurons[e] = up.sum(0)
                    experts[e] = (m.experts[e](h[token]).float().abs() * w).sum()  # |output|, weighted
                add(f"layers.{i}.experts", experts)
                add(f"layers.{i}.expert_ffn", neurons)
                add(f"layers.{i}.shared_ffn", m.shared_experts.up_proj(inp[0]).float().abs().sum(dim=(0, 1)))
            pairs.append((mix, moe_hook))
        else:
            def mlp_hook(_m, _inp, out, i=i):
                add(f"layers.{i}.ffn", out.float().abs().sum(dim=(0, 1)))
            pairs.append((mix.up_proj, mlp_hook))
    was_training = model.training
    model.eval()
    with _hooks(pairs):
        for ids in batches:
            model(ids)
    model.train(was_training)
    return {k: v.cpu() for k, v in acc.items()}


class _Skip(torch.nn.Module):
    """A block that passes its input through (a removed layer)."""

    def forward(self, x, cache=None, idx=0):
        return x


@torch.no_grad()
def depth_candidates(model: NemotronH, batches: list[torch.Tensor], keep_attention: bool = True) -> list[int]:
    """The layers the router may drop: all of them, except (``keep_attention``) the attention layer
    whose removal changes the logits most (ranked by :func:`depth_order` among the attention
    layers), so that every budget keeps one attention layer."""
    layers = list(range(len(model.arch.layers)))
    attention = [i for i in layers if model.arch.layers[i].kind == "attention"]
    if not keep_attention or not attention:
        return layers
    removable = {j for j, _ in depth_order(model, batches, attention, len(attention) - 1)}
    kept = next(i for i in attention if i not in removable)
    return [i for i in layers if i != kept]


@torch.no_grad()
def depth_order(model: NemotronH, batches: list[torch.Tensor], candidates: Iterable[int], steps: int) -> list[tuple[int, float]]:
    """Greedy layer removal: ``steps`` times, remove the candidate whose removal changes the logits
    least (normalized MSE against the full model), recomputed with the earlier removals in place.

    Returns:
        [(layer index, its normalized MSE when removed)], least important first.
    """
    layers = model.backbone.layers
    full = [model(ids) for ids in batches]
    denom = sum(float(f.pow(2).sum()) for f in full)
    removed: list[tuple[int, float]] = []
    remaining = list(candidates)
    originals = {}
    try:
        for _ in range(min(steps, len(remaining))):
            best = None
            for j in remaining:
                originals[j] = layers[j]
                layers[j] = _Skip()
                err = sum(float((f - model(ids)).pow(2).sum()) for f, ids in zip(full, batches)) / denom
                layers[j] = originals.pop(j)
                if best is None or err < best[1]:
                    best = (j, err)
            removed.append(best)
            remaining.remove(best[0])
            originals[best[0]] = layers[best[0]]
            layers[best[0]] = _Skip()
    finally:
        for j, block in originals.items():  # put every layer back
            layers[j] = block
    return removed
