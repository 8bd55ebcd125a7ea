"""``elastic export``: ONNX Runtime graphs (and a trtexec script), a GGUF for llama.cpp, or a TensorRT
Edge-LLM bundle for a Jetson."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from elastic.slicer.formats.precision import AUTO, ENGINES, GGUF, QUANTIZED, WEIGHTS
from elastic.slicer.planning.memory import DEFAULT_EXPORT_CONTEXT

from .common import (JsonOpt, boundary, canonical_precision, human_bytes, one_checkpoint, precision_choice,
                     print_json, progress_bar)


class Format(str, Enum):
    onnx = "onnx"
    tensorrt = "tensorrt"
    all = "all"
    gguf = "gguf"
    edgellm = "edgellm"


# TensorRT's precisions for trtexec, llama.cpp's for a GGUF, Edge-LLM's (Model Optimizer's quantized
# formats) for a bundle: the library refuses one the format or the device lacks
EnginePrecision = precision_choice("EnginePrecision", tuple(dict.fromkeys(ENGINES + GGUF + QUANTIZED)), AUTO)
GraphDType = precision_choice("GraphDType", WEIGHTS)  # the library says why bfloat16 graphs are refused


def _stage(enabled: bool):
    """The library's progress on stderr: a line for each new stage or message (the message, else the
    stage's name), not one per step of a stage."""
    if not enabled:
        return None
    shown = {"stage": None, "message": None}

    def say(stage: str, done: int, total: int | None, /, message: str | None = None, **_) -> None:
        if stage != shown["stage"] or (message and message != shown["message"]):
            typer.echo(f"  {message or stage} ...", err=True)
        shown["stage"], shown["message"] = stage, message or shown["message"]

    return say


def export(
    model_dir: Annotated[Optional[Path], typer.Argument(help="A dense model directory (e.g. from `elastic slice`), or "
                                                        "an export directory with --check-only (or -c).",
                                                        show_default=False)] = None,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", "-c", help="The model directory, as an "
                                                       "option.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output directory (must not exist unless "
                                                "--force).", show_default=False)] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="onnx: elastic's own ONNX Runtime graphs (prefill/"
                                        "decode with explicit state; `elastic generate --backend onnx` runs them); "
                                        "tensorrt: the same graphs plus a trtexec script (trtexec engines of these "
                                        "graphs where TensorRT and a GPU are here; no deployment runtime loads "
                                        "them); all: both; gguf: one GGUF file for llama.cpp (pip install -e "
                                        "\".\\[gguf]\"); edgellm: a TensorRT Edge-LLM bundle for a Jetson Orin / "
                                        "Thor (--target): Edge-LLM's own ONNX and the commands that build and run "
                                        "its TensorRT engine there (its exporter in .venv-edgellm, see docs/engines.md).")]
    = Format.onnx,
    target: Annotated[Optional[str], typer.Option("--target", "-t", help="Device profile (see `elastic "
                                                  "profiles`): the trtexec settings, or the Jetson of an edgellm "
                                                  "bundle. Default: this machine.", show_default=False)] = None,
    gpu: Annotated[Optional[int], typer.Option("--gpu", help="Which GPU when there are several (default: most "
                                               "free memory).", show_default=False)] = None,
    precision: Annotated[EnginePrecision, typer.Option("--precision", case_sensitive=False,
                                           help="trtexec precision: auto (bf16 where the device has it, else "
                                           "fp16), or any spelling of bfloat16, float16, float32. GGUF: f32, f16, "
                                           "bf16, or llama.cpp's q8_0, q6_k, q5_k_m, q4_k_m (made by llama.cpp's "
                                           "quantizer); auto: the slice's own float dtype. edgellm: auto (fp16, or "
                                           "the model's own quantized format), fp16, or what Edge-LLM runs on the "
                                           "Jetson: int4 (AWQ, group 128), int8, fp8, nvfp4 (Model Optimizer; "
                                           "MoE needs nvfp4).")] = EnginePrecision(AUTO),
    max_batch: Annotated[int, typer.Option("--max-batch", help="Largest batch the engines accept.", min=1)] = 1,
    context: Annotated[int, typer.Option("--context", help="Longest sequence (prompt + output) the engines "
                                         "accept.", min=2)] = DEFAULT_EXPORT_CONTEXT,
    dtype: Annotated[GraphDType, typer.Option("--dtype", case_sensitive=False,
                                       help="Weights of the ONNX graphs, float32 or float16 (any spelling; float16 halves the files; "
                                              "no parity check then). TensorRT builds fp16/bf16 engines from "
                                              "float32 graphs too (--precision).")]
    = GraphDType("float32"),
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset, 18..20 (default 18: see the README "
                                                 "written beside the graphs).", show_default=False)] = None,
    parity: Annotated[bool, typer.Option("--parity/--no-parity", help="Compare ONNX Runtime with PyTorch "
                                         "(logits, state, greedy tokens) before writing.")] = True,
    check_only: Annotated[bool, typer.Option("--check-only", help="Only check the graphs' operators against "
                                             "TensorRT's ONNX parser; write nothing. Exit code 1 when an "
                                             "operator is unsupported.")] = False,
    chat_template: Annotated[Optional[Path], typer.Option("--chat-template", show_default=False,
                                                          help="edgellm: a Jinja chat template for a model that "
                                                          "has none (Edge-LLM needs one; default: a plain "
                                                          "'role: content' template).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists and is empty or written by elastic (anything else is refused).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Export a dense model for an edge runtime.

    onnx / tensorrt / all: elastic's own ONNX Runtime graphs (prefill/decode with explicit state),
    a TensorRT operator check, parity with PyTorch, and a trtexec script for them. gguf: a GGUF for
    llama.cpp. edgellm: a bundle for NVIDIA TensorRT Edge-LLM on a Jetson Orin or Thor, the TensorRT
    engine for Jetson: the model padded to one width per layer kind, exported by Edge-LLM's own
    exporter, with the commands that build and run its engine on the device.

    Written to a temporary directory and renamed when complete: a failed run leaves nothing under --out.

    Examples:

      elastic export ./model-50 --out ./model-50-onnx

      elastic export ./model-50 --out ./model-50-edgellm --format edgellm --target orin-nx-16gb

      elastic export ./model-75 --out ./model-75-gguf --format gguf --precision q4_k_m

      elastic export ./model-50 --check-only --json
    """
    with boundary(json_out):
        model_dir = one_checkpoint(model_dir, checkpoint, required=True)
        result = _run(model_dir, out, fmt, target, gpu, precision, max_batch, context, dtype, opset, parity,
                      check_only, chat_template, force, not json_out)
    _show(result, fmt, check_only, json_out)


def _run(model_dir: Path, out: Path | None, fmt: Format, target, gpu, precision, max_batch: int, context: int,
         dtype, opset: int | None, parity: bool, check_only: bool, chat_template: Path | None, force: bool,
         show: bool) -> dict:
    """The export (or the operator check) the options ask for, as its JSON object."""
    if fmt is Format.gguf:
        return _export_gguf(model_dir, out, precision, force, check_only, show)
    if fmt is Format.edgellm:
        return _export_edgellm(model_dir, out, target, precision, max_batch, context, chat_template, force,
                               check_only, show)
    if check_only:
        from elastic.export.pipeline import check_only as run_check

        return run_check(model_dir, dtype=canonical_precision(dtype, WEIGHTS), opset=opset, progress=_stage(show))
    if out is None:
        from elastic.slicer.errors import ElasticError

        raise ElasticError("--out is required (or pass --check-only)")
    from elastic.export.pipeline import export_model
    from elastic.slicer.planning.fit import resolve_target

    # the device is decided once, here (a profile, or the GPU --gpu picks), and handed down
    device = resolve_target(target, gpu)[0] if fmt.value != "onnx" else None
    return export_model(model_dir, out, format=fmt.value, target=device,
                        precision=canonical_precision(precision, ENGINES, AUTO), max_batch=max_batch,
                        max_context=context, dtype=canonical_precision(dtype, WEIGHTS), opset=opset,
                        parity=parity, force=force, progress=_stage(show)).to_json()


def _show(result: dict, fmt: Format, check_only: bool, json_out: bool) -> None:
    """The result as JSON or lines; exit code 1 when an operator check found an unsupported operator."""
    if fmt in (Format.gguf, Format.edgellm):
        if json_out:
            print_json(result)
        else:
            typer.echo("\n".join((_gguf_lines if fmt is Format.gguf else _edgellm_lines)(result)))
        return
    if check_only:
        if json_out:
            print_json(result)
        else:
            typer.echo("\n".join(_check_lines(result)))
        if not result["ok"]:
            raise typer.Exit(1)
        return
    if json_out:
        print_json(result)
        return
    typer.echo("\n".join(_summary_lines(result)))


def _export_gguf(model_dir: Path, out: Path | None, precision, force: bool, check_only: bool, show: bool) -> dict:
    from elastic.export.gguf import export_gguf
    from elastic.slicer.errors import ElasticError

    if check_only:
        raise ElasticError("--check-only checks ONNX graphs against TensorRT; a GGUF has none (leave out --format gguf)")
    if out is None:
        raise ElasticError("--out is required: the directory the GGUF is written to")
    p = canonical_precision(precision, GGUF, AUTO)
    with progress_bar(f"GGUF to {out}", enabled=show) as advance:
        return export_gguf(model_dir, out, precision=None if p == AUTO else p, force=force, progress=advance).to_json()


def _export_edgellm(model_dir: Path, out: Path | None, target, precision, max_batch: int, context: int,
                    chat_template: Path | None, force: bool, check_only: bool, show: bool) -> dict:
    from elastic.export.edgellm import export_edgellm
    from elastic.slicer.errors import ElasticError

    if check_only:
        raise ElasticError("--check-only checks elastic's ONNX graphs against TensorRT; an Edge-LLM bundle is "
                           "checked by Edge-LLM's exporter (leave out --check-only)")
    if out is None:
        raise ElasticError("--out is required: the directory the Edge-LLM bundle is written to")
    if not target:  # this machine, when it is a Jetson with a profile (detected here, once)
        from elastic.profiles.detect import detect

        target = detect().chosen.profile
    with progress_bar(f"Edge-LLM bundle to {out}", enabled=show) as advance:
        return export_edgellm(model_dir, out, target=target, precision=getattr(precision, "value", precision),
                              max_batch=max_batch, max_context=context, chat_template=chat_template, force=force,
                              progress=advance).to_json()


def _edgellm_lines(b: dict) -> list[str]:
    from elastic.export.edgellm_readme import commands
    from .slice_cmd import form_lines

    d, cfg = b["device"], b["edgellm"]["config"]
    lines = [f"wrote {b['out']}  (TensorRT Edge-LLM {b['edgellm']['version']} bundle for {d['name']}, "
             f"{d['platform']}, {b['precision']})",
             "edge-llm  " + ", ".join(f"{k} {v}" for k, v in cfg.items() if k in (
                 "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_layers",
                 "num_linear_attn_layers")),
             *form_lines(b["form"])]
    t = b["chat_template"]
    if t["source"] == "elastic":
        lines.append("chat template: the model has none; elastic added a plain 'role: content' template "
                     "(Edge-LLM needs one; give the model's own with --chat-template)")
    lines += [f"warning: {w}" for w in b["warnings"] if not w.startswith("the model has no chat template")]
    c = commands(b, f"~/{Path(b['out']).name}")
    lines += ["next, on the Jetson (see README.md there: copy, check, build the runtime once):",
              *("  " + line for line in c["build_engine"].splitlines()),
              *("  " + line for line in c["run"].splitlines())]
    return lines


def _gguf_lines(g: dict) -> list[str]:
    kinds = ", ".join(f"{n} {k}" for k, n in g["tensor_types"].items())
    lines = [f"wrote {g['file']}  ({g['architecture']}, {g['precision']}, {human_bytes(g['bytes'])}; tensors: {kinds})",
             f"tokenizer gpt2 BPE, pre-tokenizer {g['tokenizer_pre']}"]
    if g["fallbacks"]:
        lines.append(f"fallback  llama.cpp quantized {len(g['fallbacks'])} tensor(s) to another type than "
                     f"{g['precision']} (K-quants need rows of 256): "
                     + ", ".join(f"{n} {t}" for n, t in list(g["fallbacks"].items())[:6])
                     + (" ..." if len(g["fallbacks"]) > 6 else ""))
    lines.append(f"next:     {g['next']}")
    return lines


def _check_lines(report: dict) -> list[str]:
    t = report["tensorrt"]
    lines = [f"TensorRT {t['target']} operator check (support matrix of TensorRT {t['table']}, opsets "
             + f"{t['opsets'][0]}-{t['opsets'][1]}): {report.get('path', '')}"]
    for name, r in report["graphs"].items():
        lines.append(f"  {name:<13} opset {r['opset']}, {r['nodes']} nodes, {len(r['ops'])} op types: "
                     + ("ok" if r["ok"] else "NOT OK"))
        if not r["opset_supported"]:
            lines.append(f"    opset {r['opset']} is outside {t['opsets'][0]}..{t['opsets'][1]}")
        for u in r["unsupported"]:
            lines.append(f"    {u['op']} x{u['count']}: {u['reason']} (e.g. {', '.join(u['nodes'])})")
        for n in r["notes"]:
            lines.append(f"    note {n['op']}: {n['note']}")
    lines.append("unsupported: " + (", ".join(report["unsupported_ops"]) or "none"))
    return lines


def _summary_lines(s: dict) -> list[str]:
    out = Path(s["out"])
    size = sum((out / f).stat().st_size for f in s["files"] if (out / f).is_file())
    lines = [
        f"wrote {out}  ({s['format']}, opset {s['opset']}, torch.onnx {s['exporter']}, {s['dtype']}, {human_bytes(size)})",
        f"files     {' '.join(s['files'])}",
    ]
    p = s["parity"]
    if p:
        chunked = p.get("chunked_prefill_max_abs_diff")
        lines.append(f"parity    max |logit diff| prefill {p['prefill_max_abs_diff']:.1e}, decode "
                     f"{p['decode_max_abs_diff']:.1e}" + (f", chunked prefill {chunked:.1e}" if chunked is not None else "")
                     + f" (tolerance {p['tolerance']:g}); greedy tokens "
                     f"{'identical' if p['greedy_tokens_equal'] else 'DIFFERENT'}")
    else:
        lines.append(f"parity    not checked ({s['parity_skipped']})")
    lines += _check_lines(s["tensorrt_check"])[1:-1]
    t = s["tensorrt_check"]["tensorrt"]
    bad = s["unsupported_ops"]
    lines.append(f"tensorrt  {'UNSUPPORTED operators: ' + ', '.join(bad) if bad else 'every operator is supported'} "
                 f"(TensorRT {t['target']}, checked against the {t['table']} support matrix)")
    e = s["tensorrt"]
    if e is not None:
        st = e["settings"]
        if e["built"]:
            lines.append(f"engines   built with TensorRT {e['tensorrt']} on {e['device']['name']}: {', '.join(e['engines'])}")
        else:
            lines.append(f"engines   NOT built: {e['reason'].removeprefix('not built here: ').split('. Run')[0]}")
        if e["script"]:
            where = "the target device" if st["device"] == "generic" else st["device"]
            lines.append(f"script    {e['script']}: run it on {where} ({st['precision']}, "
                         f"{st['workspace_bytes'] >> 20} MiB workspace, batch <= {st['max_batch']}, "
                         f"context <= {st['max_context']})")
    lines.append(f'next:     elastic generate {out} "Hello" --backend onnx')
    return lines
