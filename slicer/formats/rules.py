"""Which entries of which parent tensor a slice keeps: DESIGN.md section 5 in code. No torch here.

For every tensor of the child, :func:`tensor_rules` names its parent tensor and, per axis, the
kept ranges ``[start, stop)``. The streaming slicer reads exactly those ranges from disk; the
masked (elastic) forward gathers the same entries from the parent's parameters in memory.

Layouts (parent sizes: hidden D, H Mamba heads of P channels in G groups of H/G heads, state N;
child keeps d, h, p, a attention heads, f FFN):
- Mamba in_proj rows ``[z (I) | x (I) | B (G*N) | C (G*N) | dt (H)]``, I = H*P: the first h/G heads
  of each group, the first p channels of each kept head, all of B and C;
- conv1d over ``[x | B | C]``; A_log / D / dt_bias per head; gated norm and out_proj per channel;
- attention: the first a/KV query heads of each KV group; K/V rows unchanged;
- MLP: the first f neurons; every hidden axis: the first d entries;
- MoE (E routed experts in n_group contiguous routing groups of E/n_group; child keeps e experts of
  width fe and a shared expert of width fs): the first e/n_group experts of each group, renumbered
  0..e-1 (child ``experts.{j}`` <- parent ``experts.{e_j}``); each kept expert's first fe neurons;
  the gate's rows and correction bias of the kept experts; the shared expert's first fs neurons.
  Experts compute in the hidden width, or in ``moe_latent_size`` behind fc1/fc2 latent projections,
  whose width is not elastic.
"""

from __future__ import annotations

from dataclasses import dataclass

from elastic.slicer.formats.arch import Arch, LayerArch
from elastic.slicer.formats.spec import SliceSpec

Ranges = tuple[tuple[int, int], ...]  # sorted, disjoint, merged [start, stop) ranges on one axis


def merge(ranges) -> Ranges:
    """Sort and merge touching ranges: ((0, 4), (4, 8), (12, 16)) -> ((0, 8), (12, 16))."""
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if b <= a:
            continue
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def length(ranges: Ranges) -> int:
    return sum(b - a for a, b in ranges)


def indices(ranges: Ranges) -> list[int]:
    """The kept indices themselves (for index_select in the masked forward)."""
    return [i for a, b in ranges for i in range(a, b)]


def shift(ranges: Ranges, offset: int) -> Ranges:
    return tuple((a + offset, b + offset) for a, b in ranges)


@dataclass(frozen=True)
class TensorRule:
    """Child tensor ``name`` = parent tensor ``source`` restricted to ``axes`` (kept ranges per axis)."""

    name: str
    source: str
    axes: tuple[Ranges, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(length(r) for r in self.axes)


def kept_heads(total: int, groups: int, kept: int) -> Ranges:
    """The first kept/groups heads of each of ``groups`` contiguous blocks of total/groups heads."""
    per, keep = total // groups, kept // groups
    return merge((g * per, g * per + keep) for g in range(groups))


def per_head(heads: Ranges, size: int, kept: int) -> Ranges:
    """Channel ranges: the first ``kept`` of ``size`` channels of every kept head."""
    return merge((h * size, h * size + kept) for a, b in heads for h in range(a, b))


def kept_experts(total: int, n_group: int, kept: int) -> list[int]:
    """Parent indices of a child's ``kept`` routed experts of ``total``, in the child's order (child
    expert j is parent expert ``kept_experts(...)[j]``): the first kept/n_group experts of each of the
    n_group contiguous routing groups, where the trainer's permutation puts the most important first.

    Example:
        >>> kept_experts(8, 2, 4)
        [0, 1, 4, 5]
    """
    return indices(kept_heads(total, n_group, kept))


def _moe_rules(arch: Arch, parent: LayerArch, child: LayerArch,
               D: Ranges) -> dict[str, tuple[str, tuple[Ranges, ...]]]:
    """Child name -> (parent name, kept ranges) of an MoE layer's tensors, under ``backbone.layers.{i}.``."""
    full = lambda n: ((0, n),)  # noqa: E731
    inner = full(arch.moe_latent_size) if arch.moe_latent_size else D  # the experts' input/output axis
    experts = kept_heads(parent.n_routed_experts, arch.n_group, child.n_routed_experts)
    fe, fs = full(child.moe_intermediate_size), full(child.moe_shared_expert_intermediate_size)
    rules = {
        "mixer.gate.weight": (experts, D),  # (E, d): one router row per expert
        "mixer.gate.e_score_correction_bias": (experts,),
        "mixer.shared_experts.up_proj.weight": (fs, D),
        "mixer.shared_experts.down_proj.weight": (D, fs),
    }
    if arch.moe_latent_size:
        rules["mixer.fc1_latent_proj.weight"] = (inner, D)  # (latent, d)
        rules["mixer.fc2_latent_proj.weight"] = (D, inner)  # (d, latent)
    if arch.mlp_bias:
        rules["mixer.shared_experts.up_proj.bias"] = (fs,)
        rules["mixer.shared_experts.down_proj.bias"] = (D,)
        if arch.moe_latent_size:
            rules["mixer.fc1_latent_proj.bias"] = (inner,)
            rules["mixer.fc2_latent_proj.bias"] = (D,)
    out = {name: (name, axes) for name, axes in rules.items()}
    # renumbered: child expert j is parent expert e
    for j, e in enumerate(kept_experts(parent.n_routed_experts, arch.n_group, child.n_routed_experts)):
        out[f"mixer.experts.{j}.up_proj.weight"] = (f"mixer.experts.{e}.up_proj.weight", (fe, inner))  # (Fe, inner)
        out[f"mixer.experts.{j}.down_proj.weight"] = (f"mixer.experts.{e}.down_proj.weight", (inner, fe))  # (inner, Fe)
        if arch.mlp_bias:
            out[f"mixer.experts.{j}.up_proj.bias"] = (f"mixer.experts.{e}.up_proj.bias", (fe,))
            out[f"mixer.experts.{j}.down_proj.bias"] = (f"mixer.experts.{e}.down_proj.bias", (inner,))
    return out


def _layer_rules(arch: Arch, parent: LayerArch, child: LayerArch, d: int) -> dict[str, tuple[str, tuple[Ranges, ...]]]:
    """Child name -> (parent name, kept ranges) of each tensor of one layer, under ``backbone.layers.{i}.``
    (the names differ only for renumbered MoE experts)."""
    D = ((0, d),)  # the kept hidden axis
    full = lambda n: ((0, n),)  # noqa: E731
    if parent.kind == "moe":
        return {"norm.weight": ("norm.weight", (D,)), **_moe_rules(arch, parent, child, D)}
    rules: dict[str, tuple[Ranges, ...]] = {"norm.weight": (D,)}
    if parent.kind == "mamba":
        H, P, G, N, K = parent.mamba_num_heads, parent.mamba_head_dim, arch.n_groups, arch.ssm_state_size, arch.conv_kernel
        I = H * P
        heads = kept_heads(H, G, child.mamba_num_heads)
        chans = per_head(heads, P, child.mamba_head_dim)  # kept channels of I
        bc = ((I, I + 2 * G * N),)  # B and C inside [x | B | C]
        rows = merge(chans + shift(chans, I) + shift(bc, I) + shift(heads, 2 * I + 2 * G * N))
        conv_rows = merge(chans + bc)
        rules["mixer.in_proj.weight"] = (rows, D)
        rules["mixer.conv1d.weight"] = (conv_rows, full(1), full(K))
        for name in ("A_log", "D", "dt_bias"):
            rules[f"mixer.{name}"] = (heads,)
        rules["mixer.norm.weight"] = (chans,)
        rules["mixer.out_proj.weight"] = (D, chans)
        if arch.use_conv_bias:
            rules["mixer.conv1d.bias"] = (conv_rows,)
        if arch.use_bias:
            rules["mixer.in_proj.bias"] = (rows,)
            rules["mixer.out_proj.bias"] = (D,)
    elif parent.kind == "attention":
        hd, kv = arch.head_dim, parent.num_key_value_heads
        q = per_head(kept_heads(parent.num_attention_heads, kv, child.num_attention_heads), hd, hd)
        rules["mixer.q_proj.weight"] = (q, D)
        rules["mixer.k_proj.weight"] = (full(kv * hd), D)
        rules["mixer.v_proj.weight"] = (full(kv * hd), D)
        rules["mixer.o_proj.weight"] = (D, q)
    else:  # mlp
        f = ((0, child.intermediate_size),)
        rules["mixer.up_proj.weight"] = (f, D)
        rules["mixer.down_proj.weight"] = (D, f)
        if arch.mlp_bias:
            rules["mixer.up_proj.bias"] = (f,)
            rules["mixer.down_proj.bias"] = (D,)
    return {name: (name, axes) for name, axes in rules.items()}


def tensor_rules(parent: Arch, spec: SliceSpec) -> list[TensorRule]:
    """Every child tensor with its parent tensor and kept ranges, in the child's naming."""
    d = spec.hidden_size
    D = ((0, d),)
    out = [TensorRule("backbone.embeddings.weight", "backbone.embeddings.weight", (((0, parent.vocab_size),), D))]
    for k, i in enumerate(spec.kept_layers()):
        for name, (source, axes) in _layer_rules(parent, parent.layers[i], spec.layers[i], d).items():
            out.append(TensorRule(f"backbone.layers.{k}.{name}", f"backbone.layers.{i}.{source}", axes))
    out.append(TensorRule("backbone.norm_f.weight", "backbone.norm_f.weight", (D,)))
    if not parent.tie_word_embeddings:
        out.append(TensorRule("lm_head.weight", "lm_head.weight", (((0, parent.vocab_size),), D)))
    return out
