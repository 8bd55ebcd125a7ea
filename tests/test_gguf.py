"""llama.cpp GGUF export: written with llama.cpp's own writer, run by llama.cpp itself, compared with
the PyTorch reference (greedy ids) and with transformers' tokenizer (prompt ids)."""

import json

import numpy as np
import pytest

from elastic.slicer.errors import ConfigError
from elastic.slicer.planning.describe import DEMO_CHECKPOINT
from elastic.slicer.slice import slice_checkpoint
from elastic.slicer.storage.reader import Checkpoint

gguf = pytest.importorskip("gguf", reason="the gguf extra (pip install -e '.[gguf]')")

from elastic.export.gguf import export_gguf  # noqa: E402

pytestmark = pytest.mark.heavy  # llama.cpp loads, quantizes and generates: many seconds each

MOE_DEMO = DEMO_CHECKPOINT.parent / "moe_demo_checkpoint"
PROMPT = "def main(args):\n    return"
# per-layer FFN widths, the attention layer kept: NVIDIA's Puzzle form (layers "M-M*-M-")
FFN_SPEC = {"hidden_size": 64, "layers": [{"index": 1, "intermediate_size": 192},
                                          {"index": 4, "intermediate_size": 128},
                                          {"index": 6, "intermediate_size": 64}]}


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-slices")
    spec = root / "ffn.json"
    spec.write_text(json.dumps(FFN_SPEC))
    made = {}
    for key, src, kw in (("100", DEMO_CHECKPOINT, {"budget": "100%"}), ("75", DEMO_CHECKPOINT, {"budget": "75%"}),
                         ("50", DEMO_CHECKPOINT, {"budget": "50%"}), ("ffn", DEMO_CHECKPOINT, {"spec": spec}),
                         ("moe100", MOE_DEMO, {"budget": "100%"})):
        made[key] = slice_checkpoint(Checkpoint.open(src, require_weights=True), root / key, **kw).out
    return made


def _read(path):
    r = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: t for t in r.tensors}
    return fields, tensors


def test_float_gguf_holds_what_llama_cpps_nemotron_h_loader_reads(slices, tmp_path):
    res = export_gguf(slices["100"], tmp_path / "g", precision="f32")
    fields, tensors = _read(res.file)
    assert fields["general.architecture"] == "nemotron_h" and res.arch == "nemotron_h"
    assert fields["nemotron_h.block_count"] == 7
    # a layer is Mamba iff head_count_kv and feed_forward_length are both 0 (src/models/nemotron-h.cpp)
    assert fields["nemotron_h.feed_forward_length"] == [0, 256, 0, 0, 256, 0, 256]
    assert fields["nemotron_h.attention.head_count_kv"] == [0, 0, 0, 2, 0, 0, 0]
    assert fields["nemotron_h.ssm.inner_size"] == 128 and fields["nemotron_h.ssm.time_step_rank"] == 8
    assert fields["tokenizer.ggml.pre"] == "gpt-2" and len(fields["tokenizer.ggml.tokens"]) == 512
    ckpt = Checkpoint.open(slices["100"])
    a_log = ckpt.read("backbone.layers.0.mixer.A_log").numpy()
    np.testing.assert_allclose(tensors["blk.0.ssm_a"].data.reshape(-1), -np.exp(a_log), rtol=1e-6)
    norm = ckpt.read("backbone.layers.0.mixer.norm.weight").numpy()
    np.testing.assert_array_equal(tensors["blk.0.ssm_norm.weight"].data, norm.reshape(2, -1))
    up = ckpt.read("backbone.layers.1.mixer.up_proj.weight").numpy()
    np.testing.assert_array_equal(tensors["blk.1.ffn_up.weight"].data, up)
    assert len(tensors) == 44


def test_bf16_keeps_norms_conv_and_ssm_in_float32(slices, tmp_path):
    res = export_gguf(slices["100"], tmp_path / "g", precision="bf16")
    _, tensors = _read(res.file)
    kinds = {n: t.tensor_type.name for n, t in tensors.items()}
    assert kinds["blk.0.ssm_in.weight"] == "BF16" and kinds["token_embd.weight"] == "BF16"
    assert {kinds[n] for n in ("blk.0.ssm_conv1d.weight", "blk.0.ssm_a", "blk.0.ssm_norm.weight",
                               "output_norm.weight")} == {"F32"}


def test_puzzle_widths_become_the_feed_forward_length_array(slices, tmp_path):
    fields, tensors = _read(export_gguf(slices["ffn"], tmp_path / "g", precision="f32").file)
    assert fields["nemotron_h.feed_forward_length"] == [0, 192, 0, 0, 128, 0, 64]
    assert tuple(tensors["blk.6.ffn_down.weight"].shape) == (64, 64)


def test_moe_slice_is_nemotron_h_moe_with_stacked_experts(slices, tmp_path):
    fields, tensors = _read(export_gguf(slices["moe100"], tmp_path / "g", precision="f32").file)
    assert fields["general.architecture"] == "nemotron_h_moe"
    assert fields["nemotron_h_moe.expert_count"] == 8 and fields["nemotron_h_moe.expert_used_count"] == 2
    assert fields["nemotron_h_moe.expert_group_count"] == 2 and fields["nemotron_h_moe.expert_group_used_count"] == 1
    assert fields["nemotron_h_moe.expert_shared_count"] == 1
    ckpt = Checkpoint.open(slices["moe100"])
    e3 = ckpt.read("backbone.layers.1.mixer.experts.3.up_proj.weight").numpy()
    np.testing.assert_array_equal(tensors["blk.1.ffn_up_exps.weight"].data[3], e3)


def test_refusals_come_before_anything_is_written(slices, tmp_path):
    with pytest.raises(ConfigError, match="no attention layer"):
        export_gguf(slices["50"], tmp_path / "g50")
    assert not (tmp_path / "g50").exists()
    ckpt = Checkpoint.open(DEMO_CHECKPOINT, require_weights=True)
    spec = tmp_path / "mamba.json"
    spec.write_text(json.dumps({"hidden_size": 64, "layers": [{"index": 0, "mamba_num_heads": 6}]}))
    per_layer = slice_checkpoint(ckpt, tmp_path / "mamba", spec=spec).out
    with pytest.raises(ConfigError, match="one SSM shape"):
        export_gguf(per_layer, tmp_path / "gm")
    assert not (tmp_path / "gm").exists()


# ---------------------------------------------------------------- llama.cpp itself


@pytest.fixture(scope="module")
def llama():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python (pip install -e '.[gguf]')")


@pytest.mark.parametrize("key", ["100", "75", "ffn", "moe100"])
def test_llama_cpp_generates_the_reference_models_greedy_tokens(slices, tmp_path, llama, key):
    from transformers import AutoTokenizer

    from elastic.export.llama_runtime import LlamaCppModel
    from elastic.export.runtime import generate_text

    res = export_gguf(slices[key], tmp_path / "g", precision="f32")
    model = LlamaCppModel(res.file)
    hf = AutoTokenizer.from_pretrained(slices[key])
    assert model.tokenizer().encode(PROMPT, add_special_tokens=True) == hf(PROMPT)["input_ids"]
    ours = generate_text(slices[key], PROMPT, backend="torch", max_new_tokens=16)
    theirs = generate_text(res.file, PROMPT, backend="llama.cpp", max_new_tokens=16)
    assert theirs["backend"] == "llama.cpp" and theirs["prompt_tokens"] == ours["prompt_tokens"]
    assert theirs["tokens"] == ours["tokens"], (key, ours["text"], theirs["text"])


@pytest.mark.parametrize("precision", ["q8_0", "q4_k_m"])
def test_llama_cpp_quantizes_and_says_what_fell_back(slices, tmp_path, llama, precision):
    from elastic.export.runtime import generate_text

    res = export_gguf(slices["100"], tmp_path / "g", precision=precision)
    _, tensors = _read(res.file)
    assert res.file.name == f"model-{precision}.gguf" and not list((tmp_path / "g").glob(".float-*"))
    kinds = {t.tensor_type.name for t in tensors.values()}
    if precision == "q8_0":
        assert tensors["blk.0.ssm_in.weight"].tensor_type.name == "Q8_0" and not res.fallbacks
    else:  # rows of 64: K-quants need multiples of 256, llama.cpp falls back and the result says so
        assert res.fallbacks and set(res.fallbacks.values()) <= kinds - {"Q4_K"}
        assert all(tensors[n].tensor_type.name == t for n, t in res.fallbacks.items())
    out = generate_text(res.file, PROMPT, max_new_tokens=8)
    assert out["backend"] == "llama.cpp" and out["new_tokens"] == 8 and out["text"]


def test_llama_cpp_perplexity_of_an_f32_gguf_equals_the_reference_models(slices, tmp_path, llama):
    """The same held-out windows through llama.cpp and through the PyTorch reference: f32 agrees to
    float rounding; q8_0 costs a little (llama.cpp's own quantizer), and `elastic eval` takes a GGUF."""
    from typer.testing import CliRunner

    from elastic.cli.main import app
    from elastic.export.llama_runtime import perplexity_gguf
    from elastic.slicer.quantize.evaluate import perplexity

    ref = perplexity(slices["100"], max_windows=3)
    f32 = perplexity_gguf(export_gguf(slices["100"], tmp_path / "f32", precision="f32").file, max_windows=3)
    assert f32.tokens == ref.tokens and f32.precision == "f32"
    assert abs(f32.nll - ref.nll) < 1e-4 * ref.nll
    q8 = export_gguf(slices["100"], tmp_path / "q8", precision="q8_0").file
    r = CliRunner().invoke(app, ["eval", str(q8), "--max-windows", "3", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["precision"] == "q8_0" and abs(got["nll"] - ref.nll) < 0.05 * ref.nll


def test_a_smoothquant_slice_keeps_its_smoothing_in_the_gguf(slices, tmp_path, llama):
    """SmoothQuant divides each input channel by its smoothing factor and the quantized graph
    multiplies the activations back (pre_quant_scale); llama.cpp feeds the Linear its input
    unchanged, so the GGUF's weight must carry the factor: the int8 slice's perplexity in llama.cpp
    stays with the float slice's (it was 187 against 6.84 without the fold)."""
    pytest.importorskip("modelopt", reason="nvidia-modelopt makes the int8 slice")
    from elastic.export.llama_runtime import perplexity_gguf
    from elastic.slicer.quantize.evaluate import perplexity
    from elastic.slicer.quantize.workflow import slice_and_quantize

    int8 = slice_and_quantize(Checkpoint.open(DEMO_CHECKPOINT, require_weights=True), tmp_path / "int8", "int8",
                              budget="100%", samples=4, seq_len=64).out
    ref = perplexity(slices["100"], max_windows=3)
    got = perplexity_gguf(export_gguf(int8, tmp_path / "g", precision="f32").file, max_windows=3)
    assert abs(got.nll - ref.nll) < 0.02 * ref.nll, (got.perplexity, ref.perplexity)
