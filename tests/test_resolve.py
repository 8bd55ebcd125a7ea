"""Budgets by constrained choice (issue 25): the integer program against brute-force enumeration,
sizes between the trained budgets, and the memory form of a budget."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from elastic.slicer.errors import ConfigError
from elastic.slicer.formats.arch import Arch
from elastic.slicer.formats.elastic_format import (Dimension, ElasticConfig, budget_log_probs, resolve_budget,
                                                   resolve_trained, route, spec_from_choices)
from elastic.slicer.formats.resolve import (UnreachableBudget, log_probs, nearest, parameter_cost, parse_size,
                                            resolve)
from elastic.slicer.formats.spec import SliceSpec
from elastic.slicer.planning.memory import Workload, footprint

DEMO = Path(__file__).resolve().parents[1] / "slicer" / "demo_checkpoint"
TINY = {"model_type": "nemotron_h", "vocab_size": 64, "hidden_size": 32, "hybrid_override_pattern": "M-M*-",
        "mamba_num_heads": 4, "mamba_head_dim": 8, "n_groups": 2, "ssm_state_size": 8, "chunk_size": 8,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 64}


def tiny_space(parent: Arch, shared_mamba: bool = False) -> tuple[Dimension, ...]:
    """Every kind of dimension: global, shared, per layer, depth over an attention layer.
    ``shared_mamba``: both Mamba layers decided by shared rows only (one unit in the program)."""
    return (Dimension("hidden_size", (32, 24, 16)),
            Dimension("mamba_num_heads", (4, 2), (0, 2), shared=True),
            Dimension("mamba_head_dim", (8, 4), (0, 2), shared=shared_mamba),
            Dimension("num_attention_heads", (4, 2), (3,), shared=True),
            Dimension("intermediate_size", (64, 32, 16), (1, 4)),
            Dimension("depth", ("keep", "drop"), (3, 4)))


def oracle_spec(parent: Arch, dims, picks: dict) -> SliceSpec:
    """The spec one choice per router row makes, written out here (not through the resolver's code)."""
    from dataclasses import replace

    layers = list(parent.layers)
    hidden = parent.hidden_size
    for d in dims:  # sizes first
        if d.layers is None:
            hidden = picks[d.name][0]
        elif d.name != "depth":
            for k, i in enumerate(d.layers):
                layers[i] = replace(layers[i], **{d.name: picks[d.name][0 if d.shared else k]})
    for d in dims:  # then the dropped layers
        if d.name == "depth":
            for k, i in enumerate(d.layers):
                if picks["depth"][k] == "drop":
                    layers[i] = None
    return SliceSpec(hidden, tuple(layers))


def every_architecture(parent: Arch, dims, logp: dict):
    """(log-probability, spec) of every choice of every router row."""
    rows = [(d, r) for d in dims for r in range(d.rows)]
    for combo in itertools.product(*[range(len(d.choices)) for d, _ in rows]):
        picks: dict[str, list] = {}
        lp = 0.0
        for (d, r), c in zip(rows, combo):
            picks.setdefault(d.name, []).append(d.choices[c])
            lp += logp[d.name][r][c]
        yield lp, oracle_spec(parent, dims, picks)


@pytest.fixture(scope="module", params=[False, True], ids=["per-layer", "shared"])
def enumerated(request):
    parent = Arch.from_config(TINY)
    dims = tiny_space(parent, shared_mamba=request.param)
    rng = np.random.default_rng(0)
    logp = log_probs({d.name: rng.normal(size=(d.rows, len(d.choices))) for d in dims}, scale=2.0)
    table = [(lp, spec, spec.parameters(parent), any(la is not None and la.kind == "attention" for la in spec.layers))
             for lp, spec in every_architecture(parent, dims, logp)]
    return parent, dims, logp, table


@pytest.mark.parametrize("share,tolerance", [(0.95, 0.02), (0.8, 0.05), (0.6, 0.01), (0.45, 0.05), (0.3, 0.1)])
@pytest.mark.parametrize("keep_attention", [True, False])
def test_resolution_is_the_best_feasible_architecture_by_enumeration(enumerated, share, tolerance, keep_attention):
    parent, dims, logp, table = enumerated
    target = share * parent.param_counts()["total"]
    lo, hi = target * (1 - tolerance), target * (1 + tolerance)
    feasible = [(lp, spec) for lp, spec, n, attn in table if lo <= n <= hi and (attn or not keep_attention)]
    r = resolve(dims, parent, logp, [parameter_cost(parent, lo, hi)], keep_attention=keep_attention)
    if not feasible:
        assert r is None
        return
    best = max(lp for lp, _ in feasible)
    assert r is not None and r.log_prob == pytest.approx(best, abs=1e-9)
    assert lo <= r.spec.parameters(parent) <= hi and r.parameters == r.spec.parameters(parent)
    assert r.spec in [spec for lp, spec in feasible if abs(lp - best) < 1e-9]


def test_argmax_that_lands_is_returned_without_a_program(enumerated):
    parent, dims, logp, table = enumerated
    best_lp, best_spec, n, _ = max(table, key=lambda row: row[0])
    r = resolve(dims, parent, logp, [parameter_cost(parent, n * 0.99, n * 1.01)], keep_attention=False)
    assert not r.solved and r.spec == best_spec and r.log_prob == pytest.approx(best_lp)


def test_nearest_size_when_nothing_lands(enumerated):
    parent, dims, logp, table = enumerated
    lo, hi = 1000, 1100  # far below the smallest architecture
    assert resolve(dims, parent, logp, [parameter_cost(parent, lo, hi)]) is None
    near = nearest(dims, parent, [parameter_cost(parent, lo, hi)], keep_attention=True)
    assert near.parameters == min(n for _, _, n, attn in table if attn)


def test_memory_budget_by_enumeration(enumerated):
    from elastic.slicer.planning.exact import memory_cost

    parent, dims, logp, table = enumerated
    w = Workload(context=512, dtype="bfloat16", weights="bfloat16", kv="bfloat16", state="float32", prefill_chunk=64)
    sizes = sorted({spec: footprint(spec.child_arch(parent), w, 1000)["total"] for _, spec, _, _ in table}.items(),
                   key=lambda kv: kv[1])
    bytes_of = dict(sizes)
    for cap in (sizes[len(sizes) // 4][1], sizes[len(sizes) // 2][1] + 1, sizes[-1][1] - 1):
        cost = memory_cost(parent, w, 1000, max_bytes=cap)
        r = resolve(dims, parent, logp, [cost], keep_attention=False)
        best = max(lp for lp, spec, _, _ in table if bytes_of[spec] <= cap)
        assert r.log_prob == pytest.approx(best, abs=1e-9)
        assert r.values[0] == bytes_of[r.spec] <= cap


# ---- budgets of a checkpoint ---------------------------------------------------------------------------


@pytest.fixture
def demo(tmp_path):
    shutil.copytree(DEMO, tmp_path / "demo")
    return tmp_path / "demo"


def test_trained_budgets_resolve_to_the_router_argmax_where_it_lands():
    parent = Arch.from_file(DEMO)
    ec = ElasticConfig.read(DEMO, parent)
    from elastic.slicer.formats.elastic_format import read_router

    weights = read_router(DEMO, ec)
    for b in ec.budgets[1:]:
        spec, source = resolve_budget(DEMO, ec, parent, b.name)
        assert source == "router"
        assert spec == SliceSpec.from_json(spec_from_choices(route(weights, ec, b.name), ec, parent), parent)


def test_a_budget_the_argmax_misses_lands_within_its_tolerance(demo):
    """The router's argmax for 50% has 129,972 parameters; claim a target 12% above it."""
    parent = Arch.from_file(demo)
    data = json.loads((demo / "elastic_config.json").read_text())
    data["budgets"][2]["target_parameters"] = 145_000
    data["budgets"][2]["tolerance"] = 0.02
    ec = ElasticConfig.from_json(data, parent)
    from elastic.slicer.formats.elastic_format import read_router

    weights = read_router(demo, ec)
    r = resolve_trained(weights, ec, parent, "50%")
    assert r.solved and abs(r.parameters / 145_000 - 1) <= 0.02
    argmax = route(weights, ec, "50%")
    logp = budget_log_probs(weights, ec, "50%")
    assert r.log_prob < sum(float(row.max()) for rows in logp.values() for row in rows)
    assert SliceSpec.from_json(spec_from_choices(argmax, ec, parent), parent).parameters(parent) == 129_972


@pytest.mark.parametrize("size,share", [("60%", 0.60), ("40%", 0.40), ("90%", 0.90), ("150000", None)])
def test_sizes_between_the_trained_budgets(size, share):
    parent = Arch.from_file(DEMO)
    ec = ElasticConfig.read(DEMO, parent)
    total = parent.param_counts()["total"]
    target = round(share * total) if share else int(size)
    spec, source = resolve_budget(DEMO, ec, parent, size)
    assert abs(spec.parameters(parent) / target - 1) <= 0.05
    assert source.startswith("router, not trained: ")
    where = {"60%": "between budgets 75% and 50%", "40%": "below the smallest budget, 50%",
             "90%": "between the parent and budget 75%", "150000": "between budgets 75% and 50%"}[size]
    assert source.endswith(where)


def test_sizes_without_a_router_use_the_stored_choices(demo):
    (demo / "router.safetensors").unlink()
    parent = Arch.from_file(demo)
    ec = ElasticConfig.read(demo, parent)
    spec, source = resolve_budget(demo, ec, parent, "60%")
    assert source == "elastic_config.json's choices, not trained: between budgets 75% and 50%"
    assert abs(spec.parameters(parent) / (0.6 * parent.param_counts()["total"]) - 1) <= 0.05


def test_a_size_no_architecture_reaches_names_the_nearest():
    parent = Arch.from_file(DEMO)
    ec = ElasticConfig.read(DEMO, parent)
    with pytest.raises(UnreachableBudget) as e:
        resolve_budget(DEMO, ec, parent, "10%")
    near = e.value.nearest.parameters
    assert f"the nearest has {near:,}" in e.value.message and f"--budget {near}" in e.value.message
    spec, _ = resolve_budget(DEMO, ec, parent, str(near))  # and asking for it works
    assert spec.parameters(parent) == pytest.approx(near, rel=0.05)


def test_memory_sizes():
    from elastic.slicer.planning.exact import default_memory

    parent = Arch.from_file(DEMO)
    ec = ElasticConfig.read(DEMO, parent)
    assert resolve_budget(DEMO, ec, parent, "1GiB") == (SliceSpec.full(parent), "full model")
    cost = default_memory(parent)
    # between the parent and 75% (both keep the attention layer, whose context-long mask dominates the
    # demo's memory: between 75% and 50%, which has none, no architecture lands)
    full, three_q = cost.exact(SliceSpec.full(parent)), cost.exact(SliceSpec.from_json(ec.resolved["75%"], parent))
    kib = int((full + three_q) / 2) // 2**10
    spec, source = resolve_budget(DEMO, ec, parent, f"{kib}KiB")
    got = footprint(spec.child_arch(parent), Workload(), 0)["total"]
    assert 0.95 * kib * 2**10 <= got <= kib * 2**10 and "not trained" in source
    half = cost.exact(SliceSpec.from_json(ec.resolved["50%"], parent))
    with pytest.raises(UnreachableBudget, match="the nearest needs"):
        resolve_budget(DEMO, ec, parent, f"{int((three_q + half) / 2) // 2**10}KiB")


def test_unknown_budget_lists_the_forms():
    parent = Arch.from_file(DEMO)
    ec = ElasticConfig.read(DEMO, parent)
    with pytest.raises(ConfigError, match=r"this checkpoint has: 100%, 75%, 50%; or give a size: a share"):
        resolve_budget(DEMO, ec, parent, "huge")


@pytest.mark.parametrize("text,expected", [
    ("60%", ("parameters", 600)), ("7.5B", ("parameters", 7_500_000_000)), ("300m", ("parameters", 300_000_000)),
    ("120000", ("parameters", 120_000)), ("6GiB", ("bytes", 6 * 2**30)), ("8 GB", ("bytes", 8 * 10**9)),
    ("512MiB", ("bytes", 512 * 2**20)), ("12.5%", ("parameters", 125)), ("abc", None), ("6XB", None), ("", None)])
def test_parse_size(text, expected):
    assert parse_size(text, 1000) == expected


# ---- issue 25's acceptance: a held-out parent trained with default settings ------------------------------


@pytest.mark.slow
def test_held_out_run_lands_every_budget(tmp_path):
    path = Path(__file__).resolve().parents[1] / "bench" / "held_out_budgets.py"
    spec = importlib.util.spec_from_file_location("held_out_budgets", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.held_out_run(tmp_path / "run")
    assert out["all_within_5pct"], out
    for name, r in out["budgets"].items():
        if "log_prob" in r:
            assert r["log_prob"] <= r["argmax_log_prob"] + 1e-9
            assert math.isfinite(r["log_prob"])


def test_largest_fitting_by_enumeration(enumerated):
    from elastic.slicer.planning.exact import largest_fitting, memory_cost

    parent, dims, logp, table = enumerated
    w = Workload(context=512, dtype="bfloat16", weights="bfloat16", kv="bfloat16", state="float32", prefill_chunk=64)
    sizes = sorted(footprint(spec.child_arch(parent), w, 0)["total"] for _, spec, _, _ in table)
    for cap in (sizes[len(sizes) // 3], sizes[2 * len(sizes) // 3]):
        r = largest_fitting(dims, parent, memory_cost(parent, w, 0, max_bytes=cap), keep_attention=False)
        best = max(n for _, spec, n, _ in table if footprint(spec.child_arch(parent), w, 0)["total"] <= cap)
        assert r.parameters == best and r.values[1] <= cap
    too_small = memory_cost(parent, w, 0, max_bytes=sizes[0] - 1)
    assert largest_fitting(dims, parent, too_small, keep_attention=False) is None


# ---- elastic plan --fit exact ---------------------------------------------------------------------------


def test_plan_fit_exact_beside_the_trained_budgets():
    from typer.testing import CliRunner

    from elastic.cli.main import app
    from elastic.slicer.planning.memory import Workload as W

    example = Path(__file__).resolve().parents[1] / "examples" / "nemotron-elastic-12b"
    args = ["plan", "-c", str(example), "--target", "orin-nano-8gb", "--json"]
    runner = CliRunner()
    assert "exact_fit" not in json.loads(runner.invoke(app, args).stdout)
    r = runner.invoke(app, args + ["--fit", "exact"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    e, chosen = p["exact_fit"], next(b for b in p["budgets"] if b["name"] == p["chosen"])
    assert set(chosen) <= set(e) and "spec" in e  # shaped like a budget row, with its spec
    assert e["fits"] and e["weights_precision"] == chosen["weights_precision"]
    assert e["parameters"] > chosen["parameters"] and e["terms"]["total"] <= p["device"]["usable_bytes"]
    # the memory the plan shows is the plan's own footprint of that spec
    parent = Arch.from_file(example)
    spec = SliceSpec.from_json(e["spec"], parent)
    w = W(**{**p["workload"], "weights": e["weights_precision"]})
    assert footprint(spec.child_arch(parent), w, p["device"]["overhead_bytes"], e["runtime"]) == e["terms"]
    assert spec.parameters(parent) == e["parameters"]
    text = runner.invoke(app, args[:-1] + ["--fit", "exact"]).stdout
    # the engine-aware plan: on an Orin Nano llama.cpp (q5_k_m) holds the 6B (Edge-LLM's int4 refuses it)
    assert f"exact fit   {e['parameters'] / 1e9:.2f}B parameters at {e['weights_precision']}" in text
    assert "the largest trained budget that fits: 6B" in text


def test_fit_my_gpu_fit_exact_chooses_the_exact_fit_when_it_is_larger():
    from typer.testing import CliRunner

    from elastic.cli.main import app

    example = Path(__file__).resolve().parents[1] / "examples" / "nemotron-elastic-12b"
    r = CliRunner().invoke(app, ["fit-my-gpu", "-c", str(example), "--target", "orin-nano-8gb", "--fit", "exact",
                                 "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    trained = max(b["parameters"] for b in p["budgets"] if b["fits"] and b["name"] != "exact")
    assert p["exact_fit"]["parameters"] > trained  # int4 (Model Optimizer, in the test extra) fits 6B, exact 7.1B
    assert p["chosen"] == "exact" and p["budgets"][-1] == {k: v for k, v in p["exact_fit"].items() if k != "spec"}


def test_the_trainer_resolves_with_the_function_slicing_uses(demo):
    """End of a run (trainer.elastic.resolve_budgets) on the demo's router with the 50% target moved
    12% above its argmax: the resolution lands, reports the argmax it replaced, and slicing the
    written config with the same router resolves the same architecture."""
    from elastic.slicer.formats.elastic_format import read_router
    from elastic.trainer.elastic import resolve_budgets

    parent = Arch.from_file(demo)
    data = json.loads((demo / "elastic_config.json").read_text())
    data["budgets"][2]["target_parameters"] = 145_000
    ec = ElasticConfig.from_json(data, parent)
    weights = read_router(demo, ec)
    out, report = resolve_budgets(weights, ec, parent, tolerance=0.03, scale=10.0, keep_attention=False)
    assert out.router_scale == 10.0 and all(b.tolerance == 0.03 for b in out.budgets)
    assert out.resolved["100%"] == SliceSpec.full(parent).to_json(parent)
    got = SliceSpec.from_json(out.resolved["50%"], parent)
    assert abs(got.parameters(parent) / 145_000 - 1) <= 0.03
    assert report["50%"]["argmax_parameters"] == 129_972 and report["50%"]["solved"]
    assert report["50%"]["log_prob"] < report["50%"]["argmax_log_prob"]
    again = ElasticConfig.from_json(out.to_json(), parent)  # what the checkpoint holds, read back
    assert resolve_budget(demo, again, parent, "50%") == (got, "router")
