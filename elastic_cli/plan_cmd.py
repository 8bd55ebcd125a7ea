"""``elastic plan``, ``elastic profiles`` and ``elastic fit-my-gpu``: which budget fits a device."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from elastic.profiles.units import GIB, table_unit
from elastic.slicer.formats.precision import AUTO, KV, PLAN_WEIGHTS, STATE, lookup
from elastic.slicer.planning.memory import DEFAULT_CONTEXT, DEFAULT_PREFILL_CHUNK

from .common import (CheckpointOpt, JsonOpt, boundary, canonical_precision, human_bytes, human_count, precision_choice,
                     print_json, progress_bar)


TargetOpt = Annotated[Optional[str], typer.Option(
    "--target", "-t", help="Plan for a device profile instead of this machine (see `elastic profiles`).",
    show_default=False)]
GpuOpt = Annotated[Optional[int], typer.Option("--gpu", help="Which GPU when there are several (default: most free memory).",
                                               show_default=False)]
ContextOpt = Annotated[int, typer.Option("--context", help="Tokens per sequence (prompt + output).", min=1)]
BatchOpt = Annotated[int, typer.Option("--batch", help="Sequences decoded together.", min=1)]
PlanDType = precision_choice("PlanDType", PLAN_WEIGHTS, AUTO)
PlanKV = precision_choice("PlanKV", KV, AUTO)
PlanState = precision_choice("PlanState", STATE, AUTO)
PrecisionOpt = Annotated[Optional[PlanDType], typer.Option(
    "--precision", case_sensitive=False, show_default=False,
    help="Weights precision. auto (default): the largest budget that fits, at the best precision that fits "
    "it: bf16 (fp16 where the device has no bf16), then fp8, nvfp4, int8 (SmoothQuant W8A8), int4 (AWQ W4A16), "
    "each only where the device runs it; on llama.cpp (the CPU host's engine) its GGUF types q8_0, q6_k, q5_k_m, "
    "q4_k_m. Or pin one: bf16, fp16, fp32, fp8, nvfp4, int8, int8_wo (weight-only), int4, q8_0, q6_k, q5_k_m, "
    "q4_k_m (any spelling); a quantized one the device does not run is refused.")]
DTypeOpt = Annotated[PlanDType, typer.Option("--dtype", case_sensitive=False,
                                       help="The same as --precision (its older name, kept for scripts).")]
KvOpt = Annotated[PlanKV, typer.Option("--kv-precision", case_sensitive=False,
                                       help="Attention KV cache: auto (the float precision of the weights), bf16, "
                                       "fp16, fp8 (where the device runs fp8), fp32.")]
StateOpt = Annotated[PlanState, typer.Option("--state-precision", case_sensitive=False,
                                             help="Mamba SSM state: auto (fp32), fp32, bf16, fp16.")]
RuntimeOpt = Annotated[Optional[str], typer.Option(
    "--runtime", help="Pin the engine: edgellm (TensorRT Edge-LLM), vllm, tensorrt-llm, llama.cpp; one the device "
    "runs (default: every engine of the device, preferred first).", show_default=False)]
ChunkOpt = Annotated[int, typer.Option("--prefill-chunk", help="Prompt tokens per forward pass.", min=1)]


class Fit(str, Enum):
    budgets = "budgets"
    exact = "exact"


FitOpt = Annotated[Fit, typer.Option(
    "--fit", case_sensitive=False,
    help="budgets: choose among the trained budgets. exact: also the largest architecture of any size whose "
    "memory fits (an exact integer program over the checkpoint's search space; the router's favourite within 2% "
    "below the largest size that fits), at the chosen budget's precision, shown beside the largest trained budget "
    "(plan --json: \"exact_fit\").")]


def _weights(dtype, precision) -> str:
    """The weights precision asked for: --precision, or --dtype (its older name); both only when they agree."""
    from elastic.slicer.errors import ConfigError

    old = canonical_precision(dtype, PLAN_WEIGHTS, AUTO) or AUTO
    new = canonical_precision(precision, PLAN_WEIGHTS, AUTO)
    if new is None or new == old:
        return old
    if old != AUTO and new != AUTO:
        raise ConfigError(f"--dtype {old} and --precision {new} disagree; --dtype is the older name of "
                          "--precision: give one")
    return new if new != AUTO else old


def _plan(checkpoint, target, gpu, context, batch, dtype, prefill_chunk, precision=None, kv=AUTO, state=AUTO,
          for_slicing=False, fit=Fit.budgets, runtime=None):
    """The plan of a command (``plan``, ``fit-my-gpu``): its options as the one plan builder
    (``planning.fit.build_plan``) takes them."""
    from elastic.slicer.planning.fit import build_plan

    return build_plan(checkpoint, target=target, gpu=gpu, context=context, batch=batch, dtype=AUTO,
                      prefill_chunk=prefill_chunk, weights=_weights(dtype, precision),
                      kv=canonical_precision(kv, KV, AUTO), state=canonical_precision(state, STATE, AUTO),
                      for_slicing=for_slicing, fit=getattr(fit, "value", fit), runtime=runtime)


def _weights_words(b) -> str:
    """A budget plan's weights as the user reads them: "int8 weights", "bfloat16 weights" (the one
    phrase for the dry run and the result, so both name what is really written)."""
    if b.weights_precision and b.weights_precision != lookup(b.dtype).short:
        return f"{b.weights_precision} weights"
    return f"{b.dtype} weights"


def render_plan(p: dict) -> str:
    """`elastic plan`'s table, from the plan's JSON form (the same view scripts read)."""
    dev, w = p["device"], p["workload"]
    lines = [
        f"device      {dev['name']} ({dev['kind']}, {dev['source']}): {human_bytes(dev['usable_bytes'])} usable"
        + (", shares system RAM" if dev["unified"] else ""),
    ]
    lines += [f"            {n}" for n in dev["notes"]]
    lines.append(f"workload    context {w['context']:,} x batch {w['batch']}, {w['dtype']}, "
                 f"prefill chunks of {w['prefill_chunk']}, margin {w['margin']:.0%}")
    lines.append(f"precision   weights {w['weights']}, KV cache {w['kv']}, SSM state {w['state']}, "
                 f"everything else {w['dtype']}")
    lines.append(f"params      {p['parameter_convention']}")
    lines += [f"note        {n}" for n in p["notes"]]
    unit, div = table_unit(max(b["terms"]["total"] for b in p["budgets"]))
    gib = lambda n: f"{n / div:8.2f}"  # noqa: E731
    lines.append("")
    # MoE: total parameters are resident (the weights term); active ones are computed per token
    moe = any(b["active_parameters"] != b["parameters"] for b in p["budgets"])
    lines.append(f"{'budget':<8}{'params':>9} " + (f"{'active':>8} " if moe else "")
                 + f"{'engine':>12} {'prec':>6} {'weights':>8} {'kv':>8} {'ssm':>8} {'activ':>8} "
                 f"{'overhd':>8} {'margin':>8} {'total':>8} {'headroom':>9}  fits   ({unit})")
    for b in p["budgets"]:
        t = b["terms"]
        mark = "yes" if b["fits"] else ("no: refused, see below" if b.get("refused") else "no")
        if b["name"] == p["chosen"]:
            mark += "  <- chosen"
        active = f"{human_count(b['active_parameters']):>8} " if moe else ""
        lines.append(f"{b['name']:<8}{human_count(b['parameters']):>9} {active}{b.get('runtime', ''):>12} "
                     f"{b['weights_precision']:>6} "
                     f"{gib(t['weights'])} "
                     f"{gib(t['kv_cache'])} {gib(t['ssm_state'])} {gib(t['activations'])} {gib(t['overhead'])} "
                     f"{gib(t['margin'])} {gib(t['total'])} {gib(b['headroom_bytes']):>9}  {mark}")
    for b in p["budgets"]:
        if b.get("refused"):
            lines.append(f"refused     {b['name']} at {b['weights_precision']}: {b['refused']}")
    for engine in dict.fromkeys(c.get("runtime", "") for c in p["candidates"]):
        tried = list(dict.fromkeys(c["weights_precision"] for c in p["candidates"] if c.get("runtime", "") == engine))
        if len(tried) < 2 and len(p["candidates"]) <= len(p["budgets"]):
            continue  # one option per budget: the table above says it all
        lines.append("")  # the alternatives: every budget at every precision tried, per engine
        lines.append(f"{'total at':<8}" + "".join(f"{q:>9}" for q in tried) + f"   ({unit}; * fits; {engine or 'any'})")
        for b in p["budgets"]:
            cells = {c["weights_precision"]: c for c in p["candidates"]
                     if c["budget"] == b["name"] and c.get("runtime", "") == engine}
            lines.append(f"{b['name']:<8}" + "".join(  # (an exact fit is planned at one precision only)
                f"{gib(cells[q]['terms']['total']):>8}{'*' if cells[q]['fits'] and not cells[q]['refused'] else ' '}"
                if q in cells else f"{'-':>8} " for q in tried))
    lines.append("")
    where = ("here" if dev["unified"] or dev["kind"] == "cpu" else "host RAM")
    lines.append(f"{'export':<8}{'export peak':>12}{'engine build':>13}   ({unit}; `elastic export` and a TensorRT "
                 f"build, in {'the memory above' if where == 'here' else 'the host RAM'})")
    for b in p["budgets"]:
        ok = {True: "fits here", False: "too big here: export elsewhere", None: ""}[b["export_here"]]
        lines.append(f"{b['name']:<8}{gib(b['export_peak_bytes']):>12}{gib(b['engine_build_bytes']):>13}   {ok}")
    lines.append("")
    if p["chosen"]:
        lines.append(f"chosen      {p['chosen']} at {p['chosen_precision']} on {p.get('chosen_runtime')}: the largest "
                     "budget that fits, on the device's preferred engine that holds it, at its best precision that fits")
        b = next(b for b in p["budgets"] if b["name"] == p["chosen"])
        d = b["weights_detail"]
        if d["quantized"] and b.get("runtime") == "llama.cpp":  # llama.cpp's GGUF types (planning.memory)
            lines.append(f"weights     {human_bytes(d['quantized'])} of {b['weights_precision']} matrices (embeddings "
                         f"and lm_head included) + {human_bytes(d['float'])} kept in float32 by llama.cpp (norms, "
                         "conv1d, A_log, D, dt_bias" + (", MoE gates)" if moe else ")"))
        elif d["quantized"]:
            lines.append(f"weights     {human_bytes(d['quantized'])} {b['weights_precision']} Linear weights + "
                         f"{human_bytes(d['scales'])} scales + {human_bytes(d['float'])} kept in {b['dtype']} "
                         "(embeddings, lm_head, norms, conv1d, A_log, D, dt_bias" + (", MoE gates)" if moe else ")"))
    else:
        lines.append("chosen      none: no budget fits")
        lines += [f"try         {s}" for s in p["suggestions"]]
    if "exact_fit" in p:
        lines += render_exact_fit(p)
    return "\n".join(lines)


def render_exact_fit(p: dict) -> list[str]:
    """`--fit exact`'s lines: the exact fit beside the largest trained budget that fits."""
    e, dev = p["exact_fit"], p["device"]
    if e is None:
        return ["exact fit   none: no architecture of the search space fits"]
    fitting = [b for b in p["budgets"] if b["fits"] and b["name"] != e["name"]]
    trained = max(fitting, key=lambda b: b["parameters"]) if fitting else None
    beside = (f"the largest trained budget that fits: {trained['name']}, {human_count(trained['parameters'])}"
              if trained else "no trained budget fits")
    return [f"exact fit   {human_count(e['parameters'])} parameters at {e['weights_precision']}: "
            f"{human_bytes(e['terms']['total'])} of {human_bytes(dev['usable_bytes'])} usable "
            f"(headroom {human_bytes(e['headroom_bytes'])}); {beside}",
            f"            layers {e['layer_pattern']}, hidden {e['spec']['hidden_size']}; {e['resolved_by']}",
            *quality_lines(e.get("quality"), trained),
            "            its spec: elastic plan ... --fit exact --json | jq .exact_fit.spec > spec.json; "
            "elastic slice --spec spec.json"]


def quality_lines(q: dict | None, trained: dict | None) -> list[str]:
    """The quality measure under the exact fit: what the checkpoint's size curve (size_curve.json)
    says of it, and the measured perplexity of the trained budget beside it where the curve has it."""
    if not q:
        return []
    lines = [f"quality     {q['words']}" + ("; not offered: choose the trained budget" if q["verdict"] == "outside"
                                             else "")]
    if trained is not None:
        near = next((n for n in q["neighbours"] if n["budget"] == trained["name"]), None)
        if near is not None:
            lines.append(f"            trained budget {trained['name']}: measured perplexity {near['perplexity']:.3f}")
    return lines


def plan(
    checkpoint: CheckpointOpt = None,
    target: TargetOpt = None,
    gpu: GpuOpt = None,
    context: ContextOpt = DEFAULT_CONTEXT,
    batch: BatchOpt = 1,
    precision: PrecisionOpt = None,
    dtype: DTypeOpt = PlanDType(AUTO),
    kv_precision: KvOpt = PlanKV(AUTO),
    state_precision: StateOpt = PlanState(AUTO),
    prefill_chunk: ChunkOpt = DEFAULT_PREFILL_CHUNK,
    fit: FitOpt = Fit.budgets,
    runtime: RuntimeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show the memory every budget needs on this machine (or --target), at every weights precision
    the device runs, and which budget fits at which precision.

    Works from config.json (+ elastic_config.json) alone: plan before downloading the weights.

    Examples:

      elastic plan

      elastic plan -c examples/nemotron-elastic-12b --target orin-nano-8gb --context 32768

      elastic plan --target rtx-4090 --precision fp8 --kv-precision fp8

      elastic plan --target rtx-4090 --json | jq '.chosen, .chosen_precision'

      elastic plan -c examples/nemotron-elastic-12b --target orin-nano-8gb --fit exact

      elastic plan -c examples/nemotron-elastic-12b --target orin-nx-16gb --runtime llama.cpp
    """
    with boundary(json_out):
        p = _plan(checkpoint, target, gpu, context, batch, dtype, prefill_chunk, precision, kv_precision,
                  state_precision, fit=fit, runtime=runtime).to_json()
    if json_out:
        print_json(p)
    else:
        typer.echo(render_plan(p))


def profiles_(json_out: JsonOpt = False) -> None:
    """List the known device profiles (use a name with --target).

    Examples:

      elastic profiles

      elastic plan --target agx-orin-64gb
    """
    from elastic.profiles.devices import load_profiles

    with boundary(json_out):
        profs = load_profiles()
    if json_out:
        print_json([p.to_json() for p in profs.values()])
        return
    typer.echo(f"{'name':<18}{'device':<34}{'memory':>9}{'reserve':>9}  {'bf16':<5}{'fp8':<4} {'unified':<8}"
               "quantized")
    for p in profs.values():
        quantized = " ".join(q for q in ("fp8", "nvfp4", "int8", "int4") if getattr(p.caps, q)) or "-"
        typer.echo(f"{p.name:<18}{p.display_name:<34}{p.memory_bytes / GIB:>8.0f}G{p.reserve_bytes / GIB:>8.1f}G  "
                   f"{'yes' if p.caps.bf16 else 'no':<5}{'yes' if p.caps.fp8 else 'no':<4} {'yes' if p.unified else 'no':<8}"
                   f"{quantized}")


def fit_my_gpu(
    checkpoint: CheckpointOpt = None,
    target: TargetOpt = None,
    gpu: GpuOpt = None,
    context: ContextOpt = DEFAULT_CONTEXT,
    batch: BatchOpt = 1,
    precision: PrecisionOpt = None,
    dtype: DTypeOpt = PlanDType(AUTO),
    kv_precision: KvOpt = PlanKV(AUTO),
    state_precision: StateOpt = PlanState(AUTO),
    prefill_chunk: ChunkOpt = DEFAULT_PREFILL_CHUNK,
    fit: FitOpt = Fit.budgets,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write the model "
                                                "(default: ./elastic-model-<budget>).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists and is empty or written by elastic (anything else is refused).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan and choose, write nothing.")] = False,
    export: Annotated[bool, typer.Option("--export/--no-export", help="After slicing, export what the planned "
                                         "engine needs: a GGUF for llama.cpp (OUT/gguf), a TensorRT Edge-LLM bundle "
                                         "for a Jetson (OUT/edgellm); vLLM and TensorRT-LLM load OUT itself.")] = True,
    json_out: JsonOpt = False,
) -> None:
    """Detect the GPU, pick the largest budget that fits, slice it, export it, and check that it runs.

    Budget and weights precision are chosen together: the device's float precision, or a quantized
    one it runs (fp8, int8, int4, nvfp4; written by NVIDIA Model Optimizer, `pip install -e
    ".\\[modelopt]"`) when that fits a larger budget. --precision pins one.

    Examples:

      elastic fit-my-gpu                                   # the bundled demo, this machine

      elastic fit-my-gpu -c ./Nemotron-Elastic-12B --context 32768 --out ./model

      elastic fit-my-gpu -c ./Nemotron-Elastic-12B --target orin-nano-8gb --dry-run
    """
    from elastic.export.workflow import fit_my_gpu as run_fit
    from elastic.slicer.errors import ElasticError
    from elastic.slicer.planning.fit import default_out

    with boundary(json_out) as on_error:
        planned = _plan(checkpoint, target, gpu, context, batch, dtype, prefill_chunk, precision, kv_precision,
                        state_precision, for_slicing=True, fit=fit).choose_exact()
        p = planned.to_json()
        if not json_out:
            typer.echo(render_plan(p))
        if planned.chosen is None:
            on_error.update(p, out=None)  # the plan that found no fit, in the error's JSON object
            raise ElasticError("no budget fits this device; see the suggestions above")
        chosen = planned.budget(planned.chosen)
        dest = out or default_out(planned.chosen)
        if dry_run:
            if json_out:
                print_json(p | {"out": None})
            else:
                from elastic.export.workflow import run_commands

                typer.echo(f"\ndry run: would write budget {planned.chosen} ({_weights_words(chosen)}) to {dest}, "
                           f"for {chosen.why}; then run it with: " + "; ".join(run_commands(planned, chosen.name, dest)))
            return
        with progress_bar(f"{planned.chosen} to {dest}", enabled=not json_out) as advance:
            fit = run_fit(planned, out=dest, force=force, export=export, progress=advance)
    if json_out:
        print_json(fit.to_json())
        return
    typer.echo("\n".join(_fit_lines(fit, dest, chosen)))


def _fit_lines(fit, dest: Path, chosen) -> list[str]:
    """What fit-my-gpu did, in words: the slice, the export, the smoke test and how to run it."""
    p = fit.to_json()
    result, exported, smoke = fit.slice, p["export"], fit.smoke
    text = f" -> {smoke['text']!r}" if smoke.get("text") is not None else ""
    speed = smoke["tokens_per_s"]
    runner = {"onnx": "ONNX Runtime", "llama.cpp": "llama.cpp"}.get(smoke["backend"], "PyTorch reference")
    lines = [
        "",
        f"{'kept' if fit.slice_reused else 'wrote':<12}{dest}  (budget {p['chosen']}, "
        f"{human_count(result.parameters)} parameters, {_weights_words(chosen)}, {human_bytes(result.bytes_written)}"
        + ("; an earlier run's slice, not written again)" if fit.slice_reused else ")"),
    ]
    if exported.get("format") == "gguf":
        fell = f"; {len(exported['fallbacks'])} tensor(s) fell back" if exported["fallbacks"] else ""
        lines.append(f"exported    {exported['file']}  (GGUF {exported['precision']} for llama.cpp, "
                     f"{human_bytes(exported['bytes'])}{fell})")
    elif exported.get("format") == "edgellm":
        lines.append(f"exported    {exported['out']}  (TensorRT Edge-LLM bundle for {exported['device']['name']}, "
                     f"{exported['precision']}; the engine is built on the Jetson: see its README.md)")
    elif "out" in exported:
        trt = exported.get("tensorrt") or {}
        lines.append(f"exported    {exported['out']}  (ONNX opset {exported.get('opset')}; TensorRT engine "
                     + ("built)" if trt.get("built") else "not built here: run build_engines.sh on the device)"))
    else:
        lines.append(f"export      skipped: {exported['skipped']}")
    lines.append(f"smoke test  {smoke['new_tokens']} tokens{text}, {speed} tokens/s ({runner})")
    lines += [f"{'run' if i == 0 else '':<12}{c}" for i, c in enumerate(p["run"])]
    return lines
