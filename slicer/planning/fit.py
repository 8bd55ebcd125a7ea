"""The fit decision: for each budget of a checkpoint, the memory it needs on a target and whether
it fits; the largest that fits is chosen. No torch here (planning works from config.json alone).

Example:
    >>> target = target_from_profile(get_profile("orin-nano-8gb"))
    >>> p = plan("./Nemotron-Elastic-12B", target, Workload(context=8192))
    >>> p.chosen, [(b.name, b.fits) for b in p.budgets], p.to_json()["budgets"][0]["terms"]["total"]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from elastic.slicer.storage.reader import Checkpoint
from elastic.slicer.formats.elastic_format import ElasticConfig, read_router, resolve_budget
from elastic.slicer.errors import ConfigError
from elastic.slicer.planning.memory import Workload, footprint, max_context
from elastic.slicer.formats.spec import SliceSpec


@dataclass(frozen=True)
class Target:
    """The device a plan is for: detected here, or a profile for a device you do not have."""

    name: str
    kind: str  # "gpu" | "jetson" | "cpu"
    usable_bytes: int  # what the model may use (after the OS/driver reserve, or free now)
    overhead_bytes: int  # runtime overhead: CUDA context + workspace, or the CPU runtime
    bf16: bool
    fp16: bool
    fp8: bool
    unified: bool  # GPU memory is the system RAM (Jetson)
    source: str  # "detected" or "profile"
    notes: tuple[str, ...] = ()
    profile: str | None = None  # the profile's name (`--target`), None when detected


def target_from_profile(profile) -> Target:
    """Plan for a device profile (``elastic.profiles.devices.DeviceProfile``): usable = memory - reserve."""
    return Target(
        name=profile.display_name, kind=profile.kind,
        usable_bytes=max(0, profile.memory_bytes - profile.reserve_bytes),
        overhead_bytes=profile.runtime_overhead_bytes, bf16=profile.bf16, fp16=profile.fp16, fp8=profile.fp8,
        unified=profile.unified, source="profile", profile=profile.name,
        notes=(f"profile {profile.name}: {profile.memory_bytes / 2**30:.1f} GiB, "
               f"{profile.reserve_bytes / 2**30:.1f} GiB kept for the OS/driver",),
    )


def target_from_device(device) -> Target:
    """Plan for a detected device (``elastic.profiles.detect.Device``)."""
    return Target(
        name=device.name, kind=device.kind, usable_bytes=device.usable_bytes,
        overhead_bytes=device.runtime_overhead_bytes, bf16=device.bf16, fp16=device.fp16, fp8=device.fp8,
        unified=device.unified, source="detected", notes=tuple(device.notes),
    )


def choose_dtype(requested: str | None, target: Target) -> tuple[str, str | None]:
    """The dtype to plan and slice with (its canonical name), and a note when it differs from
    what was asked: ``elastic.slicer.formats.precision.choose`` over the weight precisions.

    ``None``/"auto": bfloat16 where the device has it, else float16, else float32; any spelling
    ("bf16", "half", ...) of an explicit precision.
    """
    from elastic.slicer.formats.precision import choose

    p, note = choose(requested, target)
    return p.name, note


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
    """One budget on the plan's target: its resolved spec (handed to the slicer as is) and the
    memory it needs."""

    name: str
    spec: SliceSpec
    resolved_by: str  # "router", "elastic_config.json", "full model", "dense checkpoint"
    parameters: int
    dtype: str  # canonical precision name
    fits: bool
    headroom_bytes: int
    terms: dict[str, int]  # weights, kv_cache, ssm_state, activations, overhead, margin, total
    layer_pattern: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "parameters": self.parameters, "dtype": self.dtype, "fits": self.fits,
                "headroom_bytes": self.headroom_bytes, "terms": dict(self.terms),
                "layer_pattern": self.layer_pattern, "resolved_by": self.resolved_by}


@dataclass(frozen=True)
class Plan:
    """The memory table of every budget on one target, and the budget chosen. The checkpoint it
    was made from (opened and validated once) and the target travel with it, so slicing and
    export neither reopen nor re-detect anything."""

    checkpoint: Checkpoint
    target: Target
    workload: Workload  # with the dtype chosen for the target
    budgets: tuple[BudgetPlan, ...]
    chosen: str | None  # the largest budget that fits
    notes: tuple[str, ...] = ()
    suggestions: tuple[str, ...] = ()  # what would fit instead, when nothing does
    detection: Any = None  # elastic.profiles.detect.Detection when the target was detected

    def budget(self, name: str) -> BudgetPlan:
        for b in self.budgets:
            if b.name == name:
                return b
        raise ConfigError(f"unknown budget {name!r}; this plan has: {', '.join(b.name for b in self.budgets)}")

    def to_json(self) -> dict[str, Any]:
        """The stable JSON form `elastic plan --json` prints: ``checkpoint``, ``weights_present``,
        ``device``, ``workload``, ``budgets`` (each with ``terms``), ``chosen``, ``notes``,
        ``suggestions`` (and ``detection`` for a detected target)."""
        out = {
            "checkpoint": str(self.checkpoint.root.resolve()),
            "weights_present": self.checkpoint.has_weights,
            "device": {**asdict(self.target), "notes": list(self.target.notes)},
            "workload": asdict(self.workload),
            "budgets": [b.to_json() for b in self.budgets],
            "chosen": self.chosen,
            "notes": list(self.notes),
            "suggestions": list(self.suggestions),
        }
        if self.detection is not None:
            out["detection"] = {"devices": [d.name for d in self.detection.devices],
                                "reasons": list(self.detection.reasons)}
        return out


def plan(checkpoint: str | Path | Checkpoint, target: Target, workload: Workload, detection: Any = None) -> Plan:
    """The memory table of every budget on ``target`` and the budget chosen (see :class:`Plan`).

    Args:
        checkpoint: a directory, or a Checkpoint already opened (it is not opened again).
        target: from :func:`resolve_target` (or a profile's :func:`target_from_profile`).
        workload: context, batch, dtype (any spelling, or "auto"), prefill chunk, margin.
        detection: the Detection the target came from, reported in the JSON form.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.open(checkpoint)
    dtype, dtype_note = choose_dtype(workload.dtype, target)
    w = replace(workload, dtype=dtype)
    rows = []
    for name, spec, source in budget_specs(ckpt):
        child = spec.child_arch(ckpt.arch)
        terms = footprint(child, w, target.overhead_bytes)
        rows.append(BudgetPlan(
            name=name, spec=spec, resolved_by=source, parameters=child.param_counts()["total"], dtype=dtype,
            fits=terms["total"] <= target.usable_bytes, headroom_bytes=target.usable_bytes - terms["total"],
            terms=terms, layer_pattern=child.layer_pattern,
        ))
    fitting = [r for r in rows if r.fits]
    chosen = max(fitting, key=lambda r: r.parameters).name if fitting else None
    return Plan(
        checkpoint=ckpt, target=target, workload=w, budgets=tuple(rows), chosen=chosen,
        notes=tuple(n for n in (dtype_note,) if n),
        suggestions=() if chosen else tuple(suggestions(ckpt, rows, target, w)),
        detection=detection,
    )


def suggestions(ckpt: Checkpoint, rows: list[BudgetPlan], target: Target, w: Workload) -> list[str]:
    """What would fit when nothing does: a shorter context, a smaller batch, another dtype, a bigger device."""
    smallest = min(rows, key=lambda r: r.parameters)
    name, child = smallest.name, smallest.spec.child_arch(ckpt.arch)
    out = []
    ctx = max_context(child, w, target.overhead_bytes, target.usable_bytes)
    if ctx >= 256:
        out.append(f"budget {name} fits with a context of {ctx} (instead of {w.context})")
    if w.batch > 1:
        for b in range(w.batch - 1, 0, -1):
            if footprint(child, replace(w, batch=b), target.overhead_bytes)["total"] <= target.usable_bytes:
                out.append(f"budget {name} fits with a batch of {b} (instead of {w.batch})")
                break
    if w.dtype == "float32":
        half = "bfloat16" if target.bf16 else "float16"
        if footprint(child, replace(w, dtype=half), target.overhead_bytes)["total"] <= target.usable_bytes:
            out.append(f"budget {name} fits with dtype {half}")
    need = smallest.terms["total"]
    out.append(f"budget {name} needs {need / 2**30:.2f} GiB at context {w.context}; {target.name} has "
               f"{target.usable_bytes / 2**30:.2f} GiB usable: a device with {(need - target.usable_bytes) / 2**30:.2f} "
               "GiB more would run it")
    return out


def resolve_target(target: str | None, gpu: int | None = None):
    """The planning target: the profile named ``target``, or this machine (detected; ``gpu``
    picks among several). Returns (Target, the Detection or None for a profile)."""
    if target:
        from elastic.profiles.devices import get_profile

        return target_from_profile(get_profile(target)), None
    from elastic.profiles.detect import detect

    detection = detect(gpu=gpu)
    return target_from_device(detection.chosen), detection


def default_out(budget: str) -> Path:
    """Where ``fit-my-gpu`` writes a budget when no --out is given: ./elastic-model-<budget>."""
    import re

    return Path(f"elastic-model-{re.sub(r'[^A-Za-z0-9._-]+', '', budget) or 'budget'}")


def slice_budget(p: Plan, budget: str, out: str | Path, force: bool = False, progress=None):
    """Slice one budget of a plan: its resolved spec, in the plan's dtype, from the checkpoint the
    plan opened (nothing is opened or resolved again). Returns ``elastic.slicer.slice.SliceResult``."""
    from elastic.slicer.slice import slice_checkpoint

    b = p.budget(budget)
    p.checkpoint.require_weights()  # planning works without them; slicing does not
    if p.checkpoint.is_elastic:
        return slice_checkpoint(p.checkpoint, out, budget=b.name, resolved=(b.spec, b.resolved_by), dtype=b.dtype,
                                force=force, progress=progress)
    return slice_checkpoint(p.checkpoint, out, resolved=(b.spec, "spec"), dtype=b.dtype, force=force,
                            progress=progress)
