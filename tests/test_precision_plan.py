"""Budget x precision planning: the weights term of quantized checkpoints against Model Optimizer's
own export, the ranking of precisions, pins honoured or refused, and the JSON keys scripts read."""

from __future__ import annotations

import copy
import json
from importlib.util import find_spec
import math
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from elastic.cli.main import app
from elastic.profiles.devices import Capability, get_profile, load_profiles
from elastic.slicer.errors import ConfigError
from elastic.slicer.formats.precision import lookup
from elastic.slicer.planning.fit import Target, plan, slice_budget, target_from_profile
from elastic.slicer.formats.safetensors import DTYPES
from elastic.slicer.planning.memory import Workload, weight_tensors, weights_breakdown, weights_bytes

ROOT = Path(__file__).resolve().parent.parent
E12B = ROOT / "examples" / "nemotron-elastic-12b"
runner = CliRunner()


def on(profile: str, runtime: str | None = None, **workload):
    return plan(E12B, target_from_profile(get_profile(profile)), Workload(**{"dtype": "auto", **workload}),
                runtime=runtime)


def cli_plan(*args) -> dict:
    r = runner.invoke(app, ["plan", "-c", str(E12B), *args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


# ---- the weights term against Model Optimizer's export ----------------------------------------

MODELOPT_CONFIGS = [("fp8", "FP8_DEFAULT_CFG"), ("int8", "INT8_SMOOTHQUANT_CFG"), ("int8_wo", "INT8_WEIGHT_ONLY_CFG"),
                    ("int4", "INT4_AWQ_CFG"), ("nvfp4", "NVFP4_DEFAULT_CFG")]


@pytest.fixture(scope="module")
def tiny_bf16():
    """A tiny bf16 NemotronHForCausalLM (Mamba, attention, MLP) whose Linear input widths are
    multiples of 128 (Model Optimizer's int4 export refuses partial groups)."""
    pytest.importorskip("modelopt.torch.quantization", reason="nvidia-modelopt is not installed")
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from conftest import randomize_, tiny_config

    cfg = tiny_config(hidden_size=256, intermediate_size=384, mamba_num_heads=8, mamba_head_dim=32, n_groups=2,
                      ssm_state_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=128,
                      hybrid_override_pattern="M*-")
    torch.manual_seed(0)
    model = NemotronHForCausalLM(NemotronHConfig(**cfg)).eval()
    randomize_(model, 0)
    model = model.to(torch.bfloat16)
    model.config.architectures = ["NemotronHForCausalLM"]  # export_hf_checkpoint needs it
    return model


@pytest.mark.parametrize("precision, config", MODELOPT_CONFIGS)
@pytest.mark.heavy  # Model Optimizer export
def test_weights_term_equals_model_optimizers_export(tiny_bf16, tmp_path, precision, config):
    """Quantize on CPU with Model Optimizer's preset, export its unified HF checkpoint, and compare
    every tensor (name, dtype, shape) and the bytes with the plan's weights term. (nvfp4 calibrates
    on CPU too in modelopt 0.47 for this model.)"""
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint

    from elastic.slicer.formats.arch import Arch
    from elastic.slicer.formats.safetensors import read_header

    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    model = mtq.quantize(copy.deepcopy(tiny_bf16), getattr(mtq, config), forward_loop=lambda m: m(ids, use_cache=False))
    with torch.inference_mode():
        export_hf_checkpoint(model, export_dir=tmp_path)
    exported = {}
    for f in sorted(tmp_path.glob("*.safetensors")):
        header, _ = read_header(f)
        exported |= {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}
    arch = Arch.from_file(tmp_path / "config.json")
    predicted = weight_tensors(arch, precision, "bf16")
    assert predicted == exported
    on_disk = sum(math.prod(s) * DTYPES[d][1] for d, s in exported.values())
    assert abs(weights_bytes(arch, precision, "bf16") - on_disk) <= 0.01 * on_disk
    quant = json.loads((tmp_path / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == lookup(precision).quant_algo


def test_float_weights_are_parameters_times_bytes_and_scales_are_counted():
    from elastic.slicer.storage.reader import Checkpoint

    arch = Checkpoint.open(E12B).arch
    params = arch.param_counts()["total"]
    assert weights_bytes(arch, "bf16") == 2 * params and weights_bytes(arch, "fp32") == 4 * params
    int4 = weights_breakdown(arch, "int4", "bf16")
    # embeddings + lm_head (131072 x 5120 each) stay bf16; the Linear weights take half a byte each
    assert int4["float"] >= 2 * 2 * 131072 * 5120
    linear = (params * 2 - int4["float"]) // 2  # parameters of the quantized Linears
    assert int4["quantized"] == linear // 2
    assert int4["scales"] == pytest.approx(linear * 4 / 128, rel=0.01)  # float32 per 128 inputs (+ pre_quant_scale)
    assert weights_bytes(arch, "fp8", "bf16") < weights_bytes(arch, "int8", "bf16") < weights_bytes(arch, "bf16")


# ---- device capability ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, runs", [
    ("orin-nano-8gb", {"int8", "int4"}), ("agx-orin-64gb", {"int8", "int4"}), ("rtx-3090", {"int8", "int4"}),
    ("rtx-4060", {"fp8", "int8", "int4"}), ("rtx-4090", {"fp8", "int8", "int4"}), ("h100-80gb", {"fp8", "int8", "int4"}),
    ("thor-128gb", {"fp8", "nvfp4", "int8", "int4"}), ("rtx-5090", {"fp8", "nvfp4", "int8", "int4"}), ("cpu", set()),
])
def test_quantized_capability_per_device(name, runs):
    p = get_profile(name)
    assert {q for q in ("fp8", "nvfp4", "int8", "int4") if getattr(p.caps, q)} == runs
    assert set(p.runtimes) <= runs  # a runtime is listed only for what the device runs


def test_a_runtime_for_a_precision_the_device_lacks_is_refused(tmp_path):
    from elastic.profiles.errors import ProfileError

    orin = (ROOT / "profiles" / "data" / "jetson.toml").read_text()
    orin = orin.replace('runtimes = { int8 = ["TensorRT Edge-LLM"], int4 = ["TensorRT Edge-LLM"] }',
                        'runtimes = { fp8 = ["TensorRT Edge-LLM"] }', 1)
    (tmp_path / "jetson.toml").write_text(orin)
    (tmp_path / "host.toml").write_text((ROOT / "profiles" / "data" / "host.toml").read_text())
    with pytest.raises(ProfileError) as exc:
        load_profiles(tmp_path)
    assert "'runtimes' lists fp8 but the device does not run it" in "\n".join(exc.value.problems)


# ---- the choice -----------------------------------------------------------------------------------

def test_orin_nano_8gb_chooses_6b_on_llama_cpp_where_edgellm_int4_is_refused():
    """Engines in the plan (issue 24): Edge-LLM's int4 would fit 6B, but its GEMM needs 64-aligned
    output rows and 6B's in_proj has 12368; llama.cpp holds 6B at q5_k_m (its hidden, 4480, is no multiple
    of 256: q6_k's matrices fall back to q8_0 and need 6.91 GiB of 6.5)."""
    p = on("orin-nano-8gb", context=8192)
    assert (p.chosen, p.chosen_precision, p.chosen_runtime) == ("6B", "q5_k_m", "llama.cpp")
    edge = [c for c in p.candidates if c.budget == "6B" and c.runtime == "edgellm"]
    assert [c.weights.short for c in edge] == ["fp16", "int8", "int4"]  # no fp8/nvfp4
    assert edge[-1].fits and "outputs of 64" in edge[-1].refused and "(12368, 4480)" in edge[-1].refused


@pytest.mark.parametrize("profile, context, chosen, precision", [
    ("rtx-4090", 8192, "12B", "fp8"),  # bf16 12B needs 25.9 GiB: fp8 keeps the largest budget
    ("thor-128gb", 32768, "12B", "fp16"),  # everything fits: the best precision (Edge-LLM's float is fp16)
    ("orin-nx-16gb", 8192, "12B", "int4"),  # the largest budget first, even at int4
])
def test_largest_budget_then_best_precision(profile, context, chosen, precision):
    p = on(profile, context=context)
    assert (p.chosen, p.chosen_precision) == (chosen, precision)
    for b in p.budgets:  # every row is its budget's best precision that fits
        assert b.fits_at == () or b.weights_precision == b.fits_at[0]


def test_nvfp4_ranks_after_fp8_and_before_int8():
    """A Blackwell target just too small for 12B at fp8: nvfp4 keeps 12B."""
    bw = target_from_profile(get_profile("rtx-5090"))
    full = plan(E12B, bw, Workload(dtype="auto"), runtime="tensorrt-llm")  # no int8 SmoothQuant in TensorRT-LLM
    at = {c.weights.short: c.terms["total"] for c in full.candidates if c.budget == "12B"}
    assert list(at) == ["bf16", "fp8", "nvfp4", "int4"]
    small = replace(bw, usable_bytes=(at["fp8"] + at["nvfp4"]) // 2)
    p = plan(E12B, small, Workload(dtype="auto"), runtime="tensorrt-llm")
    assert (p.chosen, p.chosen_precision) == ("12B", "nvfp4")


def test_never_below_int4_and_nothing_fits_says_what_would():
    p = on("orin-nano-4gb", context=8192)
    assert p.chosen is None and p.chosen_precision is None
    assert {c.weights.short for c in p.candidates if c.runtime == "edgellm"} == {"fp16", "int8", "int4"}
    assert {c.weights.short for c in p.candidates if c.runtime == "llama.cpp"} == {"bf16", "q8_0", "q6_k", "q5_k_m",
                                                                                   "q4_k_m"}
    assert any("budget 6B needs" in s for s in p.suggestions)


def test_a_target_that_says_nothing_of_quantization_plans_floats():
    t = Target("test", "gpu", 20 * 2**30, 2**29, caps=Capability(True, True, False, False, False, False),
               unified=False, source="profile")  # bf16 and fp16, nothing quantized
    p = plan(E12B, t, Workload(dtype="auto"), runtime="vllm")
    assert {c.weights.short for c in p.candidates} == {"bf16"} and p.chosen == "9B"
    every = plan(E12B, t, Workload(dtype="auto"))  # llama.cpp's own types need no capability
    assert not any(c.weights.quantized for c in every.candidates)


def test_the_cpu_host_plans_no_quantized_weights():
    p = on("cpu")  # no Model Optimizer format; llama.cpp's own GGUF types are llama.cpp's business
    assert {c.weights.short for c in p.candidates} == {"bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m"}
    assert {c.runtime for c in p.candidates} == {"llama.cpp"} and not any(c.weights.quantized for c in p.candidates)


# ---- pins -----------------------------------------------------------------------------------------

def test_pinned_precisions_are_honoured():
    p = on("orin-nx-16gb", weights="int8", kv="bf16", state="bf16")
    assert {b.weights_precision for b in p.budgets} == {"int8"} and {c.weights.short for c in p.candidates} == {"int8"}
    assert {(b.kv_precision, b.state_precision) for b in p.budgets} == {("bf16", "bf16")}
    fp32_state = on("orin-nx-16gb", weights="int8")
    assert p.budget("6B").terms["ssm_state"] < fp32_state.budget("6B").terms["ssm_state"]


def test_an_fp8_pin_on_orin_is_refused_naming_what_orin_runs():
    with pytest.raises(ConfigError) as exc:
        on("orin-nano-8gb", weights="fp8")
    msg = exc.value.message
    assert "Jetson Orin Nano 8GB does not run fp8 weights" in msg and "compute capability 8.9" in msg
    assert "int8" in msg and "int4" in msg and exc.value.hint.setting == "precision"
    with pytest.raises(ConfigError, match="does not run fp8 KV cache"):
        on("orin-nano-8gb", kv="fp8")
    with pytest.raises(ConfigError, match="does not run nvfp4 weights"):
        on("rtx-4090", weights="nvfp4")


def test_fp8_kv_cache_halves_the_kv_term():
    bf16, fp8 = on("rtx-4090", weights="fp8"), on("rtx-4090", weights="fp8", kv="fp8")
    assert fp8.budget("12B").terms["kv_cache"] * 2 == bf16.budget("12B").terms["kv_cache"]
    assert fp8.budget("12B").kv_precision == "fp8"


def test_cli_pins_and_refusals():
    p = cli_plan("--target", "orin-nx-16gb", "--precision", "awq", "--kv-precision", "bf16", "--state-precision", "fp16")
    assert p["chosen_precision"] == "int4" and p["workload"]["weights"] == "int4"
    assert {(b["weights_precision"], b["kv_precision"], b["state_precision"]) for b in p["budgets"]} == {("int4", "bf16", "fp16")}
    assert cli_plan("--target", "orin-nx-16gb", "--dtype", "int8")["chosen_precision"] == "int8"  # --dtype = --precision
    assert cli_plan("--target", "orin-nx-16gb", "--dtype", "int8", "--precision", "w8a8")["workload"]["weights"] == "int8"
    r = runner.invoke(app, ["plan", "-c", str(E12B), "--target", "orin-nano-8gb", "--precision", "fp8"])
    assert r.exit_code == 2 and "does not run fp8 weights" in r.stderr and "int4" in r.stderr
    assert "--precision" in r.stderr  # the hint, in the CLI's words
    r = runner.invoke(app, ["plan", "-c", str(E12B), "--dtype", "bf16", "--precision", "int4"])
    assert r.exit_code == 2 and "disagree" in r.stderr


def test_fit_my_gpu_chooses_among_what_slicing_writes(monkeypatch):
    import elastic.slicer.planning.fit as fit

    if find_spec("modelopt") is not None:  # the quantizer is installed: fp8 fits the 12B on a 4090
        p = json.loads(runner.invoke(app, ["fit-my-gpu", "-c", str(E12B), "--target", "rtx-4090", "--dry-run",
                                           "--json"]).stdout)
        assert (p["chosen"], p["chosen_precision"]) == ("12B", "fp8")
    monkeypatch.setattr(fit, "slice_precisions", lambda: fit.WEIGHTS)  # as without Model Optimizer
    r = runner.invoke(app, ["fit-my-gpu", "-c", str(E12B), "--target", "rtx-4090", "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert (p["chosen"], p["chosen_precision"]) == ("9B", "bf16")
    assert any("12B would fit with fp8 weights" in n and "elastic[modelopt]" in n for n in p["notes"])
    r = runner.invoke(app, ["fit-my-gpu", "-c", str(E12B), "--target", "rtx-4090", "--precision", "int4", "--dry-run"])
    assert r.exit_code == 2 and "int4 weights are not available here" in r.stderr


def test_slicing_a_quantized_row_needs_the_quantizer(monkeypatch):
    import elastic.slicer.planning.fit as fit

    p = on("orin-nx-16gb")
    assert (p.chosen, p.chosen_precision) == ("12B", "int4")
    monkeypatch.setattr(fit, "slice_precisions", lambda: fit.WEIGHTS)
    with pytest.raises(ConfigError, match="planned with int4 weights.*elastic.modelopt"):
        slice_budget(p, "12B", "unused")


# ---- the JSON scripts read -------------------------------------------------------------------------

def test_plan_json_keys():
    p = cli_plan("--target", "orin-nano-8gb", "--context", "8192")
    assert {"checkpoint", "weights_present", "device", "workload", "budgets", "chosen", "notes", "suggestions",
            "chosen_precision", "candidates"} <= set(p)
    assert (p["chosen"], p["chosen_precision"], p["chosen_runtime"]) == ("6B", "q5_k_m", "llama.cpp")
    assert p["parameter_convention"].startswith("safetensors count")
    assert {"context", "batch", "dtype", "weights", "kv", "state"} <= set(p["workload"])
    for b in p["budgets"]:
        assert {"name", "parameters", "dtype", "fits", "headroom_bytes", "terms", "weights_precision", "kv_precision",
                "state_precision"} <= set(b)
        assert b["dtype"] == "bfloat16" and b["kv_precision"] == "bf16" and b["state_precision"] == "fp32"
    assert len(p["candidates"]) == 3 * (3 + 5)  # 12B, 9B, 6B x Edge-LLM fp16/int8/int4, llama.cpp bf16/q8_0..q4_k_m
    for c in p["candidates"]:
        assert {"budget", "weights_precision", "fits", "terms", "runtime", "why"} <= set(c)
        t = c["terms"]
        assert set(t) == {"weights", "kv_cache", "ssm_state", "activations", "overhead", "margin", "total"}
        assert t["total"] == sum(v for k, v in t.items() if k != "total")
    chosen = next(b for b in p["budgets"] if b["name"] == p["chosen"])
    same = next(c for c in p["candidates"] if c["budget"] == "6B" and c["weights_precision"] == "q5_k_m")
    assert chosen["terms"] == same["terms"] and chosen["fits"] and same["fits"]


def test_int4_takes_the_group_the_slice_writes():
    """The demo's Linear widths (32, 48, ...) are not multiples of 128: int4 AWQ falls back to the
    largest group that divides them (``layout.weight_group``, what `elastic slice --precision int4`
    writes), so the plan offers int4 there instead of refusing it."""
    from elastic.slicer.planning.describe import DEMO_CHECKPOINT

    from elastic.slicer.planning.memory import block_problem

    p = plan(DEMO_CHECKPOINT, target_from_profile(get_profile("orin-nano-8gb")), Workload(weights="int4"))
    for b in p.budgets:  # the slicer writes int4 with a smaller group ...
        assert block_problem(b.spec.child_arch(p.checkpoint.arch), "int4") is None
    # ... but on Orin only TensorRT Edge-LLM runs int4, and its AWQ takes groups of 128 (issue 24)
    assert p.chosen is None and p.candidates and all(
        c.runtime == "edgellm" and c.fits and "multiples of 128" in c.refused for c in p.candidates)
    auto = plan(DEMO_CHECKPOINT, target_from_profile(get_profile("orin-nano-8gb")), Workload(dtype="auto"))
    # the preferred engine's float precision first: Edge-LLM's fp16 already holds the largest budget
    assert (auto.chosen_precision, auto.chosen_runtime) == ("fp16", "edgellm")
    assert all("int4" not in b.fits_at for b in auto.budgets)
