"""The README of a TensorRT Edge-LLM bundle: what it holds and the exact commands that build and
run its engine on the Jetson.

The commands are TensorRT Edge-LLM 0.11's own (its repository's docs/source/user_guide/
getting_started/installation.md, "Source workflow: C++ runtime", and quick-start-guide.md,
"Option 1: ONNX and C++ runtime"): build the C++ runtime on the device with CMake for its
EMBEDDED_TARGET, ``llm_build --onnxDir --engineDir --maxBatchSize --maxInputLen
--maxKVCacheCapacity``, then ``llm_inference --engineDir --inputFile --outputFile``.
"""

from __future__ import annotations

from typing import Any

from .layout import CHECKSUMS, MANIFEST

INPUT = "input.json"  # the request llm_inference reads
LOG = "edgellm_export.log"  # the exporter's own output
DOCS = "https://github.com/NVIDIA/TensorRT-Edge-LLM/blob/main/docs/source/user_guide/getting_started"


def commands(m: dict[str, Any], bundle: str = "$BUNDLE") -> dict[str, str]:
    """The shell commands of each step, on the Jetson, from the TensorRT-Edge-LLM checkout."""
    d, e = m["device"], m["engine"]
    return {
        "check": f"cd {bundle} && sha256sum -c {CHECKSUMS} && cd -",
        "build_runtime": "\n".join([
            "git clone https://github.com/NVIDIA/TensorRT-Edge-LLM.git",
            "cd TensorRT-Edge-LLM",
            "git submodule update --init --recursive",
            "mkdir -p build && cd build",
            "cmake .. \\",
            "    -DCMAKE_BUILD_TYPE=Release \\",
            "    -DTRT_PACKAGE_DIR=/usr \\",
            "    -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64_linux_toolchain.cmake \\",
            f"    -DEMBEDDED_TARGET={d['platform']} \\",
            f"    -DCUDA_CTK_VERSION={d['cuda']} \\",
            "    -DENABLE_CUTE_DSL=ALL",
            "make -j$(nproc)",
            "cd ..",
        ]),
        "build_engine": "\n".join([
            "./build/examples/llm/llm_build \\",
            f"    --onnxDir {bundle}/llm \\",
            f"    --engineDir {bundle}/engines/llm \\",
            f"    --maxBatchSize {e['max_batch']} \\",
            f"    --maxInputLen {e['max_input_len']} \\",
            f"    --maxKVCacheCapacity {e['max_kv_cache_capacity']}",
        ]),
        "run": "\n".join([
            "./build/examples/llm/llm_inference \\",
            f"    --engineDir {bundle}/engines/llm \\",
            f"    --inputFile {bundle}/{INPUT} \\",
            f"    --outputFile {bundle}/output.json",
            f"cat {bundle}/output.json",
        ]),
    }


def _form(m: dict[str, Any]) -> list[str]:
    f = m.get("form") or {}
    if not f.get("padding"):
        return [f"- Form: stock `nemotron_h` ({f.get('config_form', 'nemotron_h')}), no padding needed."]
    pads = "; ".join(f"layer {p['layer']} {p['field']} {p['from']} -> {p['to']}" for p in f["padding"])
    c = f["cost"]
    return [f"- Form: the model had per-layer sizes ({f['compact_config_form']}); Edge-LLM takes one size per "
            f"layer kind, so each was zero-padded to one width (exact: relu2(0) = 0, zero heads are dropped by "
            f"zero o_proj columns): {pads}.",
            f"- Padding cost: {c['parameters']:,} parameters ({c['fraction']:.1%} of the model), {c['bytes']:,} bytes "
            "of zeros in the weights."]


def render(m: dict[str, Any]) -> str:
    """README.md of the bundle described by the manifest ``m``."""
    from pathlib import Path

    d, c, name = m["device"], commands(m), Path(m["out"]).name
    jetpack = "JetPack 7.2 (JetPack 7.0/7.1 on Thor: -DCUDA_CTK_VERSION=13.0)" if d["platform"] == "jetson-thor" \
        else "JetPack 7.2"
    template = m["chat_template"]
    lines = [
        f"# TensorRT Edge-LLM bundle for {d['name']}",
        "",
        f"Written by `elastic export --format edgellm --target {d['profile']}` from `{m['model_dir']}` with "
        f"TensorRT Edge-LLM's own exporter ({m['edgellm']['version']}).",
        "",
        f"- Precision: {m['precision']}" + (f" ({m['quantization']['quant_algo']}, made with NVIDIA Model Optimizer)"
                                             if m.get("quantization") else "") + ".",
        f"- Model: {m['parameters']:,} parameters, layers `{m['layer_pattern']}`.",
        *_form(m),
        "- Chat template: " + ("the model's own." if template["source"] == "model" else
                               f"from {template['source']}." if template["source"] != "elastic" else
                               "none in the model, so elastic added a plain `role: content` one (Edge-LLM needs "
                               "one); the model was not trained on it."),
        "",
        "Files: `llm/` is Edge-LLM's export (`model.onnx` + `model.onnx.data` with its plugins, `config.json`, "
        f"`embedding.safetensors`, tokenizer, `chat_template.jinja`); `{INPUT}` a request for `llm_inference`; "
        f"`{LOG}` the exporter's output; `{MANIFEST}` what was done; `{CHECKSUMS}` the sha256 of every file.",
        "",
        f"## On the {d['name']} ({jetpack})",
        "",
        "Copy this directory to the device (from here) and check it there:",
        "",
        "```bash",
        f"rsync -a {name}/ <user>@<jetson>:~/{name}/",
        "```",
        "",
        "```bash",
        f"export BUNDLE=~/{name}  # on the Jetson",
        c["check"],
        "```",
        "",
        f"Build TensorRT Edge-LLM's C++ runtime once (needs CUDA and TensorRT from JetPack; use the release that "
        f"matches the exporter, {m['edgellm']['version']}) ([installation]({DOCS}/installation.md)):",
        "",
        "```bash",
        c["build_runtime"],
        "```",
        "",
        f"Build the engine on the device ([quick start]({DOCS}/quick-start-guide.md)); the engine is specific to "
        "this GPU and JetPack, so build it where it runs:",
        "",
        "```bash",
        c["build_engine"],
        "```",
        "",
        f"Run the request in `{INPUT}` (greedy, 64 new tokens; edit it for your prompt):",
        "",
        "```bash",
        c["run"],
        "```",
    ]
    if m["warnings"]:
        lines += ["", "## Notes", "", *(f"- {w}" for w in m["warnings"])]
    return "\n".join(lines) + "\n"
