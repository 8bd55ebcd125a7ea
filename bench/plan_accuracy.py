"""Check the memory model against a measurement on the CPU target.

    python bench/plan_accuracy.py [--prompt 1024] [--decode 32] [--chunk 256]

For the bundled demo model and a generated model of a few hundred MB (written to a temporary
directory), a fresh process imports torch, notes its RSS, loads the model in float32, runs a
chunked prefill (full logits per chunk, like the ONNX prefill graph) and a greedy decode, and
reports its peak RSS increase. The prediction is ``elastic.slicer.planning.memory.footprint`` for the same
workload with the host profile's runtime overhead and no safety margin (the margin is headroom,
not an estimate). Last line: one JSON object with ``worst_error`` = max |predicted - measured| /
measured over the two models.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GENERATED = {  # ~133M parameters: ~530 MB in float32
    "model_type": "nemotron_h", "vocab_size": 32768, "hidden_size": 1024, "hybrid_override_pattern": "M-M*-M-M-",
    "mamba_num_heads": 32, "mamba_head_dim": 64, "n_groups": 4, "ssm_state_size": 128, "conv_kernel": 4,
    "chunk_size": 128, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
    "intermediate_size": 4096, "time_step_limit": [0.0, float("inf")],
}

CHILD = """
import json, sys
sys.path.insert(0, {root!r})
import torch
from elastic.slicer.nn.model import load_model
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
base = rss()
model = load_model({path!r}, dtype=torch.float32)
ids = torch.randint(0, model.arch.vocab_size, (1, {prompt}), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    cache = model.new_cache()
    for s in range(0, {prompt}, {chunk}):
        logits = model(ids[:, s:s + {chunk}], cache=cache)  # full logits of the chunk
    for _ in range({decode}):
        logits = model(logits[:, -1:].argmax(-1), cache=cache)
# VmHWM: this process image's own peak (ru_maxrss would carry the forking parent's over exec)
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({{"measured": peak - base}}))
"""


def measure(path: Path, prompt: int, decode: int, chunk: int) -> int:
    code = CHILD.format(root=str(ROOT), path=str(path), prompt=prompt, decode=decode, chunk=chunk)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["measured"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=256)
    args = ap.parse_args()

    import torch

    from elastic.profiles.devices import get_profile
    from elastic.slicer.formats.arch import Arch
    from elastic.slicer.planning.describe import DEMO_CHECKPOINT
    from elastic.slicer.planning.memory import Workload, footprint
    from elastic.slicer.nn.model import build_model, save_model

    overhead = get_profile("cpu").runtime_overhead_bytes
    w = Workload(context=args.prompt + args.decode, batch=1, dtype="float32", prefill_chunk=args.chunk, margin=0.0)
    result = {"prompt": args.prompt, "decode": args.decode, "chunk": args.chunk, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        generated = Path(tmp) / "generated"
        save_model(build_model(Arch.from_config(GENERATED), dtype=torch.float32, seed=0), generated)
        for name, path in (("demo", DEMO_CHECKPOINT), ("generated", generated)):
            arch = Arch.from_file(path)
            terms = footprint(arch, w, overhead)
            measured = measure(path, args.prompt, args.decode, args.chunk)
            err = abs(terms["total"] - measured) / measured
            result["models"][name] = {"parameters": arch.param_counts()["total"], "predicted": terms["total"],
                                      "measured": measured, "ratio": round(terms["total"] / measured, 3),
                                      "error": round(err, 3), "terms": terms}
            mib = lambda n: f"{n / 2**20:8.1f} MiB"  # noqa: E731
            print(f"{name:<10} {arch.param_counts()['total']:>12,} params  predicted {mib(terms['total'])}  "
                  f"measured {mib(measured)}  ratio {terms['total'] / measured:.3f}")
            print("           " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in terms.items() if k != "total") + " (MiB)")
    result["worst_error"] = max(m["error"] for m in result["models"].values())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
