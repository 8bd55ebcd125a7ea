"""Function-preserving permutation of a parent by importance, so every nested model is a prefix.

The same order is applied to every tensor that shares a dimension, so the permuted model computes
exactly what it computed before (RMSNorm statistics are sums over channels; Mamba heads move only
inside their group, so the B/C group each head reads and the gated norm's groups are unchanged;
query heads move only inside their KV group).
"""

from __future__ import annotations

import torch

from elastic.slicer.nn.model import NemotronH


def _desc(scores: torch.Tensor) -> torch.Tensor:
    # stable: equal scores keep their current order, so permuting twice changes nothing
    return torch.sort(scores, descending=True, stable=True).indices


def _within_groups(scores: torch.Tensor, groups: int) -> torch.Tensor:
    """Order units by score inside each of ``groups`` contiguous blocks, blocks kept in place."""
    per = scores.numel() // groups
    return torch.cat([g * per + _desc(scores[g * per:(g + 1) * per]) for g in range(groups)])


def orders(model: NemotronH, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The permutation of every elastic dimension, most important first (keys as in ``scores``)."""
    out = {"hidden": _desc(scores["hidden"])}
    for i, block in enumerate(model.backbone.layers):
        mix = block.mixer
        if block.kind == "mamba":
            out[f"layers.{i}.heads"] = _within_groups(scores[f"layers.{i}.heads"], mix.G)
            out[f"layers.{i}.channels"] = _desc(scores[f"layers.{i}.channels"])
        elif block.kind == "attention":
            out[f"layers.{i}.attention_heads"] = _within_groups(scores[f"layers.{i}.attention_heads"], mix.kv_heads)
        elif block.kind == "moe":
            out[f"layers.{i}.experts"] = _within_groups(scores[f"layers.{i}.experts"], mix.gate.n_group)
            out[f"layers.{i}.expert_ffn"] = torch.stack([_desc(row) for row in scores[f"layers.{i}.expert_ffn"]])
            out[f"layers.{i}.shared_ffn"] = _desc(scores[f"layers.{i}.shared_ffn"])
        else:
            out[f"layers.{i}.ffn"] = _desc(scores[f"layers.{i}.ffn"])
    return out


def _expand(units: torch.Tensor, size: int, inner: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the rows of ``units`` blocks of ``size`` rows, each block ordered by ``inner``."""
    inner = torch.arange(size) if inner is None else inner
    return (units[:, None] * size + inner[None, :]).reshape(-1)


@torch.no_grad()
def permute_(model: NemotronH, order: dict[str, torch.Tensor]) -> NemotronH:
    """Re-index the model's parameters in place along ``order`` (see :func:`orders`)."""
    d = order["hidden"]

    def take(p: torch.nn.Parameter, dim: int, idx: torch.Tensor) -> None:
        p.data = p.data.index_select(dim, idx.to(p.device))

    bb = model.backbone
    take(bb.embeddings.weight, 1, d)
    take(bb.norm_f.weight, 0, d)
    if not model.arch.tie_word_embeddings:
        take(model.lm_head.weight, 1, d)
    for i, block in enumerate(bb.layers):
        take(block.norm.weight, 0, d)
        mix = block.mixer
        if block.kind == "mamba":
            heads, chans = order[f"layers.{i}.heads"], order[f"layers.{i}.channels"]
            I, GN2 = mix.I, 2 * mix.G * mix.N
            ch = _expand(heads, mix.P, chans)  # kept order of the I channels
            rows = torch.cat([ch, I + ch, 2 * I + torch.arange(GN2), 2 * I + GN2 + heads])  # [z | x | B | C | dt]
            take(mix.in_proj.weight, 0, rows)
            take(mix.in_proj.weight, 1, d)
            conv_rows = torch.cat([ch, I + torch.arange(GN2)])  # [x | B | C]
            take(mix.conv1d.weight, 0, conv_rows)
            for p in (mix.A_log, mix.D, mix.dt_bias):
                take(p, 0, heads)
            take(mix.norm.weight, 0, ch)
            take(mix.out_proj.weight, 0, d)
            take(mix.out_proj.weight, 1, ch)
            if mix.conv1d.bias is not None:
                take(mix.conv1d.bias, 0, conv_rows)
            if mix.in_proj.bias is not None:
                take(mix.in_proj.bias, 0, rows)
                take(mix.out_proj.bias, 0, d)
        elif block.kind == "attention":
            q = _expand(order[f"layers.{i}.attention_heads"], mix.head_dim)
            take(mix.q_proj.weight, 0, q)
            for lin in (mix.q_proj, mix.k_proj, mix.v_proj):
                take(lin.weight, 1, d)
            take(mix.o_proj.weight, 0, d)
            take(mix.o_proj.weight, 1, q)
        elif block.kind == "moe":
            experts = order[f"layers.{i}.experts"]
            take(mix.gate.weight, 0, experts)
            take(mix.gate.weight, 1, d)
            mix.gate.e_score_correction_bias.copy_(mix.gate.e_score_correction_bias[experts.to(
                mix.gate.e_score_correction_bias.device)])
            mix.experts = torch.nn.ModuleList([mix.experts[int(e)] for e in experts])  # routing groups kept
            # the experts' hidden side: the latent projections' when there are some, else each expert's
            latent = mix.fc1_latent_proj is not None
            if latent:
                take(mix.fc1_latent_proj.weight, 1, d)
                take(mix.fc2_latent_proj.weight, 0, d)
                if mix.fc2_latent_proj.bias is not None:
                    take(mix.fc2_latent_proj.bias, 0, d)
            for k, expert in enumerate(mix.experts):
                _ffn(take, expert, order[f"layers.{i}.expert_ffn"][int(experts[k])], None if latent else d)
            _ffn(take, mix.shared_experts, order[f"layers.{i}.shared_ffn"], d)
        else:
            _ffn(take, mix, order[f"layers.{i}.ffn"], d)
    return model


def _ffn(take, ffn, f: torch.Tensor, d: torch.Tensor | None) -> None:
    """Permute an up/down pair's neurons by ``f`` and (when ``d`` is given) its hidden side by ``d``."""
    take(ffn.up_proj.weight, 0, f)
    take(ffn.down_proj.weight, 1, f)
    if ffn.up_proj.bias is not None:
        take(ffn.up_proj.bias, 0, f)
    if d is not None:
        take(ffn.up_proj.weight, 1, d)
        take(ffn.down_proj.weight, 0, d)
        if ffn.down_proj.bias is not None:
            take(ffn.down_proj.bias, 0, d)
