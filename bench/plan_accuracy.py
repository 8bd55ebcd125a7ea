"""Check the plan's memory terms against the engines that run the model here.

    python bench/plan_accuracy.py [--sizes S,M,L] [--contexts 512,32768] [--precisions bf16,q8_0,q4_k_m]
                                  [--work /tmp/elastic-plan-accuracy] [--no-reference] [--no-onnx]

Models: the bundled demo (0.27M parameters, vocabulary 512: its compute buffer is its layers', not its
logits) and three random Nemotron-H parents (S 47M parameters, ~95 MB in bf16; M 179M, ~360 MB; L 660M,
~1.3 GB; the demo's byte-level tokenizer), built once into ``--work`` and reused (about 4.7 GB with their
GGUFs and the ONNX exports: delete it afterwards). For each:

- llama.cpp (the oracle is llama.cpp's own report): each GGUF precision (``export_gguf``; bf16 written
  directly, q8_0 / q4_k_m by llama.cpp's quantizer) at each context, loaded in a fresh process with
  llama.cpp's defaults for its tools (KV cache f16, flash attention on, n_batch = n_ubatch = 512, one
  sequence). Measured: the bytes of the model's tensors (``llama_model_size``, the sum of its "model
  buffer size" lines: CPU and CPU_REPACK), "KV buffer size", "RS buffer size" (Mamba conv + SSM
  state), "compute buffer size" + "output buffer size" (against the plan's activations). Predicted:
  ``footprint(..., engine="llama.cpp")`` with no overhead and no margin. Error: |predicted - measured|
  / measured of the sum of those buffers; the process's RSS increase is printed beside it as a
  cross-check (it is lower: llama.cpp reserves its compute buffer for a full 512-token batch and
  touches only what it runs).
- the PyTorch reference (``--no-reference`` skips it): S, M and L (``--reference-sizes``) in float32 at 512
  and 4096 tokens, a chunked prefill (full logits per chunk, one chunk's held at a time) and a greedy
  decode in a fresh process. Measured: its peak anonymous memory over the process's before loading (the
  peak RSS less the clean file-backed pages of shared-library code the run faults in: MemAvailable
  counts those as free, and their size is the filesystem's readahead, not the model's; the RSS is
  printed beside it). Predicted: ``footprint`` (engine "reference") with the host profile's runtime
  overhead and no margin. The bundled demo (``--reference-sizes demo``) is left out of the default: its
  whole activation is a few MiB of small chunks whose RSS glibc's heap, not the tensors, decides
  (predicted 11.2 MiB, measured 5.5 at 512 tokens).

- ONNX Runtime (``--no-onnx`` skips it): S, M and L (``--onnx-sizes``) exported in float32 (``elastic export
  --dtype float32``), at 512 and 4096 tokens, ``OnnxGenerator`` as ``elastic generate --backend onnx``
  runs it (a chunked prefill of 512-token chunks, then a greedy decode) in a fresh process. Measured:
  the pages of ``weights.bin`` it maps (file-backed: the weights are in memory once, as the page cache),
  counted after every page has been read through the same mapping (the steady state, once prompts have
  reached every embedding row; the pages the run itself mapped are printed too), plus its peak
  anonymous memory, measured as the reference's (the onnxruntime import included).
  Predicted: ``footprint(..., engine="onnxruntime")`` (weights.bin, the state, the arena ONNX Runtime
  grows, its own memory).

The table: engine x size x context x precision -> predicted, measured, error (MiB). Last line: one
JSON object with ``worst_error`` over every modelled row, ``worst_error_by_engine`` and ``not_modelled``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "slicer" / "demo_checkpoint"

_COMMON = {"model_type": "nemotron_h", "vocab_size": 32768, "n_groups": 8, "ssm_state_size": 128, "conv_kernel": 4,
           "chunk_size": 128, "mamba_head_dim": 64, "mamba_d_head": 64, "head_dim": 128,
           "time_step_limit": [0.0, float("inf")], "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
SIZES = {  # parameters: S 47M (~95 MB bf16), M 179M (~360 MB), L 660M (~1.3 GB)
    "S": {**_COMMON, "hidden_size": 512, "hybrid_override_pattern": "M-M*-M-", "mamba_num_heads": 16, "n_groups": 4,
          "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 2048},
    "M": {**_COMMON, "hidden_size": 1024, "hybrid_override_pattern": "M-M*-M-M*-M-", "mamba_num_heads": 32,
          "num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 6144},
    "L": {**_COMMON, "hidden_size": 2048, "hybrid_override_pattern": "M-M-M*-M-M-M*-M-", "mamba_num_heads": 64,
          "num_attention_heads": 16, "num_key_value_heads": 8, "intermediate_size": 10240},
}
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MIB = 2**20

MEASURE_HEAD = """
def status():
    return {{l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status")
            if l.startswith(("RssAnon", "RssFile", "RssShmem", "VmHWM", "VmRSS"))}}
def anon(st):
    return st["RssAnon"] + st["RssShmem"]
before, peak, done = status(), [0], threading.Event()
def sample():  # the anonymous peak, sampled (the bound below catches what a sample misses)
    while not done.is_set():
        peak[0] = max(peak[0], anon(status()))
        done.wait(0.0005)
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
"""
IMPORTS = """
import json, sys, threading
sys.path.insert(0, {root!r})
"""
REFERENCE_IMPORTS = IMPORTS + """
import torch
from elastic.slicer.nn.model import load_model
"""
ONNX_IMPORTS = IMPORTS + """
import numpy as np
from elastic.export.runtime import OnnxGenerator
"""
REFERENCE_RUN = """
model = load_model({path!r}, dtype=torch.float32)
ids = torch.randint(0, model.arch.vocab_size, (1, {prompt}), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    cache = model.new_cache()
    for s in range(0, {prompt}, {chunk}):
        logits = None  # the last chunk's logits are read: one chunk's at a time, as the plan counts
        logits = model(ids[:, s:s + {chunk}], cache=cache)  # full logits of the chunk
    for _ in range({decode}):
        logits = model(logits[:, -1:].argmax(-1), cache=cache)
extra = {{}}
"""
ONNX_RUN = """
gen = OnnxGenerator({path!r})
gen.generate(np.random.default_rng(0).integers(0, gen.vocab_size, (1, {prompt})), {decode})
def mapped(name):  # the resident pages of the mappings of one file
    total, hit = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            hit = line.rstrip().endswith("/" + name)
        elif hit and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total
run_mapped = mapped("weights.bin")
for v in gen.weights.values():  # read every page of the mapping ONNX Runtime reads (as a prompt that
    float(np.asarray(v).ravel()[::1024].sum())  # reaches every embedding row does): the steady state
extra = {{"weights_mapped": mapped("weights.bin"), "weights_run": run_mapped}}
"""
MEASURE_TAIL = """
done.set()
sampler.join()
after = status()
# VmHWM is this process image's own peak (ru_maxrss would carry the forking parent's over exec); the
# shared libraries' code pages the run faulted in count in it: file-backed, clean, what MemAvailable
# counts as free, and as large as the filesystem's readahead makes them (21 MiB here, ~90 MiB on
# earlier machines). Measured: the anonymous peak, the larger of the sampled peak and VmHWM less
# the file-backed pages added (file pages are only added while nothing presses on memory)
file_added = after["RssFile"] - before["RssFile"]
bound = after["VmHWM"] - before["VmRSS"] - file_added
print(json.dumps({{"measured": max(peak[0] - anon(before), bound), "rss": after["VmHWM"] - before["VmRSS"],
                  "file_pages": file_added, **extra}}))
"""


def build(work: Path, size: str) -> Path:
    """``work/size``: a random parent of ``SIZES[size]`` in bf16 with the demo's tokenizer (kept);
    "demo": the bundled demo checkpoint (vocabulary 512: its compute buffer is its layers', not its logits)."""
    import torch

    from elastic.slicer.formats.arch import Arch
    from elastic.slicer.nn.model import build_model, save_model

    if size == "demo":
        return DEMO
    out = work / size
    if not (out / "config.json").is_file():
        save_model(build_model(Arch.from_config(SIZES[size]), dtype=torch.bfloat16, seed=0), out, force=True)
        for f in TOKENIZER:
            shutil.copy(DEMO / f, out / f)
    return out


def gguf(work: Path, model: Path, precision: str) -> Path:
    """The GGUF of ``model`` at ``precision`` (kept in ``work``)."""
    from elastic.export.gguf import export_gguf

    out = work / f"{'demo' if model == DEMO else model.name}-{precision}"
    file = out / f"model-{precision}.gguf"
    if not file.is_file():
        export_gguf(model, out, precision=precision, force=True)
    return file


def run_child(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama_row(arch, file: Path, precision: str, context: int) -> dict:
    """One llama.cpp measurement against the plan's terms for it."""
    from elastic.slicer.planning.memory import Workload, footprint, memory_basis

    from elastic.export.llama_buffers import measure

    m = measure(file, context)
    w = Workload(context=context, batch=1, dtype="bfloat16", weights=precision, kv="bfloat16", prefill_chunk=512,
                 margin=0.0)
    t = footprint(arch, w, 0, engine="llama.cpp")
    keys = ("weights", "kv_cache", "ssm_state", "activations")
    predicted, measured = sum(t[k] for k in keys), sum(m[k] for k in keys)
    return {"engine": "llama.cpp", "precision": precision, "context": context, "predicted": predicted,
            "measured": measured, "error": abs(predicted - measured) / measured, "rss": m["rss"],
            "terms": {k: [t[k], m[k]] for k in keys}, "memory_basis": memory_basis("llama.cpp")}


def reference_row(path: Path, context: int, chunk: int = 256, decode: int = 32) -> dict:
    """The PyTorch reference's peak anonymous memory against the plan (float32, the host's overhead)."""
    from elastic.profiles.devices import get_profile
    from elastic.slicer.formats.arch import Arch
    from elastic.slicer.planning.memory import Workload, footprint, memory_basis

    arch = Arch.from_file(path)
    prompt = context - decode
    m = run_child((REFERENCE_IMPORTS + MEASURE_HEAD + REFERENCE_RUN + MEASURE_TAIL).format(root=str(ROOT), path=str(path), prompt=prompt,
                                                                       decode=decode, chunk=chunk))
    w = Workload(context=context, batch=1, dtype="float32", prefill_chunk=chunk, margin=0.0)
    t = footprint(arch, w, get_profile("cpu").runtime_overhead_bytes, engine="reference")
    return {"engine": "reference", "precision": "fp32", "context": context, "predicted": t["total"],
            "measured": m["measured"], "error": abs(t["total"] - m["measured"]) / m["measured"], "rss": m["rss"],
            "terms": {k: [t[k], None] for k in ("weights", "kv_cache", "ssm_state", "activations", "overhead")},
            "memory_basis": memory_basis("reference")}


def onnx_export(work: Path, model: Path) -> Path:
    """``work/<size>-onnx``: ``model`` exported as float32 ONNX graphs (kept)."""
    from elastic.export.pipeline import export_model

    out = work / f"{model.name}-onnx"
    if not (out / "extend.onnx").is_file():
        export_model(model, out, dtype="float32", parity=False, force=True)
    return out


def onnx_row(export: Path, context: int, decode: int = 32) -> dict:
    """ONNX Runtime's memory as ``elastic generate --backend onnx`` runs it (weights.bin's mapped pages
    plus the peak anonymous memory) against ``footprint(..., engine="onnxruntime")``."""
    from elastic.slicer.formats.arch import Arch
    from elastic.slicer.planning.memory import Workload, footprint, memory_basis

    m = run_child((ONNX_IMPORTS + MEASURE_HEAD + ONNX_RUN + MEASURE_TAIL).format(root=str(ROOT), path=str(export),
                                                                  prompt=context - decode, decode=decode))
    w = Workload(context=context, batch=1, dtype="float32", prefill_chunk=512, margin=0.0)
    t = footprint(Arch.from_file(export), w, 0, engine="onnxruntime")
    measured = m["weights_mapped"] + m["measured"]
    return {"engine": "onnxruntime", "precision": "fp32", "context": context, "predicted": t["total"],
            "measured": measured, "error": abs(t["total"] - measured) / measured, "rss": m["rss"],
            "terms": {"weights": [t["weights"], m["weights_mapped"]],
                      "anonymous": [t["total"] - t["weights"], m["measured"]],
                      "weights_mapped_by_the_run": [None, m["weights_run"]]},
            "memory_basis": memory_basis("onnxruntime")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="demo,S,M,L")
    ap.add_argument("--contexts", default="512,32768")
    ap.add_argument("--precisions", default="bf16,q8_0,q4_k_m")
    ap.add_argument("--reference-contexts", default="512,4096", help="contexts of the PyTorch reference runs")
    ap.add_argument("--work", type=Path, default=Path("/tmp/elastic-plan-accuracy"))
    ap.add_argument("--reference-sizes", default="S,M,L", help="models of the PyTorch reference runs")
    ap.add_argument("--no-reference", action="store_true", help="skip the PyTorch reference runs")
    ap.add_argument("--onnx-sizes", default="S,M,L", help="models of the ONNX Runtime runs")
    ap.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime runs")
    args = ap.parse_args()

    from elastic.slicer.formats.arch import Arch

    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    contexts = [int(c) for c in args.contexts.split(",")]
    for size in args.sizes.split(","):
        model = build(args.work, size)
        arch = Arch.from_file(model)
        for precision in args.precisions.split(","):
            file = gguf(args.work, model, precision)
            for context in contexts:
                rows.append({"size": size, "parameters": arch.param_counts()["total"],
                             **llama_row(arch, file, precision, context)})
                print_row(rows[-1], header=len(rows) == 1)
    if not args.no_reference:
        for name in args.reference_sizes.split(","):
            path = DEMO if name == "demo" else build(args.work, name)
            for context in (int(c) for c in args.reference_contexts.split(",")):
                rows.append({"size": name, "parameters": Arch.from_file(path).param_counts()["total"],
                             **reference_row(path, context)})
                print_row(rows[-1], header=False)
    if not args.no_onnx:
        for name in args.onnx_sizes.split(","):
            model = build(args.work, name)
            export = onnx_export(args.work, model)
            for context in (int(c) for c in args.reference_contexts.split(",")):
                rows.append({"size": name, "parameters": Arch.from_file(model).param_counts()["total"],
                             **onnx_row(export, context)})
                print_row(rows[-1], header=False)
    by_engine: dict[str, float] = {}
    for r in rows:
        if r["error"] is not None:
            by_engine[r["engine"]] = max(by_engine.get(r["engine"], 0.0), r["error"])
    print(json.dumps({"worst_error": round(max(by_engine.values()), 4) if by_engine else None,
                      "worst_error_by_engine": {k: round(v, 4) for k, v in by_engine.items()},
                      "not_modelled": sorted({r["engine"] for r in rows if r["error"] is None}),
                      "rows": [{**r, "error": None if r["error"] is None else round(r["error"], 4)} for r in rows]}))


def print_row(r: dict, header: bool) -> None:
    if header:
        print(f"{'engine':<12}{'size':<6}{'params':>12}{'context':>9}{'prec':>8}{'predicted':>11}{'measured':>11}"
              f"{'error':>8}{'rss':>10}   terms predicted/measured (MiB)")
    terms = "  ".join(f"{k} " + ("-" if p is None else f"{p / MIB:.1f}") + (f"/{m / MIB:.1f}" if m is not None else "")
                      for k, (p, m) in r["terms"].items())
    predicted = "-" if r["predicted"] is None else f"{r['predicted'] / MIB:.1f}"
    error = "-" if r["error"] is None else f"{r['error']:.1%}"
    print(f"{r['engine']:<12}{r['size']:<6}{r['parameters']:>12,}{r['context']:>9}{r['precision']:>8}"
          f"{predicted:>11}{r['measured'] / MIB:>11.1f}{error:>8}{r['rss'] / MIB:>10.1f}   "
          f"{terms}", flush=True)


if __name__ == "__main__":
    main()
