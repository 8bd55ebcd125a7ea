"""README.md of an export directory: what each file is, the graphs' inputs and outputs, the opset
and why, the TensorRT check, and how to build the engines on the target."""

from __future__ import annotations

from typing import Any

from .layout import CHECKSUMS, DECODE, ENGINE_META, ENGINES, EXTEND, MANIFEST, PAST, PREFILL, PRESENT, SCRIPT, WEIGHTS

OPSET_WHY = (
    "TensorRT 10.x's ONNX parser (10.3 ships with JetPack 6 on Orin) takes opsets 9 to 20 "
    "(onnx-tensorrt docs/operators.md). 18 is the opset torch's dynamo exporter emits natively, so no "
    "version conversion rewrites the graph, and it is older than the ops TensorRT 10.3 cannot parse "
    "(RMSNormalization and Attention arrive in opset 23). From opset 18 the reductions take their axes "
    "as an input, which TensorRT 10 requires to be an initializer; the operator check below verifies it."
)


QDQ_WHY = {
    19: "FLOAT8E4M3FN QuantizeLinear/DequantizeLinear arrive in opset 19 (TensorRT imports FP8 Q/DQ from 9.0).",
    21: ("ONNX's INT4 type and DequantizeLinear's block_size arrive in opset 21; TensorRT imports blocked INT4 "
         "weights from 10.0 (onnx-tensorrt Changelog), though its 10.x operator matrix states opsets up to 20 "
         "until later releases (10.15: 24). NVIDIA Model Optimizer writes its INT4 ONNX at opset 21 too."),
}


def _quantization(q: dict[str, Any]) -> list[str]:
    act = {"fp8": "quantized to FP8 E4M3 with the checkpoint's input_scale (QuantizeLinear -> DequantizeLinear)",
           "int8": "quantized to INT8 with the checkpoint's input_scale (QuantizeLinear -> DequantizeLinear)",
           None: "kept in float"}[q["activations"]]
    block = f", blocked along the input in groups of {q['group_size']}" if q.get("group_size") else ""
    return [
        "## Quantization",
        "",
        (f"`{q['quant_algo']}` ({q['precision']}): each of the {q['qdq_linears']} quantized Linear layers keeps its "
         f"weight in `{WEIGHTS}` as {q['weight_type']} (transposed to (in, out){block}) and dequantizes it in the "
         f"graph (DequantizeLinear) right before its MatMul; its input is {act}"
         + ("; AWQ/SmoothQuant's pre_quant_scale is a Mul on the input first" if q["precision"] in ("int4", "int8")
            else "") + ". Embeddings, lm_head and the Mamba conv stay float. TensorRT builds these graphs strongly "
         "typed (`--stronglyTyped`, no precision flags)."),
        "",
    ]


def _shape(s) -> str:
    return "(" + ", ".join(str(d) for d in s.shape) + ")"


def _files(ext: bool, trt: dict[str, Any] | None) -> list[tuple[str, str]]:
    """The README's file table: (file, what it is) for each file of the export."""
    files = [
        (PREFILL, "prompt -> logits of every position + the state of every layer"),
        (DECODE, "one token per sequence + the state -> logits + the new state"),
        (EXTEND, "a chunk of a prompt + the state (empty for the first) -> the last position's logits + the new state"),
    ]
    if ext:
        files.append((WEIGHTS, "the weights of every graph (ONNX external data; keep it beside the graphs)"))
    if trt:
        if trt["built"]:
            files += [(e, "TensorRT engine") for e in ENGINES.values()]
        if trt["script"]:
            files.append((SCRIPT, "builds the TensorRT engines with trtexec on the target device"))
        files.append((ENGINE_META, "what was built (or why not): TensorRT version, device, shapes"))
    files.append((MANIFEST, "everything `elastic export` reported, as JSON"))
    files.append((CHECKSUMS, "sha256 of every file: after copying the directory, `sha256sum -c SHA256SUMS`"))
    return files


def _parity(parity: dict[str, Any] | None, q: dict[str, Any] | None) -> list[str]:
    """The "Parity with PyTorch" section; no lines when parity was not checked."""
    if not parity:
        return []
    return [
        "## Parity with PyTorch",
        "",
        (f"ONNX Runtime against the reference model: max |logit diff| prefill {parity['prefill_max_abs_diff']:.2e}, "
        f"decode ({parity['decode_steps']} steps) {parity['decode_max_abs_diff']:.2e}, state "
        f"{parity['state_max_abs_diff']:.2e}"
        + (f", chunked prefill (last logits and state) {parity['chunked_prefill_max_abs_diff']:.2e}"
           if parity.get("chunked_prefill_max_abs_diff") is not None else "")
        + f" (tolerance {parity['tolerance']:g}"
        + ("; the reference dequantizes and fake-quantizes as the graphs do" if q else "") + "); greedy tokens "
        f"{'identical' if parity['greedy_tokens_equal'] else 'DIFFERENT'}."),
        "",
    ]


def _tensorrt(check: dict[str, Any], trt: dict[str, Any] | None) -> list[str]:
    """The "TensorRT" section: the operator check, then the engines built, their script, or how to get one."""
    lines = [
        "## TensorRT",
        "",
        f"Every node was checked against TensorRT {check['tensorrt']['table']}'s ONNX-parser support matrix "
        f"({check['tensorrt']['source']}), for TensorRT {check['tensorrt']['target']}: "
        + ("no unsupported operator." if check["ok"] else
           f"**unsupported: {', '.join(check['unsupported_ops'])}** (see `{MANIFEST}`)."),
        "",
    ]
    if trt and trt["built"]:
        lines += [(f"Engines built here with TensorRT {trt['tensorrt']} on {trt['device']['name']}. An engine "
                  "only runs on the GPU model and TensorRT version that built it."), ""]
    elif trt:
        s = trt["settings"]
        lines += [
            (f"No engine was built here ({trt['reason'].split('. ')[0].removeprefix('not built here: ')}). "
            f"On the target device run `sh {SCRIPT}` (trtexec from TensorRT 10; on JetPack "
            "`/usr/src/tensorrt/bin/trtexec`). It builds `prefill.engine` and `decode.engine` with "
            + (f"{s['quantized']} Q/DQ layers, strongly typed" if s.get("quantized") else f"precision {s['precision']}")
            + f", a {s['workspace_bytes'] >> 20} MiB workspace, batch 1..{s['max_batch']} "
            f"and up to {s['max_context']} tokens per sequence ({s['source']})."),
            "",
        ]
    else:
        lines += [("Build engines with `elastic export MODEL_DIR --format tensorrt --target DEVICE`, which writes "
                  f"`{SCRIPT}` where TensorRT is absent."), ""]
    return lines


def render(summary: dict[str, Any], states: list, dtype: str) -> str:
    """The README text for an export described by ``summary`` (see ``elastic.export.pipeline.export_model``)."""
    ext = summary["external_data"]
    q = summary.get("quantization")
    trt = summary.get("tensorrt")
    files = _files(ext, trt)
    state_name = {"conv_state": "causal-conv window: the last K-1 inputs of the conv over [x | B | C]",
                  "ssm_state": "SSM state, always float32", "key": "attention keys so far",
                  "value": "attention values so far"}
    lines = [
        "# ONNX export",
        "",
        (f"Written by `elastic export` from `{summary['model_dir']}` ({summary['parameters']:,} parameters, "
        f"layers `{summary['layer_pattern']}`). Graphs in {dtype}, opset {summary['opset']}, "
        f"exporter: torch.onnx ({summary['exporter']})."),
        "",
        "| file | what |",
        "|---|---|",
        *[f"| `{f}` | {w} |" for f, w in files],
        "",
        "## Graphs",
        "",
        "Dynamic axes: `batch` (sequences), `seq` (prompt tokens), `past` (tokens already in the KV cache).",
        "",
        (f"**{PREFILL}**: input `input_ids` int64 (batch, seq); outputs `logits` float32 (batch, seq, vocab), "
        f"then `{PRESENT}<state>` for every state below."),
        "",
        (f"**{DECODE}**: inputs `input_ids` int64 (batch, 1) and `{PAST}<state>` for every state below; "
        f"outputs `logits` float32 (batch, 1, vocab) and `{PRESENT}<state>`. Feed each `{PRESENT}X` back "
        f"as `{PAST}X` at the next step. Keys and values grow by one position per step "
        "(`present_key.i` has past + 1 positions); Mamba states keep their size."),
        "",
        (f"**{EXTEND}**: inputs `input_ids` int64 (batch, seq), seq >= 2, and `{PAST}<state>`; outputs the "
        f"last position's `logits` float32 (batch, 1, vocab) and `{PRESENT}<state>`: a prompt prefills in "
        "chunks from an empty state (zeros; keys and values of no position), so the activations grow with the "
        "chunk, not the prompt, and no logits but the last are computed."),
        "",
        "| state | shape | dtype | what |",
        "|---|---|---|---|",
        *[f"| `{s.name}` | {_shape(s)} | {'float32' if s.float32 else dtype} | {state_name[s.kind]} |"
          for s in states],
        "",
        ("The suffix is the layer index; MLP layers keep no state. Greedy decoding: prefill the prompt, "
        "take `argmax(logits[:, -1])`, then one decode call per token (`OnnxGenerator` prefills with "
        f"{EXTEND} instead, in chunks of 512 tokens)."),
        "",
        "```python",
        "from elastic.export.runtime import OnnxGenerator",
        "gen = OnnxGenerator('.')                      # onnxruntime sessions over the graphs",
        "ids = gen.generate(prompt_ids, max_new_tokens=32)",
        "```",
        "",
        "or `elastic generate . \"prompt\" --backend onnx`.",
        "",
        "## Opset",
        "",
        f"Opset {summary['opset']}. "
        + (QDQ_WHY[summary["opset"]] + " Float graphs stay at 18: " if summary["opset"] in QDQ_WHY and q else "")
        + OPSET_WHY,
        "",
    ]
    if q:
        lines += _quantization(q)
    if ext:
        lines += [(f"The weights live in `{WEIGHTS}`, written once straight from the checkpoint; every graph points "
                  "into the same file (ONNX external data), and `elastic generate --backend onnx` maps it once for "
                  "all sessions. Keep the graphs and the weights together."), ""]
    lines += _parity(summary.get("parity"), q)
    lines += _tensorrt(summary["tensorrt_check"], trt)
    return "\n".join(lines)
