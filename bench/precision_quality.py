"""What each precision costs in quality and saves on disk, for every budget of the bundled demo.

    python bench/precision_quality.py [--work DIR] [--max-windows N] [--keep]

For each budget (100%, 75%, 50%) and precision (bf16; fp8, int8 = SmoothQuant W8A8, int4 = AWQ
through NVIDIA Model Optimizer; nvfp4 only where CUDA is present): slice the demo (quantized
ones as `elastic slice --precision` does: sliced in float32, calibrated on 16 x 256 train-split
tokens, the tensors left unquantized in bf16), measure the bytes of the weight files, and the
perplexity on the held-out split of the standard-library corpus (`elastic eval`: the reference
model in float32, quantized weights dequantized, W8A8 activations simulated). Prints a table,
then one JSON line:

    {"perplexity": {BUDGET: {PRECISION: float}}, "bytes": {BUDGET: {PRECISION: int}},
     "delta_pct": {...}, "tokens": int, "calibration": {...}, "seconds": {...}}

Needs `pip install 'elastic[modelopt]'`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "slicer" / "demo_checkpoint"
BUDGETS = ("100%", "75%", "50%")
FLOAT = "bf16"


def precisions() -> list[str]:
    import torch

    return [FLOAT, "fp8", "int8", "int4"] + (["nvfp4"] if torch.cuda.is_available() else [])


def build(budget: str, precision: str, out: Path) -> dict:
    """Slice ``budget`` at ``precision`` into ``out``; returns the weight bytes and the seconds it took."""
    from elastic.slicer.quantize.workflow import slice_and_quantize
    from elastic.slicer.slice import slice_checkpoint

    t0 = time.perf_counter()
    if precision == FLOAT:
        r = slice_checkpoint(DEMO, out, budget=budget, dtype=FLOAT)
        weights = sum((out / s["file"]).stat().st_size for s in r.manifest["shards"])
    else:
        r = slice_and_quantize(DEMO, out, precision, budget=budget, dtype=FLOAT)
        weights = r.weights_bytes
    return {"bytes": weights, "seconds": time.perf_counter() - t0,
            "group": (getattr(r, "manifest", {}).get("quantization") or {}).get("group_size")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None, help="where the slices go (default: a temporary directory)")
    ap.add_argument("--max-windows", type=int, default=None, help="held-out windows of 256 (default: all)")
    ap.add_argument("--keep", action="store_true", help="keep the slices")
    args = ap.parse_args()

    from elastic.slicer.quantize.evaluate import perplexity
    from elastic.slicer.quantize.workflow import require_modelopt

    require_modelopt()
    work = args.work or Path(tempfile.mkdtemp(prefix="elastic-precision-"))
    work.mkdir(parents=True, exist_ok=True)
    ppl: dict = {}
    size: dict = {}
    secs: dict = {}
    groups: dict = {}
    tokens = None
    try:
        for budget in BUDGETS:
            for p in precisions():
                out = work / f"{budget.rstrip('%')}-{p}"
                shutil.rmtree(out, ignore_errors=True)
                b = build(budget, p, out)
                e = perplexity(out, max_windows=args.max_windows)
                tokens = e.tokens
                ppl.setdefault(budget, {})[p] = round(e.perplexity, 4)
                size.setdefault(budget, {})[p] = b["bytes"]
                secs.setdefault(budget, {})[p] = {"build": round(b["seconds"], 1), "eval": round(e.seconds, 1)}
                if b["group"]:
                    groups.setdefault(budget, {})[p] = b["group"]
                print(f"  {budget:>5} {p:<6} {b['bytes']:>9,} B  perplexity {e.perplexity:8.4f}  "
                      f"({b['seconds']:.0f} s + {e.seconds:.0f} s)", file=sys.stderr, flush=True)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    delta = {b: {p: round(100 * (v / ppl[b][FLOAT] - 1), 3) for p, v in row.items()} for b, row in ppl.items()}
    print(f"held-out perplexity ({tokens:,} tokens of standard-library text never trained on) and weight bytes")
    print(f"{'budget':>6}  {'precision':<9} {'weights':>11} {'vs bf16':>8} {'perplexity':>11} {'vs bf16':>9}")
    for b in ppl:
        for p in ppl[b]:
            note = f"  (AWQ group {groups[b][p]})" if groups.get(b, {}).get(p) else ""
            print(f"{b:>6}  {p:<9} {size[b][p]:>11,} {size[b][p] / size[b][FLOAT]:>7.2f}x {ppl[b][p]:>11.4f} "
                  f"{delta[b][p]:>+8.2f}%{note}")
    print(json.dumps({"perplexity": ppl, "bytes": size, "delta_pct": delta, "tokens": tokens,
                      "int4_group": groups, "calibration": {"windows": 16, "tokens_per_window": 256,
                                                            "split": "train"},
                      "seconds": secs}))


if __name__ == "__main__":
    main()
