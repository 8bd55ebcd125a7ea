"""The workflows the CLI and the TUI run, as library calls with typed results: plan for a target,
slice a planned budget, export it for the plan's target, and fit-my-gpu (plan, slice, export, smoke
test). The front ends parse, call one of these and render what they return.

The plan is made once (one checkpoint opening, one target decision, every budget resolved once)
and handed down: slicing takes the planned spec and dtype, the export takes the planned target,
context and batch. Everything reports through one progress protocol, ``progress(stage, done,
total)`` with ``total`` None when a stage has no size.

Example:
    >>> p = make_plan("./Nemotron-Elastic-12B", target="orin-nx-16gb", context=32768)
    >>> result = fit_my_gpu(p, out="./model")
    >>> result.to_json()["smoke"]["tokens_per_s"]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elastic.slicer.errors import ElasticError, MissingDependencyError
from elastic.slicer.planning.fit import Plan, default_out, plan, resolve_target, slice_budget
from elastic.slicer.planning.memory import Workload

Progress = Callable[[str, int, "int | None"], None]  # (stage, done, total or None)


def make_plan(checkpoint=None, *, target: str | None = None, gpu: int | None = None, context: int = 8192,
              batch: int = 1, dtype: str = "auto", prefill_chunk: int = 512) -> Plan:
    """``elastic plan``: the target decided once (a profile, or this machine's GPU ``gpu``), every
    budget's memory at ``context`` x ``batch`` in ``dtype`` (any spelling, or "auto")."""
    from elastic.slicer.planning.describe import default_checkpoint

    tgt, detection = resolve_target(target, gpu)
    w = Workload(context=context, batch=batch, dtype=dtype, prefill_chunk=prefill_chunk)
    return plan(checkpoint or default_checkpoint(), tgt, w, detection=detection)


def slice_planned(p: Plan, budget: str, out: str | Path, *, force: bool = False, progress: Progress | None = None):
    """Slice ``budget`` of plan ``p`` (its spec and dtype, the checkpoint the plan opened)."""
    return slice_budget(p, budget, out, force=force, progress=progress)


def export_unavailable() -> str | None:
    """Why exporting cannot run here (the onnx extra missing), or None."""
    try:
        from .deps import require

        require("onnx", "onnxruntime", "onnxscript")
    except MissingDependencyError as e:
        return e.message
    return None


def export_planned(p: Plan, model_dir: str | Path, *, progress: Progress | None = None):
    """Export a sliced model into MODEL_DIR/export for the plan's target, context and batch: ONNX
    graphs, the TensorRT engine or its build script. Returns ``pipeline.ExportResult``.

    Raises:
        MissingDependencyError: the onnx extra is not installed (:func:`export_unavailable` says so first).
    """
    from .pipeline import export_model

    return export_model(model_dir, Path(model_dir) / "export", format="all", target=p.target,
                        max_batch=p.workload.batch, max_context=p.workload.context, force=True, progress=progress)


def smoke(p: Plan, model_dir: str | Path, exported=None) -> dict[str, Any]:
    """A short greedy generation from what was produced: the exported graphs (an ExportResult)
    when there are some, else the PyTorch reference (float32 on a CPU target)."""
    if exported is not None:
        from .runtime import generate_text

        return generate_text(exported.out, "Hello", backend="onnx", max_new_tokens=16)
    from elastic.slicer.nn.smoke import smoke_test

    return smoke_test(model_dir, dtype="float32" if p.target.kind == "cpu" else None)


@dataclass(frozen=True)
class FitResult:
    """What ``fit_my_gpu`` did: the plan, where the model went, the slice, the export, the smoke test."""

    plan: Plan
    budget: str
    out: Path
    slice: Any  # elastic.slicer.slice.SliceResult
    export: Any  # elastic.export.pipeline.ExportResult, or None when skipped
    export_skipped: str | None  # why there is no export
    smoke: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """`elastic fit-my-gpu --json`: the plan's keys plus ``out``, ``slice``, ``export``, ``smoke``."""
        return self.plan.to_json() | {
            "out": str(self.out),
            "slice": {"parameters": self.slice.parameters, "bytes_written": self.slice.bytes_written,
                      "runtimes": self.slice.manifest["runtimes"]},
            "export": self.export.to_json() if self.export is not None else {"skipped": self.export_skipped},
            "smoke": self.smoke,
        }


def fit_my_gpu(p: Plan, *, budget: str | None = None, out: str | Path | None = None, force: bool = False,
               export: bool = True, progress: Progress | None = None) -> FitResult:
    """Slice the plan's chosen budget (or ``budget``), export it for the plan's target, context and
    batch (unless the plan says the export or the engine build would not fit this device's memory:
    ``export_skipped`` then says how to export it elsewhere), and check that it runs.

    Raises:
        ElasticError: no budget fits (the plan's suggestions say what would), or any failure of the
            steps (the output directory is then left as it was).
    """
    name = budget or p.chosen
    if name is None:
        raise ElasticError("no budget fits this device; see the plan's suggestions")
    dest = Path(out) if out is not None else default_out(name)
    result = slice_planned(p, name, dest, force=force, progress=progress)
    why = export_unavailable() if export else "export not asked for"
    if why is None and any(layer.kind == "moe" for layer in p.checkpoint.arch.layers):
        why = "elastic export does not trace MoE layers yet; the slice runs in transformers and vLLM"
    b = p.budget(name)
    if why is None and b.export_here is False:  # it runs here, but exporting it here would run out of memory
        from elastic.slicer.planning.fit import export_advice

        why = export_advice(b, p.target)
    exported = None if why else export_planned(p, dest, progress=progress)
    if progress:
        progress("smoke test", 0, None)
    return FitResult(p, name, dest, result, exported, why, smoke(p, dest, exported))
