"""Issue 25 item 4: held-out perplexity against parameters for the trained budgets of an elastic
checkpoint and the sizes between them (every 5% from 40% to 100%), each sliced with
``elastic slice --budget N%`` (``slice_checkpoint``) and measured with ``elastic eval``'s library call
(``slicer.quant.evaluate.perplexity``).

    python bench/size_curve.py [-c CHECKPOINT] [--max-windows 64] [--png size_curve.png]

An in-between size should lie between its trained neighbours; one that does not is listed under
``outside`` (with its neighbours' perplexities) instead of being offered as a good size. Writes a PNG
when matplotlib is installed; ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def size_curve(checkpoint: str | Path, shares: list[int], max_windows: int | None) -> dict:
    """Perplexity and parameters of every trained budget and every ``shares`` percentage."""
    from elastic.slicer.formats.elastic_format import ElasticConfig
    from elastic.slicer.quant.evaluate import perplexity
    from elastic.slicer.slice import slice_checkpoint
    from elastic.slicer.storage.reader import Checkpoint

    ckpt = Checkpoint.open(checkpoint, require_weights=True)
    ec = ElasticConfig.read(ckpt.root, ckpt.arch)
    names = [b.name for b in ec.budgets] + [f"{s}%" for s in shares if f"{s}%" not in [b.name for b in ec.budgets]]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            try:
                result = slice_checkpoint(ckpt, Path(tmp) / name.replace("%", "pct"), budget=name)
            except Exception as e:  # noqa: BLE001  (a size no architecture reaches: reported, not fatal)
                rows.append({"budget": name, "error": getattr(e, "message", str(e))})
                continue
            m = result.manifest
            ppl = perplexity(result.out, max_windows=max_windows)
            rows.append({"budget": name, "trained": name in [b.name for b in ec.budgets],
                         "parameters": m["parameters"]["total"], "perplexity": round(ppl.perplexity, 4),
                         "resolved_by": m["spec_source"], "layer_pattern": m["layer_pattern"]})
    return {"rows": rows, "outside": outside(rows)}


def outside(rows: list[dict]) -> list[dict]:
    """In-between sizes whose perplexity is not between those of the trained budgets on either side
    (by parameters): sizes not to offer."""
    trained = sorted((r for r in rows if r.get("trained")), key=lambda r: r["parameters"])
    out = []
    for r in rows:
        if r.get("trained") or "perplexity" not in r:
            continue
        below = [t for t in trained if t["parameters"] <= r["parameters"]]
        above = [t for t in trained if t["parameters"] >= r["parameters"]]
        lo = above[0]["perplexity"] if above else None  # the larger neighbour: lower perplexity
        hi = below[-1]["perplexity"] if below else None
        if (lo is not None and r["perplexity"] < lo) or (hi is not None and r["perplexity"] > hi):
            out.append({"budget": r["budget"], "perplexity": r["perplexity"],
                        "neighbours": {t["budget"]: t["perplexity"] for t in (above[:1] + below[-1:])}})
    return out


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
    args = ap.parse_args()
    from elastic.slicer.planning.describe import DEMO_CHECKPOINT

    t0 = time.perf_counter()
    out = size_curve(args.checkpoint or DEMO_CHECKPOINT, list(range(40, 101, 5)), args.max_windows or None)
    wrote = plot(out["rows"], args.png)
    print(json.dumps({"bench": "size_curve", "checkpoint": str(args.checkpoint or "demo"),
                      "max_windows": args.max_windows, "seconds": round(time.perf_counter() - t0, 1),
                      "png": str(args.png) if wrote else None, **out}))


if __name__ == "__main__":
    main()
