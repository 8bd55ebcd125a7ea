"""Memory and decode speed of one resident parent serving every budget against sliced children.

Each measurement runs in a fresh subprocess (``--worker``) so its RSS delta is its own:
  * ``parent``: load the parent once, build every budget on its views, decode each budget;
  * ``child B``: load the physically sliced child of budget B alone, decode it.
Figures: the parent's RSS delta (all budgets built and run) against the sum of the children's RSS
deltas, and decode tokens/s per budget on the parent's views against the sliced child (same
prompt, same tokens). The last line is one JSON object.

Usage:
    python bench/serve_bench.py [-c ELASTIC_CKPT] [-n 64]   # default: the demo checkpoint (tiny: its
                                                             # RSS figures are mostly allocator noise)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPT = "The capital of France is"


def rss_bytes() -> int:
    """The process's resident set size (Linux /proc)."""
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(kind: str, path: str, budgets: list[str], n: int) -> dict:
    import torch

    from elastic.slicer.nn.budget import ResidentParent
    from elastic.slicer.nn.smoke import smoke_test

    import elastic.slicer.nn.generate  # noqa: F401  (imports before the baseline: the delta is the model's)
    from elastic.slicer.formats.tokenizer import require_tokenizer

    torch.set_num_threads(1)
    require_tokenizer(path)
    base = rss_bytes()
    out = {}
    if kind in ("parent", "alone"):  # alone: the parent serving its full budget only, the baseline
        resident = ResidentParent(path)
        budgets = budgets if kind == "parent" else budgets[:1]
        for b in budgets:
            resident.model(b)
        for b in budgets:
            resident.generate(b, PROMPT, 4)  # warm-up
            out[b] = resident.generate(b, PROMPT, n)["tokens_per_s"]
    else:
        smoke_test(path, PROMPT, 4)
        out[kind] = smoke_test(path, PROMPT, n)["tokens_per_s"]
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"rss_delta": rss_bytes() - base, "peak_delta": peak - base, "tokens_per_s": out}


def run_worker(*args: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-c", "--checkpoint", default=None)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--worker", nargs=4, metavar=("KIND", "PATH", "BUDGETS", "N"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        kind, path, budgets, n = a.worker
        print(json.dumps(worker(kind, path, budgets.split(","), int(n))))
        return
    import elastic.slicer as pkg
    from elastic.slicer.nn.budget import ResidentParent
    from elastic.slicer.slice import slice_checkpoint

    root = Path(a.checkpoint or Path(pkg.__file__).parent / "demo_checkpoint")
    budgets = ResidentParent(root).budgets
    parent = run_worker("parent", str(root), ",".join(budgets), str(a.n))
    alone = run_worker("alone", str(root), ",".join(budgets), str(a.n))
    children = {}
    with tempfile.TemporaryDirectory() as tmp:
        for b in budgets:
            d = Path(tmp) / b.replace("%", "pct")
            slice_checkpoint(root, d, budget=b)
            children[b] = run_worker(b, str(d), b, str(a.n))
    child_rss = sum(c["rss_delta"] for c in children.values())
    print(f"{'budget':>8} {'parent tok/s':>13} {'child tok/s':>12} {'ratio':>6}")
    ratios = {}
    for b in budgets:
        p, c = parent["tokens_per_s"][b], children[b]["tokens_per_s"][b]
        ratios[b] = round(p / c, 3) if p and c else None
        print(f"{b:>8} {p!s:>13} {c!s:>12} {ratios[b]!s:>6}")
    print(f"RSS delta: parent serving {len(budgets)} budgets {parent['rss_delta'] / 2**20:.1f} MiB, "
          f"{len(budgets)} sliced children {child_rss / 2**20:.1f} MiB")
    print(json.dumps({"checkpoint": str(root), "new_tokens": a.n, "rss_parent_all_budgets": parent["rss_delta"],
                      "rss_children_sum": child_rss,
                      "rss_all_budgets_over_children": round(parent["rss_delta"] / child_rss, 3) if child_rss else None,
                      "rss_parent_alone": alone["rss_delta"], "peak_parent_all_budgets": parent["peak_delta"],
                      "peak_parent_alone": alone["peak_delta"],
                      "rss_all_budgets_over_parent": round(parent["peak_delta"] / alone["peak_delta"], 3)
                      if alone["peak_delta"] > 0 else None,
                      "tokens_per_s_parent": parent["tokens_per_s"],
                      "tokens_per_s_child": {b: c["tokens_per_s"][b] for b, c in children.items()},
                      "tokens_per_s_over_child": ratios}))


if __name__ == "__main__":
    main()
