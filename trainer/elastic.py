"""The router and the elastic forward (DESIGN.md section 6).

- The search space: per elastic dimension, the parent's size and smaller valid ones (multiples of
  n_groups for Mamba heads, of the KV heads for attention heads); FFN widths per layer, Mamba and
  attention sizes one per budget for all their layers (``shared``: serving runtimes take one global
  Mamba and attention size, docs/runtime-facts.md), per layer only when asked
  (``per_layer_mamba``); depth: keep/drop for the layers the depth importance ranks least harmful
  to remove.
- The router: one small MLP per dimension (budget one-hot -> 256 -> LeakyReLU(0.1) -> logits over
  the choices, one row per layer); Gumbel-softmax with a temperature annealed 1.0 -> 0.05 and a
  logit scale 1 -> 10 over stage 1 (held through stage 2); straight-through: the forward uses the hard choice, gradients reach the
  router through a scalar that is exactly 1.0 in the forward and multiplies each chosen unit's
  output projection.
- The elastic forward: the chosen nested model computed from narrowed parent weights
  (``elastic.slicer.nn.masked``), so a smaller budget costs less.
- The cost: the parameters of the hard sample actually taken (``Choice.hard``: exact in the
  forward, differentiable through the straight-through Gumbel sample), relative to the budget's
  target, with a dead zone (:func:`budget_loss`), as NVIDIA's elastic budget loss does: the
  router is pulled toward the model that is deployed, not toward an expectation over models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from elastic.slicer.formats.arch import Arch
from elastic.slicer.formats.elastic_format import Dimension, ElasticConfig, spec_from_choices
from elastic.slicer.nn.masked import _child_module, masked_params
from elastic.slicer.nn.model import NemotronH
from elastic.slicer.formats.spec import SliceSpec

ROUTER_HIDDEN = 256
# which child tensor a dimension's straight-through scalar multiplies, per layer kind
OUTPUT_PROJ = {"mamba": "mixer.out_proj.weight", "attention": "mixer.o_proj.weight", "mlp": "mixer.down_proj.weight"}


def _steps(top: int, unit: int, fractions=(1.0, 0.75, 0.5)) -> tuple[int, ...]:
    """Sizes ``top * f`` rounded down to a multiple of ``unit`` (at least one unit), largest first."""
    out = []
    for f in fractions:
        v = max(unit, int(top * f) // unit * unit)
        if v not in out:
            out.append(v)
    return tuple(out)


def default_search_space(arch: Arch, droppable: list[int], per_layer_mamba: bool = False) -> tuple[Dimension, ...]:
    """Choices down to about half of every width, and keep/drop for the ``droppable`` layers.

    FFN widths are chosen per layer (NVIDIA's Puzzle format and vLLM hold them per layer); Mamba and
    attention sizes once for all their layers, unless ``per_layer_mamba`` (then per layer, and the
    slices load only in transformers, through the modeling file elastic ships).
    """
    shared = not per_layer_mamba
    idx = lambda kind: tuple(i for i, layer in enumerate(arch.layers) if layer.kind == kind)  # noqa: E731
    dims = [Dimension("hidden_size", _steps(arch.hidden_size, 8 if arch.hidden_size >= 16 else 1, (1.0, 0.875, 0.75, 0.625, 0.5)))]
    mamba, attn, mlp = idx("mamba"), idx("attention"), idx("mlp")
    if mamba:
        first = arch.layers[mamba[0]]
        dims.append(Dimension("mamba_num_heads", _steps(first.mamba_num_heads, arch.n_groups), mamba, shared))
        dims.append(Dimension("mamba_head_dim", _steps(first.mamba_head_dim, 1), mamba, shared))
    if attn:
        first = arch.layers[attn[0]]
        dims.append(Dimension("num_attention_heads", _steps(first.num_attention_heads, first.num_key_value_heads), attn,
                              shared))
    if mlp:
        dims.append(Dimension("intermediate_size", _steps(arch.layers[mlp[0]].intermediate_size, 8, (1.0, 0.75, 0.5, 0.25)), mlp))
    if droppable:
        dims.append(Dimension("depth", ("keep", "drop"), tuple(sorted(droppable))))
    return tuple(dims)


class Router(nn.Module):
    """One MLP per elastic dimension; parameters named ``{dimension}.0.weight`` ... as stored."""

    def __init__(self, dims: tuple[Dimension, ...], n_budgets: int, hidden: int = ROUTER_HIDDEN):
        super().__init__()
        self.dims = dims
        self.n_budgets = n_budgets
        self.mlps = nn.ModuleDict({
            d.name: nn.Sequential(nn.Linear(n_budgets, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, d.router_outputs))
            for d in dims
        })

    def logits(self, budget: int) -> dict[str, torch.Tensor]:
        x = F.one_hot(torch.tensor(budget), self.n_budgets).float().to(next(self.parameters()).device)
        return {d.name: self.mlps[d.name](x).view(-1, len(d.choices)) for d in self.dims}  # (rows, choices)

    def numpy_state(self) -> dict:
        """float32 numpy arrays with the names ``router.safetensors`` uses."""
        return {k: v.detach().float().cpu().numpy() for k, v in self.mlps.state_dict().items()}


@dataclass
class Choice:
    """One sampled nested model: its spec, the straight-through scalars, the router probabilities."""

    spec: SliceSpec
    picks: dict[str, list]  # dimension -> chosen value per row
    st: dict[str, torch.Tensor]  # dimension -> (rows,) scalars, 1.0 in the forward
    probs: dict[str, torch.Tensor]  # dimension -> (rows, choices) softmax of the scaled logits
    hard: dict[str, torch.Tensor]  # dimension -> (rows, choices) the sample's one-hot, straight-through


def sample(router: Router, ec: ElasticConfig, parent: Arch, budget: int, tau: float, scale: float,
           gen: torch.Generator | None, full: bool = False) -> Choice:
    """Gumbel-softmax sample of a nested model for ``budget`` (argmax, no noise, when ``gen`` is None).

    ``full`` pins the choice to the parent itself (the largest choice everywhere, every layer kept):
    a budget of 100% is the parent, not whatever the router happens to prefer.
    """
    picks, st, probs, hard_st = {}, {}, {}, {}
    for d, (name, logits) in zip(ec.dimensions, router.logits(budget).items()):
        z = logits * scale
        probs[name] = z.softmax(-1)
        if full:
            idx = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)  # choices are largest first
            probs[name] = hard_st[name] = F.one_hot(idx, z.shape[-1]).to(z.dtype)
            st[name] = torch.ones(z.shape[0], device=z.device)
        elif gen is None:
            idx = z.argmax(-1)
            hard_st[name] = F.one_hot(idx, z.shape[-1]).to(z.dtype)
            st[name] = torch.ones(z.shape[0], device=z.device)
        else:
            u = torch.rand(z.shape, generator=gen).to(z.device).clamp_(1e-9, 1 - 1e-9)
            soft = ((z - torch.log(-torch.log(u))) / tau).softmax(-1)
            idx = soft.argmax(-1)
            hard = F.one_hot(idx, z.shape[-1]).to(soft.dtype)
            hard_st[name] = hard - soft.detach() + soft  # the one-hot forward, the soft sample's gradient
            st[name] = hard_st[name].gather(-1, idx[:, None])[:, 0]  # exactly 1.0 forward
        picks[name] = [d.choices[int(k)] for k in idx]  # one per router row (d.per_layer expands)
    spec = SliceSpec.from_json(spec_from_choices(picks, ec, parent), parent)
    return Choice(spec, picks, st, probs, hard_st)


def elastic_forward(parent: NemotronH, ec: ElasticConfig, choice: Choice, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the chosen nested model, from narrowed parent weights, with the router's
    straight-through scalars on each chosen unit's output projection."""
    params = masked_params(parent, choice.spec)
    kept = choice.spec.kept_layers()
    child_index = {i: k for k, i in enumerate(kept)}
    for d in ec.dimensions:
        s = choice.st[d.name]
        if d.layers is None:  # hidden size: the embeddings feed every hidden channel
            params["backbone.embeddings.weight"] = params["backbone.embeddings.weight"] * s[0]
            continue
        for i in d.layers:
            if i not in child_index:
                continue  # dropped: nothing of this layer is computed
            name = f"backbone.layers.{child_index[i]}.{OUTPUT_PROJ[parent.arch.layers[i].kind]}"
            params[name] = params[name] * s[d.row(i)]
    child = _child_module(parent.arch, choice.spec)
    return torch.func.functional_call(child, params, (ids,))


def expected_params(arch: Arch, ec: ElasticConfig, probs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Parameters of the nested model in expectation under ``probs`` (exact for one-hot probs)."""
    def mean(name: str, row: int | None, default: float) -> torch.Tensor:
        d = next((x for x in ec.dimensions if x.name == name), None)
        if d is None or (d.layers is not None and row not in d.layers):
            return torch.tensor(float(default))
        p = probs[name][0 if d.layers is None else d.row(row)]
        if name == "depth":
            return p[d.choices.index("keep")]
        return (p * torch.tensor([float(c) for c in d.choices], device=p.device)).sum()

    dh = mean("hidden_size", None, arch.hidden_size)
    total = arch.vocab_size * dh * (1 if arch.tie_word_embeddings else 2) + dh  # embeddings, lm_head, norm_f
    G, N, K = arch.n_groups, arch.ssm_state_size, arch.conv_kernel
    for i, layer in enumerate(arch.layers):
        keep = mean("depth", i, 1.0)
        if layer.kind == "mamba":
            H, P = mean("mamba_num_heads", i, layer.mamba_num_heads), mean("mamba_head_dim", i, layer.mamba_head_dim)
            I = H * P
            n = (2 * I + 2 * G * N + H) * dh + (I + 2 * G * N) * K + 3 * H + I + dh * I
            if arch.use_conv_bias:
                n = n + I + 2 * G * N
            if arch.use_bias:
                n = n + 2 * I + 2 * G * N + H + dh
        elif layer.kind == "attention":
            A, hd, kv = mean("num_attention_heads", i, layer.num_attention_heads), arch.head_dim, layer.num_key_value_heads
            n = 2 * A * hd * dh + 2 * kv * hd * dh
        else:
            Fs = mean("intermediate_size", i, layer.intermediate_size)
            n = 2 * Fs * dh + ((Fs + dh) if arch.mlp_bias else 0)
        total = total + keep * (n + dh)  # + the block's pre-norm
    return total


def budget_loss(params: torch.Tensor, target: float, dead_zone: float) -> torch.Tensor:
    """``max(0, |params / target - 1| - dead_zone)``: zero within ``dead_zone`` of the target."""
    return ((params / target - 1).abs() - dead_zone).clamp(min=0)


def anneal(step: int, total: int, start: float, end: float) -> float:
    """Geometric interpolation from ``start`` to ``end`` over ``total`` steps."""
    t = min(1.0, step / max(1, total))
    return start * math.exp(t * math.log(end / start))
