"""The router and the elastic forward (DESIGN.md section 6).

- The search space (``default_search_space``, built in trainer/memory.py, which has no torch, so
  the dry run counts the same router): per elastic dimension, the parent's size and smaller valid
  ones (multiples of n_groups for Mamba heads, of the KV heads for attention heads, of n_group for
  routed experts); FFN widths per layer, Mamba, attention and MoE sizes one per budget for all their
  layers (``shared``: serving runtimes take one global size, docs/runtime-facts.md), per layer only
  when asked (``per_layer_mamba``); depth: keep/drop for the layers the depth importance ranks
  least harmful to remove.
- The router: one small MLP per dimension (budget one-hot -> 256 -> LeakyReLU(0.1) -> logits over
  the choices, one row per layer); Gumbel-softmax with a temperature annealed 1.0 -> 0.05 and a
  logit scale 1 -> 10 over stage 1 (held through stage 2); straight-through: the forward uses the
  hard choice, the backward the soft sample's gradient.
- Soft masks (NVIDIA's elastification weights every choice's mask by the sample): each unit of a
  dimension (a Mamba head, head channel, attention head, FFN neuron, hidden channel; a layer for
  depth) is multiplied by ``m = sum_k sample_k * mask_k``, where ``mask_k`` keeps choice k's units.
  In the forward the sample is one-hot, so ``m`` is exactly 1 on every computed unit; in the
  backward every choice k receives ``<dL/dm, mask_k>``: distillation feedback about what keeping
  fewer units would lose, not only about the choice taken. The masks multiply the input of each
  layer's output projection (out_proj, o_proj, down_proj; the embeddings' columns for hidden channels).
- The elastic forward: the chosen nested model computed from narrowed parent weights, so a smaller
  budget costs less; units beyond the chosen size are not computed, so choices larger than the
  taken one see the same feedback as the taken one (first order, on what was computed). Each block
  narrows its own weights inside its module call (``Block.forward(via=...)``), so FSDP2's gather
  and activation checkpointing wrap it as they wrap a plain forward.
- The cost: the parameters of the hard sample actually taken (``Choice.hard``: exact in the
  forward, differentiable through the straight-through Gumbel sample), relative to the budget's
  target, with a dead zone (:func:`budget_loss`), as NVIDIA's elastic budget loss does: the
  router is pulled toward the model that is deployed, not toward an expectation over models. Its
  gradient reaches the logits through the soft sample and vanishes once the router saturates, so
  the step adds :func:`move_loss` (:func:`router_cost` sums both): outside the dead zone, a
  cross-entropy pull toward the single row switch that lowers the cost most, which does not vanish.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from elastic.slicer.formats.arch import Arch, LayerArch
from elastic.slicer.formats.elastic_format import Dimension, ElasticConfig, spec_from_choices
from elastic.slicer.formats.rules import tensor_rules
from elastic.slicer.nn.masked import child_module
from elastic.slicer.nn.masked import narrow as _narrow  # one name here: tests record its copies
from elastic.slicer.nn.model import NemotronH
from elastic.slicer.formats.spec import SliceSpec

# the search space is built in one place, torch-free, so that the dry run's memory plan counts the
# router train() builds (trainer/memory.py)
from .memory import ROUTER_HIDDEN, default_search_space  # noqa: F401  (re-exported: train.py, tests)

# the output projection of each layer kind: its input columns are the units the soft masks weight
OUTPUT_PROJ = {"mamba": "mixer.out_proj.weight", "attention": "mixer.o_proj.weight", "mlp": "mixer.down_proj.weight"}


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
    """One sampled nested model: its spec, the router probabilities and the straight-through sample."""

    spec: SliceSpec
    picks: dict[str, list]  # dimension -> chosen value per row
    probs: dict[str, torch.Tensor]  # dimension -> (rows, choices) softmax of the scaled logits
    hard: dict[str, torch.Tensor]  # dimension -> (rows, choices) the sample's one-hot, straight-through
    # dimension -> (rows, choices) log-softmax of the scaled logits (None: a pinned choice, no router)
    log_probs: dict[str, torch.Tensor] | None = None


def sample(router: Router, ec: ElasticConfig, parent: Arch, budget: int, tau: float, scale: float,
           gen: torch.Generator | None, full: bool = False) -> Choice:
    """Gumbel-softmax sample of a nested model for ``budget`` (argmax, no noise, when ``gen`` is None).

    ``full`` pins the choice to the parent itself (the largest choice everywhere, every layer kept):
    a budget of 100% is the parent, not whatever the router happens to prefer.
    """
    picks, probs, hard_st, log_probs = {}, {}, {}, {}
    for d, (name, logits) in zip(ec.dimensions, router.logits(budget).items()):
        z = logits * scale
        probs[name], log_probs[name] = z.softmax(-1), z.log_softmax(-1)
        if full:
            idx = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)  # choices are largest first
            probs[name] = hard_st[name] = F.one_hot(idx, z.shape[-1]).to(z.dtype)
        elif gen is None:
            idx = z.argmax(-1)
            hard_st[name] = F.one_hot(idx, z.shape[-1]).to(z.dtype)
        else:
            u = torch.rand(z.shape, generator=gen).to(z.device).clamp_(1e-9, 1 - 1e-9)
            soft = ((z - torch.log(-torch.log(u))) / tau).softmax(-1)
            idx = soft.argmax(-1)
            # the one-hot exactly in the forward (soft - soft is 0), the soft sample's gradient
            hard_st[name] = F.one_hot(idx, z.shape[-1]).to(soft.dtype) + (soft - soft.detach())
        picks[name] = [d.choices[int(k)] for k in idx]  # one per router row (d.per_layer expands)
    spec = SliceSpec.from_json(spec_from_choices(picks, ec, parent), parent)
    return Choice(spec, picks, probs, hard_st, None if full else log_probs)


def unit_mask(sample_row: torch.Tensor, sizes: tuple, kept: int, groups: int = 1) -> torch.Tensor:
    """Soft mask over the ``kept`` computed units: ``sum_k sample_row[k] * [unit < sizes[k]]``.

    Units lie in ``groups`` equal blocks (Mamba heads per group, query heads per KV group), each
    choice keeping the first ``size / groups`` of every block, as the slicing rules do.
    """
    per = kept // groups
    r = torch.arange(per, device=sample_row.device)
    sizes_t = torch.tensor([s // groups for s in sizes], device=sample_row.device)
    masks = (r[None, :] < sizes_t[:, None]).to(sample_row.dtype)  # (choices, per)
    return (sample_row @ masks).repeat(groups)


@functools.lru_cache(maxsize=64)
def _layer_rules(parent_arch: Arch, spec: SliceSpec) -> tuple[dict, dict[int, dict]]:
    """The slicing rules as (root tensors, {parent layer: {name in the child block: (name in the parent
    block, kept ranges per axis)}}); the names differ where experts are renumbered."""
    root, layers = {}, {}
    for rule in tensor_rules(parent_arch, spec):
        if rule.source.startswith("backbone.layers."):
            i, _, rel = rule.source[len("backbone.layers."):].partition(".")
            child_rel = rule.name[len("backbone.layers."):].partition(".")[2]
            layers.setdefault(int(i), {})[child_rel] = (rel, rule.axes)
        else:
            root[rule.source] = rule.axes
    return root, layers


def _layer_masks(ec: ElasticConfig, choice: Choice, parent: Arch, i: int, child: LayerArch) -> list[tuple]:
    """The soft masks of layer ``i`` (its child layer is ``child``): ``(module path in the block,
    "input" | "output", mask)``, each multiplying that module's input or output."""
    dims = {d.name: d for d in ec.dimensions if d.layers is not None and i in d.layers}
    kind = parent.layers[i].kind

    def m(name: str, kept: int, groups: int = 1) -> torch.Tensor | None:
        d = dims.get(name)
        return None if d is None else unit_mask(choice.hard[name][d.row(i)], d.choices, kept, groups)

    mask, out = None, []
    if kind == "mamba":
        H, P = child.mamba_num_heads, child.mamba_head_dim
        mh, mp = m("mamba_num_heads", H, parent.n_groups), m("mamba_head_dim", P)
        if mh is not None or mp is not None:
            like = mh if mh is not None else mp
            mh = mh if mh is not None else torch.ones(H, device=like.device, dtype=like.dtype)
            mp = mp if mp is not None else torch.ones(P, device=like.device, dtype=like.dtype)
            mask = (mh[:, None] * mp[None, :]).reshape(-1)  # columns: kept heads, each with its channels
    elif kind == "attention":
        mh = m("num_attention_heads", child.num_attention_heads, child.num_key_value_heads)
        mask = None if mh is None else mh.repeat_interleave(parent.head_dim)
    elif kind == "mlp":
        mask = m("intermediate_size", child.intermediate_size)
    else:  # moe: each expert's width, the shared expert's width, and each routed expert's output
        width = m("moe_intermediate_size", child.moe_intermediate_size)
        experts = m("n_routed_experts", child.n_routed_experts, parent.n_group)
        for j in range(child.n_routed_experts):
            if width is not None:
                out.append((f"mixer.experts.{j}.down_proj", "input", width))
            if experts is not None:
                out.append((f"mixer.experts.{j}", "output", experts[j:j + 1]))
        shared = m("moe_shared_expert_intermediate_size", child.moe_shared_expert_intermediate_size)
        if shared is not None:
            out.append(("mixer.shared_experts.down_proj", "input", shared))
    depth = dims.get("depth")
    keep = None if depth is None else choice.hard["depth"][depth.row(i)][depth.choices.index("keep")].reshape(1)
    if kind == "moe":
        if keep is not None:
            out.append(("mixer", "output", keep))
    elif mask is not None or keep is not None:
        mask = keep if mask is None else (mask if keep is None else mask * keep)
        out.append((OUTPUT_PROJ[kind].rsplit(".", 1)[0], "input", mask))
    return out


def elastic_forward(parent: NemotronH, ec: ElasticConfig, choice: Choice, ids: torch.Tensor,
                    checkpoint: bool = False) -> torch.Tensor:
    """Logits of the chosen nested model, from narrowed parent weights, with the soft masks on
    each unit's output projection (exactly 1 in the forward: the plain nested model's logits).

    Every block narrows its own weights inside its module call, so this works on FSDP2-sharded
    modules (their hooks gather the block's parameters first); ``checkpoint`` recomputes each
    block's activations in the backward (activation checkpointing).
    """
    hidden = next((d for d in ec.dimensions if d.layers is None), None)
    emb_mask = None
    if hidden is not None:
        emb_mask = unit_mask(choice.hard[hidden.name][0], hidden.choices, choice.spec.hidden_size)
    return nested_forward(parent, choice.spec, ids, checkpoint=checkpoint, emb_mask=emb_mask,
                          masks=lambda i, layer: _layer_masks(ec, choice, parent.arch, i, layer))


def nested_forward(parent: NemotronH, spec: SliceSpec, ids: torch.Tensor, checkpoint: bool = False,
                   emb_mask: torch.Tensor | None = None, masks=None) -> torch.Tensor:
    """Logits of the nested model ``spec`` from narrowed parent weights, each block narrowing its own
    inside its module call (FSDP2-safe; ``elastic.slicer.nn.masked.masked_forward`` computes the same
    from the whole parameter dict at once, which a sharded model does not hold).

    ``emb_mask`` multiplies the kept embedding columns; ``masks(i, child_layer)`` gives parent layer
    ``i``'s soft masks (see :func:`_layer_masks`).
    """
    arch = parent.arch
    root_rules, layer_rules = _layer_rules(arch, spec)
    child = child_module(arch, spec)
    kept = spec.kept_layers()
    child_arch = spec.child_arch(arch)

    def block_fn(i: int, k: int, layer_masks: list):
        def run(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
            own = {**dict(block.named_buffers()), **dict(block.named_parameters())}  # buffers: the MoE router's bias
            params = {name: _narrow(own[rel], axes) for name, (rel, axes) in layer_rules[i].items()}
            target = child.backbone.layers[k]
            # each mask multiplies a module's input (the same product as masking the next Linear's
            # columns, without a masked copy of the weight kept for the backward) or its output
            handles = []
            for path, where, mask in layer_masks:
                sub = target.get_submodule(path)
                if where == "input":
                    handles.append(sub.register_forward_pre_hook(
                        lambda _m, args, mask=mask: (args[0] * mask.to(args[0].dtype), *args[1:])))
                else:
                    handles.append(sub.register_forward_hook(lambda _m, _a, y, mask=mask: y * mask.to(y.dtype)))
            try:
                return torch.func.functional_call(target, params, (h, None, k))
            finally:
                for handle in handles:
                    handle.remove()
        return run

    def root_fn(model: NemotronH, x: torch.Tensor) -> torch.Tensor:
        own = dict(model.named_parameters(remove_duplicate=False))
        h = F.embedding(x, _narrow(own["backbone.embeddings.weight"], root_rules["backbone.embeddings.weight"]))
        if emb_mask is not None:  # on the looked-up rows: the same product as masking the table's columns
            h = h * emb_mask.to(h.dtype)
        for k, i in enumerate(kept):
            block = model.backbone.layers[i]
            fn = block_fn(i, k, masks(i, child_arch.layers[k]) if masks is not None else [])
            if checkpoint and torch.is_grad_enabled():
                h = torch.utils.checkpoint.checkpoint(block, h, None, k, fn, use_reentrant=False)
            else:
                h = block(h, None, k, fn)
        norm = _narrow(own["backbone.norm_f.weight"], root_rules["backbone.norm_f.weight"])
        h = torch.func.functional_call(child.backbone.norm_f, {"weight": norm}, (h,))
        head = _narrow(own["lm_head.weight"], root_rules.get("lm_head.weight", root_rules["backbone.embeddings.weight"]))
        return F.linear(h, head).float()

    return parent(ids, via=root_fn)


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
        elif layer.kind == "moe":
            E = mean("n_routed_experts", i, layer.n_routed_experts)
            Fe = mean("moe_intermediate_size", i, layer.moe_intermediate_size)
            Fsh = mean("moe_shared_expert_intermediate_size", i, layer.moe_shared_expert_intermediate_size)
            L = arch.moe_latent_size
            inner = L if L else dh  # the experts' width on the hidden side (a latent width is not elastic)
            n = E * dh + E + E * 2 * Fe * inner + 2 * Fsh * dh  # gate + its bias, routed experts, shared expert
            if L:
                n = n + 2 * L * dh
            if arch.mlp_bias:
                n = n + E * (Fe + inner) + Fsh + dh + ((L + dh) if L else 0)
        else:
            Fs = mean("intermediate_size", i, layer.intermediate_size)
            n = 2 * Fs * dh + ((Fs + dh) if arch.mlp_bias else 0)
        total = total + keep * (n + dh)  # + the block's pre-norm
    return total


def budget_loss(params: torch.Tensor, target: float, dead_zone: float) -> torch.Tensor:
    """``max(0, |params / target - 1| - dead_zone)``: zero within ``dead_zone`` of the target."""
    return ((params / target - 1).abs() - dead_zone).clamp(min=0)


def move_loss(arch: Arch, ec: ElasticConfig, choice: Choice, target: float, dead_zone: float) -> torch.Tensor:
    """Zero in value; its gradient pulls the router toward the best one-row move of its argmax.

    The straight-through cost's gradient reaches the logits through the soft sample, whose Jacobian
    vanishes once the router saturates (a one-hot softmax): a router whose argmax settled outside the
    dead zone then stays there. This term does not vanish: the cost is affine in each router row's
    one-hot (products only join different rows), so one backward gives, exactly, the parameters after
    switching any single row to any other choice; of the switches that lower :func:`budget_loss`,
    the one that lowers it most gets a cross-entropy pull (gradient ``p - onehot``, size one at
    saturation). A switch that would overshoot the target past the dead zone's far side into a worse
    loss is never pulled toward; inside the dead zone no switch lowers a zero loss, so the term is
    zero there and the dead zone keeps its meaning. The move is judged on the router's argmax (what
    the end of the run resolves to when it lands), not on the Gumbel sample: a pull judged on
    samples points wherever the noise fell, and the argmax of the MoE demo trained so at the default
    router learning rate wandered 25-40% around its 50% target.
    """
    zero = torch.zeros((), device=next(iter(choice.hard.values())).device)
    if choice.log_probs is None:  # pinned to the parent: no router to pull
        return zero
    hard = {n: F.one_hot(p.detach().argmax(-1), p.shape[-1]).to(p.dtype).requires_grad_(True)
            for n, p in choice.probs.items()}
    cost = expected_params(arch, ec, hard)
    now = budget_loss(cost.detach(), target, dead_zone)
    if float(now) <= 0:
        return zero
    grads = torch.autograd.grad(cost, list(hard.values()), allow_unused=True)
    best = None  # (gain, dimension, row, choice)
    for (name, h), g in zip(hard.items(), grads):
        if g is None:
            continue
        switched = cost.detach() + g - (g * h.detach()).sum(-1, keepdim=True)  # (rows, choices) after one switch
        gain = now - budget_loss(switched, target, dead_zone)  # (rows, choices)
        i = int(gain.argmax())
        top = float(gain.flatten()[i])
        if top > 0 and (best is None or top > best[0]):
            best = (top, name, *divmod(i, gain.shape[-1]))
    if best is None:  # no single switch helps: the straight-through cost is all there is
        return zero
    _, name, row, k = best
    ce = -choice.log_probs[name][row, k]
    return ce - ce.detach()


def router_cost(cost: torch.Tensor, choice: Choice, arch: Arch, ec: ElasticConfig, target: float,
                dead_zone: float) -> torch.Tensor:
    """The per-step budget loss: :func:`budget_loss` of ``cost`` (the parameters of ``choice``'s hard
    sample, :func:`expected_params` of ``choice.hard``), whose gradient flows through the straight-through
    sample, plus :func:`move_loss`, whose gradient does not vanish when the router saturates."""
    return budget_loss(cost, target, dead_zone) + move_loss(arch, ec, choice, target, dead_zone)


def anneal(step: int, total: int, start: float, end: float) -> float:
    """Geometric interpolation from ``start`` to ``end`` over ``total`` steps."""
    t = min(1.0, step / max(1, total))
    return start * math.exp(t * math.log(end / start))


def resolve_budgets(weights: dict, ec: ElasticConfig, arch: Arch, *, tolerance: float, scale: float,
                    keep_attention: bool) -> tuple[ElasticConfig, dict[str, dict]]:
    """The end-of-run resolution (DESIGN.md section 6): every budget by constrained choice, the
    architecture of highest router log-probability within ``tolerance`` of its target
    (``elastic_format.resolve_trained``, the function slicing calls with the router written here,
    so both resolve the same architecture); the parent's own budget is the parent. A budget that no
    architecture reaches gets the nearest one (the caller reports the miss).

    Args:
        weights: the router as ``Router.numpy_state()`` returns it (what ``router.safetensors`` holds).
        tolerance: how far a budget may land from its target (stored as each budget's tolerance).
        scale: the logit scale training ended at (stored as ``router.logit_scale``).

    Returns:
        the elastic config to write (budgets' tolerance, router scale and resolved specs set), and
        per budget: ``log_prob`` of the resolved architecture, and ``argmax_log_prob`` and
        ``argmax_parameters`` of each row's own argmax (the unconstrained choice, for comparison).
    """
    from dataclasses import replace

    from elastic.slicer.formats.elastic_format import budget_log_probs, resolve_trained, route
    from elastic.slicer.formats.resolve import UnreachableBudget, score

    ec = replace(ec, budgets=tuple(replace(b, tolerance=tolerance) for b in ec.budgets), router_scale=scale)
    total = arch.param_counts()["total"]
    resolved, report = {}, {}
    for b in ec.budgets:
        if b.target_parameters >= total:
            resolved[b.name] = SliceSpec.full(arch).to_json(arch)
            continue
        try:
            r = resolve_trained(weights, ec, arch, b.name, keep_attention=keep_attention)
        except UnreachableBudget as e:
            r = e.nearest
        resolved[b.name] = r.spec.to_json(arch)
        picks, logp = route(weights, ec, b.name), budget_log_probs(weights, ec, b.name)
        argmax = SliceSpec.from_json(spec_from_choices(picks, ec, arch), arch)
        report[b.name] = {"log_prob": score(r.picks, ec.dimensions, logp), "solved": r.solved,
                          "argmax_parameters": argmax.parameters(arch),
                          "argmax_log_prob": score(picks, ec.dimensions, logp)}
    return replace(ec, resolved=resolved), report
