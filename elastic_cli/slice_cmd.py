"""``elastic slice``: cut a nested model out of a checkpoint into a dense checkpoint."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from elastic.slicer.formats.padding import ONE_WIDTH_RUNTIMES, RUNTIMES
from elastic.slicer.formats.precision import KEEP, QUANTIZED, WEIGHTS

from .common import (CheckpointOpt, JsonOpt, boundary, canonical_precision, human_bytes, human_count, precision_choice,
                     print_json, progress_bar, runtime_lines)

SliceDType = precision_choice("SliceDType", WEIGHTS, KEEP)
SlicePrecision = precision_choice("SlicePrecision", WEIGHTS + QUANTIZED)


class Form(str, Enum):
    auto = "auto"
    stock = "stock"
    puzzle = "puzzle"


Runtime = Enum("Runtime", {r: r for r in RUNTIMES}, type=str)


def slice_(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (new, or with --force an empty one or one elastic wrote).")],
    budget: Annotated[Optional[str], typer.Option("--budget", "-b", help="A budget of the elastic checkpoint "
                                                  "(see `elastic inspect`), or any size: 60%, 7.5B, 6GiB (resolved "
                                                  "between the trained budgets; the manifest says so).",
                                                  show_default=False)] = None,
    spec: Annotated[Optional[Path], typer.Option("--spec", help="A slice spec JSON file instead of a budget "
                                                 "(works on any nemotron_h checkpoint): per-layer sizes, or one flat "
                                                 "object in NVIDIA's terms (hidden_size, mamba_num_heads, "
                                                 "num_moe_experts, moe_ffn_hidden_size, num_layers, ...; "
                                                 "docs/elastic-format.md).", show_default=False)] = None,
    checkpoint: CheckpointOpt = None,
    dtype: Annotated[SliceDType, typer.Option("--dtype", case_sensitive=False,
                                       help="keep the stored dtype, or cast the weights to any spelling of "
                                       "bfloat16, float16, float32 (e.g. fp16 for GPUs without bf16). With a "
                                       "quantized --precision: the dtype of the tensors it leaves "
                                       "unquantized.")] = SliceDType(KEEP),
    precision: Annotated[Optional[SlicePrecision], typer.Option(
        "--precision", case_sensitive=False, show_default=False,
        help="A float precision (as --dtype), or a quantized one made with NVIDIA Model Optimizer: fp8, int8 "
        "(SmoothQuant W8A8), int8_wo, int4 (AWQ), nvfp4; calibrated on bundled text "
        "(pip install 'elastic\\[modelopt]').")] = None,
    form: Annotated[Form, typer.Option("--form", case_sensitive=False, help="stock: one size per layer kind, every "
                                       "MLP width (and attention head count) zero-padded to the largest, a stock "
                                       "nemotron_h every runtime loads (exact: relu2(0) = 0); per-layer Mamba sizes "
                                       "cannot be padded and are refused. puzzle: as cut (NVIDIA's Puzzle form for "
                                       "per-layer MLP widths). auto: stock when --runtime takes one MLP width ("
                                       + ", ".join(ONE_WIDTH_RUNTIMES) + "), else puzzle.")] = Form.auto,
    pad_multiple: Annotated[Optional[int], typer.Option("--pad-multiple", min=1, show_default=False,
                                                        help="Round every MLP width up to a multiple of this "
                                                        "(128: int4 AWQ's group), with zeros.")] = None,
    runtime: Annotated[Optional[Runtime], typer.Option("--runtime", case_sensitive=False, show_default=False,
                                                       help="The runtime the slice is for (decides --form auto).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists and is empty or written by elastic (anything else is refused).")] = False,
    allow_off_curve: Annotated[bool, typer.Option("--allow-off-curve", help="Slice a size between the trained "
                                                  "budgets even where the checkpoint's size curve (size_curve.json, "
                                                  "`elastic eval --curve`) measured its perplexity outside its trained "
                                                  "neighbours' (refused otherwise).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Physically slice a checkpoint along a budget (or a spec) into dense safetensors.

    The result is a standard nemotron_h checkpoint with a slice_manifest.json saying what it is
    and which runtimes load it. It is written to a temporary directory and renamed when complete:
    a failed or interrupted run leaves nothing under --out.

    A quantized --precision slices in float32 to a temporary directory beside --out, calibrates
    on bundled text (the train split of the demo's standard-library corpus) and writes NVIDIA
    Model Optimizer's checkpoint (what vLLM, TensorRT-LLM and SGLang read); `elastic generate`
    and `elastic eval` run it too.

    A size between the trained budgets (60%, 7.5B, 6GiB) is checked against the checkpoint's
    measured size curve (size_curve.json, written by `elastic eval --curve --out`): measured
    between its trained neighbours, the manifest says its perplexity; measured outside them, it is
    refused; not measured, the manifest and a warning say so.

    Examples:

      elastic slice --budget 50% --out ./model-50

      elastic slice -c ./Nemotron-Elastic-12B --budget 6B --dtype float16 --out ./model-6B

      elastic slice -c ./Nemotron-Elastic-12B --budget 6B --precision int4 --out ./model-6B-int4

      elastic slice --budget 50% --form stock --pad-multiple 128 --out ./model-50-stock

      elastic slice -c ./dense-model --spec spec.json --out ./pruned --json
    """
    with boundary(json_out):
        quantized, dtype_name = _precisions(precision, dtype)
        result = _run(checkpoint, out, budget, spec, quantized, dtype_name, form, pad_multiple, runtime, force,
                      allow_off_curve, not json_out)
    if json_out:
        print_json(result.to_json())
        return
    typer.echo("\n".join(_result_lines(result, budget, spec, quantized)))


def _run(checkpoint: Path | None, out: Path, budget: str | None, spec: Path | None, quantized: str | None,
         dtype_name: str | None, form: Form, pad_multiple: int | None, runtime, force: bool,
         allow_off_curve: bool, show: bool):
    """The slice (quantized where asked): the checkpoint opened, the spec resolved once, one library call."""
    from elastic.slicer.storage.reader import Checkpoint
    from elastic.slicer.planning.describe import default_checkpoint
    from elastic.slicer.slice import choose_spec, slice_checkpoint

    if quantized is not None:
        from elastic.slicer.quantize.workflow import quantized_precision, require_device, require_modelopt

        require_modelopt()  # refused before the checkpoint is read
        require_device(quantized_precision(quantized))
    ckpt = Checkpoint.open(checkpoint or default_checkpoint(), require_weights=True)
    shape = {"form": form.value, "pad_multiple": pad_multiple, "runtime": runtime.value if runtime else None,
             "resolved": choose_spec(ckpt, budget, spec, allow_off_curve=allow_off_curve)}  # resolved once
    with progress_bar(f"slicing to {out}", enabled=show) as advance:
        if quantized is None:
            return slice_checkpoint(ckpt, out, budget=budget, spec=spec, dtype=dtype_name, force=force,
                                    progress=advance, **shape)
        from elastic.slicer.quantize.workflow import slice_and_quantize

        return slice_and_quantize(ckpt, out, quantized, budget=budget, spec=spec, dtype=dtype_name,
                                  force=force, progress=advance, **shape)


def _result_lines(result, budget: str | None, spec: Path | None, quantized: str | None) -> list[str]:
    """What was written, in words: the head line, layers, form, quality, runtimes, warnings, next."""
    m = result.manifest
    what = f"budget {budget}" if budget else f"spec {spec}"
    if quantized is None:
        head = (f"wrote {result.out}  ({what}, {human_count(result.parameters)} parameters, {m['dtype']}, "
                f"{human_bytes(result.bytes_written)})")
    else:
        q = m["quantization"]
        group = f", group {q['group_size']}" if q.get("group_size") else ""
        head = (f"wrote {result.out}  ({what}, {human_count(m['parameters']['total'])} parameters, {result.precision} "
                f"({q['quant_algo']}{group}; unquantized tensors {m['dtype']}), weights "
                f"{human_bytes(result.weights_bytes)}, {human_bytes(result.bytes_written)} in all)\n"
                f"quantized with {q['tool']} {q['modelopt_config']}, calibrated on {q['calibration']['windows']} x "
                f"{q['calibration']['seq_len']} tokens of train-split standard-library text")
    quality = m.get("quality") or {}
    lines = [head, f"layers  {m['layer_pattern']}", *form_lines(m.get("form")),
             *([f"quality {quality['words']}"] if quality.get("perplexity") is not None else []), "loads in:",
             *runtime_lines(m["runtimes"])]
    lines += [f"warning: {w}" for w in m.get("warnings", [])]
    lines.append(f"next:   elastic inspect {result.out}" if quantized is None else
                 f"next:   elastic eval {result.out}    elastic generate {result.out} \"Hello\"")
    return lines


def _precisions(precision, dtype) -> tuple[str | None, str | None]:
    """(the quantized precision or None, the float dtype for slice_checkpoint / the unquantized tensors)
    from --precision and --dtype; a float --precision is --dtype under another name."""
    from elastic.slicer.errors import ConfigError
    from elastic.slicer.formats.precision import lookup

    dtype_name = canonical_precision(dtype, WEIGHTS, KEEP)
    dtype_name = None if dtype_name == KEEP else dtype_name
    if precision is None:
        return None, dtype_name
    p = lookup(getattr(precision, "value", precision), WEIGHTS + QUANTIZED)
    if p.quantized:
        return p.name, dtype_name
    if dtype_name not in (None, p.name):
        raise ConfigError(f"--precision {p.name} and --dtype {dtype_name} say two things; give one")
    return None, p.name


def form_lines(form: dict | None) -> list[str]:
    """The manifest's ``form`` in words: the config form written and each padded size with its cost."""
    if not form:
        return []
    if not form["padding"]:
        return [f"form    {form['config_form']} (no padding)"]
    pads = ", ".join(f"layer {p['layer']} {p['field']} {p['from']} -> {p['to']}" for p in form["padding"][:6])
    more = f" and {len(form['padding']) - 6} more" if len(form["padding"]) > 6 else ""
    c = form["cost"]
    return [f"form    {form['config_form']} (was {form['compact_config_form']}), zero-padded: {pads}{more}",
            f"        padding costs {human_count(c['parameters'])} parameters, {human_bytes(c['bytes'])} "
            f"({c['fraction']:.1%} of the compact slice), all zeros"]
