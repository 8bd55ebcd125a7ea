"""Memory and decode speed of one resident parent serving every budget against sliced children.

By default the bench first generates its model (``make_parent``): a random Nemotron-H elastic parent
of about 390 MB in float32 (hidden 1024, 14 layers ``M-M*-M-M-M*-M-``, Mamba 32 x 64 in 4 groups,
FFN 4096, the demo's tokenizer) whose elastic_config.json holds budgets 100% / 75% / 50%: for each,
the homogeneous point of the trainer's default search space nearest the target (preferring, within
1%, the one whose most trimmed dimension is trimmed least, then the wider hidden size), so every
width shrinks and the smaller budgets keep a strided subset of Mamba heads and channels. ``-c`` runs it on
an existing checkpoint instead.

Memory: each figure is a fresh subprocess (``--worker``), so its RSS is its own:
  * ``parent``: load the parent once, build every budget on its views, decode each budget;
  * ``alone``: the parent serving its full budget only (the baseline: goal within 5%);
  * ``children``: the physically sliced children of every budget loaded side by side, each decoding.
Speed (one subprocess holding the parent and every child, so both sides see the same machine): per
repetition, every budget decodes on the parent's views and its sliced child decodes the same
prompt, back to back; then a think-small / answer-large request (think with the smallest budget
for half the tokens, answer with the full one) and the same request on the full budget. Medians
over the repetitions: of the tokens/s ratio per pair, and of the same ratio in the thread's CPU time
(what the decode costs, robust to other work on a shared machine). The last line is one JSON object.

On a GPU (``--device cuda``) the same runs hold the parent and children there; the memory figures are
then PyTorch's peak allocated GPU memory (tests/test_serve.py has the gpu-marked equality test).

Usage:
    python bench/serve_bench.py [-n 64] [--reps 5] [--work /tmp/serve-bench]   # the generated model
    python bench/serve_bench.py --device cuda                                   # the same on a GPU
    python bench/serve_bench.py -c ELASTIC_CKPT                                 # e.g. the demo
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "The capital of France is"
PARENT = {
    "model_type": "nemotron_h", "architectures": ["NemotronHForCausalLM"], "hidden_size": 1024,
    "hybrid_override_pattern": "M-M*-M-M-M*-M-", "mamba_num_heads": 32, "mamba_head_dim": 64, "n_groups": 4,
    "ssm_state_size": 64, "conv_kernel": 4, "chunk_size": 64, "num_attention_heads": 16, "num_key_value_heads": 4,
    "head_dim": 64, "intermediate_size": 4096, "time_step_limit": [0.0, float("inf")], "tie_word_embeddings": False,
}
TARGETS = (("100%", 1.0), ("75%", 0.75), ("50%", 0.5))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def make_parent(out: Path, seed: int = 0) -> Path:
    """A random elastic parent at ``out`` (see the module doc; kept from an earlier run when ``out``
    holds one); no eos in its config, so every run decodes all its tokens."""
    import itertools

    import elastic.slicer as pkg
    from elastic.slicer.formats.arch import Arch
    from elastic.slicer.formats.elastic_format import Budget, ElasticConfig
    from elastic.slicer.formats.spec import SliceSpec
    from elastic.slicer.nn.model import build_model, save_model
    from elastic.trainer.memory import default_search_space

    if (out / "elastic_config.json").is_file():
        return out
    demo = Path(pkg.__file__).parent / "demo_checkpoint"
    vocab = json.loads((demo / "config.json").read_text())["vocab_size"]
    arch = Arch.from_config(PARENT | {"vocab_size": vocab})
    save_model(build_model(arch, seed=seed), out, force=True)
    for f in TOKENIZER_FILES:
        shutil.copy(demo / f, out / f)
    space = default_search_space(arch, droppable=[])
    total = arch.param_counts()["total"]
    cands = []
    for values in itertools.product(*(d.choices for d in space)):
        pick = dict(zip((d.name for d in space), values))
        layers = {i: {"index": i} for i in range(len(arch.layers))}
        for d, v in zip(space, values):
            for i in d.layers or ():
                layers[i][d.name] = v
        spec = SliceSpec.from_json({"hidden_size": pick["hidden_size"], "layers": list(layers.values())}, arch)
        shrink = max(1 - v / d.choices[0] for d, v in zip(space, values))  # the most trimmed dimension
        cands.append((spec.parameters(arch), (round(shrink, 3), tuple(-v for v in values)), spec.to_json(arch)))
    resolved, budgets = {}, []
    for name, frac in TARGETS:
        target = total * frac
        close = ([c for c in cands if abs(c[0] - target) <= 0.01 * target]
                 or [min(cands, key=lambda c: abs(c[0] - target))])
        n, _, spec = min(close, key=lambda c: c[1])
        resolved[name] = spec
        budgets.append(Budget(name, n))
    ec = ElasticConfig(tuple(budgets), space, resolved)
    (out / "elastic_config.json").write_text(json.dumps(ec.to_json(), indent=2) + "\n")
    return out


def rss_bytes() -> int:
    """The process's resident set size (Linux /proc)."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _child_backend(path: str, device: str = "cpu"):
    from elastic.slicer.formats.tokenizer import require_tokenizer
    from elastic.slicer.nn.model import TorchBackend, load_model

    return TorchBackend(load_model(path, device=device)), require_tokenizer(path)


def memory_worker(kind: str, root: str, budgets: list[str], children: dict[str, str], n: int,
                  device: str = "cpu") -> dict:
    """RSS of one way of serving: ``parent`` (every budget on views), ``alone`` (the full budget),
    ``children`` (every sliced child loaded side by side). On CUDA, the peak of PyTorch's allocated
    GPU memory instead (``torch.cuda.max_memory_allocated``)."""
    import torch

    import elastic.slicer.nn.generate  # noqa: F401  (imports before the baseline: the delta is the model's)
    from elastic.slicer.formats.tokenizer import require_tokenizer
    from elastic.slicer.nn.budget import ResidentParent
    from elastic.slicer.nn.generate import generate_text

    torch.set_num_threads(1)
    require_tokenizer(root)
    cuda = device.startswith("cuda")
    base = rss_bytes() if not cuda else torch.cuda.memory_allocated(device)
    if kind in ("parent", "alone"):
        resident = ResidentParent(root, device=device)
        served = budgets if kind == "parent" else budgets[:1]
        for b in served:
            resident.model(b)
        for b in served:
            resident.generate(b, PROMPT, n)
    else:
        loaded = [_child_backend(children[b], device) for b in budgets]  # side by side
        for backend, tok in loaded:
            generate_text(backend, tok, PROMPT, n)
    if cuda:
        torch.cuda.synchronize(device)
        return {"rss_delta": torch.cuda.memory_allocated(device) - base,
                "peak_delta": torch.cuda.max_memory_allocated(device) - base}
    return {"rss_delta": rss_bytes() - base, "peak_delta": _peak() - base}


def speed_worker(root: str, budgets: list[str], children: dict[str, str], n: int, reps: int,
                 device: str = "cpu") -> dict:
    """Decode tokens/s of every budget on the parent's views and of its sliced child, interleaved,
    and a think-small / answer-large request against the full budget; medians over ``reps``."""
    import torch

    from elastic.slicer.nn.budget import ResidentParent
    from elastic.slicer.nn.generate import generate_text

    torch.set_num_threads(1)
    resident = ResidentParent(root, device=device)
    kids = {b: _child_backend(children[b], device) for b in budgets}
    for b in budgets:  # warm-up, and the equality the server promises
        got = resident.generate(b, PROMPT, n, eos_token_id=-1)["tokens"]
        ref = generate_text(*kids[b], PROMPT, n, eos_token_id=-1)["tokens"]
        assert got == ref, f"budget {b}: the parent's views and the sliced child disagree"
    small, full = budgets[-1], budgets[0]
    view, child = {b: [] for b in budgets}, {b: [] for b in budgets}
    cpu: dict[str, list[float]] = {b: [] for b in budgets}  # child's CPU seconds / the view's, per pair
    split: dict[str, list[float]] = {"split_s": [], "full_s": [], "split_tps": [], "full_tps": []}
    for rep in range(reps):
        for b in budgets:
            pair = [("view", lambda: resident.generate(b, PROMPT, n, eos_token_id=-1)),
                    ("child", lambda: generate_text(*kids[b], PROMPT, n, eos_token_id=-1))]
            spent = {}
            for side, run in pair if rep % 2 == 0 else pair[::-1]:  # alternate which goes first
                c0 = time.thread_time()  # one torch thread: this thread's CPU time, robust to a shared machine
                (view if side == "view" else child)[b].append(run()["tokens_per_s"])
                spent[side] = time.thread_time() - c0
            cpu[b].append(spent["child"] / spent["view"])
        t0 = time.perf_counter()
        r = resident.generate_split(small, full, PROMPT, n, max_think_tokens=n // 2, eos_token_id=-1)
        t1 = time.perf_counter()
        f = resident.generate(full, PROMPT, n, eos_token_id=-1)
        t2 = time.perf_counter()
        split["split_s"].append(t1 - t0)
        split["full_s"].append(t2 - t1)
        split["split_tps"].append(r["new_tokens"] / (t1 - t0))
        split["full_tps"].append(f["new_tokens"] / (t2 - t1))
    med = statistics.median
    return {"view": {b: med(v) for b, v in view.items()}, "child": {b: med(v) for b, v in child.items()},
            "ratio": {b: round(med([v / c for v, c in zip(view[b], child[b])]), 3) for b in budgets},
            "cpu_ratio": {b: round(med(cpu[b]), 3) for b in budgets},
            "split": {k: round(med(v), 3) for k, v in split.items()}, "think_budget": small, "answer_budget": full,
            "think_tokens": n // 2}


def run_worker(args: dict) -> dict:
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(args)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"worker {args['kind']} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-c", "--checkpoint", default=None, help="an elastic checkpoint (default: generate one)")
    ap.add_argument("-n", type=int, default=64, help="new tokens per request")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--work", default=None, help="where the generated model and the slices go (default: a temp dir)")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: the same bench on a GPU (memory: PyTorch's "
                    "peak allocated GPU memory; the CPU-time ratio then means little)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        w = json.loads(a.worker)
        if w["kind"] == "speed":
            out = speed_worker(w["root"], w["budgets"], w["children"], w["n"], w["reps"], w["device"])
        else:
            out = memory_worker(w["kind"], w["root"], w["budgets"], w["children"], w["n"], w["device"])
        print(json.dumps(out))
        return
    from elastic.slicer.nn.budget import ResidentParent
    from elastic.slicer.slice import slice_checkpoint

    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="serve-bench-"))
    try:
        root = Path(a.checkpoint) if a.checkpoint else make_parent(work / "parent")
        size = sum(f.stat().st_size for f in root.glob("*.safetensors"))
        budgets = ResidentParent(root).budgets
        children = {}
        for b in budgets:
            d = work / ("child-" + b.replace("%", "pct"))
            slice_checkpoint(root, d, budget=b, force=True)
            children[b] = str(d)
        common = {"root": str(root), "budgets": budgets, "children": children, "n": a.n, "device": a.device}
        mem = {k: run_worker({**common, "kind": k}) for k in ("parent", "alone", "children")}
        speed = run_worker({**common, "kind": "speed", "reps": a.reps})
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    report(root, size, budgets, mem, speed, a)


def report(root: Path, size: int, budgets: list[str], mem: dict, speed: dict, a) -> None:
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    print(f"checkpoint {root} ({mib(size)} of weights), {a.n} new tokens, {a.reps} repetitions (medians)")
    print(f"{'budget':>8} {'views tok/s':>12} {'child tok/s':>12} {'ratio':>6} {'CPU-time ratio':>15}")
    for b in budgets:
        print(f"{b:>8} {speed['view'][b]:>12.1f} {speed['child'][b]:>12.1f} {speed['ratio'][b]:>6.3f} "
              f"{speed['cpu_ratio'][b]:>15.3f}")
    p, al, ch = mem["parent"]["peak_delta"], mem["alone"]["peak_delta"], mem["children"]["peak_delta"]
    what = "peak RSS delta" if a.device == "cpu" else f"peak allocated {a.device} memory"
    print(f"{what}: parent serving {len(budgets)} budgets {mib(p)}, parent alone {mib(al)} "
          f"({p / al:.3f}x), {len(budgets)} sliced children side by side {mib(ch)} ({p / ch:.3f}x)")
    s = speed["split"]
    print(f"think {speed['think_budget']} ({speed['think_tokens']} tokens) / answer {speed['answer_budget']}: "
          f"{s['split_s']:.2f} s, {s['split_tps']:.1f} tok/s; all on {speed['answer_budget']}: {s['full_s']:.2f} s, "
          f"{s['full_tps']:.1f} tok/s (latency {s['split_s'] / s['full_s']:.3f}x)")
    print(json.dumps({
        "bench": "serve_bench", "checkpoint": str(root), "device": a.device, "weights_bytes": size, "new_tokens": a.n,
        "reps": a.reps,
        "peak_parent_all_budgets": p, "peak_parent_alone": al, "peak_children_side_by_side": ch,
        "rss_all_budgets_over_parent": round(p / al, 3), "rss_all_budgets_over_children": round(p / ch, 3),
        "tokens_per_s_parent": speed["view"], "tokens_per_s_child": speed["child"],
        "tokens_per_s_over_child": speed["ratio"], "tokens_per_cpu_s_over_child": speed["cpu_ratio"],
        "think_small_answer_large": {"think_budget": speed["think_budget"], "answer_budget": speed["answer_budget"],
                                     "think_tokens": speed["think_tokens"], "latency_s": s["split_s"],
                                     "tokens_per_s": round(s["split_tps"], 1)},
        "full_budget": {"latency_s": s["full_s"], "tokens_per_s": round(s["full_tps"], 1)},
        "latency_over_full": round(s["split_s"] / s["full_s"], 3)}))


if __name__ == "__main__":
    main()
