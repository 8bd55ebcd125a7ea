"""Benchmark: slice a synthetic elastic checkpoint with Nemotron Nano 12B v2 shapes to ~50%.

    python bench/slice_bench.py [--layers 62] [--dir /tmp/elastic-bench] [--reuse]

Writes the source (bf16, 5 GB shards; ``--layers N`` keeps the first N layers of the 12B pattern
to fit a small disk), then measures in one run, with the page cache of the files dropped before
each measurement:
- the slice itself (a subprocess: wall time, peak RSS, bytes read and written from /proc/self/io);
- the baseline: read every source shard once and write as many bytes as the slice wrote, with
  plain file I/O (64 MiB blocks, fsync like the slicer);
and prints the ratio of the medians over ``--repeat`` alternating runs (the disk of a shared
machine is noisy). The last line is one JSON object (``ratio``, ``peak_rss_bytes``, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Nemotron Nano 12B v2's config (the Elastic parent), shipped as the config-only example
NANO_12B_V2 = json.loads((ROOT / "examples" / "nemotron-elastic-12b" / "config.json").read_text())
BLOCK = 64 * 2**20


def drop_cache(paths) -> None:
    """Evict the page cache so every measurement reads from disk: all of it where we may (root),
    else the files' own pages (clean pages need no root)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return
    except OSError:
        pass
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_source(path: Path, layers: int) -> dict:
    import torch
    from safetensors.numpy import save_file

    from elastic.slicer.formats.arch import Arch
    from elastic.slicer.storage.writer import OutTensor, ShardedWriter
    from elastic.slicer.formats.elastic_format import CONFIG_NAME, ROUTER_NAME, Budget, Dimension, ElasticConfig, synthetic_router
    from elastic.slicer.formats.spec import SliceSpec

    cfg = dict(NANO_12B_V2)
    cfg["hybrid_override_pattern"] = cfg["hybrid_override_pattern"][:layers]
    cfg["num_hidden_layers"] = layers
    arch = Arch.from_config(cfg)
    total = arch.param_counts()["total"]

    # the ~50% budget: uniform trims of every elastic dimension, the closest of a small grid
    best = None
    for d in (4096, 3584, 3072):
        for h in (96, 64):
            for f in (10240, 8192):
                for a in (32, 24, 16):
                    layers_spec = []
                    for i, layer in enumerate(arch.layers):
                        sizes = {"mamba": {"mamba_num_heads": h, "mamba_head_dim": 64},
                                 "attention": {"num_attention_heads": a}, "mlp": {"intermediate_size": f}}[layer.kind]
                        layers_spec.append({"index": i, **sizes})
                    spec = {"hidden_size": d, "layers": layers_spec}
                    n = SliceSpec.from_json(spec, arch).parameters(arch)
                    if best is None or abs(n - total / 2) < best[0]:
                        best = (abs(n - total / 2), spec, (d, h, f, a))
    _, half, (d, h, f, a) = best
    idx = lambda kind: tuple(i for i, layer in enumerate(arch.layers) if layer.kind == kind)  # noqa: E731
    dims = [Dimension("hidden_size", (5120, d))]
    if idx("mamba"):
        dims += [Dimension("mamba_num_heads", (128, h), idx("mamba")), Dimension("mamba_head_dim", (80, 64), idx("mamba"))]
    if idx("attention"):
        dims.append(Dimension("num_attention_heads", (40, a), idx("attention")))
    if idx("mlp"):
        dims.append(Dimension("intermediate_size", (20480, f), idx("mlp")))
    ec = ElasticConfig((Budget("full", total), Budget("half", total // 2)), tuple(dims),
                       {"full": SliceSpec.full(arch).to_json(arch), "half": half})
    ElasticConfig.from_json(ec.to_json(), arch)

    noise = torch.randn(BLOCK // 2, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

    def blocks(shape):
        n = 1
        for s in shape:
            n *= s
        row = n // shape[0] if shape else 1
        rows = max(1, (BLOCK // 2) // max(1, row))
        for r0 in range(0, shape[0], rows):
            k = min(rows, shape[0] - r0) * row
            yield noise[:k].reshape(min(rows, shape[0] - r0), *shape[1:]) * 0.02

    tensors = [OutTensor(name, "BF16", shape, lambda shape=shape: blocks(shape))
               for name, shape in arch.tensor_shapes().items()]
    with ShardedWriter(path, force=True) as w:
        w.add_json("config.json", arch.to_config() | {"dtype": "bfloat16"})
        w.add_text(CONFIG_NAME, json.dumps(ec.to_json(), indent=2))
        w.write_tensors(tensors, max_shard_bytes=5 * 10**9)
    save_file(synthetic_router(ec, arch), str(path / ROUTER_NAME))
    return {"parameters": total}


CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from elastic.slicer.slice import slice_checkpoint
t = time.perf_counter()
r = slice_checkpoint({src!r}, {out!r}, budget="half", force=True)
wall = time.perf_counter() - t
io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
print(json.dumps({{"wall_s": wall, "parameters": r.parameters, "bytes_written": r.bytes_written,
                  "rchar": int(io["rchar"]), "wchar": int(io["wchar"]),
                  "peak_rss_bytes": int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024}}))
"""


def baseline(src_files, nbytes_out: int, out: Path) -> float:
    buf = bytearray(BLOCK)
    t = time.perf_counter()
    for p in src_files:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    with open(out, "wb", buffering=0) as f:
        left = nbytes_out
        while left > 0:
            left -= f.write(memoryview(buf)[: min(BLOCK, left)])
        os.fsync(f.fileno())
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=62, help="first N layers of the 12B pattern (default: all 62)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/elastic-bench"))
    ap.add_argument("--reuse", action="store_true", help="reuse a source written by an earlier run")
    ap.add_argument("--keep", action="store_true", help="keep the files afterwards")
    ap.add_argument("--repeat", type=int, default=3, help="measure slice and baseline N times each; report medians")
    args = ap.parse_args()
    src, out, base_out = args.dir / "source", args.dir / "sliced", args.dir / "baseline.bin"
    args.dir.mkdir(parents=True, exist_ok=True)
    if not (args.reuse and (src / "config.json").is_file()):
        t = time.perf_counter()
        info = write_source(src, args.layers)
        print(f"wrote source: {info['parameters']:,} parameters in {time.perf_counter() - t:.1f}s", flush=True)
    src_files = sorted(src.glob("*.safetensors"))
    src_bytes = sum(p.stat().st_size for p in src_files)

    runs, bases = [], []
    for _ in range(args.repeat):  # alternate, so both see the same disk and cache conditions
        shutil.rmtree(out, ignore_errors=True)  # replacing an old output would be timed too
        base_out.unlink(missing_ok=True)
        drop_cache(src_files)
        proc = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), src=str(src), out=str(out))],
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        drop_cache(src_files)
        bases.append(baseline(src_files, runs[-1]["bytes_written"], base_out))
    s = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]  # the median run
    s["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in runs)
    base = sorted(bases)[len(bases) // 2]
    result = {
        "layers": args.layers,
        "source_bytes": src_bytes,
        "bytes_read": s["rchar"],
        "bytes_written": s["bytes_written"],
        "parameters_slice": s["parameters"],
        "slice_s": round(s["wall_s"], 2),
        "baseline_s": round(base, 2),
        "ratio": round(s["wall_s"] / base, 3),
        "peak_rss_bytes": s["peak_rss_bytes"],
        "repeat": args.repeat,
        "slice_s_all": [round(r["wall_s"], 2) for r in runs],
        "baseline_s_all": [round(b, 2) for b in bases],
    }
    print(f"source        {src_bytes / 2**30:.2f} GiB in {len(src_files)} shards ({args.layers} layers)")
    print(f"slice         {s['wall_s']:.1f}s, read {s['rchar'] / 2**30:.2f} GiB, wrote {s['bytes_written'] / 2**30:.2f} GiB, "
          f"peak RSS {s['peak_rss_bytes'] / 2**30:.2f} GiB")
    print(f"baseline      {base:.1f}s (read the source once + write the output size once)")
    print(f"ratio         {result['ratio']:.2f}x")
    if not args.keep:
        shutil.rmtree(out, ignore_errors=True)
        base_out.unlink(missing_ok=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
