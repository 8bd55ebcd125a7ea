"""A budget's architecture by constrained choice: an exact integer program over the router's choices.

The router gives, for every elastic dimension and router row (one per layer, or one for a global or
shared dimension), log-probabilities over that dimension's choices. An architecture takes one choice
per row; its log-probability is the sum of the chosen options'. :func:`resolve` finds the
architecture of highest log-probability whose cost meets the budget (parameters within a tolerance
of a target, or memory at most a byte budget), exactly, with ``scipy.optimize.milp`` (HiGHS). When
every row's argmax already meets the budget it is the optimum, returned without a solve.

Linearity: a layer's parameters are products of its sizes (a Mamba layer's heads x head channels x
hidden size, every layer x keep), so the program does not take sizes as variables directly:

- hidden size (one value, few choices): an outer loop, one program per value;
- per layer: one binary ``y[i, k]`` per joint configuration ``k`` of the dimensions covering layer
  ``i`` (keep/drop x heads x channels ...), whose cost is a constant; ``sum_k y[i, k] = 1``. Layers
  alike in the parent that only shared rows decide (never dropped) share one set (a unit), its cost
  counted once per layer: what keeps a 52-layer MoE parent's programs small;
- per router row: one binary ``x[D, r, c]`` per choice, ``sum_c x[D, r, c] = 1``, tied to the layers
  it decides by ``sum_{k: k_D = c} y[i, k] = x[D, row(i), c]`` (a shared row ties all its layers);
- a peak over layers (the largest layer's activations in a memory budget): a continuous ``A >=``
  every kept layer's peak.

The constraints specs obey come with the search space (Mamba heads in multiples of n_groups,
routed experts per routing group and never fewer than top-k can reach: every choice was validated
when elastic_config.json was read); the program adds at least one kept layer, and at least one
attention layer where asked (``keep_attention``) and the parent has one.

Example:
    >>> logp = log_probs(router_logits(weights, ec.dimensions, one_hot), scale=10.0)
    >>> r = resolve(ec.dimensions, parent, logp, [parameter_cost(parent, 0.95 * t, 1.05 * t)])
    >>> r.spec, r.parameters, r.log_prob
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from elastic.profiles.units import GIB, KIB, MIB, TIB
from elastic.slicer.errors import ConfigError, Hint
from elastic.slicer.formats.arch import Arch, LayerArch
from elastic.slicer.formats.spec import SliceSpec

MAX_CONFIGS = 200_000  # joint layer configurations a program may hold (a search space beyond it is refused)
TIME_LIMIT = 120.0  # seconds one program may search (HiGHS); past it the best architecture found is taken


@dataclass(frozen=True)
class Cost:
    """What a budget constrains, in a form the program can hold. For hidden size ``d``:
    ``factor * (root(d) + sum over kept layers of layer(d, layer) + max over kept layers of
    peak(d, layer))``, within ``[lo, hi]``. ``exact(spec)`` is the true value (the program's is
    checked against it)."""

    name: str  # "parameters" or "bytes", for messages
    root: Callable[[int], float]  # what no layer holds (embeddings, LM head, final norm, overhead)
    layer: Callable[[int, LayerArch], float]  # one kept layer of these sizes
    exact: Callable[[SliceSpec], float]
    lo: float = 0.0
    hi: float = math.inf
    peak: Callable[[int, LayerArch], float] | None = None  # the largest kept layer's counts once
    factor: float = 1.0  # a safety margin on the sum

    def within(self, value: float) -> bool:
        return self.lo <= value <= self.hi


@dataclass(frozen=True)
class Resolution:
    """One resolved architecture."""

    spec: SliceSpec
    picks: dict[str, list]  # dimension -> chosen value per router row (as the router says them)
    log_prob: float  # sum over rows of the chosen options' log-probabilities
    values: tuple[float, ...]  # each cost's exact value, in the order given
    parameters: int
    solved: bool  # False: every row's argmax met the budget (no program was needed)


class UnreachableBudget(ConfigError):
    """No architecture of the search space meets the budget; ``nearest`` is the one closest to it."""

    def __init__(self, message: str, nearest: Resolution, **kw):
        super().__init__(message, **kw)
        self.nearest = nearest


# ---- the router's scores ------------------------------------------------------------------------


def router_logits(weights: dict, dims: Sequence, x) -> dict[str, Any]:
    """The router's logits for input ``x`` (a budget one-hot, or a mixture of them): per dimension a
    float64 array (rows, choices). The router: Linear -> LeakyReLU(0.1) -> Linear per dimension.

    Raises:
        ConfigError: the output is not finite (finite float32 weights can still overflow).
    """
    import numpy as np

    out = {}
    for d in dims:
        h = weights[f"{d.name}.0.weight"].astype(np.float64) @ x + weights[f"{d.name}.0.bias"]
        h = np.where(h > 0, h, 0.1 * h)
        z = (weights[f"{d.name}.2.weight"].astype(np.float64) @ h + weights[f"{d.name}.2.bias"])
        z = z.reshape(-1, len(d.choices))
        if not np.isfinite(z).all():
            raise ConfigError(f"the router's output is not finite ({d.name}); the router weights are broken")
        out[d.name] = z
    return out


def log_probs(logits: dict, scale: float = 1.0) -> dict[str, Any]:
    """``log_softmax(scale * logits)`` per row (the trainer samples with ``softmax(scale * logits)``)."""
    import numpy as np

    out = {}
    for name, z in logits.items():
        z = scale * np.asarray(z, dtype=np.float64)
        z = z - z.max(-1, keepdims=True)
        out[name] = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return out


def mix(a: dict, b: dict, alpha: float) -> dict[str, Any]:
    """``alpha * a + (1 - alpha) * b``, renormalized per row: the geometric mixture of two budgets'
    choice distributions (a size between two trained budgets)."""
    return log_probs({name: alpha * a[name] + (1 - alpha) * b[name] for name in a})


# ---- specs from choices -------------------------------------------------------------------------


def spec_from_choices(choices: dict[str, list], dims: Sequence, parent: Arch) -> dict:
    """Spec JSON from per-dimension choices, one per router row (as the router says them)."""
    per_layer: dict[int, dict] = {}
    hidden = parent.hidden_size
    for d in dims:
        picks = choices[d.name]
        if d.layers is None:
            hidden = picks[0]
            continue
        for i, v in zip(d.layers, d.per_layer(picks)):
            entry = per_layer.setdefault(i, {"index": i})
            if d.name == "depth":
                if v == "drop":
                    entry["keep"] = False
            else:
                entry[d.name] = v
    layers = []
    for i in sorted(per_layer):
        e = per_layer[i]
        if e.get("keep") is False:
            e = {"index": i, "keep": False}
        layers.append(e)
    return {"hidden_size": hidden, "layers": layers}


# ---- costs --------------------------------------------------------------------------------------


def parameter_cost(parent: Arch, lo: float, hi: float = math.inf) -> Cost:
    """Total parameters (every tensor, all experts: ``Arch.param_counts()["total"]``) in ``[lo, hi]``."""

    @functools.lru_cache(maxsize=None)
    def layer(d: int, la: LayerArch) -> int:
        return sum(math.prod(s) for s in parent.with_layers((la,), d).layer_tensor_shapes(0).values())

    return Cost("parameters", root=lambda d: parent.vocab_size * d * (1 if parent.tie_word_embeddings else 2) + d,
                layer=layer, exact=lambda spec: spec.parameters(parent), lo=lo, hi=hi)


# ---- the program --------------------------------------------------------------------------------


@dataclass
class _Program:
    """The variables of one hidden size's program: x (router rows' choices), y (layer configurations)."""

    d: int
    rows: list[tuple[Any, int]]  # (dimension, row) of every router row except hidden size
    x0: dict[tuple[str, int], int]  # (dimension, row) -> index of its first choice variable
    configs: dict[int, list[dict]]  # unit (its first layer) -> its configurations: {dimension name: choice}
    members: dict[int, list[int]]  # unit -> the layers it stands for
    y0: dict[int, int]  # unit -> index of its first configuration variable
    n: int  # variables so far


def _layer_dims(dims: Sequence, parent: Arch) -> dict[int, list]:
    """Parent layer -> the per-layer dimensions that decide it."""
    cover: dict[int, list] = {}
    for d in dims:
        for i in d.layers or ():
            cover.setdefault(i, []).append(d)
    return cover


def _program(dims: Sequence, parent: Arch, d: int) -> _Program:
    """The variables of the program at hidden size ``d`` (see the module's docstring)."""
    rows = [(dim, r) for dim in dims if dim.layers is not None for r in range(dim.rows)]
    n, x0 = 0, {}
    for dim, r in rows:
        x0[(dim.name, r)] = n
        n += len(dim.choices)
    configs, members, y0 = {}, {}, {}
    # layers decided only by shared rows (never dropped) and alike in the parent take the same
    # configuration: one unit for all of them, its cost counted once per member
    units: dict[Any, int] = {}
    for i, covering in sorted(_layer_dims(dims, parent).items()):
        key = (parent.layers[i], tuple(c.name for c in covering)) if all(c.shared for c in covering) else i
        if key in units:
            members[units[key]].append(i)
            continue
        units[key] = i
        members[i] = [i]
        configs[i] = [dict(zip([c.name for c in covering], combo))
                      for combo in itertools.product(*[c.choices for c in covering])]
        y0[i] = n
        n += len(configs[i])
    if n > MAX_CONFIGS:
        raise ConfigError(f"the search space is too large to resolve exactly ({n:,} choices and layer configurations "
                          f"at hidden size {d}; at most {MAX_CONFIGS:,})",
                          hint=Hint("spec", "cut the size you want with a slice spec file"))
    return _Program(d, rows, x0, configs, members, y0, n)


def _kept(parent: Arch, i: int, config: dict) -> LayerArch | None:
    """Layer ``i`` under one configuration, or None when dropped."""
    if config.get("depth") == "drop":
        return None
    return replace(parent.layers[i], **{k: v for k, v in config.items() if k != "depth"})


def _cost_rows(p: _Program, parent: Arch, cost: Cost, peak: int | None) -> tuple[list, float, float, list, float]:
    """One cost as program rows: (coefficients of its row, lo, hi, the peak's rows, the peak's lower
    bound). ``peak``: the index of the continuous variable A (``cost.peak``), A >= every kept layer's
    peak. Divided by the window's bound, so HiGHS's tolerances are relative to it."""
    covered = {i for group in p.members.values() for i in group}
    fixed = cost.root(p.d) + sum(cost.layer(p.d, parent.layers[i]) for i in range(len(parent.layers))
                                 if i not in covered)
    coef = []
    for i, configs in p.configs.items():
        for k, c in enumerate(configs):
            la = _kept(parent, i, c)
            if la is not None:
                coef.append((p.y0[i] + k, len(p.members[i]) * cost.layer(p.d, la)))
    ref = cost.hi if math.isfinite(cost.hi) else max(cost.lo, 1.0)
    coef = [(j, v / ref) for j, v in coef]
    peaks, peak_floor = [], 0.0
    if cost.peak is not None:  # A, in units of ref like every coefficient (HiGHS drops ones below 1e-9)
        coef.append((peak, 1.0))
        peak_floor = max((cost.peak(p.d, parent.layers[i]) for i in range(len(parent.layers)) if i not in covered),
                         default=0.0)
        for i, configs in p.configs.items():
            row = [(peak, 1.0)]
            for k, c in enumerate(configs):
                la = _kept(parent, i, c)
                if la is not None:
                    row.append((p.y0[i] + k, -cost.peak(p.d, la) / ref))
            peaks.append(row)
    lo = cost.lo / cost.factor - fixed
    # a margin is rounded down to whole bytes (planning.memory.footprint): a total at the bound may be one
    # byte under factor x sum; the exact check (_solve_checked) keeps the window true
    hi = (cost.hi + (cost.factor != 1)) / cost.factor - fixed
    return coef, lo / ref, hi / ref, peaks, peak_floor / ref


def _structure(p: _Program, dims: Sequence, parent: Arch, keep_attention: bool) -> list[tuple[list, float, float]]:
    """The rows every program has: one choice per router row, one configuration per layer, the
    configurations tied to the rows' choices, at least one kept layer (and attention layer)."""
    out = []
    for dim, r in p.rows:
        out.append(([(p.x0[(dim.name, r)] + c, 1.0) for c in range(len(dim.choices))], 1.0, 1.0))
    cover = _layer_dims(dims, parent)
    for i, configs in p.configs.items():
        out.append(([(p.y0[i] + k, 1.0) for k in range(len(configs))], 1.0, 1.0))
        for dim in cover[i]:
            r = dim.row(i)
            for c, value in enumerate(dim.choices):
                row = [(p.y0[i] + k, 1.0) for k, cfg in enumerate(configs) if cfg[dim.name] == value]
                out.append((row + [(p.x0[(dim.name, r)] + c, -1.0)], 0.0, 0.0))

    def at_least_one(layers: list[int]) -> None:
        if layers and all(i in p.configs and "depth" in p.configs[i][0] for i in layers):
            out.append(([(p.y0[i] + k, 1.0) for i in layers for k, cfg in enumerate(p.configs[i])
                         if cfg["depth"] == "keep"], 1.0, math.inf))

    at_least_one(list(range(len(parent.layers))))
    if keep_attention:
        at_least_one([i for i, layer in enumerate(parent.layers) if layer.kind == "attention"])
    return out


def _solve(p: _Program, dims: Sequence, parent: Arch, objective: dict[int, float], costs: Sequence[Cost],
           keep_attention: bool, distance_to: Cost | None = None):
    """Solve one program: (the 0/1 values of the choice and configuration variables, the objective),
    or None when it is infeasible. ``objective``: variable -> coefficient to maximize.
    ``distance_to``: instead, minimize the distance of that cost to its window (a variable
    t >= cost - hi, t >= lo - cost). A search past :data:`TIME_LIMIT` keeps the best found."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    peaks_at = {}
    n = p.n
    for j, cost in enumerate(costs):
        if cost.peak is not None:
            peaks_at[j] = n
            n += 1
    t = n if distance_to is not None else None
    n += t is not None
    rows = list(_structure(p, dims, parent, keep_attention))
    lb = np.zeros(n)
    for j, cost in enumerate(costs):
        coef, lo, hi, peaks, floor = _cost_rows(p, parent, cost, peaks_at.get(j))
        if cost is distance_to:  # lo - t <= cost <= hi + t
            rows.append((coef + [(t, -1.0)], -math.inf, hi))
            rows.append((coef + [(t, 1.0)], lo, math.inf))
        else:
            rows.append((coef, lo, hi))
        rows += [(r, 0.0, math.inf) for r in peaks]
        if j in peaks_at:
            lb[peaks_at[j]] = floor
    data, ri, ci, lo_b, hi_b = [], [], [], [], []
    for k, (row, lo, hi) in enumerate(rows):
        for j, v in row:
            ri.append(k), ci.append(j), data.append(v)
        lo_b.append(lo), hi_b.append(hi)
    A = coo_matrix((data, (ri, ci)), shape=(len(rows), n)).tocsr()
    c = np.zeros(n)
    if t is not None:
        c[t] = 1.0
    else:
        for j, v in objective.items():
            c[j] = -v
    integrality = np.zeros(n)
    integrality[:p.n] = 1
    ub = np.full(n, np.inf)
    ub[:p.n] = 1.0
    # the best log-probability exactly; a distance (messages, the largest size that fits) to within 0.01%
    res = milp(c, integrality=integrality, bounds=Bounds(lb, ub), constraints=LinearConstraint(A, lo_b, hi_b),
               options={"mip_rel_gap": 0.0 if t is None else 1e-4, "time_limit": TIME_LIMIT})
    if res.x is None:
        return None
    return np.round(res.x[:p.n]).astype(int), res.fun


def _picks(p: _Program, x, hidden_dim) -> dict[str, list]:
    import numpy as np

    picks: dict[str, list] = {}
    for dim, r in p.rows:
        start = p.x0[(dim.name, r)]
        picks.setdefault(dim.name, []).append(dim.choices[int(np.argmax(x[start:start + len(dim.choices)]))])
    if hidden_dim is not None:
        picks[hidden_dim.name] = [p.d]
    return picks


def score(picks: dict, dims: Sequence, logp: dict) -> float:
    """The log-probability of an architecture: the sum over router rows of the chosen options'."""
    return float(sum(logp[d.name][r][list(d.choices).index(v)] for d in dims for r, v in enumerate(picks[d.name])))


def _resolution(picks: dict, dims: Sequence, parent: Arch, logp: dict | None, costs: Sequence[Cost],
                solved: bool) -> Resolution:
    spec = SliceSpec.from_json(spec_from_choices(picks, dims, parent), parent, source="resolved budget")
    return Resolution(spec, picks, score(picks, dims, logp) if logp is not None else 0.0,
                      tuple(float(c.exact(spec)) for c in costs), spec.parameters(parent), solved)


def _feasible(r: Resolution, costs: Sequence[Cost], parent: Arch, keep_attention: bool) -> bool:
    if not all(c.within(v) for c, v in zip(costs, r.values)):
        return False
    kept = [layer for layer in r.spec.layers if layer is not None]
    has_attention = any(layer.kind == "attention" for layer in parent.layers)
    return bool(kept) and not (keep_attention and has_attention and not any(la.kind == "attention" for la in kept))


def _hidden(dims: Sequence, parent: Arch):
    dim = next((d for d in dims if d.layers is None), None)
    return dim, (list(dim.choices) if dim is not None else [parent.hidden_size])


def resolve(dims: Sequence, parent: Arch, logp: dict, costs: Sequence[Cost], *,
            keep_attention: bool = True) -> Resolution | None:
    """The architecture of highest log-probability that meets every cost; None when none does.

    Args:
        dims: the search space (``ElasticConfig.dimensions``).
        parent: the architecture being cut.
        logp: dimension -> (rows, choices) log-probabilities (:func:`log_probs`).
        costs: each within its window (:func:`parameter_cost`; a memory cost from
            ``elastic.slicer.planning.exact``).
        keep_attention: keep at least one attention layer when the parent has one.
    """
    import numpy as np

    hidden_dim, hidden = _hidden(dims, parent)
    argmax = {d.name: [d.choices[int(k)] for k in np.argmax(logp[d.name], -1)] for d in dims}
    first = _resolution(argmax, dims, parent, logp, costs, solved=False)
    if _feasible(first, costs, parent, keep_attention):
        return first  # every row at its best: nothing scores higher
    best = None
    for d in sorted(hidden, key=lambda v: -_hidden_logp(hidden_dim, logp, v)):
        base = _hidden_logp(hidden_dim, logp, d)
        bound = base + sum(float(np.max(logp[dim.name][r])) for dim in dims if dim.layers is not None
                           for r in range(dim.rows))
        if best is not None and bound <= best.log_prob:
            continue  # even every row's best at this hidden size scores no higher
        r = _solve_checked(dims, parent, d, hidden_dim, logp, costs, keep_attention)
        if r is not None and (best is None or r.log_prob > best.log_prob):
            best = r
    return best


def _hidden_logp(hidden_dim, logp: dict, d: int) -> float:
    return 0.0 if hidden_dim is None else float(logp[hidden_dim.name][0][list(hidden_dim.choices).index(d)])


def _solve_checked(dims, parent, d, hidden_dim, logp, costs, keep_attention) -> Resolution | None:
    """One hidden size's program, its answer checked against the exact costs; where the program's
    cost and the exact one differ (a memory term it approximates, HiGHS's tolerances) the window is
    narrowed by the difference and the program solved again."""
    p = _program(dims, parent, d)
    objective = {p.x0[(dim.name, r)] + c: float(logp[dim.name][r][c]) for dim, r in p.rows
                 for c in range(len(dim.choices))}
    work = list(costs)
    for _ in range(6):
        out = _solve(p, dims, parent, objective, work, keep_attention)
        if out is None:
            return None
        r = _resolution(_picks(p, out[0], hidden_dim), dims, parent, logp, costs, solved=True)
        if _feasible(r, costs, parent, keep_attention):
            return r
        work = [_narrow(w, c, v) for w, c, v in zip(work, costs, r.values)]
    return None


def _narrow(work: Cost, cost: Cost, value: float) -> Cost:
    """``work`` (the program's window for ``cost``) moved inward past an exact ``value`` outside it."""
    span = max(1.0, 1e-9 * max(abs(cost.lo), abs(cost.hi) if math.isfinite(cost.hi) else 0.0))
    if value > cost.hi:
        return replace(work, hi=work.hi - (value - cost.hi) - span)
    if value < cost.lo:
        return replace(work, lo=work.lo + (cost.lo - value) + span)
    return work


def nearest(dims: Sequence, parent: Arch, costs: Sequence[Cost], *, keep_attention: bool = True) -> Resolution:
    """The architecture whose first cost is closest to its window, the others met (for messages:
    what size a budget that cannot be met could have instead)."""
    hidden_dim, hidden = _hidden(dims, parent)
    best, gap = None, math.inf
    for d in hidden:
        p = _program(dims, parent, d)
        work, r = list(costs), None
        for _ in range(6):  # the other costs met exactly (see _solve_checked)
            out = _solve(p, dims, parent, {}, work, keep_attention, distance_to=work[0])
            if out is None:
                break
            r = _resolution(_picks(p, out[0], hidden_dim), dims, parent, None, costs, solved=True)
            if all(c.within(v) for c, v in zip(costs[1:], r.values[1:])):
                break
            work = work[:1] + [_narrow(w, c, v) for w, c, v in zip(work[1:], costs[1:], r.values[1:])]
            r = None
        if r is None:
            continue
        v = r.values[0]
        g = max(0.0, costs[0].lo - v, v - costs[0].hi)
        if g < gap:
            best, gap = r, g
    if best is None:
        raise ConfigError("no architecture of the search space meets the other constraints of this budget")
    return best


# ---- what users type ----------------------------------------------------------------------------

_PARAMS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}
_BYTES = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": KIB, "mib": MIB, "gib": GIB,
          "tib": TIB}
SIZE_FORMS = "a share of the parent (60%), parameters (7.5B, 300M, 120000) or memory (6GiB, 512MiB, 8GB)"


def parse_size(text: str, parent_total: int) -> tuple[str, int] | None:
    """``"60%"`` -> ("parameters", 60% of ``parent_total``); ``"7.5B"``, ``"300M"``, ``"120000"`` ->
    ("parameters", n); ``"6GiB"``, ``"8GB"`` -> ("bytes", n). None when ``text`` is none of these."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(%|[kmbt]?|[kmgt]i?b)\s*", str(text), flags=re.IGNORECASE)
    if m is None:
        return None
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit == "%":
        return "parameters", round(value / 100 * parent_total)
    if unit in _BYTES:
        return "bytes", round(value * _BYTES[unit])
    return "parameters", round(value * _PARAMS[unit])
