"""The engine is part of the plan (issue 24 item 3): budget x weights precision x engine, each
choice checked against the engines' rules (DESIGN.md section 10), not against a snapshot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from elastic.cli.main import app
from elastic.profiles.devices import get_profile, load_profiles
from elastic.slicer.errors import ConfigError
from elastic.slicer.formats.llama_cpp import gguf_problems
from elastic.slicer.formats.precision import GGUF_QUANTIZED, Q4_K_M
from elastic.slicer.planning.engines import ENGINES, engine_option
from elastic.slicer.planning.fit import plan, target_from_profile
from elastic.slicer.planning.memory import Workload, weights_bytes

E12B = Path(__file__).resolve().parent.parent / "examples" / "nemotron-elastic-12b"
SIX = ("orin-nano-8gb", "orin-nx-16gb", "agx-orin-64gb", "thor-128gb", "rtx-4060", "rtx-4090")


def on(profile: str, runtime: str | None = None, **w):
    return plan(E12B, target_from_profile(get_profile(profile)), Workload(**{"context": 8192, "dtype": "auto", **w}), runtime=runtime)


@pytest.fixture(scope="module")
def plans():
    return {t: on(t) for t in (*SIX, "cpu")}


def test_every_profile_names_engines_the_planner_knows():
    for p in load_profiles().values():
        assert p.engines and set(p.engines) <= set(ENGINES), p.name
    assert get_profile("orin-nano-8gb").engines == ("edgellm", "llama.cpp")
    assert get_profile("rtx-4090").engines == ("vllm", "tensorrt-llm", "llama.cpp")
    assert get_profile("cpu").engines == ("llama.cpp",)


def test_only_the_engines_precisions_are_offered(plans):
    by = lambda p, r: {c.weights.short for c in p.candidates if c.runtime == r}  # noqa: E731
    for t in ("orin-nano-8gb", "orin-nx-16gb", "agx-orin-64gb"):
        assert by(plans[t], "edgellm") == {"fp16", "int8", "int4"}  # Orin: never fp8 / nvfp4 on Edge-LLM
        assert {c.runtime for c in plans[t].candidates} == {"edgellm", "llama.cpp"}
    assert by(plans["thor-128gb"], "edgellm") == {"fp16", "fp8", "nvfp4", "int4"}
    assert by(plans["rtx-4090"], "vllm") == {"bf16", "fp8"}  # vLLM: Model Optimizer fp8/nvfp4 only; Ada: no nvfp4
    assert by(plans["rtx-4090"], "tensorrt-llm") == {"bf16", "fp8", "int4"}  # no int8 SmoothQuant
    for p in plans.values():
        assert by(p, "llama.cpp") == {"bf16", *(q.short for q in GGUF_QUANTIZED)}
    assert {c.runtime for c in plans["cpu"].candidates} == {"llama.cpp"}


def test_the_six_targets_choose_by_the_rules(plans):
    got = {t: (plans[t].chosen, plans[t].chosen_precision, plans[t].chosen_runtime) for t in SIX}
    # orin-nano-8gb: the 6B's hidden size (4480) is no multiple of 256, so llama.cpp's K-quants fall back for
    # every matrix that reads it (Q6_K -> Q8_0, Q5_K -> Q5_1): q6_k needs 6.91 GiB of 6.5, q5_k_m fits
    assert got == {"orin-nano-8gb": ("6B", "q5_k_m", "llama.cpp"), "orin-nx-16gb": ("12B", "int4", "edgellm"),
                   "agx-orin-64gb": ("12B", "fp16", "edgellm"), "thor-128gb": ("12B", "fp16", "edgellm"),
                   "rtx-4060": ("9B", "q4_k_m", "llama.cpp"), "rtx-4090": ("12B", "fp8", "vllm")}
    for t in SIX:  # each choice is the first option that fits, in the device's engine order
        p = plans[t]
        tried = [c for c in p.candidates if c.budget == p.chosen]
        first = next(c for c in tried if c.usable)
        assert (first.runtime, first.weights.short) == (p.chosen_runtime, p.chosen_precision)
        bigger = [b for b in p.budgets if b.parameters > p.budget(p.chosen).parameters]
        assert all(not c.usable for c in p.candidates if c.budget in {b.name for b in bigger})
    # orin-nano-8gb: Edge-LLM int4 fits 6B in memory but its GEMM needs 64-aligned outputs (in_proj: 12368)
    nano = [c for c in plans["orin-nano-8gb"].candidates if c.budget == "6B" and c.runtime == "edgellm"]
    assert nano[-1].weights.short == "int4" and nano[-1].fits and "outputs of 64" in nano[-1].refused
    # rtx-4060: no GPU engine fits 9B (int4 the smallest), llama.cpp's q4_k_m does
    r = [c for c in plans["rtx-4060"].candidates if c.budget == "9B"]
    assert not any(c.usable for c in r if c.runtime != "llama.cpp")
    assert plans["rtx-4090"].budget("12B").why.startswith("vLLM: fp8 on GeForce RTX 4090")


def test_the_cpu_host_offers_q4_k_m_on_llama_cpp(plans):
    c = next(c for c in plans["cpu"].candidates if c.budget == "12B" and c.weights is Q4_K_M)
    assert c.runtime == "llama.cpp" and c.refused is None and "llama.cpp: q4_k_m on the CPU host" in c.why
    # q4_k_m: 4.5 bits per matrix weight; the float32 rest is small
    child = plans["cpu"].budget("12B").spec.child_arch(plans["cpu"].checkpoint.arch)
    assert weights_bytes(child, "q4_k_m") < weights_bytes(child, "q8_0") < weights_bytes(child, "bf16")
    assert "estimate" in c.why


def test_runtime_pins_and_refuses():
    p = on("orin-nx-16gb", runtime="llama.cpp")
    assert {c.runtime for c in p.candidates} == {"llama.cpp"} and p.chosen_runtime == "llama.cpp"
    with pytest.raises(ConfigError, match="vLLM does not run on Jetson Orin Nano 8GB.*edgellm, llama.cpp"):
        on("orin-nano-8gb", runtime="vllm")
    with pytest.raises(ConfigError, match="unknown runtime 'trt'.*edgellm, vllm, tensorrt-llm, llama.cpp"):
        on("rtx-4090", runtime="trt")
    with pytest.raises(ConfigError, match="no engine on Jetson Orin Nano 8GB runs int8_wo"):
        on("orin-nano-8gb", weights="int8_wo")


def test_engines_that_cannot_hold_a_model_are_not_offered():
    arch = load_arch_without_attention()
    t = target_from_profile(get_profile("cpu"))
    o = engine_option("llama.cpp", arch, Q4_K_M, Q4_K_M, t)
    assert gguf_problems(arch) and o.refused and "no attention layer" in o.refused
    moe = load_moe_arch()
    from elastic.slicer.formats.precision import FLOAT16, NVFP4

    thor = target_from_profile(get_profile("thor-128gb"))
    assert "only as NVFP4" in engine_option("edgellm", moe, FLOAT16, FLOAT16, thor).refused
    assert "only as NVFP4" not in (engine_option("edgellm", moe, NVFP4, FLOAT16, thor).refused or "")


def load_arch_without_attention():
    from elastic.slicer.storage.reader import Checkpoint

    arch = Checkpoint.open(E12B).arch
    return arch.with_layers(tuple(layer for layer in arch.layers if layer.kind != "attention"))


def load_moe_arch():
    from dataclasses import replace

    arch = load_arch_without_attention()
    return arch.with_layers(tuple(replace(layer, kind="moe") if layer.kind == "mlp" else layer
                                  for layer in arch.layers))


def test_plan_json_carries_runtime_per_candidate():
    r = CliRunner().invoke(app, ["plan", "-c", str(E12B), "--target", "rtx-4090", "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.output)
    assert p["chosen_runtime"] == "vllm" and p["chosen_precision"] == "fp8" and p["chosen"] == "12B"
    assert all(c["runtime"] in ENGINES and c["why"] for c in p["candidates"])
    assert all(b["runtime"] for b in p["budgets"])
    text = CliRunner().invoke(app, ["plan", "-c", str(E12B), "--target", "rtx-4090"]).output
    assert "engine" in text and "vllm" in text


def test_plan_on_the_cpu_host_shows_llama_cpps_precisions():
    """`elastic plan --target cpu`: every budget at bf16 and llama.cpp's q8_0 ... q4_k_m, costed as llama.cpp
    holds them (a GGUF of q4_k_m is smaller than q8_0); pinning Model Optimizer's int4 there is refused
    with the precisions the host runs."""
    r = CliRunner().invoke(app, ["plan", "-c", str(E12B), "--target", "cpu"])
    assert r.exit_code == 0, r.output
    head = next(line for line in r.output.splitlines() if line.startswith("total at"))
    assert head.split()[2:7] == ["bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m"] and "llama.cpp" in head
    p = json.loads(CliRunner().invoke(app, ["plan", "-c", str(E12B), "--target", "cpu", "--json"]).stdout)
    cells = {(c["budget"], c["weights_precision"]): c for c in p["candidates"]}
    assert cells[("12B", "q4_k_m")]["terms"]["weights"] < cells[("12B", "q8_0")]["terms"]["weights"]
    assert cells[("12B", "q4_k_m")]["memory_basis"].startswith("measured model: llama.cpp")
    bad = CliRunner().invoke(app, ["plan", "-c", str(E12B), "--target", "cpu", "--precision", "int4"])
    assert bad.exit_code == 2 and "q4_k_m" in bad.stderr and "llama.cpp's GGUF types" in bad.stderr
