"""Issue 25 item 4: held-out perplexity against parameters for the trained budgets of an elastic
checkpoint and the sizes between them (every 5% from 40% to 100%), each sliced as
``elastic slice --budget N%`` slices it and measured with ``elastic eval``'s library call: the same
measurement as ``elastic eval --curve`` (``elastic.slicer.planning.measure.measure_curve``).

    python bench/size_curve.py [-c CHECKPOINT] [--max-windows 64] [--png size_curve.png] [--write FILE]

An in-between size should lie between its trained neighbours; one that does not is listed under
``outside`` (with its neighbours' perplexities): ``elastic slice`` refuses it once the record is in
the checkpoint (``--write CHECKPOINT/size_curve.json``; nothing is written without ``--write``).
Writes a PNG when matplotlib is installed; ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def size_curve(checkpoint: str | Path, shares: list[int], max_windows: int | None):
    """The measured curve (``SizeCurve``) and its JSON rows: every trained budget and every ``shares`` percentage."""
    from elastic.slicer.formats.elastic_format import ElasticConfig
    from elastic.slicer.planning.measure import curve_sizes, measure_curve
    from elastic.slicer.storage.reader import Checkpoint

    ckpt = Checkpoint.open(checkpoint, require_weights=True)
    names = [b.name for b in ElasticConfig.read(ckpt.root, ckpt.arch).budgets]
    curve, skipped = measure_curve(ckpt, curve_sizes(names, shares), max_windows=max_windows)
    rows = [{"budget": ", ".join(p.sizes), "trained": p.trained, "parameters": p.parameters,
             "perplexity": p.perplexity, "resolved_by": p.resolved_by} for p in curve.points]
    rows += [{"budget": s["size"], "error": s["error"]} for s in skipped]
    outside = [{"budget": ", ".join(p.sizes), "perplexity": p.perplexity,
                "neighbours": {n.name: n.perplexity for n in curve.trained_neighbours(p.parameters)}}
               for p in curve.outside()]
    return curve, {"rows": rows, "outside": outside}


def plot(rows: list[dict], path: Path) -> bool:
    """perplexity against parameters, trained budgets marked; False when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = sorted((r for r in rows if "perplexity" in r), key=lambda r: r["parameters"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["parameters"] for r in ok], [r["perplexity"] for r in ok], "-o", color="0.6", label="any size")
    tr = [r for r in ok if r["trained"]]
    ax.plot([r["parameters"] for r in tr], [r["perplexity"] for r in tr], "s", color="C3", label="trained budget")
    for r in ok:
        ax.annotate(r["budget"], (r["parameters"], r["perplexity"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("parameters")
    ax.set_ylabel("held-out perplexity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--checkpoint", default=None, help="an elastic checkpoint (default: the bundled demo)")
    ap.add_argument("--max-windows", type=int, default=64, help="held-out windows per size (0: all)")
    ap.add_argument("--png", type=Path, default=Path("size_curve.png"))
    ap.add_argument("--write", type=Path, default=None, help="write the size-curve record here (a file, or a "
                    "directory for DIR/size_curve.json); refused if it exists")
    args = ap.parse_args()
    from elastic.slicer.formats.size_curve import curve_target, write_curve
    from elastic.slicer.planning.describe import DEMO_CHECKPOINT

    target = curve_target(args.write) if args.write else None  # refused before measuring
    t0 = time.perf_counter()
    curve, out = size_curve(args.checkpoint or DEMO_CHECKPOINT, list(range(40, 101, 5)), args.max_windows or None)
    wrote = plot(out["rows"], args.png)
    written = write_curve(curve, target) if target else None
    print(json.dumps({"bench": "size_curve", "checkpoint": str(args.checkpoint or "demo"),
                      "max_windows": args.max_windows, "seconds": round(time.perf_counter() - t0, 1),
                      "png": str(args.png) if wrote else None, "written": str(written) if written else None, **out}))


if __name__ == "__main__":
    main()
