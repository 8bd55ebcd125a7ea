"""An independent masked forward: the full parent computed with zero masks (DESIGN.md section 5).

Written from the Nemotron-H equations, not from slicer/rules.py: dropped channels, heads and
neurons are multiplied by zero, and every RMSNorm divides by the number of *kept* channels. If the
slicing rules keep the wrong entries anywhere, this disagrees with the sliced child.
"""

import torch
import torch.nn.functional as F

from elastic.slicer.nn.ssd import ssd_naive


def _mask(n, keep):
    m = torch.zeros(n)
    m[keep] = 1.0
    return m


def _rms(x, w, m, eps):
    """RMSNorm over the kept channels (m = 1) only."""
    var = (x.pow(2) * m).sum(-1, keepdim=True) / m.sum()
    return x * torch.rsqrt(var + eps) * w * m


def _prefix_in_groups(total, groups, kept):
    per = total // groups
    return [g * per + j for g in range(groups) for j in range(kept // groups)]


@torch.no_grad()
def masked_logits(parent, spec, ids):
    arch, eps = parent.arch, parent.arch.layer_norm_epsilon
    md = _mask(arch.hidden_size, list(range(spec.hidden_size)))
    h = parent.backbone.embeddings(ids) * md
    for i, block in enumerate(parent.backbone.layers):
        keep = spec.layers[i]
        if keep is None:
            continue  # a dropped layer is the identity
        u = _rms(h, block.norm.weight, md, eps)
        mix = block.mixer
        if block.kind == "mamba":
            H, P, G, N = mix.H, mix.P, mix.G, mix.N
            heads = _prefix_in_groups(H, G, keep.mamba_num_heads)
            mh = _mask(H, heads)
            mc = (mh[:, None] * _mask(P, list(range(keep.mamba_head_dim)))[None, :]).reshape(-1)  # (H*P,)
            z, xBC, dt = mix.in_proj(u).split([mix.I, mix.conv_dim, H], dim=-1)
            xBC = F.silu(F.conv1d(F.pad(xBC.transpose(1, 2), (mix.K - 1, 0)), mix.conv1d.weight, mix.conv1d.bias,
                                  groups=mix.conv_dim)).transpose(1, 2)
            x, B, C = xBC.split([mix.I, G * N, G * N], dim=-1)
            x = x * mc
            dt = F.softplus(dt + mix.dt_bias)
            b, l = ids.shape
            y, _ = ssd_naive(x.view(b, l, H, P), dt, -torch.exp(mix.A_log), B.view(b, l, G, N), C.view(b, l, G, N), mix.D)
            y = y.reshape(b, l, -1) * F.silu(z)
            # gated norm: per group of H/G heads, over that group's kept channels
            yg, mg = y.view(b, l, G, -1), mc.view(G, -1)
            var = (yg.pow(2) * mg).sum(-1, keepdim=True) / mg.sum(-1, keepdim=True)
            y = (yg * torch.rsqrt(var + eps) * mg).reshape(b, l, -1) * mix.norm.weight
            out = mix.out_proj(y)
        elif block.kind == "attention":
            b, l, _ = u.shape
            hd, nh, nkv = mix.head_dim, mix.heads, mix.kv_heads
            mq = _mask(nh, _prefix_in_groups(nh, nkv, keep.num_attention_heads))
            q = mix.q_proj(u).view(b, l, nh, hd).transpose(1, 2)
            k = mix.k_proj(u).view(b, l, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, 1)
            v = mix.v_proj(u).view(b, l, nkv, hd).transpose(1, 2).repeat_interleave(nh // nkv, 1)
            att = (q @ k.transpose(-1, -2)) / hd**0.5
            att = att.masked_fill(~torch.ones(l, l, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
            o = (att @ v) * mq[None, :, None, None]
            out = mix.o_proj(o.transpose(1, 2).reshape(b, l, -1))
        else:
            mf = _mask(mix.up_proj.out_features, list(range(keep.intermediate_size)))
            out = mix.down_proj(F.relu(mix.up_proj(u)).square() * mf)
        h = h + out * md
    return parent.lm_head(_rms(h, parent.backbone.norm_f.weight, md, eps)).float()
