"""The elastic checkpoint format, version 1: ``elastic_config.json`` + ``router.safetensors``.

An elastic checkpoint is a normal ``nemotron_h`` directory (it loads and runs as the full model)
whose weights are ordered so every nested model keeps a prefix of each dimension, plus:

- ``elastic_config.json``: format name and version, the budgets, the search space of every
  elastic dimension, the router's shape, and the resolved slice spec of every budget;
- ``router.safetensors`` (optional; ``router.file`` names it, a path inside the checkpoint
  directory): the router that produced those choices, float32. Slicing never needs it: every
  budget's choice is stored in elastic_config.json; when present it is checked against the
  router's shape there and its choices are used.

The full description, for anyone who wants to produce one, is ``docs/elastic-format.md``.
Resolving a budget needs numpy at most (the router is a two-layer MLP), never torch.

Example:
    >>> ec = ElasticConfig.read(ckpt_dir, parent_arch)
    >>> spec = resolve_budget(ckpt_dir, ec, parent_arch, "6B")
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from elastic.slicer.formats.arch import Arch
from elastic.slicer.errors import ConfigError, Hint
from elastic.slicer.formats.safetensors import _cap
from elastic.slicer.formats.values import is_int
from elastic.slicer.formats.resolve import (SIZE_FORMS, Resolution, UnreachableBudget, log_probs, mix, nearest,
                                            parameter_cost, parse_size, resolve, router_logits)
from elastic.slicer.formats.resolve import spec_from_choices as _spec_from_choices
from elastic.slicer.formats.spec import SPEC_FIELDS, SliceSpec, layer_problems

FORMAT = "nemotron-elastic"
VERSION = 1
CONFIG_NAME = "elastic_config.json"
ROUTER_NAME = "router.safetensors"
# elastic dimensions: hidden size is global; the others are per layer of one kind
DIMENSIONS = {
    "hidden_size": None,
    "mamba_num_heads": "mamba",
    "mamba_head_dim": "mamba",
    "num_attention_heads": "attention",
    "intermediate_size": "mlp",
    "n_routed_experts": "moe",  # kept per routing group (n_group); never fewer than top-k can route to
    "moe_intermediate_size": "moe",  # width of every routed expert
    "moe_shared_expert_intermediate_size": "moe",
    "depth": None,  # choices ["keep", "drop"] per droppable layer, of any kind
}
# A resolved budget may miss its target by this fraction (per budget: "tolerance" in budgets[]);
# further off, the router or the resolved spec is broken and slicing it would mislabel the model.
BUDGET_TOLERANCE = 0.10
SIZE_TOLERANCE = 0.05  # a size no budget was trained for ("60%", "7.5B") resolves within this of it
HEAD_ORDER = "group_prefix"  # Mamba heads kept as a prefix inside each group (DESIGN.md section 3)


@dataclass(frozen=True)
class Budget:
    name: str  # what users type: "12B", "6B", "50%"
    target_parameters: int  # the parameter count the router was trained toward
    tolerance: float = 0.10  # how far (a fraction of the target) a resolved budget may miss it


@dataclass(frozen=True)
class Dimension:
    """One elastic dimension: its choices and the layers it applies to (None: the whole model).

    ``shared``: one choice for all of ``layers`` (one router row), so every layer of that kind keeps
    the same size and the slice stays loadable where runtimes take one global size (Mamba and
    attention: docs/runtime-facts.md); otherwise one choice per layer.
    """

    name: str
    choices: tuple
    layers: tuple[int, ...] | None = None
    shared: bool = False

    @property
    def rows(self) -> int:
        """Router rows: one per layer, or one for a global or shared dimension."""
        return 1 if self.layers is None or self.shared else len(self.layers)

    @property
    def router_outputs(self) -> int:
        return len(self.choices) * self.rows

    def row(self, layer: int) -> int:
        """The router row that decides ``layer`` (one of ``layers``)."""
        return 0 if self.shared else self.layers.index(layer)

    def per_layer(self, picks: list) -> list:
        """One pick per row -> one per layer of ``layers``."""
        return list(picks) * len(self.layers) if self.shared else list(picks)


@dataclass(frozen=True)
class ElasticConfig:
    budgets: tuple[Budget, ...]
    dimensions: tuple[Dimension, ...]
    resolved: dict[str, dict] = field(compare=False)  # budget name -> spec JSON
    router_hidden: int = 256
    head_order: str = HEAD_ORDER
    router_file: str = ROUTER_NAME  # router.file: the router's path inside the checkpoint directory
    # router.logit_scale: the trainer samples with softmax(scale * logits); the log-probabilities a budget
    # is resolved by (formats/resolve.py) use the scale training ended at
    router_scale: float = 1.0

    def budget(self, name: str) -> Budget:
        for b in self.budgets:
            if b.name == name:
                return b
        raise ConfigError(f"unknown budget {name!r}; this checkpoint has: {', '.join(b.name for b in self.budgets)}")

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "budgets": [{"name": b.name, "target_parameters": b.target_parameters,
                         **({"tolerance": b.tolerance} if b.tolerance != BUDGET_TOLERANCE else {})}
                        for b in self.budgets],
            "search_space": [
                {"dimension": d.name, "choices": list(d.choices), "layers": None if d.layers is None else list(d.layers),
                 **({"shared": True} if d.shared else {})}
                for d in self.dimensions
            ],
            "router": {
                "file": self.router_file,
                "input": "budget one-hot, in the order of budgets",
                "hidden": self.router_hidden,
                "activation": "leaky_relu(0.1)",
                "outputs": {d.name: [d.rows, len(d.choices)] for d in self.dimensions},
                **({"logit_scale": self.router_scale} if self.router_scale != 1.0 else {}),
            },
            "head_order": self.head_order,
            "resolved": self.resolved,
        }

    # ---- reading with validation ---------------------------------------------------------
    @classmethod
    def from_json(cls, data: Any, parent: Arch, source: str | None = None) -> "ElasticConfig":
        """Parse and validate against the parent's architecture; every problem reported at once."""
        problems: list[str] = []
        if not isinstance(data, dict):
            raise ConfigError("elastic_config.json must be a JSON object", path=source)
        if data.get("format") != FORMAT:
            problems.append(f"format is {data.get('format')!r}, expected {FORMAT!r}")
        if data.get("version") != VERSION:
            problems.append(f"version {data.get('version')!r} is not supported (this elastic reads version {VERSION})")
        if data.get("head_order", HEAD_ORDER) != HEAD_ORDER:
            problems.append(
                f"head_order {data.get('head_order')!r}: only {HEAD_ORDER!r} (a prefix of heads inside each group) "
                "can be sliced; a global prefix of Mamba heads (Megatron 'Flextron' order) must be re-permuted first"
            )
        budgets = _parse_budgets(data.get("budgets"), parent, problems)
        names = [b.name for b in budgets]
        dims = _parse_dimensions(data.get("search_space"), parent, problems)
        resolved = data.get("resolved") or {}
        if not isinstance(resolved, dict):
            problems.append("resolved must map each budget name to a slice spec")
            resolved = {}
        for name in names:
            if name not in resolved:
                problems.append(f"resolved: no slice spec for budget {name!r}")
                continue
            try:
                SliceSpec.from_json(resolved[name], parent)
            except ConfigError as e:
                problems += [f"resolved[{name!r}]: {p}" for p in e.problems] or [f"resolved[{name!r}]: {e.message}"]
        hidden, router_file, scale = _parse_router(data.get("router"), problems)
        if problems:
            raise ConfigError(
                f"invalid elastic config ({len(problems)} problem{'s' * (len(problems) > 1)})",
                problems=list(dict.fromkeys(problems)),
                path=source,
            )
        ec = cls(tuple(budgets), tuple(dims), dict(resolved), hidden, data.get("head_order", HEAD_ORDER), router_file,
                 scale)
        problems = check_choices(ec, parent)
        if problems:
            raise ConfigError("the resolved budgets leave the search space", problems=problems, path=source)
        return ec

    @classmethod
    def read(cls, root: str | Path, parent: Arch) -> "ElasticConfig":
        from elastic.slicer.storage.reader import refuse_missing_link

        path = Path(root) / CONFIG_NAME
        refuse_missing_link(path, ConfigError)  # else it would read as "not an elastic checkpoint"
        try:
            data = json.loads(path.read_text())
        except RecursionError:
            raise ConfigError("not valid JSON (nested too deeply)", path=str(path)) from None
        except FileNotFoundError:
            raise ConfigError(
                f"not an elastic checkpoint (no {CONFIG_NAME}): it has no budgets", path=str(root),
                hint=Hint("spec", "to cut a slice from a dense checkpoint, give a slice spec file")
            ) from None
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"not valid JSON ({str(e)[:80]})", path=str(path)) from None
        except OSError as e:
            raise ConfigError(f"cannot read ({e.strerror})", path=str(path)) from None
        return cls.from_json(data, parent, source=str(path))


def _parse_budgets(raw: Any, parent: Arch, problems: list[str]) -> list[Budget]:
    """``budgets``: names, targets (1..the parent's parameters) and tolerances; problems appended."""
    budgets = []
    parent_total = parent.param_counts()["total"]
    if raw is not None and not isinstance(raw, list):
        problems.append(f"budgets must be a list of {{name, target_parameters}} objects, found {raw!r:.40}")
        raw = []
    for k, b in enumerate(raw or []):
        if not isinstance(b, dict) or not isinstance(b.get("name"), str) or not b["name"]:
            problems.append(f"budgets[{k}] needs a non-empty name")
            continue
        t = b.get("target_parameters")
        if isinstance(t, bool) or not isinstance(t, int) or not 0 < t <= parent_total:
            problems.append(f"budget {b['name']!r}: target_parameters must be an integer in 1..{parent_total} "
                            f"(the parent's parameters), found {t!r:.40}")
            t = 0
        tol = b.get("tolerance", BUDGET_TOLERANCE)
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol <= 1:
            problems.append(f"budget {b['name']!r}: tolerance must be a fraction in (0, 1], found {tol!r:.40}")
            tol = BUDGET_TOLERANCE
        budgets.append(Budget(b["name"], t, float(tol)))
    if not budgets:
        problems.append("no budgets: expected a non-empty 'budgets' list")
    names = [b.name for b in budgets]
    if len(set(names)) != len(names):
        problems.append(f"budget names repeat: {names}")
    return budgets


def _parse_dimensions(space: Any, parent: Arch, problems: list[str]) -> list[Dimension]:
    """``search_space``: one :class:`Dimension` per valid entry; problems appended."""
    dims = []
    if space is not None and not isinstance(space, list):
        problems.append(f"search_space must be a list of dimensions, found {space!r:.40}")
        space = []
    seen_dims: set[str] = set()
    for k, d in enumerate(space or []):
        name = d.get("dimension") if isinstance(d, dict) else None
        if not isinstance(name, str) or name not in DIMENSIONS:
            problems.append(f"search_space[{k}]: unknown dimension {name!r}; known: {', '.join(DIMENSIONS)}")
            continue
        choices, layers = d.get("choices"), d.get("layers")
        if not isinstance(choices, list) or not choices:
            problems.append(f"search_space[{k}] ({name}): choices must be a non-empty list")
            continue
        if name in seen_dims:
            problems.append(f"search_space[{k}]: dimension {name} is listed twice")
            continue
        seen_dims.add(name)
        kind = DIMENSIONS[name]
        if name != "depth":
            for c in choices:
                if isinstance(c, bool) or not isinstance(c, int) or c <= 0:
                    problems.append(f"search_space[{k}] ({name}): choices must be positive integers, found {c!r:.40}")
            if len(set(map(repr, choices))) != len(choices):
                problems.append(f"search_space[{k}] ({name}): choices repeat: {choices}")
        if name == "hidden_size":
            layers = None
        elif not isinstance(layers, list) or not layers:
            problems.append(f"search_space[{k}] ({name}): layers must list the layer indices it applies to")
            continue
        else:
            problems += _layer_problems(k, name, kind, choices, layers, parent)
        if name == "depth" and sorted(map(repr, choices)) != ["'drop'", "'keep'"]:
            problems.append(f"search_space[{k}] (depth): choices must be ['keep', 'drop'], found {choices}")
        shared = d.get("shared", False)
        if not isinstance(shared, bool):
            problems.append(f"search_space[{k}] ({name}): shared must be true or false, found {shared!r:.40}")
            shared = False
        elif shared and name in ("hidden_size", "depth"):
            problems.append(f"search_space[{k}] ({name}): only per-layer size dimensions can be shared")
            shared = False
        dims.append(Dimension(name, tuple(choices), None if layers is None else tuple(layers), shared))
    return dims


def _layer_problems(k: int, name: str, kind: str | None, choices: list, layers: list, parent: Arch) -> list[str]:
    """What is wrong with the ``layers`` of ``search_space[k]``, and with each choice on each of them."""
    problems = []
    if len(set(map(repr, layers))) != len(layers):
        problems.append(f"search_space[{k}] ({name}): layer indices repeat")
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < parent.num_hidden_layers:
            problems.append(f"search_space[{k}] ({name}): unknown layer index {i!r}")
        elif kind is not None and parent.layers[i].kind != kind:
            problems.append(f"search_space[{k}] ({name}): layer {i} is {parent.layers[i].kind}, not {kind}")
    if kind is not None and all(is_int(c) and c > 0 for c in choices):
        # every choice must cut each of the dimension's layers validly (the router may pick any)
        for c in choices:
            for i in layers:
                if is_int(i) and 0 <= i < parent.num_hidden_layers and parent.layers[i].kind == kind:
                    mine = replace(parent.layers[i], **{name: c})
                    problems += [f"search_space[{k}] ({name}): choice {c}: {why}"
                                 for f, why in layer_problems(parent, parent.layers[i], mine) if f == name]
    return problems


def _parse_router(router: Any, problems: list[str]) -> tuple[int, str, float]:
    """(``router.hidden``, ``router.file``, ``router.logit_scale``); problems appended. The file must
    be a relative path that stays inside the checkpoint directory: no absolute path, no ``..`` (its
    link may point anywhere, as every file of a Hugging Face cache snapshot does)."""
    router = {} if router is None else router
    if not isinstance(router, dict):
        problems.append(f"router must be an object, found {router!r:.40}")
        router = {}
    hidden = router.get("hidden", 256)
    if isinstance(hidden, bool) or not isinstance(hidden, int) or not 0 < hidden <= 65536:
        problems.append(f"router.hidden must be an integer in 1..65536, found {hidden!r:.40}")
    file = router.get("file", ROUTER_NAME)
    if not isinstance(file, str) or not file.strip() or "\0" in file:
        problems.append(f"router.file must name the router's file inside the checkpoint directory (e.g. "
                        f"{ROUTER_NAME!r}), found {file!r:.60}")
        file = ROUTER_NAME
    elif PurePosixPath(file).is_absolute() or PureWindowsPath(file).anchor:
        problems.append(f"router.file {file!r:.60} is an absolute path; it must name a file inside the checkpoint "
                        f"directory, relative to it (e.g. {ROUTER_NAME!r})")
        file = ROUTER_NAME
    elif ".." in PurePosixPath(file.replace("\\", "/")).parts:
        problems.append(f"router.file {file!r:.60} leaves the checkpoint directory; it must name a file inside it "
                        f"(e.g. {ROUTER_NAME!r})")
        file = ROUTER_NAME
    elif file.endswith(("/", "\\")) or not PurePosixPath(file).name.strip("."):
        problems.append(f"router.file {file!r:.60} names a directory; it must name the router's file (e.g. "
                        f"{ROUTER_NAME!r})")
        file = ROUTER_NAME
    scale = router.get("logit_scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        problems.append(f"router.logit_scale must be a finite number > 0, found {scale!r:.40}")
        scale = 1.0
    return hidden, file, float(scale)


# ---- the router -------------------------------------------------------------------------------


def router_shapes(ec: ElasticConfig) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of the router: per dimension, Linear(budgets -> hidden), Linear(hidden -> outputs)."""
    nb, h = len(ec.budgets), ec.router_hidden
    shapes = {}
    for d in ec.dimensions:
        shapes[f"{d.name}.0.weight"] = (h, nb)
        shapes[f"{d.name}.0.bias"] = (h,)
        shapes[f"{d.name}.2.weight"] = (d.router_outputs, h)
        shapes[f"{d.name}.2.bias"] = (d.router_outputs,)
    return shapes


def router_path(root: str | Path, ec: ElasticConfig) -> Path:
    """Where ``router.file`` says the router is (validated by :meth:`ElasticConfig.from_json` to stay
    inside ``root``)."""
    return Path(root) / ec.router_file


def router_warning(root: str | Path, ec: ElasticConfig) -> str | None:
    """A note for the user when ``router.file`` names a file that is not there: slicing and planning
    resolve every budget from the choices stored in elastic_config.json (the ``resolved`` map, one
    per budget), so it is not needed; None when the router is there."""
    path = router_path(root, ec)
    if path.is_file() or path.is_symlink():  # a dangling link is an error, raised by read_router
        return None
    return (f"router.file names {ec.router_file!r}, which is not in the checkpoint: the budgets resolve from the "
            f"choices stored in {CONFIG_NAME} instead of the router")


def read_router(root: str | Path, ec: ElasticConfig) -> dict | None:
    """The router weights (``router.file``, default ``router.safetensors``) as numpy arrays, or None
    when that file is absent (see :func:`router_warning`).

    Raises:
        ConfigError: ``router.file`` is a link to a missing target; the file is not a readable float32
            safetensors file; its tensors are not finite; or their names and shapes are not the ones
            elastic_config.json's budgets, router hidden size and search space imply (a router of
            another model: both shapes named).
    """
    from elastic.slicer.storage.reader import refuse_missing_link

    path = router_path(root, ec)
    refuse_missing_link(path, ConfigError)
    if not path.is_file():
        return None
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from elastic.slicer.formats.safetensors import read_header

    read_header(path)  # truncation and corruption give a clear CheckpointError
    try:
        weights = load_file(str(path))
    except (SafetensorError, TypeError, ValueError) as e:
        raise ConfigError(f"cannot read the router ({e}); it must be float32", path=str(path)) from None
    import numpy as np

    problems = [f"{name} holds {int((~np.isfinite(w)).sum())} NaN or infinite values"
                for name, w in sorted(weights.items()) if w.dtype.kind == "f" and not np.isfinite(w).all()]
    problems += [f"{name} is {w.dtype}; the router is float32" for name, w in sorted(weights.items())
                 if w.dtype != np.float32]
    shapes = router_shapes(ec)
    for name, shape in shapes.items():
        if name not in weights:
            problems.append(f"missing router tensor {name} {list(shape)}")
        elif tuple(weights[name].shape) != shape:
            problems.append(f"{name}: {CONFIG_NAME} implies {list(shape)}, {ec.router_file} has "
                            f"{list(weights[name].shape)}")
    problems += [f"unexpected router tensor {name} {list(w.shape)} (not a dimension of {CONFIG_NAME}'s search space)"
                 for name, w in sorted(weights.items()) if name not in shapes]
    if problems:
        raise ConfigError(f"the router ({ec.router_file}) is broken or is not the router of this {CONFIG_NAME} "
                          f"({len(ec.budgets)} budgets, hidden {ec.router_hidden}, "
                          f"{len(ec.dimensions)} dimensions)", problems=_cap(problems), path=str(path))
    return weights


def budget_log_probs(weights: dict, ec: ElasticConfig, budget: str) -> dict:
    """The router's log-probabilities for a trained ``budget``: per dimension (rows, choices),
    ``log_softmax(router.logit_scale * logits)`` of the budget's one-hot input."""
    import numpy as np

    names = [b.name for b in ec.budgets]
    x = np.zeros(len(names))
    x[names.index(budget)] = 1.0
    try:
        logits = router_logits(weights, ec.dimensions, x)
    except ConfigError:
        raise ConfigError(f"the router's output for budget {budget!r} is not finite; the router weights are broken",
                          path=ec.router_file) from None
    return log_probs(logits, ec.router_scale)


def route(weights: dict, ec: ElasticConfig, budget: str) -> dict[str, list]:
    """Each row's own best choice for ``budget`` (the argmax, row by row; :func:`resolve_budget`
    chooses under the budget's constraint instead)."""
    logp = budget_log_probs(weights, ec, budget)
    return {d.name: [d.choices[int(k)] for k in logp[d.name].argmax(-1)] for d in ec.dimensions}


def spec_from_choices(choices: dict[str, list], ec: ElasticConfig, parent: Arch) -> dict:
    """Spec JSON from per-dimension choices (as :func:`route` returns them)."""
    return _spec_from_choices(choices, ec.dimensions, parent)


def keeps_attention(ec: ElasticConfig, parent: Arch) -> bool:
    """Whether every size resolved from this checkpoint keeps an attention layer: when its search
    space cannot drop them all (``elastic train`` leaves the most important attention layer out of
    the depth choices). A checkpoint whose depth choices include every attention layer (trained
    before that rule) may drop them all, as its budgets may. Decided by the search space alone, never
    by the stored choices, so editing those cannot change what the router resolves."""
    attention = {i for i, layer in enumerate(parent.layers) if layer.kind == "attention"}
    depth = next((d for d in ec.dimensions if d.name == "depth"), None)
    droppable = set(depth.layers or ()) if depth is not None else set()
    return bool(attention - droppable)


_UNREAD = object()


def resolve_budget(root: str | Path, ec: ElasticConfig, parent: Arch, budget: str,
                   weights: Any = _UNREAD) -> tuple[SliceSpec, str]:
    """The slice spec of a budget, and where it came from.

    A trained budget (a name in elastic_config.json): the parent itself when its target is the
    parent's size; else, with the router (``router.file``), the architecture of highest router
    log-probability whose parameters lie within the budget's tolerance of its target (an exact
    integer program, ``formats/resolve.py``; the row-by-row argmax whenever that already lands);
    without it, the resolved choice stored in elastic_config.json (:func:`router_warning` says so).

    Any other size (:data:`resolve.SIZE_FORMS`: ``"60%"``, ``"7.5B"``, ``"6GiB"``) is resolved
    between the trained budgets: :func:`resolve_size`.

    Raises:
        ConfigError: an unknown budget that is no size either (the budgets listed); a budget no
            architecture of the search space meets (:class:`resolve.UnreachableBudget`, naming the
            nearest size); a stored choice outside the tolerance.
    """
    if budget not in [b.name for b in ec.budgets]:
        return resolve_size(root, ec, parent, budget, weights)
    b = ec.budget(budget)
    total = parent.param_counts()["total"]
    if b.target_parameters >= total:  # the full budget is the parent itself
        return SliceSpec.full(parent), "full model"
    if weights is _UNREAD:  # callers resolving every budget read the router once and pass it
        weights = read_router(root, ec)
    if weights is not None:
        return resolve_trained(weights, ec, parent, budget, root=root).spec, "router"
    data, source = ec.resolved[budget], "elastic_config.json"
    spec = SliceSpec.from_json(data, parent, source=f"budget {budget!r} ({source})")
    got = spec.parameters(parent)
    miss = got / b.target_parameters - 1
    if abs(miss) > b.tolerance:
        raise ConfigError(
            f"budget {budget!r} resolves ({source}) to {got:,} parameters, {miss:+.1%} off its target of "
            f"{b.target_parameters:,} (tolerance {b.tolerance:.0%}); the {source} does not deliver this budget, so "
            "slicing it would mislabel the model. Retrain the router", path=str(root),
            hint=Hint("spec", "or cut the sizes you want with a slice spec file"))
    return spec, source


def resolve_trained(weights: dict, ec: ElasticConfig, parent: Arch, budget: str, *,
                    keep_attention: bool | None = None, root: str | Path | None = None) -> Resolution:
    """A trained budget by constrained choice: the architecture of highest router log-probability
    (:func:`budget_log_probs`) within the budget's tolerance of its target. ``elastic train`` calls
    it at the end of a run with the router it writes, so slicing resolves the same architecture.

    Args:
        keep_attention: keep an attention layer; None: :func:`keeps_attention`.

    Raises:
        UnreachableBudget: no architecture of the search space lands there; ``nearest`` is the closest.
    """
    b = ec.budget(budget)
    return _resolve_parameters(root, ec, parent, budget_log_probs(weights, ec, budget), b.target_parameters,
                               b.tolerance, budget, keep_attention)


def _resolve_parameters(root, ec: ElasticConfig, parent: Arch, logp: dict, target: int, tolerance: float,
                        what: str, keep: bool | None = None) -> Resolution:
    """The best architecture under ``logp`` within ``tolerance`` of ``target`` parameters.

    Raises:
        UnreachableBudget: no architecture of the search space lands there; names the nearest.
    """
    lo, hi = target * (1 - tolerance), target * (1 + tolerance)
    keep = keeps_attention(ec, parent) if keep is None else keep
    r = resolve(ec.dimensions, parent, logp, [parameter_cost(parent, lo, hi)], keep_attention=keep)
    if r is not None:
        return r
    near = nearest(ec.dimensions, parent, [parameter_cost(parent, lo, hi)], keep_attention=keep)
    raise UnreachableBudget(
        f"budget {what!r}: no architecture of the search space has {target:,} parameters (tolerance "
        f"{tolerance:.0%}); the nearest has {near.parameters:,} ({near.parameters / target - 1:+.1%})"
        + ("; an attention layer is always kept" if keep else "") + f": ask for --budget {near.parameters}",
        near, path=None if root is None else str(root),
        hint=Hint("spec", "or cut the size you want with a slice spec file"))


def resolve_size(root: str | Path, ec: ElasticConfig, parent: Arch, size: str,
                 weights: Any = _UNREAD) -> tuple[SliceSpec, str]:
    """A size no budget was trained for (:data:`resolve.SIZE_FORMS`): ``"60%"``, ``"7.5B"`` (within
    :data:`SIZE_TOLERANCE` of it) or ``"6GiB"`` (at most that, and within :data:`SIZE_TOLERANCE`
    below it, by ``elastic plan``'s memory terms at the default workload, ``Workload()``: bf16,
    context 8192, batch 1, margin 5%, no device's runtime overhead).

    Its log-probabilities (:func:`size_log_probs`) mix those of the two trained budgets whose sizes
    (their stored choices') it lies between, in proportion to where it lies (``resolve.mix``); below
    the smallest, the smallest's alone; above the largest budget below the parent, that budget's
    mixed with the parent's own choices (:func:`parent_log_probs`: training pins the parent's budget
    to the parent, so its router row is never trained). Without a router, each budget's stored
    choice stands in for it (:func:`synthetic_router`). The source says the size was not trained
    and where it sits.

    Raises:
        ConfigError: not a budget name nor a size; more parameters than the parent's; a size no
            architecture reaches (:class:`resolve.UnreachableBudget`, the nearest named).
    """
    total = parent.param_counts()["total"]
    parsed = parse_size(size, total)
    if parsed is None or parsed[1] <= 0:
        raise ConfigError(f"unknown budget {size!r}; this checkpoint has: {', '.join(b.name for b in ec.budgets)}; "
                          f"or give a size: {SIZE_FORMS}")
    kind, value = parsed
    if kind == "parameters" and value > total:
        raise ConfigError(f"unknown budget {size!r}; this checkpoint has: {', '.join(b.name for b in ec.budgets)}; as "
                          f"a size, {size} ({value:,} parameters) is more than the parent's {total:,}")
    same = next((b for b in ec.budgets if kind == "parameters" and b.target_parameters == value), None)
    if same is not None:
        return resolve_budget(root, ec, parent, same.name, weights)
    if weights is _UNREAD:
        weights = read_router(root, ec)
    via = "router" if weights is not None else f"{CONFIG_NAME}'s choices"
    if kind == "parameters":
        measure = lambda spec: spec.parameters(parent)  # noqa: E731
    else:
        from elastic.slicer.planning.exact import default_memory

        measure = default_memory(parent).exact
        if measure(SliceSpec.full(parent)) <= value:
            return SliceSpec.full(parent), "full model"
    logp, where = size_log_probs(ec, parent, weights, value, measure, what=size)
    if kind == "parameters":
        r = _resolve_parameters(root, ec, parent, logp, value, SIZE_TOLERANCE, size)
    else:
        from elastic.slicer.planning.exact import resolve_bytes

        r = resolve_bytes(ec.dimensions, parent, logp, value, SIZE_TOLERANCE, what=size,
                          keep_attention=keeps_attention(ec, parent))
    return r.spec, f"{via}, not trained: {where}"


def size_log_probs(ec: ElasticConfig, parent: Arch, weights: dict | None, value: float, measure=None,
                   what: str = "this size") -> tuple[dict, str]:
    """Log-probabilities for a size no budget was trained for, and where it sits in words
    (:func:`resolve_size` says how). ``measure(spec)``: the size of a spec in the units of
    ``value`` (default: parameters); ``weights`` None: the stored choices stand in for the router."""
    total = parent.param_counts()["total"]
    measure = measure or (lambda spec: spec.parameters(parent))
    trained = sorted(((measure(SliceSpec.from_json(ec.resolved[b.name], parent)), b) for b in ec.budgets
                      if b.target_parameters < total), key=lambda vb: -vb[0])
    if not trained:
        raise ConfigError(f"this checkpoint has no budget below the parent's size to resolve {what!r} from",
                          hint=Hint("spec", "cut the size you want with a slice spec file"))
    weights = weights if weights is not None else synthetic_router(ec, parent)
    above = [(v, b) for v, b in trained if v >= value]
    below = [(v, b) for v, b in trained if v < value]
    if above and below:
        (va, a), (vb, b) = above[-1], below[0]
        alpha = (value - vb) / (va - vb)
        return (mix(budget_log_probs(weights, ec, a.name), budget_log_probs(weights, ec, b.name), alpha),
                f"between budgets {a.name} and {b.name}")
    if below:  # above the largest budget the router was trained for: toward the parent's own choices
        (vb, b), vp = below[0], measure(SliceSpec.full(parent))
        alpha = min(1.0, (value - vb) / (vp - vb)) if vp > vb else 1.0
        return (mix(parent_log_probs(ec, parent), budget_log_probs(weights, ec, b.name), alpha),
                f"between the parent and budget {b.name}")
    a = above[-1][1]
    return budget_log_probs(weights, ec, a.name), f"below the smallest budget, {a.name}"


PARENT_GAP = 10.0  # parent_log_probs: how much less than the parent's own choice every other scores


def parent_log_probs(ec: ElasticConfig, parent: Arch) -> dict:
    """Log-probabilities that choose the parent itself, as a budget's would: its own size (and keep)
    on every row, every other choice :data:`PARENT_GAP` less. A size above the largest budget the
    router was trained for mixes these with that budget's (the parent's budget has no trained router
    row: training pins it to the parent)."""
    import numpy as np

    out = {}
    for d in ec.dimensions:
        rows = []
        for r in range(d.rows):
            if d.layers is None:
                own = parent.hidden_size
            else:
                own = "keep" if d.name == "depth" else getattr(parent.layers[d.layers[r]], d.name)
            rows.append([0.0 if c == own else -PARENT_GAP for c in d.choices])
        out[d.name] = log_probs({d.name: np.array(rows)})[d.name]
    return out


def synthetic_router(ec: ElasticConfig, parent: Arch, scale: float = 10.0) -> dict:
    """Router weights whose argmax reproduces ``ec.resolved`` exactly (for synthetic checkpoints
    made before training; the trainer learns a real one). Returns float32 numpy arrays."""
    import numpy as np

    nb, h = len(ec.budgets), ec.router_hidden
    weights = {}
    for d in ec.dimensions:
        w0 = np.zeros((h, nb), dtype=np.float32)
        w0[np.arange(nb), np.arange(nb)] = 1.0  # hidden unit b fires for budget b
        w2 = np.zeros((d.router_outputs, h), dtype=np.float32)
        for b, budget in enumerate(ec.budgets):
            spec = SliceSpec.from_json(ec.resolved[budget.name], parent)
            values = _dimension_values(d, spec, parent)
            if d.shared:  # one row: the size the kept layers share
                values = (_kept_values(d, spec, values) or values)[:1]
            for row, value in enumerate(values):
                w2[row * len(d.choices) + d.choices.index(value), b] = scale
        weights.update({
            f"{d.name}.0.weight": w0, f"{d.name}.0.bias": np.zeros(h, dtype=np.float32),
            f"{d.name}.2.weight": w2, f"{d.name}.2.bias": np.zeros(d.router_outputs, dtype=np.float32),
        })
    return weights


def _dimension_values(d: Dimension, spec: SliceSpec, parent: Arch) -> list:
    """What a spec chose along one dimension (one value per layer, or one for hidden size)."""
    if d.layers is None:
        return [spec.hidden_size]
    if d.name == "depth":
        return ["drop" if spec.layers[i] is None else "keep" for i in d.layers]
    return [getattr(spec.layers[i] or parent.layers[i], d.name) for i in d.layers]


def _kept_values(d: Dimension, spec: SliceSpec, values: list) -> list:
    """Of one value per layer of ``d``, those of the layers the spec keeps."""
    return [v for i, v in zip(d.layers, values) if spec.layers[i] is not None]


def check_choices(ec: ElasticConfig, parent: Arch) -> list[str]:
    """Resolved specs must only use values from the search space (else the router cannot say them)."""
    problems = []
    for b in ec.budgets:
        spec = SliceSpec.from_json(ec.resolved[b.name], parent)
        for d in ec.dimensions:
            values = _dimension_values(d, spec, parent)
            for v in values:
                if v not in d.choices:
                    problems.append(f"budget {b.name!r}: {d.name} = {v!r} is not among the choices {list(d.choices)}")
            if d.shared and len(set(map(repr, _kept_values(d, spec, values)))) > 1:
                problems.append(f"budget {b.name!r}: {d.name} is shared by layers {list(d.layers)} but the spec gives "
                                f"the kept ones different values {_kept_values(d, spec, values)}")
        if spec.hidden_size != parent.hidden_size and not any(d.name == "hidden_size" for d in ec.dimensions):
            problems.append(f"budget {b.name!r}: trims hidden_size, which is not in the search space")
        for i, layer in enumerate(spec.layers):
            covered = {d.name for d in ec.dimensions if d.layers is not None and i in d.layers}
            if layer is None and "depth" not in covered:
                problems.append(f"budget {b.name!r}: drops layer {i}, which is not in the depth search space")
            elif layer is not None:
                for f in SPEC_FIELDS[layer.kind]:
                    if getattr(layer, f) != getattr(parent.layers[i], f) and f not in covered:
                        problems.append(f"budget {b.name!r}: trims {f} of layer {i}, which is not in the search space")
    return problems
