"""What the TUI shows and does, without Textual: the same library calls as ``elastic plan`` and
``elastic fit-my-gpu`` (``elastic.slicer.planning.fit.plan``, ``elastic.slicer.slice.slice_checkpoint``), plus the text
they are shown as. No torch at import; slicing imports it in the worker thread.

Example:
    >>> planner = Planner(None)                       # the default checkpoint, opened once
    >>> p = planner.plan(Choice(target="orin-nx-16gb", context=32768))
    >>> p.chosen, budget_rows(p)[1][0]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elastic.profiles.progress import Progress
from elastic.profiles.units import table_unit
from elastic.slicer.formats.precision import AUTO, WEIGHTS
from elastic.slicer.planning.memory import DEFAULT_CONTEXT

from ..common import human_bytes, human_count, runtime_lines

HERE = "this machine"  # the target choice that detects this machine instead of naming a profile
DTYPES = (AUTO, *(p.name for p in WEIGHTS))  # what `elastic plan --dtype` takes, canonical names
ACTIONS = ("slice", "export", "both")
EXPORT_MISSING = 'export: needs the onnx extra (pip install -e ".[onnx]")'
COLUMNS = ("budget", "params", "weights", "kv", "state", "total", "headroom", "fits")

# how the TUI says each hint's setting (elastic.profiles.errors.SETTINGS): its controls
CONTROLS = {"replace": "set 'replace' to yes", "checkpoint": "start it with another checkpoint (-c)",
            "spec": "cut it from the command line with a spec file", "target": "pick another target",
            "gpu": "start it with another GPU", "context": "change the context", "batch": "change the batch",
            "dtype": "change the dtype", "parity": "export it from the command line without the parity check",
            "max_new_tokens": "ask for fewer new tokens", "precision": "change the dtype",
            "kv_precision": "plan it from the command line (elastic plan)",
            "state_precision": "plan it from the command line (elastic plan)",
            "off_curve": "slice it from the command line (elastic slice --allow-off-curve)"}


def error_text(e) -> str:
    """An ElasticError as the TUI shows it: the message, then its hint in terms of the TUI's controls."""
    text = f"error: {e.render()}"
    if e.hint is not None:
        value = f" ({e.hint.value})" if e.hint.value is not None and not isinstance(e.hint.value, bool) else ""
        text += f"\nhint: {e.hint.action}: {CONTROLS[e.hint.setting]}{value}"
    return text


@dataclass(frozen=True)
class Choice:
    """What to plan for: the values of the TUI's controls (defaults: those of `elastic plan`)."""

    target: str = HERE  # a profile name (`elastic profiles`), or HERE
    context: int = DEFAULT_CONTEXT  # tokens per sequence
    batch: int = 1  # sequences decoded together
    dtype: str = "auto"  # one of DTYPES


class Planner:
    """One checkpoint, opened and validated once, planned for many choices.

    Raises (at construction) the errors ``elastic plan`` would: a missing or broken checkpoint.
    """

    def __init__(self, checkpoint: str | Path | None):
        from elastic.slicer.storage.reader import Checkpoint
        from elastic.slicer.planning.describe import default_checkpoint

        self.ckpt = Checkpoint.open(checkpoint or default_checkpoint())
        self._targets: dict[str, Any] = {}  # choice.target -> (Target, Detection | None)

    @property
    def name(self) -> str:
        return self.ckpt.root.resolve().name

    def target(self, name: str):
        """(Target, Detection or None) exactly as `elastic plan --target` / no --target builds it."""
        from elastic.slicer.planning.fit import resolve_target

        if name not in self._targets:  # detection probes the machine: once per session
            self._targets[name] = resolve_target(None if name == HERE else name, None)
        return self._targets[name]

    def plan(self, choice: Choice):
        """The one plan builder (``planning.fit.build_plan``) for ``choice``: a ``Plan`` (raises
        ProfileError for an unknown profile). The checkpoint was opened once, at construction."""
        from elastic.slicer.planning.fit import build_plan

        return build_plan(self.ckpt, resolved=self.target(choice.target), context=choice.context,
                          batch=choice.batch, dtype=choice.dtype, for_slicing=True)  # its actions slice the chosen budget


# ---- text ---------------------------------------------------------------------------------------

def checkpoint_line(planner: Planner) -> str:
    ckpt = planner.ckpt
    kind = "elastic" if ckpt.is_elastic else "dense"
    weights = "weights present" if ckpt.has_weights else "config.json only: plan, no slicing"
    return f"checkpoint: {planner.name} ({kind}, {weights})"


def device_line(plan) -> str:
    """The first line of `elastic plan`'s text, a little shorter (80 columns)."""
    dev = plan.to_json()["device"]
    return (f"device: {dev['name']}, {dev['kind']} {dev['source']}: {human_bytes(dev['usable_bytes'])} usable"
            + (", shares system RAM" if dev["unified"] else ""))


def budget_rows(plan) -> tuple[str, list[tuple[str, ...]]]:
    """The unit and one row per budget, in COLUMNS order: the numbers of `elastic plan`'s table."""
    p = plan.to_json()
    unit, div = table_unit(max(b["terms"]["total"] for b in p["budgets"]))
    rows = []
    for b in p["budgets"]:
        t = b["terms"]
        rows.append((b["name"], human_count(b["parameters"]),
                     *(f"{n / div:.2f}" for n in (t["weights"], t["kv_cache"], t["ssm_state"], t["total"],
                                                   b["headroom_bytes"])),
                     "yes" if b["fits"] else "no"))
    return unit, rows


def summary_lines(plan, unit: str) -> list[str]:
    p = plan.to_json()
    w = p["workload"]
    workload = f"context {w['context']:,} x batch {w['batch']}, {w['dtype']}, margin {w['margin']:.0%}"
    lines = [f"memory in {unit} at {workload}"]
    lines += [f"note: {n}" for n in p["notes"]]
    if p["chosen"]:
        lines.append(f"chosen {p['chosen']}: the largest budget that fits")
    else:
        lines.append("chosen none: no budget fits")
        lines += [f"try: {s}" for s in p["suggestions"]]
    return lines


# ---- actions ------------------------------------------------------------------------------------

def default_out(budget: str) -> Path:
    """Where `elastic fit-my-gpu` writes a budget when no --out is given."""
    from elastic.slicer.planning.fit import default_out as library_default_out

    return library_default_out(budget)


def unavailable(action: str) -> str | None:
    """Why ``action`` cannot run here, or None: export needs the onnx extra."""
    if action not in ("export", "both"):
        return None
    from elastic.export.workflow import export_unavailable

    return EXPORT_MISSING if export_unavailable() else None


def run_action(action: str, p, budget: str, out: Path, force: bool, progress: Progress) -> list[str]:
    """Run one action for ``budget`` of plan ``p`` (an ``elastic.slicer.planning.fit.Plan``): the
    workflows of ``elastic.export.workflow``, so "both" is fit-my-gpu's (the plan's target,
    context and batch, and its smoke test). ``progress(stage, done, total, **detail)``. Returns the lines
    that report it; raises what the CLI would and whatever ``progress`` raises."""
    from elastic.export import workflow

    if action == "both":
        fit = workflow.fit_my_gpu(p, budget=budget, out=out, force=force, progress=progress)
        return [*slice_lines(fit.slice, budget, out, reused=fit.slice_reused), *export_lines(fit.to_json()["export"]),
                smoke_line(fit.smoke)]
    if action == "slice":
        return slice_lines(workflow.slice_planned(p, budget, out, force=force, progress=progress), budget, out)
    exported = workflow.export_planned(p, out, progress=progress, budget=budget)
    return [*export_lines(exported.to_json()), smoke_line(workflow.smoke(p, out, exported))]


def slice_lines(result, budget: str, out: Path, reused: bool = False) -> list[str]:
    m = result.manifest
    size = f"{human_count(result.parameters)} parameters, {m['dtype']}, {human_bytes(result.bytes_written)}"
    head = f"kept {Path(out).resolve()} (an earlier run's slice, not written again)" if reused else \
        f"wrote {Path(out).resolve()}"
    lines = [head, f"  budget {budget}, {size}", "loads in:"]
    lines += runtime_lines(m["runtimes"])
    lines += [f"warning: {w}" for w in m.get("warnings", [])]
    lines.append(f"next: elastic inspect {out}")
    return lines


def export_lines(info: dict) -> list[str]:
    if "out" not in info:
        return [f"export skipped: {info['skipped']}"]
    if info.get("format") == "edgellm":
        engine = info["engine"]
        return [f"exported {info['out']} (TensorRT Edge-LLM bundle for {info['device']['name']}, {info['precision']}, "
                f"context {engine['max_input_len']} x batch {engine['max_batch']})",
                f"next: on the Jetson, the commands in {info['out']}/README.md (build the engine, run it)"]
    if info.get("format") == "gguf":
        return [f"exported {info['file']} (GGUF {info['precision']} for llama.cpp, {human_bytes(info['bytes'])})",
                f"next: {info['next']}"]
    trt = info.get("tensorrt") or {}
    settings = trt.get("settings") or {}
    return [f"exported {info['out']} (ONNX opset {info.get('opset')})",
            f"  TensorRT {settings.get('precision', '?')} for {settings.get('device', '?')}, context "
            f"{settings.get('max_context', '?')} x batch {settings.get('max_batch', '?')}: "
            + ("engine built" if trt.get("built") else "not built here: run build_engines.sh on the device"),
            f"next: elastic generate {info['out']} \"Hello\""]


def smoke_line(smoke: dict) -> str:
    text = f" -> {smoke['text']!r}" if smoke.get("text") is not None else ""
    return f"smoke test: {smoke['new_tokens']} tokens{text}, {smoke['tokens_per_s']} tokens/s ({smoke['backend']})"
