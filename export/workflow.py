"""The workflows the CLI and the TUI run, as library calls with typed results: plan for a target,
slice a planned budget, export it for the plan's target, and fit-my-gpu (plan, slice, export, smoke
test). The front ends parse, call one of these and render what they return.

The plan is made once (one checkpoint opening, one target decision, every budget resolved once)
and handed down: slicing takes the planned spec and dtype, the export takes the planned target,
context and batch. Everything reports through one progress protocol, ``progress(stage, done,
total, **detail)`` (``elastic.profiles.progress``) with ``total`` None when a stage has no size.

Example:
    >>> p = make_plan("./Nemotron-Elastic-12B", target="orin-nx-16gb", context=32768)
    >>> result = fit_my_gpu(p, out="./model")
    >>> result.to_json()["smoke"]["tokens_per_s"]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from elastic.profiles.progress import Progress
from elastic.slicer.errors import ElasticError, MissingDependencyError
from elastic.slicer.storage.outputs import check_output
from elastic.slicer.planning.fit import Plan, build_plan, default_out, slice_budget


make_plan = build_plan  # ``elastic plan`` as a library call: the one plan builder (``planning.fit.build_plan``)


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


def llama_cpp_engine(p: Plan, name: str) -> bool:
    """Whether budget ``name`` goes to llama.cpp as a GGUF: the plan chose llama.cpp for it (the CPU
    host's engine; elsewhere when no engine before it holds the budget), llama.cpp's tools installed
    (else :func:`llama_cpp_missing` says so and nothing is exported), no Model Optimizer format, and
    a model and tokenizer llama.cpp can hold (else elastic's ONNX graphs, for ONNX Runtime)."""
    from elastic.slicer.formats.llama_cpp import gguf_problems, gguf_tokenizer_problem

    b = p.budget(name)
    if b.runtime != "llama.cpp" or _quantized(b) or llama_cpp_missing():
        return False
    spec = p.budget(name).spec
    return not gguf_problems(spec.child_arch(p.checkpoint.arch)) and gguf_tokenizer_problem(p.checkpoint.root) is None


def llama_cpp_missing() -> str | None:
    """What to install for llama.cpp's GGUF writer and runtime (None: both are here)."""
    from importlib.util import find_spec

    if None in (find_spec("gguf"), find_spec("llama_cpp")):
        return "llama.cpp's tools are not installed: pip install 'elastic[gguf]'"
    return None


def export_planned(p: Plan, model_dir: str | Path, *, progress: Progress | None = None, budget: str | None = None):
    """Export a sliced model for the engine the plan chose, at the plan's target, context and batch:
    llama.cpp (:func:`llama_cpp_engine`): a GGUF in MODEL_DIR/gguf (``gguf.GgufResult``); TensorRT
    Edge-LLM: its exporter's bundle in MODEL_DIR/edgellm (``edgellm.EdgeLLMResult``), the engine built
    on the Jetson; otherwise elastic's ONNX graphs and the TensorRT engine or its build script in
    MODEL_DIR/export (``pipeline.ExportResult``).

    Raises:
        ElasticError: the engine loads the slice's directory itself (vLLM, TensorRT-LLM): nothing to export.
        MissingDependencyError: the engine's exporter is not installed (:func:`_export_why` says so first).
    """
    name = budget or p.chosen
    runtime = p.budget(name).runtime if name is not None else ""
    if runtime in DIRECTORY_ENGINES:
        raise ElasticError(_directory_engine(runtime))
    if runtime == "edgellm":
        from .edgellm import export_edgellm

        device = p.detection.chosen.profile if p.detection is not None else None  # detected here: its profile
        return export_edgellm(model_dir, Path(model_dir) / "edgellm", target=p.target.profile or device,
                              max_batch=p.workload.batch, max_context=p.workload.context, force=True,
                              progress=progress)
    missing = llama_cpp_missing() if runtime == "llama.cpp" else None
    if missing:  # not elastic's ONNX graphs in its place
        raise MissingDependencyError(missing)
    if name is not None and llama_cpp_engine(p, name):
        from .gguf import export_gguf

        b = p.budget(name)  # a llama.cpp type (q4_k_m, ...) is made by llama.cpp's quantizer from the float slice
        return export_gguf(model_dir, Path(model_dir) / "gguf", precision=b.written_weights.name,
                           force=True, progress=progress)
    from .pipeline import export_model

    return export_model(model_dir, Path(model_dir) / "export", format="all", target=p.target,
                        max_batch=p.workload.batch, max_context=p.workload.context, force=True, progress=progress)


def smoke(p: Plan, model_dir: str | Path, exported=None) -> dict[str, Any]:
    """A short greedy generation from what was produced: the GGUF in llama.cpp or the exported
    graphs in ONNX Runtime when there are some, else (nothing exported, or an Edge-LLM bundle, whose
    engine is built on the Jetson) the slice in the PyTorch reference (float32 on a CPU target)."""
    made = exported.to_json().get("format") if exported is not None else None
    if exported is not None and made != "edgellm":  # an Edge-LLM bundle's engine is built on the Jetson
        from .runtime import generate_text

        if made == "gguf":
            return generate_text(exported.file, "Hello", backend="llama.cpp", max_new_tokens=16)
        return generate_text(exported.out, "Hello", backend="onnx", max_new_tokens=16)
    from elastic.slicer.nn.smoke import smoke_test

    return smoke_test(model_dir, dtype="float32" if p.target.kind == "cpu" else None)


def run_commands(p: Plan, name: str, dest: str | Path, exported=None) -> list[str]:
    """The commands that run budget ``name`` of ``p``, sliced to ``dest``, on the engine the plan
    chose for it: a GGUF in llama.cpp, an Edge-LLM bundle built on the Jetson, or the Hugging Face
    directory served by vLLM / TensorRT-LLM."""
    import shlex

    b, d = p.budget(name), shlex.quote(str(dest))
    done = exported.to_json() if exported is not None else {}
    if b.runtime == "llama.cpp":
        if done.get("format") == "gguf":
            f = shlex.quote(str(done["file"]))
            return [f"elastic generate {f} \"Hello\"", f"llama-cli -m {f}"]
        return [f"elastic export {d} --format gguf --precision {b.weights_precision} --out {d}/gguf",
                f"llama-cli -m {d}/gguf/<the .gguf file it wrote>"]
    if b.runtime == "edgellm":
        where = p.target.profile or "<this Jetson's profile>"
        bundle = shlex.quote(f"{dest}/edgellm")
        if done.get("format") == "edgellm":
            return [f"on the Jetson, the commands in {bundle}/README.md (build the engine, run it)"]
        return [f"elastic export {d} --format edgellm --target {where} --precision {b.weights_precision} "
                f"--out {bundle}", f"then, on the Jetson, the commands in {bundle}/README.md (build the engine, run it)"]
    if b.runtime == "tensorrt-llm":
        return [f"trtllm-serve {d}"]
    return [f"vllm serve {d}"]  # vllm, and the default of a plan made without engines


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
    slice_reused: bool = False  # ``out`` already held this slice (an earlier run's, whose export failed)

    def to_json(self) -> dict[str, Any]:
        """`elastic fit-my-gpu --json`: the plan's keys plus ``out``, ``slice`` (``reused``: an
        earlier run's slice, not written again), ``export``, ``smoke``, ``run`` (the commands that run
        it on the engine the plan chose)."""
        return self.plan.to_json() | {
            "run": run_commands(self.plan, self.budget, self.out, self.export),
            "out": str(self.out),
            "slice": {"parameters": self.slice.parameters, "bytes_written": self.slice.bytes_written,
                      "runtimes": self.slice.manifest["runtimes"], "reused": self.slice_reused},
            "export": self.export.to_json() if self.export is not None else {"skipped": self.export_skipped},
            "smoke": self.smoke,
        }


class SliceKeptError(ElasticError):
    """fit-my-gpu wrote its slice, then exporting it failed: the slice stays (complete and usable),
    nothing of the export was kept, and the same command run again exports the slice it finds."""


def _slice_kept(dest: Path, result, reused: bool, reusable: bool, e: ElasticError | OSError) -> SliceKeptError:
    """The error of an export that failed after its slice was written: what is on disk, then why,
    then how to finish (a float slice is reused by the same command; a quantized one is sliced again)."""
    from elastic.slicer.storage.outputs import REPLACE, DiskFullError, size_text

    again = ("run the same command again to export it: the slice is reused, not written again" if reusable else
             "run the same command again, replacing the slice")
    if isinstance(e, DiskFullError):  # the disk's numbers, then what to do here (not "another directory")
        why, problems, hint, fix = f"{e.path}: {e.head}", [], None, f"free some space on that disk, then {again}"
    elif isinstance(e, ElasticError):
        why, problems, hint, fix = e.headline, e.problems, e.hint, again
    else:
        why, problems, hint, fix = f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}", [], None, again
    err = SliceKeptError(
        f"the slice in {dest} is complete and usable ({size_text(result.bytes_written)}, "
        f"{'kept from an earlier run' if reused else 'written by this run'}), but exporting it failed: {why}. "
        f"Nothing of the export was kept; {fix}", problems=problems, hint=hint or (None if reusable else REPLACE))
    err.slice_out, err.export_error = dest, e
    return err


# engines that load the slice's Hugging Face directory itself: fit-my-gpu's deliverable for them is the slice
DIRECTORY_ENGINES = ("vllm", "tensorrt-llm")


def _directory_engine(runtime: str) -> str:
    from elastic.slicer.planning.engines import ENGINES

    return f"{ENGINES[runtime].title} loads the slice's Hugging Face directory as it is: there is nothing to export for it"


def _export_why(p: Plan, name: str, export: bool) -> str | None:
    """Why fit-my-gpu will not export budget ``name`` (None: it will)."""
    if export and llama_cpp_engine(p, name):
        return None  # a GGUF: no ONNX tracing, no engine build
    b = p.budget(name)
    if export and b.runtime in DIRECTORY_ENGINES:
        return _directory_engine(b.runtime)
    if export and b.runtime == "edgellm":  # its own exporter, installed apart (its transformers pin)
        why = _edgellm_why(b)
    elif export and b.runtime == "llama.cpp" and (missing := llama_cpp_missing()):  # no ONNX graphs for it
        why = missing
    else:
        why = export_unavailable() if export else "export not asked for"
        if why is None:
            from .pipeline import untraced_layers

            why = untraced_layers(p.checkpoint.arch)
    if why is None and b.export_here is False:  # it runs here, but exporting it here would run out of memory
        from elastic.slicer.planning.fit import export_advice

        why = export_advice(b, p.target)
    return why


def _edgellm_why(b) -> str | None:
    """Why TensorRT Edge-LLM's exporter will not run on budget ``b`` here (None: it will): the plan
    refused the budget on it (its rules: MoE only as nvfp4, int4 widths; planning.engines), or the
    exporter is not installed."""
    from .edgellm import find_exporter

    if b.refused:
        return b.refused
    try:
        find_exporter()
    except MissingDependencyError as e:
        return e.message
    return None


def _quantized(b) -> bool:
    return b.weights is not None and b.weights.quantized


def reusable_slice(p: Plan, name: str, dest: Path):
    """``dest`` as a ``SliceResult`` when it already holds exactly the slice fit-my-gpu would write
    for budget ``name`` (elastic's own complete output: every file its marker lists, nothing else;
    the same source, spec and dtype; written after the source's weights) and no export yet, else None.
    A float slice only: a quantized one depends on its calibration too."""
    import hashlib
    import json

    from elastic.slicer.formats.precision import lookup
    from elastic.slicer.slice import MANIFEST_NAME, SliceResult
    from elastic.slicer.storage.outputs import MARKER, own_output

    b, ckpt = p.budget(name), p.checkpoint
    files = own_output(dest, "slice")
    if files is None or _quantized(b) or any((dest / d).exists() for d in ("export", "gguf")):
        return None
    try:
        m = json.loads((dest / MANIFEST_NAME).read_text())
        same = (m.get("format") == "elastic-slice" and "precision" not in m
                and m.get("budget") == (b.name if ckpt.is_elastic else None)
                and m.get("spec") == json.loads(json.dumps(b.spec.to_json(ckpt.arch)))
                and m.get("dtype") == lookup(b.dtype).name
                and m["source"]["path"] == str(ckpt.root.resolve())
                and m["source"]["config_sha256"] == hashlib.sha256((ckpt.root / "config.json").read_bytes()).hexdigest()
                and all(f["file"] in files for f in m["shards"])
                and all(w.stat().st_mtime <= (dest / MARKER).stat().st_mtime for w in ckpt.weight_files))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not same:
        return None
    size = sum((dest / f).stat().st_size for f in files if (dest / f).is_file()) + (dest / MARKER).stat().st_size
    return SliceResult(dest, m["parameters"]["total"], size, m)


def _preflight(p: Plan, name: str, dest: Path, reused: bool, exporting: bool) -> None:
    """Refuse before anything is written when the slice and its export together cannot fit on
    ``dest``'s disk (a float slice's weights and a float32 export: the parts of known size)."""
    from elastic.slicer.storage.outputs import require_space

    from .pipeline import export_disk_bytes

    b = p.budget(name)
    if _quantized(b):
        return
    needed = (0 if reused else b.terms.get("weights", 0)) + (export_disk_bytes(b.parameters) if exporting else 0)
    what = "the slice and its export" if exporting and not reused else "the export" if exporting else "the slice"
    require_space(dest, needed, what)


def fit_my_gpu(p: Plan, *, budget: str | None = None, out: str | Path | None = None, force: bool = False,
               export: bool = True, progress: Progress | None = None) -> FitResult:
    """Slice the plan's chosen budget (or ``budget``), export it for the plan's target, context and
    batch (unless the plan says the export or the engine build would not fit this device's memory:
    ``export_skipped`` then says how to export it elsewhere), and check that it runs.

    Where ``out`` already holds exactly this slice and no export (a run whose export failed), the
    slice is kept and only exported (``slice_reused``); ``force`` slices again.

    Raises:
        ElasticError: no budget fits (the plan's suggestions say what would), or any failure of the
            steps (the output directory is then left as it was).
        DiskFullError: the slice and its export cannot fit on the output's disk (nothing written).
        SliceKeptError: the slice was written but its export failed: the message says so, names
            the slice and carries the export's error (a full disk included).
    """
    name = budget or p.chosen
    if name is None:
        raise ElasticError("no budget fits this device; see the plan's suggestions")
    dest = Path(out) if out is not None else default_out(name)
    p.checkpoint.require_weights()  # a config-only checkpoint is said before any disk is asked for
    why = _export_why(p, name, export)
    result = None if force or why is not None else reusable_slice(p, name, dest)
    reused = result is not None
    if not reused:
        check_output(dest, force=force)  # an output that may not be written is said before its disk space
    _preflight(p, name, dest, reused, why is None)
    if result is None:
        result = slice_planned(p, name, dest, force=force, progress=progress)
    exported = None
    if why is None:
        try:
            exported = export_planned(p, dest, progress=progress, budget=name)
        except (ElasticError, OSError) as e:
            raise _slice_kept(dest, result, reused, not _quantized(p.budget(name)), e) from e
    if progress:
        progress("smoke test", 0, None)
    return FitResult(p, name, dest, result, exported, why, smoke(p, dest, exported), reused)
