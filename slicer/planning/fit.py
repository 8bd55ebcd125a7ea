"""The fit decision: budget x precision. For each budget of a checkpoint and each weights
precision the target runs, the memory it needs and whether it fits; the largest budget that fits
is chosen, at the best precision that fits it. No torch here (planning works from config.json alone).

Precision order (``formats.precision``): the device's float precision (bf16, else fp16), then
fp8, nvfp4, int8 (SmoothQuant), int4 (AWQ), each only where the device runs it; never below int4
unless pinned. The KV cache follows the float precision and the SSM state stays float32 unless pinned.

Example:
    >>> target = target_from_profile(get_profile("orin-nano-8gb"))
    >>> p = plan("./Nemotron-Elastic-12B", target, Workload(context=8192, dtype="auto"))
    >>> p.chosen, p.chosen_precision, [(b.name, b.fits_at) for b in p.budgets]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from elastic.profiles.progress import Progress
from elastic.profiles.units import gib, table_unit
from elastic.profiles.devices import CAPABILITY_WORDS
# the plan's target is decided in profiles (profiles.target); re-exported for the importers of this module
from elastic.profiles.target import Target, resolve_target, target_from_device, target_from_profile  # noqa: F401
from elastic.slicer.storage.reader import Checkpoint
from elastic.slicer.formats.elastic_format import ElasticConfig, read_router, resolve_budget
from elastic.slicer.errors import ConfigError, Hint
from elastic.slicer.formats.precision import (AUTO, FLOAT32, GGUF_QUANTIZED, KV, PLAN_WEIGHTS, QUANT_RANKING, STATE,
                                              WEIGHTS, Precision, choose, lookup, supported)
from elastic.slicer.planning.describe import PARAMETER_CONVENTION
from elastic.slicer.planning.engines import EngineOption, engine_options, with_base
from elastic.slicer.planning.memory import (DEFAULT_CONTEXT, DEFAULT_PREFILL_CHUNK, Workload, block_problem, engine_build_bytes, export_peak_bytes, footprint,
                                            gguf_quantized, max_context, memory_basis, weights_breakdown)
from elastic.slicer.formats.spec import SliceSpec


def choose_dtype(requested: str | None, target: Target) -> tuple[str, str | None]:
    """The dtype to plan and slice with (its canonical name), and a note when it differs from
    what was asked: ``elastic.slicer.formats.precision.choose`` over the weight precisions.

    ``None``/"auto": bfloat16 where the device has it, else float16, else float32; any spelling
    ("bf16", "half", ...) of an explicit precision.
    """
    p, note = choose(requested, target)
    return p.name, note


# what each quantized precision needs of the hardware, in words (profiles.devices.capability_flags)
NEEDS = CAPABILITY_WORDS


@dataclass(frozen=True)
class Precisions:
    """The precisions of a plan, resolved for its target: the float base, the weights precisions
    tried (best first; one when pinned), the KV cache and the SSM state."""

    base: Precision  # activations, conv window and every unquantized tensor
    weights: tuple[Precision, ...]
    kv: Precision
    state: Precision
    pinned: bool  # the weights precision was asked for
    notes: tuple[str, ...] = ()

    def workload(self, w: Workload, weights: Precision) -> Workload:
        """``w`` with every precision set, the weights at ``weights``."""
        return replace(w, dtype=self.base.name, weights=weights.name, kv=self.kv.name, state=self.state.name)


def _given(value: str | None) -> str | None:
    return None if value is None or str(value).strip().lower() == AUTO else value


def _refuse(p: Precision, target: Target, what: str, allowed: tuple[Precision, ...], setting: str) -> ConfigError:
    runs = ", ".join(q.short for q in allowed if supported(q, target))
    why = f": {p.short} needs {NEEDS[p.needs]}" if p.needs in NEEDS else ""
    cpu = ("; the CPU host runs quantized weights as llama.cpp's GGUF types (q8_0, q6_k, q5_k_m, q4_k_m), not Model "
           "Optimizer's GPU formats" if target.kind == "cpu" else "")
    return ConfigError(f"{target.name} does not run {p.short} {what}{why}. It runs {runs}{cpu}",
                       hint=Hint(setting, f"choose {what} it runs ({runs})"))


def _pin(req: str, target: Target, allowed: tuple[Precision, ...], what: str, setting: str,
         notes: list[str]) -> Precision:
    """An asked-for precision on ``target``: a float one falls back as ``precision.choose`` does
    (with a note); a quantized one the device lacks is refused."""
    p = lookup(req, allowed, what)
    if p.quantized or gguf_quantized(p):  # a llama.cpp type runs wherever llama.cpp does
        if not supported(p, target):
            raise _refuse(p, target, what, allowed, setting)
        return p
    floats = tuple(q for q in allowed if not q.quantized)
    q, note = choose(p.name, target, floats)
    notes.extend(n for n in (note,) if n)
    return q


def resolve_precisions(w: Workload, target: Target, allowed: tuple[Precision, ...] = PLAN_WEIGHTS) -> Precisions:
    """The precisions to plan ``w`` with on ``target`` (:class:`Precisions`).

    Weights: ``w.weights`` (or, when None, ``w.dtype``); "auto" tries the device's float
    precision and then every quantized one it runs (``precision.QUANT_RANKING``) among
    ``allowed``. A float one pins the base too. KV cache: ``w.kv``, "auto"/None: the base. SSM
    state: ``w.state``, "auto"/None: float32.

    Raises:
        ConfigError: a quantized precision the target does not run (naming what it runs), or one
            ``allowed`` leaves out (slicing writes float weights only in this build).
    """
    notes: list[str] = []
    req = _given(w.weights) if w.weights is not None else _given(w.dtype)  # one dtype alone: the weights too
    base_req = _given(w.dtype)
    if base_req is not None and lookup(base_req, PLAN_WEIGHTS, "dtype").quantized:
        base_req = None  # a quantized "dtype" names the weights; the base is the device's float
    if req is not None:
        p = _pin(req, target, PLAN_WEIGHTS, "weights", "precision", notes)
        if p not in allowed:
            raise ConfigError(f"{p.short} weights are not available here: slicing writes "
                              f"{', '.join(q.short for q in allowed)} weights only in this build (no quantizer yet)",
                              hint=Hint("precision", "choose float weights", value=choose(AUTO, target)[0].short))
        if not p.quantized and not gguf_quantized(p):
            base = p
        elif base_req is not None:
            base = _pin(base_req, target, WEIGHTS, "dtype", "dtype", notes)
        else:
            base = choose(AUTO, target)[0]
        tried: tuple[Precision, ...] = (p,)
    else:
        base, note = choose(base_req, target)
        notes.extend(n for n in (note,) if n)
        tried = (base, *(q for q in QUANT_RANKING if q in allowed and supported(q, target)))
    kv_req = _given(w.kv)
    kv = _pin(kv_req, target, KV, "KV cache", "kv_precision", notes) if kv_req else base
    state_req = _given(w.state)
    state = _pin(state_req, target, STATE, "SSM state", "state_precision", notes) if state_req else FLOAT32
    return Precisions(base=base, weights=tried, kv=kv, state=state, pinned=req is not None, notes=tuple(notes))


@dataclass(frozen=True)
class Candidate:
    """One (budget, weights precision) pair on the plan's target."""

    budget: str
    weights: Precision
    workload: Workload  # every precision set
    fits: bool  # its memory fits the target
    headroom_bytes: int
    terms: dict[str, int]  # weights, kv_cache, ssm_state, activations, overhead, margin, total
    weights_detail: dict[str, int]  # the weights term: quantized, scales, float
    refused: str | None = None  # why it cannot be produced or run (int4 groups, the engine's rules)
    runtime: str = ""  # the engine that runs it (planning.engines: "edgellm", "vllm", "llama.cpp", ...)
    why: str = ""  # the engine and precision in words
    form: str = ""  # the config form the engine loads: "stock" (padded where needed) or "as cut"
    memory_basis: str = ""  # what its terms rest on: "measured model: ..." or "estimate: ..." (memory.memory_basis)

    @property
    def usable(self) -> bool:
        return self.fits and self.refused is None

    def to_json(self) -> dict[str, Any]:
        return {"budget": self.budget, "weights_precision": self.weights.short, "runtime": self.runtime,
                "why": self.why, "form": self.form, "fits": self.fits, "memory_basis": self.memory_basis,
                "refused": self.refused, "headroom_bytes": self.headroom_bytes, "terms": dict(self.terms),
                "weights_detail": dict(self.weights_detail)}


def candidate(budget: str, child, p: Precision, pr: Precisions, w: Workload, target: Target,
              engine: str | None = None) -> Candidate:
    """The memory of budget ``child`` at weights ``p`` (and the plan's other precisions) on ``target``,
    as ``engine`` sizes it (``memory.footprint``; None: the reference model's terms)."""
    cw = pr.workload(w, p)
    terms = footprint(child, cw, target.overhead_bytes, engine)
    return Candidate(budget=budget, weights=p, workload=cw, fits=terms["total"] <= target.usable_bytes,
                     headroom_bytes=target.usable_bytes - terms["total"], terms=terms,
                     weights_detail=weights_breakdown(child, p.name, pr.base.name, engine),
                     refused=block_problem(child, p.name), memory_basis=memory_basis(engine))


def engine_candidate(budget: str, opt: EngineOption, pr: Precisions, w: Workload, target: Target) -> Candidate:
    """The memory of one engine option (the budget as that engine loads it) on ``target``."""
    c = candidate(budget, opt.arch, opt.weights, with_base(pr, opt.base), w, target, opt.engine)
    return replace(c, refused=opt.refused, runtime=opt.engine, why=opt.why, form=opt.form)


def budget_specs(ckpt: Checkpoint) -> list[tuple[str, SliceSpec, str]]:
    """(name, spec, where the spec came from) for every budget; a dense checkpoint has one, "full"."""
    if not ckpt.is_elastic:
        return [("full", SliceSpec.full(ckpt.arch), "dense checkpoint")]
    ec = ElasticConfig.read(ckpt.root, ckpt.arch)
    weights = read_router(ckpt.root, ec)  # once for every budget
    out = []
    for b in ec.budgets:
        spec, source = resolve_budget(ckpt.root, ec, ckpt.arch, b.name, weights=weights)
        out.append((b.name, spec, source))
    return out


@dataclass(frozen=True)
class BudgetPlan:
    """One budget on the plan's target: its resolved spec (handed to the slicer as is), the best
    weights precision that fits it (else the smallest tried) and the memory it needs there."""

    name: str
    spec: SliceSpec
    resolved_by: str  # "router", "elastic_config.json", "full model", "dense checkpoint"
    parameters: int  # total: every tensor, all experts resident (what the weights term counts)
    dtype: str  # the base float precision, canonical name ("bfloat16")
    fits: bool
    headroom_bytes: int
    terms: dict[str, int]  # weights, kv_cache, ssm_state, activations, overhead, margin, total
    layer_pattern: str
    weights: Precision | None = None  # the precisions it is planned at (typed: nothing below parses a name)
    kv: Precision | None = None
    state: Precision | None = None
    fits_at: tuple[str, ...] = ()  # every weights precision tried that fits, best first
    weights_detail: dict[str, int] = field(default_factory=dict, hash=False)  # quantized, scales, float
    workload: Workload | None = None  # the precisions it was planned at
    export_peak_bytes: int = 0  # `elastic export` of this budget (measured model: memory.export_peak_bytes)
    engine_build_bytes: int = 0  # a TensorRT engine build of it (estimate: memory.engine_build_bytes)
    export_here: bool | None = None  # both fit the target's memory (None: they run in host RAM, not known here)
    active_parameters: int = 0  # computed per token: total less the routed experts a token skips (MoE)
    refused: str | None = None  # why the precision shown cannot be written (when its memory would fit)
    runtime: str = ""  # the engine of the option shown (planning.engines)
    why: str = ""  # that engine and precision in words
    memory_basis: str = ""  # what its terms rest on: "measured model: ..." or "estimate: ..."
    quality: Any = None  # the exact fit's formats.size_curve.Quality: what the checkpoint's size curve says of it

    @property
    def weights_precision(self) -> str:
        """The weights precision's short name, as the CLI spells it ("int4"; "" when not planned)."""
        return self.weights.short if self.weights is not None else ""

    @property
    def kv_precision(self) -> str:
        return self.kv.short if self.kv is not None else ""

    @property
    def state_precision(self) -> str:
        return self.state.short if self.state is not None else ""

    @property
    def written_weights(self) -> Precision:
        """The precision its weights are written in: the planned one, else the base dtype."""
        return self.weights if self.weights is not None else lookup(self.dtype)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "runtime": self.runtime, "why": self.why, "parameters": self.parameters, "active_parameters": self.active_parameters,
                "dtype": self.dtype, "fits": self.fits,
                "headroom_bytes": self.headroom_bytes, "terms": dict(self.terms),
                "layer_pattern": self.layer_pattern, "resolved_by": self.resolved_by,
                "weights_precision": self.weights_precision, "kv_precision": self.kv_precision,
                "state_precision": self.state_precision, "fits_at": list(self.fits_at),
                "weights_detail": dict(self.weights_detail), "export_peak_bytes": self.export_peak_bytes,
                "engine_build_bytes": self.engine_build_bytes, "export_here": self.export_here,
                "refused": self.refused, "memory_basis": self.memory_basis,
                **({"quality": self.quality.to_json()} if self.quality is not None else {})}


@dataclass(frozen=True)
class Plan:
    """The memory table of every budget on one target, and the budget chosen. The checkpoint it
    was made from (opened and validated once) and the target travel with it, so slicing and
    export neither reopen nor re-detect anything."""

    checkpoint: Checkpoint
    target: Target
    workload: Workload  # with the precisions resolved for the target (weights: the pin, or "auto")
    budgets: tuple[BudgetPlan, ...]
    chosen: str | None  # the largest budget that fits (at the best precision that fits it)
    notes: tuple[str, ...] = ()
    suggestions: tuple[str, ...] = ()  # what would fit instead, when nothing does
    detection: Any = None  # elastic.profiles.detect.Detection when the target was detected
    candidates: tuple[Candidate, ...] = ()  # every budget x weights precision tried
    fit: str = "budgets"  # "exact": also the largest architecture of any size that fits (``exact_fit``)
    exact_fit: BudgetPlan | None = None  # its row, named "exact" (None: nothing fits, or not asked)
    exact_candidates: tuple[Candidate, ...] = ()  # the exact fit at its precision
    runtime: str | None = None  # the engine `--runtime` pinned (None: every engine of the target)

    def budget(self, name: str) -> BudgetPlan:
        for b in self.budgets:
            if b.name == name:
                return b
        raise ConfigError(f"unknown budget {name!r}; this plan has: {', '.join(b.name for b in self.budgets)}")

    def choose_exact(self) -> "Plan":
        """This plan with its exact fit (``fit="exact"``) added as a budget named "exact" and chosen
        when it has more parameters than the chosen budget (``fit-my-gpu --fit exact`` slices it);
        the plan itself otherwise, and when the checkpoint's size curve measured it outside its
        trained neighbours (``formats.size_curve``: not offered; a note says so)."""
        e = self.exact_fit
        if e is None or not e.fits:
            return self
        if self.chosen is not None and self.budget(self.chosen).parameters >= e.parameters:
            return self
        if e.quality is not None and not e.quality.offered:
            return replace(self, notes=self.notes + (f"exact fit not chosen: {e.quality.words()}",))
        return replace(self, budgets=self.budgets + (e,), chosen=e.name,
                       candidates=self.candidates + self.exact_candidates,
                       notes=self.notes + (f"exact fit chosen: {e.parameters:,} parameters, no trained budget "
                                           f"({e.resolved_by})",))

    @property
    def chosen_runtime(self) -> str | None:
        """The engine that runs the chosen budget ("edgellm", "vllm", "tensorrt-llm", "llama.cpp"), or None."""
        return self.budget(self.chosen).runtime if self.chosen else None

    @property
    def chosen_precision(self) -> str | None:
        """The weights precision of the chosen budget, short ("bf16", "int4"), or None."""
        return self.budget(self.chosen).weights_precision if self.chosen else None

    def to_json(self) -> dict[str, Any]:
        """The stable JSON form `elastic plan --json` prints: ``checkpoint``, ``weights_present``,
        ``device``, ``workload``, ``budgets`` (each with ``parameters`` (total) and
        ``active_parameters`` (per token), ``terms`` and its ``weights_precision``,
        ``kv_precision``, ``state_precision``), ``chosen``, ``chosen_precision``, ``candidates``
        (every budget x weights precision: ``budget``, ``weights_precision``, ``fits``, ``terms``),
        ``notes``, ``suggestions`` (and ``detection`` for a detected target); with ``fit`` "exact",
        ``exact_fit``: a budget row (``parameters``, ``terms``, ``spec``, ``quality``: what the
        checkpoint's size-curve record says of it, ``formats.size_curve.Quality.to_json``, ...) or None."""
        out = {
            "checkpoint": str(self.checkpoint.root.resolve()),
            "weights_present": self.checkpoint.has_weights,
            "device": self.target.to_json(),
            "workload": asdict(self.workload),
            "budgets": [b.to_json() for b in self.budgets],
            "chosen": self.chosen,
            "chosen_precision": self.chosen_precision,
            "chosen_runtime": self.chosen_runtime,
            "chosen_why": self.budget(self.chosen).why if self.chosen else None,
            "candidates": [c.to_json() for c in self.candidates],
            "parameter_convention": PARAMETER_CONVENTION,  # how "parameters" counts (planning.describe)
            "notes": list(self.notes),
            "suggestions": list(self.suggestions),
        }
        if self.fit == "exact":
            e = self.exact_fit
            out["exact_fit"] = None if e is None else {**e.to_json(), "spec": e.spec.to_json(self.checkpoint.arch)}
        if self.detection is not None:
            out["detection"] = {"devices": [d.name for d in self.detection.devices],
                                "reasons": list(self.detection.reasons)}
        return out


def slice_precisions() -> tuple[Precision, ...]:
    """The weights precisions :func:`slice_budget` can write here: the float ones, and the quantized
    ones when NVIDIA Model Optimizer is installed (``elastic[modelopt]``; every format calibrates on
    the CPU too). A plan made ``for_slicing`` chooses among these only."""
    from importlib.util import find_spec

    gguf = GGUF_QUANTIZED if None not in (find_spec("gguf"), find_spec("llama_cpp")) else ()  # llama.cpp quantizes
    if find_spec("modelopt") is None:  # imports nothing
        return (*WEIGHTS, *gguf)
    return (*WEIGHTS, *QUANT_RANKING, *gguf)


def plan(checkpoint: str | Path | Checkpoint, target: Target, workload: Workload, detection: Any = None,
         for_slicing: bool = False, fit: str = "budgets", runtime: str | None = None) -> Plan:
    """The memory table of every budget x weights precision on ``target`` and the budget chosen:
    the largest that fits, at the best precision that fits it (see :class:`Plan`).

    Args:
        checkpoint: a directory, or a Checkpoint already opened (it is not opened again).
        target: from :func:`resolve_target` (or a profile's :func:`target_from_profile`).
        workload: context, batch, prefill chunk, margin and the precisions (any spelling, or
            "auto"; see :func:`resolve_precisions`). ``Workload(dtype=...)`` alone pins the weights.
        detection: the Detection the target came from, reported in the JSON form.
        for_slicing: the plan will be sliced (fit-my-gpu, the TUI): choose only among
            :func:`slice_precisions`, and say what a quantized precision would have fitted.
        fit: "budgets" (the trained budgets), or "exact": also the largest architecture of any size
            that fits (:func:`exact_fit_row`), beside them.
        runtime: pin the engine (``--runtime``; :func:`elastic.slicer.planning.engines.pin_engine`).
            None: every engine of the target, preferred first; each budget shows the first
            (engine, precision) that fits it, and the largest budget that fits is chosen.

    Raises:
        ConfigError: a pinned precision the target does not run, (``for_slicing``) one that
            slicing cannot write, a runtime unknown or not on the target, or a pinned precision no
            engine of the target runs.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.open(checkpoint)
    allowed = slice_precisions() if for_slicing else PLAN_WEIGHTS
    pr = resolve_precisions(workload, target, allowed)
    if fit not in ("budgets", "exact"):
        raise ConfigError(f"fit is {fit!r}; choose budgets (the trained ones) or exact (any size that fits)")
    _require_engine(ckpt, target, pr, allowed, runtime)
    rows, candidates = [], []
    for name, spec, source in budget_specs(ckpt):
        row, tried = budget_row(ckpt, name, spec, source, pr, workload, target, allowed, runtime)
        rows.append(row)
        candidates += tried
    fitting = [r for r in rows if r.fits]
    chosen = max(fitting, key=lambda r: r.parameters) if fitting else None
    notes = list(pr.notes)
    if chosen is not None:
        notes += _precision_notes(chosen, target, [c for c in candidates if c.budget == chosen.name])
        if chosen.export_here is False:
            notes.append(export_advice(chosen, target))
    if for_slicing:
        alt = better_alternative(ckpt, rows, target, pr.weights)
        if alt is not None and chosen is not None and alt[0].parameters > chosen.parameters:
            notes.append(f"budget {alt[0].name} would fit with {alt[1].short} weights, but slicing here writes "
                         f"{', '.join(q.short for q in allowed)} weights"
                         + ("" if len(allowed) > len(WEIGHTS) else
                            " (quantized ones need NVIDIA Model Optimizer: pip install 'elastic[modelopt]')"))
    exact, exact_tried = None, []
    if fit == "exact":
        exact, exact_tried, why = exact_fit_row(ckpt, pr, workload, target, chosen, allowed, runtime)
        notes += [why] if why else []
        if exact is not None:  # the quality measure: what the checkpoint's size_curve.json says of it
            from elastic.slicer.formats.size_curve import spec_quality

            router_file = ElasticConfig.read(ckpt.root, ckpt.arch).router_file
            exact = replace(exact, quality=spec_quality(ckpt.root, router_file, exact.spec.to_json(ckpt.arch),
                                                        exact.parameters))
    w = replace(workload, dtype=pr.base.name, weights=pr.weights[0].name if pr.pinned else AUTO,
                kv=pr.kv.name, state=pr.state.name)
    return Plan(
        checkpoint=ckpt, target=target, workload=w, budgets=tuple(rows), chosen=chosen.name if chosen else None,
        notes=tuple(notes), suggestions=() if chosen else tuple(suggestions(ckpt, rows, target, pr.weights, allowed)),
        detection=detection, candidates=tuple(candidates), fit=fit, exact_fit=exact,
        exact_candidates=tuple(exact_tried), runtime=runtime,
    )


def _options(child, target: Target, pr: Precisions, allowed: tuple[Precision, ...], runtime: str | None):
    """The engine options of ``child`` on ``target`` (``planning.engines.engine_options``)."""
    return engine_options(child, target, pr.base, allowed, pr.weights if pr.pinned else None, runtime)


def _require_engine(ckpt: Checkpoint, target: Target, pr: Precisions, allowed: tuple[Precision, ...],
                    runtime: str | None) -> None:
    """Refuse a plan no engine of ``target`` can make at all (a pinned precision none of them runs)."""
    if _options(ckpt.arch, target, pr, allowed, runtime):
        return
    from elastic.slicer.planning.engines import ENGINES, device_engines, engine_precisions

    names = (runtime,) if runtime else device_engines(target)
    runs = "; ".join(f"{ENGINES[n].title}: " + ", ".join(q.short for q in engine_precisions(ENGINES[n], target,
                     pr.base, None) if q in allowed) for n in names)
    raise ConfigError(f"no engine on {target.name} runs {', '.join(q.short for q in pr.weights)} weights "
                      f"({runs})", hint=Hint("precision", "choose a precision one of them runs, or auto"))


def budget_row(ckpt: Checkpoint, name: str, spec: SliceSpec, source: str, pr: Precisions, workload: Workload,
               target: Target, allowed: tuple[Precision, ...] = PLAN_WEIGHTS,
               runtime: str | None = None) -> tuple[BudgetPlan, list[Candidate]]:
    """One row of the plan: ``spec`` on every engine of ``target`` at each of its weights
    precisions (``planning.engines``), the first that fits (engines in the device's order, each
    best precision first) shown, else the last tried; and every option tried."""
    child = spec.child_arch(ckpt.arch)
    tried = [engine_candidate(name, o, pr, workload, target) for o in _options(child, target, pr, allowed, runtime)]
    if not tried:  # every option of the plan is refused for the parent already (_require_engine)
        raise ConfigError(f"budget {name}: no engine option on {target.name}")
    best = next((c for c in tried if c.usable), tried[-1])
    export_peak, build, here = export_terms(child, target, best.terms["weights"])
    counts = child.param_counts()
    return BudgetPlan(
        name=name, spec=spec, resolved_by=source, parameters=counts["total"],
        active_parameters=counts["active"], dtype=pr.base.name,
        fits=best.usable, headroom_bytes=best.headroom_bytes, terms=best.terms, layer_pattern=child.layer_pattern,
        weights=best.weights, kv=pr.kv, state=pr.state,
        fits_at=tuple(dict.fromkeys(c.weights.short for c in tried if c.usable)), weights_detail=best.weights_detail,
        workload=best.workload, export_peak_bytes=export_peak, engine_build_bytes=build, export_here=here,
        refused=None if best.usable else best.refused, runtime=best.runtime, why=best.why,
        memory_basis=best.memory_basis,
    ), tried


EXACT_TOLERANCE = 0.02  # --fit exact: the router's favourite within this below the largest size that fits


def exact_fit_row(ckpt: Checkpoint, pr: Precisions, workload: Workload, target: Target, chosen: BudgetPlan | None,
                  allowed: tuple[Precision, ...] = PLAN_WEIGHTS,
                  runtime: str | None = None) -> tuple[BudgetPlan | None, list[Candidate], str | None]:
    """``--fit exact``: the architecture of any size, not only a trained budget, that fits
    ``target``: the most parameters whose memory (every term of the plan) fits, then the router's
    favourite within :data:`EXACT_TOLERANCE` below that size (``planning.exact.exact_fit``; the
    router's scores interpolated there as for ``elastic slice --budget 60%``). At the chosen
    budget's weights precision, else the first of the plan's that fits anything.

    Returns:
        (its row, named "exact", and its candidate at that precision; or None, [] and why there is none).
    """
    from elastic.slicer.formats.elastic_format import keeps_attention, size_log_probs
    from elastic.slicer.planning.exact import exact_fit, memory_cost

    if not ckpt.is_elastic:
        return None, [], "--fit exact needs an elastic checkpoint (a dense one has no search space)"
    parent = ckpt.arch
    ec = ElasticConfig.read(ckpt.root, parent)
    weights = read_router(ckpt.root, ec)
    keep = keeps_attention(ec, parent)
    engine = chosen.runtime if chosen is not None else runtime
    for p in [chosen.weights] if chosen is not None else list(pr.weights):
        cost = memory_cost(parent, pr.workload(workload, p), target.overhead_bytes, max_bytes=target.usable_bytes,
                           engine=engine)
        r = exact_fit(ec.dimensions, parent, lambda size: size_log_probs(ec, parent, weights, size)[0], cost,
                      EXACT_TOLERANCE, keep_attention=keep)
        if r is None:
            continue
        if r.spec.is_full(parent):
            source = "full model"
        else:
            where = size_log_probs(ec, parent, weights, r.parameters)[1]
            source = f"exact fit: {'router' if weights is not None else 'stored choices'}, not trained: {where}"
        row, tried = budget_row(ckpt, "exact", r.spec, source, replace(pr, weights=(p,), pinned=True), workload,
                                target, allowed, engine)
        return row, tried, None
    return None, [], f"--fit exact: no architecture of the search space fits {target.name}"


def export_terms(child, target: Target, engine_weight_bytes: int) -> tuple[int, int, bool | None]:
    """(export peak, engine build, whether both fit ``target``) of one budget. On a Jetson (and the
    CPU host) they share the memory the model runs in; on a desktop GPU they run in host RAM, which
    a profile does not know (None)."""
    peak = export_peak_bytes(child)
    build = engine_build_bytes(child, engine_weight_bytes, target.overhead_bytes // 2)
    here = max(peak, build) <= target.usable_bytes if (target.unified or target.kind == "cpu") else None
    return peak, build, here


def export_advice(b: BudgetPlan, target: Target) -> str:
    """What to do when ``b`` runs on ``target`` but cannot be exported or built there."""
    where = f"--target {target.profile}" if target.profile else "--target <this device's profile>"
    if b.runtime == "edgellm":  # TensorRT Edge-LLM's exporter, its engine built on the device
        return (f"{b.name} runs on {target.name}, but exporting it needs {gib(b.export_peak_bytes, 1)} "
                f"({gib(target.usable_bytes, 1)} usable here): on a machine with more memory run `elastic export "
                f"MODEL_DIR --format edgellm {where} --out BUNDLE`, copy BUNDLE here, check it with `sha256sum -c "
                "SHA256SUMS` and run the commands in its README.md (they build the engine here)")
    return (f"{b.name} runs on {target.name}, but exporting it needs {gib(b.export_peak_bytes, 1)} and a "
            f"TensorRT engine build about {gib(b.engine_build_bytes, 1)} ({gib(target.usable_bytes, 1)} usable "
            "here): on a machine with more "
            f"memory run `elastic export MODEL_DIR --format all {where} --out BUNDLE`, copy BUNDLE here, check it with "
            "`sha256sum -c SHA256SUMS` and run its build_engines.sh (or build the engine on that machine if it has "
            "the same GPU)")


def _precision_notes(chosen: BudgetPlan, target: Target, tried: list[Candidate]) -> list[str]:
    """Why the chosen budget has its engine and precision, in words: the options tried before it."""
    at = next(i for i, c in enumerate(tried) if c.usable and (c.runtime, c.weights.short) ==
              (chosen.runtime, chosen.weights_precision))
    out = []
    if tried[:at]:  # preferred, but did not fit or was refused
        misses = ", ".join(f"{c.runtime} {c.weights.short} needs {gib(c.terms['total'])}"
                           if c.refused is None else f"{c.runtime} {c.weights.short}: {c.refused}" for c in tried[:at])
        out.append(f"{chosen.name} on {chosen.runtime} at {chosen.weights_precision}: {misses} "
                   f"({gib(target.usable_bytes)} usable)")
    out.append(f"runs with {chosen.why}")
    return out


def better_alternative(ckpt: Checkpoint, rows: list[BudgetPlan], target: Target,
                       tried: tuple[Precision, ...]) -> tuple[BudgetPlan, Precision] | None:
    """The largest budget that would fit with a weights precision the plan did not try (the
    device's float one, then every quantized one it runs), and that precision; None if none would."""
    floats = choose(AUTO, target)[0]
    others = [p for p in (floats, *(q for q in QUANT_RANKING if supported(q, target))) if p not in tried]
    for r in sorted(rows, key=lambda r: -r.parameters):
        child = r.spec.child_arch(ckpt.arch)
        for p in others:
            w = r.workload
            if not p.quantized:  # a float precision is the base of everything that followed it
                w = replace(w, dtype=p.name, weights=p.name, kv=p.name if w.kv == w.dtype else w.kv)
            else:
                w = replace(w, weights=p.name)
            if (footprint(child, w, target.overhead_bytes)["total"] <= target.usable_bytes
                    and block_problem(child, p.name) is None):
                return r, p
    return None


def suggestions(ckpt: Checkpoint, rows: list[BudgetPlan], target: Target, tried: tuple[Precision, ...],
                allowed: tuple[Precision, ...] = PLAN_WEIGHTS) -> list[str]:
    """What would fit when nothing does: a shorter context, a smaller batch, another weights
    precision (saying so when it is not in ``allowed``), a bigger device (for the smallest budget
    at the smallest precision tried).

    Every suggestion is true of the plan: a context is only suggested when it is shorter than the
    one asked for, a batch when smaller, more memory only by a positive amount. When the smallest
    budget's memory already fits and only its precision is refused (``BudgetPlan.refused``), less
    context, batch or memory would not help: only another precision is suggested.
    """
    smallest = min(rows, key=lambda r: r.parameters)
    name, child, w = smallest.name, smallest.spec.child_arch(ckpt.arch), smallest.workload
    need = smallest.terms["total"]
    short = need - target.usable_bytes  # > 0: the memory it lacks
    out = []
    if short > 0 and smallest.refused is None:
        ctx = max_context(child, w, target.overhead_bytes, target.usable_bytes, smallest.runtime or None)
        if 256 <= ctx < w.context:
            out.append(f"budget {name} fits with a context of {ctx} (instead of {w.context})")
        for b in range(w.batch - 1, 0, -1):
            if footprint(child, replace(w, batch=b), target.overhead_bytes, smallest.runtime or None)["total"] \
                    <= target.usable_bytes:
                out.append(f"budget {name} fits with a batch of {b} (instead of {w.batch})")
                break
    alt = better_alternative(ckpt, rows, target, tried)
    if alt is not None:
        out.append(f"budget {alt[0].name} fits with {alt[1].short} weights (instead of {alt[0].weights_precision})"
                   + ("" if alt[1] in allowed else f" (slicing here writes {', '.join(q.short for q in allowed)} weights"
                      + ("; quantized ones need NVIDIA Model Optimizer: pip install 'elastic[modelopt]')"
                         if len(allowed) == len(WEIGHTS) else ")")))
    if short > 0 and smallest.refused is None:
        out.append(f"budget {name} needs {gib(need)} at context {w.context}; {target.name} has "
                   f"{gib(target.usable_bytes)} usable: a device with {_at_least(short)} more "
                   "would run it")
    return out


def _at_least(n: int) -> str:
    """``n`` bytes (> 0) rounded up to a hundredth of a GiB, or of a MiB below 1 GiB: never less
    than ``n``, never "0.00"."""
    import math

    unit, size = table_unit(n)
    return f"{math.ceil(n * 100 / size) / 100:.2f} {unit}"


def build_plan(checkpoint: str | Path | Checkpoint | None = None, *, target: str | None = None,
               gpu: int | None = None, resolved: tuple[Target, Any] | None = None, context: int = DEFAULT_CONTEXT,
               batch: int = 1, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, dtype: str = AUTO,
               weights: str | None = None, kv: str | None = None, state: str | None = None, for_slicing: bool = False,
               fit: str = "budgets", runtime: str | None = None) -> Plan:
    """The one plan builder of every front end (``elastic plan``, fit-my-gpu, the TUI): the target
    decided once (``resolved``, or :func:`resolve_target` of ``target``/``gpu``), the workload built
    once (a :class:`Workload`, which refuses bad values), then :func:`plan`.

    Args:
        checkpoint: a directory or an opened Checkpoint; None: the bundled demo.
        resolved: (Target, Detection or None) already resolved (the TUI detects once per session).
        dtype: the base float precision ("auto": the device's); alone it also pins the weights.
        weights, kv, state: the precisions of the weights, KV cache and SSM state (None/"auto": the plan
            decides; the state: float32).
        for_slicing, fit, runtime: as :func:`plan`.
    """
    from elastic.slicer.planning.describe import default_checkpoint

    tgt, detection = resolved if resolved is not None else resolve_target(target, gpu)
    w = Workload(context=context, batch=batch, dtype=dtype, prefill_chunk=prefill_chunk, weights=weights, kv=kv,
                 **({} if state is None else {"state": state}))
    return plan(checkpoint or default_checkpoint(), tgt, w, detection=detection, for_slicing=for_slicing, fit=fit,
                runtime=runtime)


def default_out(budget: str) -> Path:
    """Where ``fit-my-gpu`` writes a budget when no --out is given: ./elastic-model-<budget>."""
    import re

    return Path(f"elastic-model-{re.sub(r'[^A-Za-z0-9._-]+', '', budget) or 'budget'}")


def slice_budget(p: Plan, budget: str, out: str | Path, force: bool = False, progress: Progress | None = None):
    """Slice one budget of a plan: its resolved spec, in the plan's dtype, from the checkpoint the
    plan opened (nothing is opened or resolved again). Returns ``elastic.slicer.slice.SliceResult``."""
    from elastic.slicer.slice import slice_checkpoint

    b = p.budget(budget)
    allowed = slice_precisions()
    weights = b.written_weights
    if gguf_quantized(weights) and weights in allowed:  # sliced in float; llama.cpp quantizes the GGUF
        weights = lookup(b.dtype)
    if weights not in allowed:
        raise ConfigError(f"budget {b.name} was planned with {weights.short} weights; slicing here writes "
                          f"{', '.join(q.short for q in allowed)} weights"
                          + ("" if len(allowed) > len(WEIGHTS) else
                             " (quantized ones need NVIDIA Model Optimizer: pip install 'elastic[modelopt]')"),
                          hint=Hint("precision", "plan with float weights", value=lookup(b.dtype).short))
    p.checkpoint.require_weights()  # planning works without them; slicing does not
    if weights.quantized:
        from elastic.slicer.quantize.workflow import slice_and_quantize

        kind = {"budget": b.name} if p.checkpoint.is_elastic else {}
        return slice_and_quantize(p.checkpoint, out, weights, dtype=b.dtype, force=force, progress=progress,
                                  resolved=(b.spec, b.resolved_by if p.checkpoint.is_elastic else "spec"), **kind)
    if p.checkpoint.is_elastic:
        return slice_checkpoint(p.checkpoint, out, budget=b.name, resolved=(b.spec, b.resolved_by), dtype=b.dtype,
                                force=force, progress=progress)
    return slice_checkpoint(p.checkpoint, out, resolved=(b.spec, "spec"), dtype=b.dtype, force=force,
                            progress=progress)
