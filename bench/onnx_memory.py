"""Benchmark: ONNX Runtime's memory and speed under ``OnnxGenerator``'s allocator setups, in one run.

    python bench/onnx_memory.py [--sizes S,M] [--contexts 512,4096] [--repeat 2] [--work /tmp/elastic-plan-accuracy]

Models: bench/plan_accuracy.py's random Nemotron-H parents (S 47M parameters, M 179M, L 660M), exported
as float32 graphs, built once into ``--work`` and shared with that bench. For each size and context,
each setup runs in a fresh process as ``elastic generate --backend onnx`` does (a chunked prefill of
``context - 32`` random tokens, then 32 greedy tokens), ``--repeat`` rounds that take every setup once
in turn (a shared machine's load falls on all of them alike):

- ``before``: malloc with ONNX Runtime's buffer reuse (``memory_arena=False, buffer_reuse=True``),
  what ``OnnxGenerator`` did until the shared arena;
- ``malloc``: malloc, no buffer reuse (``memory_arena=False``);
- ``arena``: the default, one arena for the process, no buffer reuse.

Measured: the peak anonymous memory over the process's before ONNX Runtime is imported (as
bench/plan_accuracy.py measures it), the prefill's seconds and the decode's tokens/s; the rows give
each round's figures, the ratios the medians' against ``before``. The arena's peak is also compared
with the plan's (``footprint(..., engine="onnxruntime")`` less the weights, which are file pages).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from plan_accuracy import MEASURE_HEAD, MEASURE_TAIL, MIB, ONNX_IMPORTS, ROOT, build, onnx_export, run_child

SETUPS = {"before": "memory_arena=False, buffer_reuse=True", "malloc": "memory_arena=False", "arena": ""}
RUN = """
import time
gen = OnnxGenerator({path!r}, {setup})
ids = np.random.default_rng(0).integers(0, gen.vocab_size, (1, {prompt}))
t0 = time.perf_counter()
logits, state = gen.prefill(ids)
t1 = time.perf_counter()
for _ in range({decode}):
    logits, state = gen.step(logits[:, -1].argmax(-1), state)
t2 = time.perf_counter()
extra = {{"prefill_s": t1 - t0, "decode_tps": {decode} / (t2 - t1)}}
"""


def one(export: Path, setup: str, context: int, decode: int = 32) -> dict:
    code = (ONNX_IMPORTS + MEASURE_HEAD + RUN + MEASURE_TAIL).format(
        root=str(ROOT), path=str(export), setup=SETUPS[setup], prompt=context - decode, decode=decode)
    m = run_child(code)
    return {"peak_mib": m["measured"] / MIB, "prefill_s": m["prefill_s"], "decode_tps": m["decode_tps"]}


def planned_mib(export: Path, context: int) -> float:
    from elastic.slicer.formats.arch import Arch
    from elastic.slicer.planning.memory import Workload, footprint

    w = Workload(context=context, batch=1, dtype="float32", prefill_chunk=512, margin=0.0)
    t = footprint(Arch.from_file(export), w, 0, engine="onnxruntime")
    return (t["total"] - t["weights"]) / MIB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="S,M")
    ap.add_argument("--contexts", default="512,4096")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/elastic-plan-accuracy"))
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{'size':<6}{'context':>8}  {'setup':<8}{'peak MiB':>22}{'prefill s':>20}{'decode tok/s':>20}")
    for size in args.sizes.split(","):
        export = onnx_export(args.work, build(args.work, size))
        for context in (int(c) for c in args.contexts.split(",")):
            runs: dict[str, list[dict]] = {s: [] for s in SETUPS}
            for _ in range(args.repeat):
                for setup in SETUPS:
                    runs[setup].append(one(export, setup, context))
            med = {s: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for s, rs in runs.items()}
            for setup, rs in runs.items():
                cols = ["/".join(f"{r[k]:.1f}" if k != "prefill_s" else f"{r[k]:.2f}" for r in rs)
                        for k in ("peak_mib", "prefill_s", "decode_tps")]
                print(f"{size:<6}{context:>8}  {setup:<8}{cols[0]:>22}{cols[1]:>20}{cols[2]:>20}", flush=True)
            base = med["before"]
            row = {"size": size, "context": context, "runs": runs, "median": med,
                   "planned_arena_peak_mib": round(planned_mib(export, context), 1),
                   "ratios_over_before": {s: {k: round(m[k] / base[k], 3) for k in m} for s, m in med.items()
                                          if s != "before"}}
            print(f"{'':<16}arena / before: peak {row['ratios_over_before']['arena']['peak_mib']:.2f}x, "
                  f"prefill {row['ratios_over_before']['arena']['prefill_s']:.2f}x, decode "
                  f"{row['ratios_over_before']['arena']['decode_tps']:.2f}x; plan {row['planned_arena_peak_mib']} "
                  f"MiB against the arena's {med['arena']['peak_mib']:.1f}", flush=True)
            rows.append(row)
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
