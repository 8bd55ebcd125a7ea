"""Export memory and disk against the weights: does `elastic export` stay within its stated bounds?

    python bench/export_bench.py [--sizes 0.3,1,3] [--dir DIR] [--parity]

For each size (GB of float32 weights), a generated Nemotron-H checkpoint (random weights, float32 on
disk, layers "M-M*-M-" repeated) is exported with ``elastic export --format onnx`` in a child
process; measured there: wall time, peak RSS (VmHWM), bytes written, and the ratios peak RSS /
weight bytes and disk / weight bytes. The fixed overhead (Python, torch, onnx, onnxruntime
imported; the exporter's own allocations) is what peak RSS minus the weights' share leaves at the
smallest size; the bound checked is ``peak <= 1.3 x weights + overhead`` with the overhead measured
in the same run: the peak RSS of exporting a tiny generated model (about 5 MB of weights) the same way, and ``disk <= 1.05 x weights + graph bytes``. Parity (ONNX Runtime against
PyTorch) is off by default (it loads the model into ONNX Runtime as well); ``--parity`` turns it on.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 1 << 24


def config_for(gb: float) -> dict:
    """A Nemotron-H config with about ``gb`` GB of float32 weights."""
    from elastic.slicer.formats.arch import Arch

    base = {"model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"], "vocab_size": 32000,
            "hidden_size": 1024, "mamba_num_heads": 32, "mamba_head_dim": 64, "n_groups": 8, "ssm_state_size": 64,
            "conv_kernel": 4, "chunk_size": 64, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
            "intermediate_size": 4096, "mlp_hidden_act": "relu2", "time_step_limit": [0.0, 1e30],
            "tie_word_embeddings": False, "eos_token_id": 2, "bos_token_id": 1, "pad_token_id": 0}
    if gb < 0.05:  # the overhead probe: a small vocabulary and width, so the weights are a few MB
        base.update(vocab_size=4096, hidden_size=256, mamba_num_heads=8, intermediate_size=1024, num_attention_heads=4,
                    num_key_value_heads=2)
    best = None
    for reps in range(1, 400):
        pattern = "M-M*-M-" * reps
        cfg = {**base, "hybrid_override_pattern": pattern, "num_hidden_layers": len(pattern)}
        n = Arch.from_config(cfg).param_counts()["total"]
        best = cfg
        if n * 4 >= gb * 1e9:
            break
    return best


def make_checkpoint(path: Path, gb: float) -> int:
    import torch

    from elastic.slicer.formats.arch import Arch
    from elastic.slicer.storage.writer import OutTensor, ShardedWriter

    cfg = config_for(gb)
    arch = Arch.from_config(cfg)
    gen = torch.Generator().manual_seed(0)
    noise = (torch.randn(BLOCK // 4, generator=gen) * 0.02).float()

    def blocks(name, shape):
        n = 1
        for s in shape:
            n *= s
        if name.endswith(("A_log", "dt_bias")) or name.endswith("norm.weight") or name.endswith(".D"):
            yield torch.full(shape, 0.5 if not name.endswith("A_log") else 0.0)  # stable dynamics
            return
        row = n // shape[0] if shape else 1
        rows = max(1, (BLOCK // 4) // max(1, row))
        for r0 in range(0, shape[0], rows):
            k = min(rows, shape[0] - r0)
            yield noise[:k * row].reshape(k, *shape[1:])

    tensors = [OutTensor(name, "F32", shape, lambda name=name, shape=shape: blocks(name, shape))
               for name, shape in arch.tensor_shapes().items()]
    with ShardedWriter(path, force=True) as w:
        w.add_json("config.json", arch.to_config() | {"dtype": "float32"})
        w.write_tensors(tensors, max_shard_bytes=5 * 10**9)
    return arch.param_counts()["total"]


CHILD = r"""
import json, sys, time
from pathlib import Path
from elastic.export.pipeline import export_model
src, out, parity = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
t = time.perf_counter()
r = export_model(src, out, format="onnx", parity=parity, force=True)
wall = time.perf_counter() - t
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
files = {p.name: p.stat().st_size for p in Path(out).iterdir() if p.is_file()}
print(json.dumps({"wall_s": round(wall, 2), "peak_rss_bytes": hwm, "files": files,
                  "external_data": r.manifest["external_data"]}))
"""

BASELINE = r"""
import json
import elastic.export.pipeline, onnx, onnxruntime, onnxscript, torch  # what every export imports
hwm = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({"peak_rss_bytes": hwm}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="0.3,1,3", help="GB of float32 weights, comma-separated")
    ap.add_argument("--dir", type=Path, help="work directory (default: a temporary one, removed)")
    ap.add_argument("--parity", action="store_true", help="also run the ONNX Runtime parity check")
    args = ap.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="elastic-export-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        base = json.loads(subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True,
                                         check=True).stdout)["peak_rss_bytes"]
        for gb in (0.005, *(float(x) for x in args.sizes.split(","))):
            src, out = work / f"model-{gb:g}", work / f"export-{gb:g}"
            t = time.perf_counter()
            params = make_checkpoint(src, gb)
            made = time.perf_counter() - t
            weight_bytes = params * 4
            r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), "1" if args.parity else "0"],
                               capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"export of {gb:g} GB failed:\n{r.stderr[-3000:]}")
            m = json.loads(r.stdout.strip().splitlines()[-1])
            disk = sum(m["files"].values())
            graphs = sum(v for k, v in m["files"].items() if k.endswith(".onnx"))
            rows.append({"size_gb": gb, "parameters": params, "weight_bytes": weight_bytes, "export_s": m["wall_s"],
                         "peak_rss_bytes": m["peak_rss_bytes"], "disk_bytes": disk, "graph_bytes": graphs,
                         "peak_over_weights": round(m["peak_rss_bytes"] / weight_bytes, 3),
                         "disk_over_weights": round(disk / weight_bytes, 3), "external_data": m["external_data"],
                         "files": m["files"], "generate_s": round(made, 1)})
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(src, ignore_errors=True)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    overhead = rows.pop(0)["peak_rss_bytes"]  # the tiny model's whole peak: imports + the exporter's fixed cost
    print(f"import baseline (Python + torch + onnx + onnxruntime): {base / 2**20:.0f} MiB; fixed overhead (peak RSS "
          f"of exporting a 5 MB model): {overhead / 2**20:.0f} MiB")
    print(f"{'weights':>10} {'export s':>9} {'peak RSS':>10} {'peak/w':>7} {'disk':>10} {'disk/w':>7} "
          f"{'peak <= 1.3w+c':>15} {'disk <= 1.05w+g':>16}")
    # the smallest constant for which peak <= 1.3 x weights + c holds at every size measured
    fitted = max(r["peak_rss_bytes"] - int(1.3 * r["weight_bytes"]) for r in rows)
    print(f"smallest constant c with peak <= 1.3 x weights + c at every size: {fitted / 2**20:.0f} MiB "
          "(the columns below use the 5 MB probe's overhead)")
    for r in rows:
        r["peak_bound_ok"] = r["peak_rss_bytes"] <= 1.3 * r["weight_bytes"] + overhead
        r["disk_bound_ok"] = r["disk_bytes"] <= 1.05 * r["weight_bytes"] + r["graph_bytes"]
        print(f"{r['weight_bytes'] / 1e9:>9.2f}G {r['export_s']:>9.1f} {r['peak_rss_bytes'] / 1e9:>9.2f}G "
              f"{r['peak_over_weights']:>7.2f} {r['disk_bytes'] / 1e9:>9.2f}G {r['disk_over_weights']:>7.3f} "
              f"{str(r['peak_bound_ok']):>15} {str(r['disk_bound_ok']):>16}")
    print(json.dumps({"import_baseline_bytes": base, "fixed_overhead_bytes": overhead, "fitted_overhead_bytes": fitted,
                      "parity": args.parity,
                      "exports": rows}))


if __name__ == "__main__":
    main()
