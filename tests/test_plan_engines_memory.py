"""The plan's memory terms for llama.cpp against llama.cpp itself (the oracle: the buffer sizes it reports
when it loads a GGUF and makes a context), on the bundled demo, and what the plan says its terms rest on.

bench/plan_accuracy.py runs the same comparison on models of 50 MB to 1.3 GB at 512 and 32k tokens."""

from pathlib import Path

import pytest

from elastic.slicer.formats.arch import Arch
from elastic.slicer.formats.precision import lookup
from elastic.slicer.planning.describe import DEMO_CHECKPOINT
from elastic.slicer.planning.memory import Workload, footprint, gguf_tensor_types, memory_basis

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

MIB = 2**20
REPORTED = 0.005 * MIB + 1  # llama.cpp prints MiB with two decimals


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory) -> dict[str, Path]:
    from elastic.export.gguf import export_gguf

    root = tmp_path_factory.mktemp("gguf")
    return {p: export_gguf(DEMO_CHECKPOINT, root / p, precision=p).file for p in ("bf16", "q4_k_m")}


def _llama(file: Path, context: int) -> dict:
    from elastic.export.llama_buffers import measure

    return measure(file, context)


@pytest.mark.parametrize("precision", ["bf16", "q4_k_m"])
@pytest.mark.parametrize("context", [512, 3000])
def test_llama_cpp_terms_are_the_buffers_llama_cpp_reports(ggufs, precision, context):
    """Weights to the byte (llama_model_size), KV cache, recurrent state and compute + output buffers
    to llama.cpp's printed precision; 3000 tokens is rounded up to 3072 as llama.cpp rounds it."""
    arch = Arch.from_file(DEMO_CHECKPOINT)
    m = _llama(ggufs[precision], context)
    t = footprint(arch, Workload(context=context, weights=precision, kv="bf16", margin=0.0), 0, engine="llama.cpp")
    assert t["weights"] == m["weights"]
    assert abs(t["kv_cache"] - m["kv_cache"]) <= REPORTED
    assert abs(t["ssm_state"] - m["ssm_state"]) <= REPORTED
    assert abs(t["activations"] - m["activations"]) <= 2 * REPORTED


def test_q4_k_m_types_are_the_ones_llama_cpp_wrote(ggufs):
    """Oracle: the GGUF llama.cpp's quantizer wrote (read back with gguf): every tensor's type, as the
    plan predicts it (the _M mix's Q6_K layers, the K-quants' fallback for rows of 64)."""
    import gguf

    from elastic.export.gguf import gguf_tensors

    arch = Arch.from_file(DEMO_CHECKPOINT)
    names = [name for name, _, _ in gguf_tensors(arch, lambda n: None)]  # GGUF names, in checkpoint order
    written = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(ggufs["q4_k_m"]).tensors}
    planned = [kind for kind, _ in gguf_tensor_types(arch, lookup("q4_k_m")).values()]
    assert dict(zip(names, planned)) == written
    assert {"q6_k", "q8_0", "q5_0", "f32"} <= set(planned)  # the mix, the fallbacks and the kept tensors


def test_every_option_says_what_its_memory_rests_on():
    """llama.cpp: a model measured against it; the GPU engines: an estimate, and from what."""
    from elastic.profiles.devices import get_profile
    from elastic.slicer.planning.fit import plan, target_from_profile

    for target, engines in (("cpu", {"llama.cpp"}), ("agx-orin-64gb", {"edgellm", "llama.cpp"}),
                            ("rtx-4090", {"vllm", "tensorrt-llm", "llama.cpp"})):
        p = plan(DEMO_CHECKPOINT, target_from_profile(get_profile(target)), Workload(dtype="auto")).to_json()
        seen = {c["runtime"]: c["memory_basis"] for c in p["candidates"]}
        assert set(seen) == engines
        for engine, basis in seen.items():
            assert basis == memory_basis(engine)
            assert basis.startswith("measured model: llama.cpp" if engine == "llama.cpp" else "estimate: ")
        assert all(b["memory_basis"] for b in p["budgets"])


@pytest.mark.parametrize("amx", [True, False])
def test_extra_buffer_types_are_off_only_on_an_amx_cpu(ggufs, monkeypatch, amx):
    """llama.cpp's AMX / repacked weight buffers crash its decode on q4_k_m on an AMX CPU: open_llama
    turns them off there (and only there), puts the bindings' defaults back, and the model decodes."""
    import llama_cpp

    from elastic.export import gguf

    here = gguf.cpu_has_amx()
    monkeypatch.setattr(gguf, "cpu_has_amx", lambda: amx)
    default = llama_cpp.llama_cpp.llama_model_default_params
    llm = gguf.open_llama(llama_cpp, model_path=str(ggufs["q4_k_m"]), n_ctx=64, verbose=False)
    assert llm.model_params.use_extra_bufts is (not amx)
    assert llama_cpp.llama_cpp.llama_model_default_params is default
    if amx or not here:  # with the extra buffers on, it decodes only where the CPU has no AMX
        llm.eval(list(range(4, 20)))
        assert llm.n_tokens == 16
