"""The memory model and the fit decision."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from elastic.cli.main import app
from elastic.profiles.devices import Capability, get_profile
from elastic.slicer.storage.reader import Checkpoint
from elastic.slicer.planning.fit import Target, budget_specs, choose_dtype, plan, target_from_profile
from elastic.slicer.planning.memory import Workload, footprint, kv_cache_bytes, ssm_state_bytes
from elastic.slicer.nn.model import load_model
from elastic.slicer.planning.describe import DEMO_CHECKPOINT

ROOT = Path(__file__).resolve().parent.parent
E12B = ROOT / "examples" / "nemotron-elastic-12b"
runner = CliRunner()


def test_weight_terms_are_two_bytes_per_parameter_in_bf16():
    ckpt = Checkpoint.open(E12B)
    assert not ckpt.has_weights and ckpt.is_elastic
    w = Workload(context=8192, dtype="bfloat16")
    params = {}
    for name, spec, _ in budget_specs(ckpt):
        child = spec.child_arch(ckpt.arch)
        params[name] = child.param_counts()["total"]
        assert footprint(child, w, 0)["weights"] == 2 * params[name]
    assert params["12B"] == 12_310_001_152  # the parent's count (DESIGN.md section 3)
    assert 8.9e9 < params["9B"] < 9.1e9 and 5.9e9 < params["6B"] < 6.1e9


def test_state_terms_equal_the_real_cache(hf_ckpt):
    """KV cache and Mamba state predicted from the config = the tensors the model really keeps."""
    model = load_model(hf_ckpt[0])
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(0, 97, (3, 40)), cache=cache)
    kv = sum(t.numel() * t.element_size() for s in cache.layers if s is not None and hasattr(s, "k") for t in (s.k, s.v))
    ssm = sum(t.numel() * t.element_size() for s in cache.layers if s is not None and hasattr(s, "ssm") for t in (s.conv, s.ssm))
    assert kv == kv_cache_bytes(model.arch, context=40, batch=3, dtype="float32")
    assert ssm == ssm_state_bytes(model.arch, batch=3, dtype="float32")


def cpu_target(gib: float, **kw) -> Target:
    caps = Capability(bf16=kw.get("bf16", True), fp16=True, fp8=False, int8=False, int4=False, nvfp4=False)
    return Target("test", "gpu", int(gib * 2**30), 2**29, caps=caps, unified=False, source="profile")


def test_largest_fitting_budget_is_chosen():
    p = plan(E12B, cpu_target(20), Workload(context=8192)).to_json()
    fits = {b["name"]: b["fits"] for b in p["budgets"]}
    assert fits == {"12B": False, "9B": True, "6B": True} and p["chosen"] == "9B"
    for b in p["budgets"]:
        t = b["terms"]
        assert t["total"] == sum(v for k, v in t.items() if k != "total")
        assert b["headroom_bytes"] == 20 * 2**30 - t["total"]


def test_longer_context_needs_more_kv_and_can_change_the_choice():
    short = plan(E12B, cpu_target(20), Workload(context=8192)).to_json()
    long = plan(E12B, cpu_target(20), Workload(context=262144)).to_json()
    assert short["chosen"] == "9B"
    kv = lambda p: {b["name"]: b["terms"]["kv_cache"] for b in p["budgets"]}  # noqa: E731
    assert kv(long)["6B"] == 32 * kv(short)["6B"]
    assert long["chosen"] == "6B"


def test_bf16_falls_back_to_fp16():
    t = cpu_target(24, bf16=False)
    assert choose_dtype("bfloat16", t)[0] == "float16" and choose_dtype(None, t)[0] == "float16"
    p = plan(E12B, t, Workload(dtype="bfloat16")).to_json()
    assert {b["dtype"] for b in p["budgets"]} == {"float16"} and "no bfloat16" in p["notes"][0]


def test_nothing_fits_says_what_would():
    p = plan(E12B, target_from_profile(get_profile("orin-nano-4gb")), Workload(context=8192)).to_json()
    assert p["chosen"] is None
    text = " ".join(p["suggestions"])
    assert "budget 6B needs" in text and "more would run it" in text


def test_plan_json_keys_stable():
    r = runner.invoke(app, ["plan", "-c", str(E12B), "--target", "agx-orin-64gb", "--context", "32768", "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert {"name", "usable_bytes"} <= set(p["device"])
    for b in p["budgets"]:
        assert {"name", "parameters", "dtype", "fits", "terms"} <= set(b)
        assert {"weights", "kv_cache", "ssm_state", "activations", "overhead", "total"} <= set(b["terms"])
    assert p["chosen"] == "12B"


def test_unknown_target_exit_2():
    r = runner.invoke(app, ["plan", "--target", "rtx-409"])
    assert r.exit_code == 2 and "rtx-4090" in r.stderr


def test_fit_my_gpu_on_the_demo(tmp_path, monkeypatch):
    """The README's first command; one run opens the checkpoint once: every safetensors header
    (weights, router, the slice it writes) is read exactly once."""
    from collections import Counter

    import elastic.slicer.formats.safetensors as st
    import elastic.slicer.storage.reader as reader

    reads: Counter = Counter()
    real = st.read_header

    def counting(path):
        reads[str(Path(path).resolve())] += 1
        return real(path)

    monkeypatch.setattr(st, "read_header", counting)
    monkeypatch.setattr(reader, "read_header", counting)
    monkeypatch.delenv("ELASTIC_CHECKPOINT", raising=False)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["fit-my-gpu", "--out", "model", "--json"])
    assert r.exit_code == 0, r.output
    assert reads and max(reads.values()) == 1, reads
    assert str((DEMO_CHECKPOINT / "router.safetensors").resolve()) in reads  # budgets resolved by the router
    p = json.loads(r.stdout)
    assert p["chosen"] == "100%" and p["out"] == "model" and (tmp_path / "model" / "config.json").is_file()
    assert 1 <= p["smoke"]["new_tokens"] <= 16 and p["smoke"]["tokens_per_s"] > 0
    dry = runner.invoke(app, ["fit-my-gpu", "--target", "cpu", "--dry-run", "--json"])
    assert json.loads(dry.stdout)["out"] is None and not (tmp_path / "elastic-model-100").exists()


def test_fit_my_gpu_needs_weights(tmp_path):
    r = runner.invoke(app, ["fit-my-gpu", "-c", str(E12B), "--target", "h100-80gb", "--out", str(tmp_path / "m")])
    assert r.exit_code == 2 and "config.json only" in r.stderr and not (tmp_path / "m").exists()


@pytest.mark.heavy
def test_fit_my_gpu_plans_for_the_gpu_asked_for_and_hands_vllm_the_slice(tmp_path, monkeypatch):
    """Two GPUs behind a fake NVML: GPU 0 has the most free memory, `--gpu 1` asks for the other.
    The plan and the slice's dtype use GPU 1 (nothing re-detects); the engine there is vLLM, which
    loads the slice's directory itself, so nothing is exported (no ONNX tracing for an engine that
    does not use it) and the smoke test runs the slice in the PyTorch reference; the TensorRT engine
    settings of the detected GPU are the ones a TensorRT export would use."""
    import sys

    from test_profiles import RTX3060, RTX4090, FakeNVML

    from elastic.export import trt
    from elastic.profiles.target import resolve_target

    nvml = FakeNVML([RTX3060, RTX4090])  # 11.5 GiB free on GPU 0, 10 GiB on GPU 1
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["fit-my-gpu", "-c", str(DEMO_CHECKPOINT), "--gpu", "1", "--out", "m", "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert p["device"]["name"] == RTX4090[0] and p["budgets"][0]["dtype"] == "bfloat16"
    chosen = next(b for b in p["budgets"] if b["name"] == p["chosen"])
    assert chosen["runtime"] == "vllm" and p["run"] == ["vllm serve m"]
    assert p["export"] == {"skipped": "vLLM loads the slice's Hugging Face directory as it is: there is nothing "
                                      "to export for it"}
    assert not (tmp_path / "m" / "export").exists() and p["smoke"]["new_tokens"] >= 1
    settings = trt.engine_settings(resolve_target(None, gpu=1)[0], max_context=8192)
    assert settings.device == RTX4090[0] and settings.source == f"detected {RTX4090[0]}" and settings.precision == "bf16"


def test_plan_counts_the_export_and_the_engine_build():
    """The 12B example runs on an Orin NX 16GB (at int4) but its float32 export does not fit there:
    the plan says so per budget and says how to export it elsewhere."""
    from elastic.slicer.planning.memory import EXPORT_FIXED_BYTES, export_peak_bytes

    r = runner.invoke(app, ["plan", "-c", str(E12B), "--target", "orin-nx-16gb", "--json"])
    p = json.loads(r.stdout)
    arch = Checkpoint.open(E12B).arch
    b = next(b for b in p["budgets"] if b["name"] == p["chosen"])
    assert b["fits"] and b["export_here"] is False
    assert b["export_peak_bytes"] > b["parameters"] * 4 + EXPORT_FIXED_BYTES  # float32 graphs + the tracer
    assert b["engine_build_bytes"] > b["parameters"] * 4 + 2 * b["terms"]["weights"]
    assert any("elastic export MODEL_DIR --format edgellm --target orin-nx-16gb" in n and "SHA256SUMS" in n
               for n in p["notes"])
    assert export_peak_bytes(arch) == next(x for x in p["budgets"] if x["name"] == "12B")["export_peak_bytes"]
    # a desktop GPU exports in host RAM, which a profile does not know
    gpu = json.loads(runner.invoke(app, ["plan", "-c", str(E12B), "--target", "rtx-4090",
                                         "--json"]).stdout)
    assert all(x["export_here"] is None for x in gpu["budgets"])


def test_fit_my_gpu_skips_an_export_that_would_not_fit(tmp_path, monkeypatch):
    import elastic.slicer.planning.memory as memory

    import elastic.export.workflow as workflow

    monkeypatch.setattr(memory, "EXPORT_FIXED_BYTES", 1 << 50)  # exporting anything needs a petabyte
    monkeypatch.setattr(workflow, "llama_cpp_engine", lambda p, name: False)  # the ONNX export, not a GGUF
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["fit-my-gpu", "-c", str(DEMO_CHECKPOINT), "--target", "cpu", "--out", "m", "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert "exporting it needs" in p["export"]["skipped"] and not (tmp_path / "m" / "export").exists()
    assert p["smoke"]["new_tokens"] >= 1  # the sliced model still runs (PyTorch)


def test_fit_my_gpu_without_llama_cpp_says_so_instead_of_exporting_onnx(tmp_path, monkeypatch):
    """The CPU host plans llama.cpp; without its tools installed, fit-my-gpu says how to install them
    and exports nothing (elastic's ONNX graphs are not what llama.cpp runs)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("gguf", "llama_cpp") else
                        real(name, *a))
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["fit-my-gpu", "-c", str(DEMO_CHECKPOINT), "--target", "cpu", "--out", "m", "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    chosen = next(b for b in p["budgets"] if b["name"] == p["chosen"])
    assert chosen["runtime"] == "llama.cpp"
    assert "pip install 'elastic[gguf]'" in p["export"]["skipped"]
    assert not any((tmp_path / "m" / d).exists() for d in ("export", "gguf"))
    assert p["smoke"]["new_tokens"] >= 1  # the slice itself still runs (PyTorch)


@pytest.mark.heavy
def test_fit_my_gpu_slices_the_quantized_precision_it_planned(tmp_path, monkeypatch):
    """With Model Optimizer installed, fit-my-gpu writes what the plan chose: here int8 pinned for an
    Orin Nano (which runs int8), and the smoke test runs the quantized slice."""
    pytest.importorskip("modelopt")
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["fit-my-gpu", "-c", str(DEMO_CHECKPOINT), "--target", "orin-nano-8gb", "--precision",
                            "int8", "--out", "m", "--no-export", "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert p["chosen_precision"] == "int8"
    manifest = json.loads((tmp_path / "m" / "slice_manifest.json").read_text())
    assert manifest["precision"] == "int8" and (tmp_path / "m" / "hf_quant_config.json").is_file()
    assert p["smoke"]["new_tokens"] >= 1
