"""The reference Nemotron-H model in plain PyTorch, shared by slicer tests, trainer and export.

Module and parameter names are the on-disk names (``backbone.layers.3.mixer.in_proj.weight``,
``lm_head.weight``), so a checkpoint loads with no key mapping. Every layer may have its own sizes
(heterogeneous "Puzzle" models): sizes come from ``Arch.layers[i]``.

It computes what transformers' ``NemotronHForCausalLM`` computes (tests compare logits), with one
deliberate difference, matching NVIDIA's kernels: dt is clamped to the config's ``time_step_limit``
in prefill *and* decode (transformers clamps to ``time_step_min`` in prefill only). MoE layers
(Nemotron 3, the Star Elastic parent) keep NVIDIA's on-disk form, one module per expert
(``mixer.experts.7.up_proj.weight``), where transformers merges them into 3-D tensors; the router's
``e_score_correction_bias`` is a float32 buffer, as in transformers.

A quantized checkpoint (NVIDIA Model Optimizer's layout) loads with its Linear weights
dequantized (``elastic.slicer.quant.dequant``); for W8A8 formats (fp8, int8 SmoothQuant) the
Linear's input is quantize-dequantized with its ``input_scale`` as well (:class:`FakeQuantLinear`),
so the logits are Model Optimizer's simulated-quantization logits.

Example:
    >>> model = load_model("./model", dtype=torch.float32)
    >>> cache = model.new_cache()
    >>> logits = model(input_ids, cache=cache)          # prefill, (b, l, vocab)
    >>> logits = model(next_ids[:, None], cache=cache)   # one decode step, (b, 1, vocab)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from elastic.profiles.units import GIB
from elastic.slicer.nn import kernels
from elastic.slicer.formats.arch import Arch, LayerArch
from elastic.slicer.storage.reader import Checkpoint
from elastic.slicer.errors import CheckpointError
from elastic.slicer.nn.ssd import ssd_chunked, ssd_step


# ---- recurrent state ------------------------------------------------------------------------


@dataclass
class MambaState:
    conv: torch.Tensor  # (b, conv_dim, K-1): the last K-1 inputs of the conv over [x | B | C]
    ssm: torch.Tensor  # (b, h, p, n) float32


@dataclass
class KVState:
    k: torch.Tensor  # (b, kv_heads, t, head_dim)
    v: torch.Tensor  # (b, kv_heads, t, head_dim)


class Cache:
    """Per-layer decode state; MLP and MoE layers keep none. ``seen`` counts the tokens consumed."""

    def __init__(self, num_layers: int):
        self.layers: list[MambaState | KVState | None] = [None] * num_layers
        self.seen = 0


# ---- norms ----------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * xf).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """y * silu(z), then RMS-normalised separately over each group of ``size // n_groups`` channels."""

    def __init__(self, size: int, n_groups: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.n_groups, self.eps = n_groups, eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = y.dtype
        y = y.float() * F.silu(z.float())
        g = y.unflatten(-1, (self.n_groups, -1))  # (..., G, I/G)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.flatten(-2).to(dtype)


# ---- mixers ---------------------------------------------------------------------------------


class Mamba2Mixer(nn.Module):
    def __init__(self, arch: Arch, layer: LayerArch):
        super().__init__()
        d, H, P = arch.hidden_size, layer.mamba_num_heads, layer.mamba_head_dim
        G, N, K = arch.n_groups, arch.ssm_state_size, arch.conv_kernel
        self.H, self.P, self.G, self.N, self.K = H, P, G, N, K
        self.I = H * P
        self.conv_dim = self.I + 2 * G * N
        self.chunk_size = arch.chunk_size
        self.dt_limit = arch.time_step_limit
        # in_proj rows: [z (I) | x (I) | B (G*N) | C (G*N) | dt (H)]
        self.in_proj = nn.Linear(d, 2 * self.I + 2 * G * N + H, bias=arch.use_bias)
        # depthwise causal conv over [x | B | C] only
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, K, groups=self.conv_dim, bias=arch.use_conv_bias)
        self.A_log = nn.Parameter(torch.zeros(H))
        self.D = nn.Parameter(torch.ones(H))
        self.dt_bias = nn.Parameter(torch.zeros(H))
        self.norm = GatedRMSNorm(self.I, G, arch.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.I, d, bias=arch.use_bias)

    def _dt(self, dt: torch.Tensor) -> torch.Tensor:
        dt = F.softplus(dt.float() + self.dt_bias.float())
        return dt.clamp(self.dt_limit[0], self.dt_limit[1])

    def forward(self, u: torch.Tensor, cache: Cache | None = None, idx: int = 0) -> torch.Tensor:
        b, l, _ = u.shape
        state = cache.layers[idx] if cache is not None else None
        z, xBC, dt = self.in_proj(u).split([self.I, self.conv_dim, self.H], dim=-1)
        A = -torch.exp(self.A_log.float())  # (H,)
        w = self.conv1d.weight.squeeze(1)  # (conv_dim, K)

        if state is not None and l == 1:  # decode: one token, recurrent form
            window = torch.cat([state.conv, xBC.transpose(1, 2)], dim=-1)  # (b, conv_dim, K)
            conv = (window * w).sum(-1)
            if self.conv1d.bias is not None:
                conv = conv + self.conv1d.bias
            x, B, C = F.silu(conv).split([self.I, self.G * self.N, self.G * self.N], dim=-1)
            y, ssm = self._step(state.ssm, x.view(b, self.H, self.P), dt[:, 0], A, B.view(b, self.G, self.N), C.view(b, self.G, self.N))
            cache.layers[idx] = MambaState(window[..., 1:], ssm)
            y = y.reshape(b, 1, self.I)
        else:  # prefill (or a multi-token continuation): causal conv, then the chunked scan
            prev = state.conv if state is not None else xBC.new_zeros(b, self.conv_dim, self.K - 1)
            seq = torch.cat([prev, xBC.transpose(1, 2)], dim=-1)  # (b, conv_dim, K-1+l)
            ck = kernels.conv_kernels(u) if state is None else None
            if ck is not None:
                conv = ck[0](xBC.transpose(1, 2).contiguous(), w, self.conv1d.bias, activation="silu")
            else:
                conv = F.silu(F.conv1d(seq, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim))
            x, B, C = conv.transpose(1, 2).split([self.I, self.G * self.N, self.G * self.N], dim=-1)
            y, ssm = self._scan(
                x.reshape(b, l, self.H, self.P), dt, A,
                B.reshape(b, l, self.G, self.N), C.reshape(b, l, self.G, self.N),
                state.ssm if state is not None else None,
            )
            if cache is not None:
                # a copy: a view of the last K-1 columns would keep the whole sequence's storage alive
                cache.layers[idx] = MambaState(seq[..., seq.shape[-1] - (self.K - 1):].clone(), ssm)
            y = y.reshape(b, l, self.I)
        y = self.norm(y, z)
        return self.out_proj(y.to(u.dtype))

    def _scan(self, x, dt, A, B, C, initial):
        k = kernels.ssm_kernels(x)
        if k is not None and self.dt_limit == (0.0, math.inf):
            return k[0](
                x, dt, A, B, C, self.chunk_size, D=self.D.float(), dt_bias=self.dt_bias.float(),
                dt_softplus=True, initial_states=initial, return_final_states=True,
            )
        return ssd_chunked(x, self._dt(dt), A, B, C, self.chunk_size, D=self.D, initial_state=initial)

    def _step(self, ssm, x, dt, A, B, C):
        k = kernels.ssm_kernels(x)
        if k is not None and self.dt_limit == (0.0, math.inf):
            ssm = ssm.clone()
            P, N = self.P, self.N
            y = k[1](  # updates ssm in place; per-channel expansions as the kernel wants them
                ssm, x, dt[..., None].expand(-1, -1, P), A[:, None, None].expand(-1, P, N), B, C,
                D=self.D.float()[:, None].expand(-1, P), dt_bias=self.dt_bias.float()[:, None].expand(-1, P),
                dt_softplus=True,
            )
            return y, ssm
        return ssd_step(ssm, x, self._dt(dt), A, B, C, self.D)


class Attention(nn.Module):
    """Grouped-query attention with a KV cache. No rotary embedding: Mamba layers carry position."""

    def __init__(self, arch: Arch, layer: LayerArch):
        super().__init__()
        d, hd = arch.hidden_size, arch.head_dim
        self.heads, self.kv_heads, self.head_dim = layer.num_attention_heads, layer.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cache: Cache | None = None, idx: int = 0) -> torch.Tensor:
        b, l, _ = x.shape
        q = self.q_proj(x).view(b, l, self.heads, self.head_dim).transpose(1, 2)  # (b, heads, l, hd)
        k = self.k_proj(x).view(b, l, self.kv_heads, self.head_dim).transpose(1, 2)  # (b, kv, l, hd)
        v = self.v_proj(x).view(b, l, self.kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            past = cache.layers[idx]
            if past is not None:
                k, v = torch.cat([past.k, k], dim=2), torch.cat([past.v, v], dim=2)
            cache.layers[idx] = KVState(k, v)
        t = k.shape[2]
        # query i (absolute position t - l + i) sees keys 0 .. t - l + i
        mask = None if l == 1 else torch.ones(l, t, dtype=torch.bool, device=x.device).tril(t - l)
        # GQA without materialising repeated K/V: query heads j*rep .. (j+1)*rep-1 share KV head j
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5,
                                             enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, l, self.heads * self.head_dim))


class FakeQuantLinear(nn.Linear):
    """A Linear whose input is quantize-dequantized first (W8A8: fp8 or int8 with a static
    per-tensor ``scale``, after SmoothQuant's ``pre_quant_scale``); the weight is already dequantized."""

    def __init__(self, in_features: int, out_features: int, bias: bool, kind: str, scale: float,
                 pre_quant_scale: torch.Tensor | None, device=None):
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.kind, self.scale = kind, scale
        self.register_buffer("pre_quant_scale", pre_quant_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from elastic.slicer.quant.dequant import fake_quant_input

        return F.linear(fake_quant_input(x, self.kind, self.scale, self.pre_quant_scale), self.weight, self.bias)


class FFN(nn.Module):
    """Squared-ReLU feed-forward, no gate: ``down_proj(relu(up_proj(x))**2)``, width -> ``size`` -> width."""

    def __init__(self, width: int, size: int, bias: bool):
        super().__init__()
        self.up_proj = nn.Linear(width, size, bias=bias)
        self.down_proj = nn.Linear(size, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(x)).square())


class MLP(FFN):
    """The MLP mixer: one squared-ReLU FFN of the layer's ``intermediate_size``."""

    def __init__(self, arch: Arch, layer: LayerArch):
        super().__init__(arch.hidden_size, layer.intermediate_size, arch.mlp_bias)

    def forward(self, x: torch.Tensor, cache: Cache | None = None, idx: int = 0) -> torch.Tensor:
        return super().forward(x)


# tensors kept in float32 whatever the model's dtype (transformers' _keep_in_fp32_modules_strict)
KEEP_FP32 = ("e_score_correction_bias",)


class TopkRouter(nn.Module):
    """``mixer.gate``: sigmoid scores, group-limited top-k choice (DeepSeek-V3 style).

    The choice uses ``scores + e_score_correction_bias``: the experts are split into ``n_group``
    contiguous groups, each group scored by the sum of its two best, and only the best
    ``topk_group`` groups compete. The weights are the plain scores of the chosen experts,
    normalised to sum 1 when ``norm_topk_prob``, times ``routed_scaling_factor``. All in float32.
    """

    def __init__(self, arch: Arch, layer: LayerArch):
        super().__init__()
        E = layer.n_routed_experts
        self.weight = nn.Parameter(torch.zeros(E, arch.hidden_size))
        # persistent but not trained (NVIDIA adjusts it for load balance): a buffer, in float32
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        self.top_k, self.n_group, self.topk_group = arch.num_experts_per_tok, arch.n_group, arch.topk_group
        self.norm_topk_prob, self.scale = arch.norm_topk_prob, arch.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(expert ids (T, k), weights (T, k) float32) for tokens ``x`` (T, d)."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (T, E)
        choice = scores + self.e_score_correction_bias.float()
        if self.n_group > 1:  # with one group every expert competes
            groups = choice.unflatten(-1, (self.n_group, -1))  # (T, n_group, E / n_group)
            # sum of each group's two best (transformers' topk(2) fails on groups of one; those score alone)
            group_score = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(-1)  # (T, n_group)
            kept = group_score.topk(self.topk_group, dim=-1).indices  # (T, topk_group)
            mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(-1, kept, True)
            choice = groups.masked_fill(~mask[..., None], -math.inf).flatten(-2)  # (T, E)
        ids = choice.topk(self.top_k, dim=-1).indices  # (T, k)
        weights = scores.gather(-1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)  # transformers' epsilon
        return ids, weights * self.scale


def routes(ids: torch.Tensor):
    """(expert, tokens, slots) for every expert some token chose, from the router's ids (T, k):
    ``ids[tokens, slots] == expert``."""
    for e in ids.unique().tolist():
        token, slot = (ids == e).nonzero(as_tuple=True)
        yield e, token, slot


class MoE(nn.Module):
    """Routed squared-ReLU experts plus one shared expert; stateless per token (no cache).

    ``out = fc2(sum_k w_k * expert_k(fc1(x))) + shared_experts(x)``, where the optional latent
    projections ``fc1_latent_proj`` / ``fc2_latent_proj`` (``moe_latent_size``) make the experts
    compute in a narrower width. Each expert is its own module, as stored on disk.
    """

    def __init__(self, arch: Arch, layer: LayerArch):
        super().__init__()
        d, latent = arch.hidden_size, arch.moe_latent_size
        inner = latent or d
        self.gate = TopkRouter(arch, layer)
        self.experts = nn.ModuleList(FFN(inner, layer.moe_intermediate_size, arch.mlp_bias)
                                     for _ in range(layer.n_routed_experts))
        self.shared_experts = FFN(d, layer.moe_shared_expert_intermediate_size, arch.mlp_bias)
        self.fc1_latent_proj = nn.Linear(d, latent, bias=arch.mlp_bias) if latent else None
        self.fc2_latent_proj = nn.Linear(latent, d, bias=arch.mlp_bias) if latent else None

    def forward(self, x: torch.Tensor, cache: Cache | None = None, idx: int = 0) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])  # (T, d)
        ids, weights = self.gate(tokens)  # (T, k), (T, k)
        h = self.fc1_latent_proj(tokens) if self.fc1_latent_proj is not None else tokens  # (T, inner)
        routed = torch.zeros(h.shape, dtype=torch.float32, device=h.device)  # weighted sum in float32
        for e, token, slot in routes(ids):
            routed.index_add_(0, token, self.experts[e](h[token]) * weights[token, slot, None])
        routed = routed.to(x.dtype)
        if self.fc2_latent_proj is not None:
            routed = self.fc2_latent_proj(routed)  # (T, d)
        return routed.view(x.shape) + self.shared_experts(x)


MIXERS = {"mamba": Mamba2Mixer, "attention": Attention, "mlp": MLP, "moe": MoE}


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x))."""

    def __init__(self, arch: Arch, layer: LayerArch):
        super().__init__()
        self.kind = layer.kind
        self.norm = RMSNorm(arch.hidden_size, arch.layer_norm_epsilon)
        self.mixer = MIXERS[layer.kind](arch, layer)

    def forward(self, x: torch.Tensor, cache: Cache | None, idx: int, via: Callable | None = None) -> torch.Tensor:
        """``via(self, x)``, when given, computes the block instead (the trainer's narrowed forward),
        inside this module's call so that wrappers' hooks apply (FSDP2's gather, checkpointing)."""
        if via is not None:
            return via(self, x)
        return x + self.mixer(self.norm(x), cache, idx)


class Backbone(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        weight = torch.empty(arch.vocab_size, arch.hidden_size)
        if not weight.is_meta:  # N(0, 1) as nn.Embedding's own init; on meta, init would import torch._dynamo (1.3 s)
            nn.init.normal_(weight)
        self.embeddings = nn.Embedding(arch.vocab_size, arch.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(Block(arch, layer) for layer in arch.layers)
        self.norm_f = RMSNorm(arch.hidden_size, arch.layer_norm_epsilon)


class NemotronH(nn.Module):
    """Causal LM: embeddings -> blocks -> final RMSNorm -> untied LM head."""

    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        self.backbone = Backbone(arch)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    def new_cache(self) -> Cache:
        return Cache(len(self.backbone.layers))

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None, last_only: bool = False,
                via: Callable | None = None) -> torch.Tensor:
        """Logits (b, l, vocab) in float32 (or (b, 1, vocab) with ``last_only``).

        With a ``cache``, continues from its state and updates it in place; a one-token input then
        takes the recurrent decode path. ``via(self, input_ids)``, when given, computes the logits
        instead, inside this module's call (see :meth:`Block.forward`).
        """
        if via is not None:
            return via(self, input_ids)
        h = self.backbone.embeddings(input_ids)  # (b, l, d)
        for i, block in enumerate(self.backbone.layers):
            h = block(h, cache, i)
        if cache is not None:
            cache.seen += input_ids.shape[1]
        if last_only:
            h = h[:, -1:]
        return self.lm_head(self.backbone.norm_f(h)).float()


# ---- building and loading -------------------------------------------------------------------


def init_weights(model: NemotronH, seed: int = 0, std: float = 0.02) -> NemotronH:
    """Random initialisation in the Nemotron-H style (for demos and tests, not for training runs).

    Linear/embedding weights ~ N(0, std); A = 1..H; D = 1; dt_bias such that softplus(dt_bias)
    lies in [1e-2, 1e-1] (well above ``time_step_min``); norms 1.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "A_log":
                p.copy_(torch.log(torch.arange(1, p.numel() + 1, dtype=torch.float32)))
            elif leaf == "D":
                p.fill_(1.0)
            elif leaf == "dt_bias":
                dt = torch.exp(torch.rand(p.shape, generator=g) * (math.log(0.1) - math.log(0.01)) + math.log(0.01))
                p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.fill_(1.0)
            elif leaf == "bias":
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def build_model(arch: Arch, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int | None = 0) -> NemotronH:
    """A model with random weights (``seed``), or uninitialised on ``meta`` when ``device='meta'``."""
    with torch.device(device):
        model = NemotronH(arch)
    if device != "meta" and seed is not None:
        init_weights(model, seed)
    model.to(dtype)  # a meta model too: the ONNX graphs are traced on it, in the graphs' dtype
    for name, buf in list(model.named_buffers()):
        module_name, leaf = name.rsplit(".", 1)
        if leaf in KEEP_FP32:
            setattr(model.get_submodule(module_name), leaf, buf.float())
    return model


def load_model(path: str | Path | Checkpoint, dtype: torch.dtype | None = None, device: str = "cpu") -> NemotronH:
    """Load a checkpoint directory into the reference model.

    The model is built on the ``meta`` device and each tensor, read from its shard, becomes the
    parameter itself (``assign``), so there is never a second copy of the weights in memory. A
    quantized checkpoint's Linear weights are dequantized one Linear at a time (see the module
    docstring).

    Args:
        path: checkpoint directory (config.json + safetensors) or an opened :class:`Checkpoint`.
        dtype: cast every tensor to this dtype (default: as stored; for a quantized checkpoint, the
            dtype of its unquantized tensors), except the MoE routers' ``e_score_correction_bias``,
            which is always float32 (``KEEP_FP32``).
        device: where the parameters go.

    Raises:
        ConfigError / CheckpointError: the checkpoint is invalid (see ``Checkpoint.open``).
    """
    ckpt = path if isinstance(path, Checkpoint) else Checkpoint.open(path, require_weights=True)
    if not ckpt.has_weights:
        raise CheckpointError("no weights to load (config.json only)", path=str(ckpt.root))
    with torch.device("meta"):
        model = NemotronH(ckpt.arch)
    # parameters and persistent buffers (the routers' bias), named before any Linear is swapped for
    # a FakeQuantLinear (whose pre_quant_scale _load_quantized fills)
    expected = set(model.state_dict())
    quantized: list[str] = []
    if ckpt.quant is not None:
        from elastic.slicer.quant.layout import linear_modules

        quantized = [m for m in linear_modules(ckpt.arch.tensor_shapes()) if ckpt.quant.is_quantized(m)]
        if dtype is None:  # run in the dtype the unquantized tensors are stored in
            dtype = getattr(torch, ckpt.tensors["backbone.embeddings.weight"].dtype_name)
        _load_quantized(model, ckpt, quantized, dtype, device)
    skip = {f"{m}.weight" for m in quantized}
    for name, tensor in ckpt.iter_tensors([n for n in ckpt.tensors if n in expected and n not in skip]):
        module_name, leaf = name.rsplit(".", 1)
        if leaf in KEEP_FP32:
            tensor = tensor.float()
        elif dtype is not None:
            tensor = tensor.to(dtype)
        module, tensor = model.get_submodule(module_name), tensor.to(device)
        if isinstance(getattr(module, leaf), nn.Parameter):  # else a buffer, which stays one
            tensor = nn.Parameter(tensor, requires_grad=False)
        setattr(module, leaf, tensor)
    if ckpt.arch.tie_word_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # Checkpoint.open checked shapes; this guards the loader itself
        raise CheckpointError("weights not loaded", problems=left, path=str(ckpt.root))
    release_free_memory()
    return model.eval()


def release_free_memory(mmap_threshold: int | None = None) -> None:
    """Give the C heap's free memory back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    Converting each stored tensor (bf16 -> float32, say) frees its source, and glibc keeps such
    chunks for reuse: loading a 360 MB checkpoint into float32 left 18 MiB more resident than the
    weights until trimmed (17.6 MiB on bench/plan_accuracy.py's M model, 27 MiB on its L).
    ``mmap_threshold``: from now on, blocks of that many bytes and more are mapped and unmapped on
    their own (glibc's dynamic threshold otherwise grows to 32 MiB, and activations freed layer after
    layer stay in the heap; each such block then costs its page faults again, so only for a stage
    whose peak matters more than its speed, as an export's parity run)."""
    import ctypes
    import ctypes.util
    import gc
    import sys

    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim, mallopt = libc.malloc_trim, libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no malloc_trim
        return
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    if mmap_threshold is not None:
        mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        mallopt(-3, mmap_threshold)  # M_MMAP_THRESHOLD


def _load_quantized(model: NemotronH, ckpt: Checkpoint, modules: list[str], dtype: torch.dtype, device: str) -> None:
    """Dequantize each quantized Linear of ``ckpt`` into ``model`` (W8A8: as a FakeQuantLinear)."""
    from elastic.slicer.quant.dequant import dequantize_module

    for module in modules:
        weight, act = dequantize_module(ckpt, module)
        parent_name, leaf = module.rsplit(".", 1) if "." in module else ("", module)
        parent, old = model.get_submodule(parent_name), model.get_submodule(module)
        if act is not None:
            pqs = act.pre_quant_scale
            pqs = pqs.to(device=device, dtype=torch.float32) if pqs is not None else None
            new = FakeQuantLinear(old.in_features, old.out_features, old.bias is not None, act.kind, act.scale, pqs,
                                  device="meta")
            setattr(parent, leaf, new)
        linear = model.get_submodule(module)
        linear.weight = nn.Parameter(weight.to(dtype).to(device), requires_grad=False)


class TorchBackend:
    """The reference model with its cache as a backend of ``elastic.slicer.nn.generate.greedy``.

    ``state`` is the :class:`Cache`, updated in place; ids stay on the model's device.
    """

    name = "torch"

    def __init__(self, model: NemotronH):
        self.model = model
        self.vocab_size = model.arch.vocab_size
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def prefill(self, input_ids) -> tuple[torch.Tensor, Cache]:
        """(logits of the last position (b, 1, vocab), cache) for prompt ids (b, l)."""
        cache = self.model.new_cache()
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        return self.model(ids, cache=cache, last_only=True), cache

    @torch.no_grad()
    def step(self, next_ids: torch.Tensor, cache: Cache) -> tuple[torch.Tensor, Cache]:
        """(logits (b, 1, vocab), cache) for one token per sequence, ids (b,)."""
        ids = torch.as_tensor(next_ids, dtype=torch.long, device=self.device)
        return self.model(ids[:, None], cache=cache), cache


def generate(model: NemotronH, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy decoding with the cache (``elastic.slicer.nn.generate.greedy`` over :class:`TorchBackend`).

    Returns:
        (b, prompt + generated) token ids; stops early when every row has produced ``eos_token_id``.
    """
    from elastic.slicer.nn.generate import greedy

    out = greedy(TorchBackend(model), input_ids, max_new_tokens, eos_token_id)
    new = torch.tensor(out.tokens, dtype=input_ids.dtype, device=input_ids.device)  # (b, n), n >= 0
    return torch.cat([input_ids, new], dim=1)


def write_model(w, model: NemotronH, max_shard_bytes: int = 2 * GIB, extra_config: dict | None = None) -> None:
    """Write ``model``'s config.json and weights into an open ``ShardedWriter`` (tied LM heads are
    stored once, as transformers does), and the modeling code a config with per-layer sizes needs."""
    from elastic.slicer import remote_code
    from elastic.slicer.storage.writer import OutTensor, st_dtype

    config = model.arch.to_config()
    config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    config.update(extra_config or {})
    tensors = [
        OutTensor(name, st_dtype(p.dtype), tuple(p.shape), lambda p=p: [p.detach().cpu()])
        for name, p in model.state_dict().items()
        if not (model.arch.tie_word_embeddings and name == "lm_head.weight")
    ]
    w.add_json("config.json", config)
    if remote_code.needs_code(config):
        for f in remote_code.FILES:
            w.add_file(f)
    w.write_tensors(tensors, max_shard_bytes)


def save_model(model: NemotronH, out: str | Path, max_shard_bytes: int = 2 * GIB, force: bool = False,
               extra_config: dict | None = None) -> Path:
    """Write ``model`` as a Hugging Face checkpoint (config.json + safetensors, in the form
    ``Arch.config_form`` names), atomically."""
    from elastic.slicer.storage.writer import ShardedWriter

    with ShardedWriter(out, force=force) as w:
        write_model(w, model, max_shard_bytes, extra_config)
    return Path(out)
