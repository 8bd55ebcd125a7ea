"""What fit-my-gpu's export costs: the README's main job (`elastic fit-my-gpu` on the bundled demo)
timed with and without `--no-export`, in one run (issue 27 item 3: at most 2x).

Every run is a fresh `elastic fit-my-gpu --json` process (imports, plan, slice, export, smoke test:
what a user waits for) writing to a fresh `--out` in a temporary directory; the two kinds alternate,
which goes first swapping each repetition, so both see the same machine. Medians over `--reps`.
The cache of traced ONNX graphs (export/onnx_export.py) starts empty in a directory of the bench's
own: on a route that exports ONNX, the first run with export traces (``first_with_export_s``) and
the later ones load the graphs, as a user's second run would.
The table gives every run; the last line is one JSON object with ``with_export_s``,
``without_export_s``, ``ratio`` and what the export chose (budget, engine, export format).

Usage:
    python bench/fit_export_cost.py [--reps 3] [-c CKPT] [--target PROFILE]   # default: the demo, this machine
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def fit(out: Path, export: bool, checkpoint: str | None, target: str | None, cache: Path) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds, the --json result) of one `elastic fit-my-gpu` process (its CPU
    time counts its own children too: the export's tracing process)."""
    import os

    cmd = [sys.executable, "-m", "elastic.cli.main", "fit-my-gpu", "--out", str(out), "--json"]
    cmd += ["-c", checkpoint] if checkpoint else []
    cmd += ["--target", target] if target else []
    cmd += [] if export else ["--no-export"]
    t0, c0 = time.perf_counter(), _children_cpu()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "ELASTIC_CACHE_DIR": str(cache)})
    wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return wall, cpu, json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-c", "--checkpoint", default=None, help="default: the bundled demo")
    ap.add_argument("--target", default=None, help="a device profile (default: this machine)")
    a = ap.parse_args()
    times: dict[bool, list[float]] = {True: [], False: []}
    cpus: dict[bool, list[float]] = {True: [], False: []}
    chosen: dict = {}
    with tempfile.TemporaryDirectory(prefix="fit-export-cost-") as tmp:
        for rep in range(a.reps):
            for export in ((True, False) if rep % 2 == 0 else (False, True)):
                kind = "with" if export else "without"
                wall, cpu, r = fit(Path(tmp) / f"{rep}-{kind}", export, a.checkpoint, a.target, Path(tmp) / "cache")
                times[export].append(wall)
                cpus[export].append(cpu)
                if export:
                    e = r["export"]
                    chosen = {"budget": r["chosen"], "engine": r.get("chosen_runtime"),
                              "export": e.get("format") if "skipped" not in e else None,
                              "export_files": sorted(Path(p).name for p in e.get("files", [])) or
                              ([Path(e["file"]).name] if e.get("file") else []),
                              "export_skipped": e.get("skipped"), "smoke_backend": r["smoke"].get("backend")}
                print(f"rep {rep}: {kind} export {wall:6.2f} s ({cpu:.2f} s CPU)", flush=True)
    med = statistics.median
    w, wo, cw, cwo = med(times[True]), med(times[False]), med(cpus[True]), med(cpus[False])
    print(f"{'':>16} {'median s':>9} {'CPU s':>7}  runs (wall s)")
    for label, k in (("with export", True), ("--no-export", False)):
        print(f"{label:>16} {med(times[k]):9.2f} {med(cpus[k]):7.2f}  {' '.join(f'{t:.2f}' for t in times[k])}")
    print(f"ratio {w / wo:.3f} wall, {cw / cwo:.3f} CPU (goal <= 2); chose {chosen}")
    print(json.dumps({"bench": "fit_export_cost", "checkpoint": a.checkpoint or "demo",
                      "target": a.target or "this machine", "reps": a.reps,
                      "with_export_s": round(w, 2), "without_export_s": round(wo, 2), "ratio": round(w / wo, 3),
                      "with_export_cpu_s": round(cw, 2), "without_export_cpu_s": round(cwo, 2),
                      "cpu_ratio": round(cw / cwo, 3), "first_with_export_s": round(times[True][0], 2), **chosen,
                      "runs": {"with_export_s": [round(t, 2) for t in times[True]],
                               "without_export_s": [round(t, 2) for t in times[False]]}}))


if __name__ == "__main__":
    main()
