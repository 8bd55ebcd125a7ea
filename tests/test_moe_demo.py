"""The bundled MoE demo (slicer/moe_demo_checkpoint, made by `elastic train`, examples/make_moe_demo_checkpoint.py):
every budget sliced computes what the masked parent computes, and loads in transformers as it is."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from elastic.slicer.nn.generate import greedy
from elastic.slicer.nn.masked import masked_forward
from elastic.slicer.nn.model import TorchBackend, load_model
from elastic.slicer.slice import slice_checkpoint
from elastic.slicer.storage.reader import Checkpoint

MOE_DEMO = Path(__file__).resolve().parents[1] / "slicer" / "moe_demo_checkpoint"
transformers = pytest.importorskip("transformers")


class _Masked:
    """The masked parent as a greedy-decoding backend (a full forward per step: no cache needed)."""

    name = "masked"

    def __init__(self, parent, spec):
        self.parent, self.spec, self.vocab_size = parent, spec, parent.arch.vocab_size

    def prefill(self, ids):
        ids = torch.as_tensor(ids)
        return masked_forward(self.parent, self.spec, ids), ids

    def step(self, nxt, ids):
        ids = torch.cat([ids, torch.as_tensor(nxt)[:, None]], 1)
        return masked_forward(self.parent, self.spec, ids)[:, -1:], ids


def test_the_moe_demo_is_an_elastic_moe_checkpoint():
    ckpt = Checkpoint.open(MOE_DEMO)
    assert ckpt.is_elastic and any(layer.kind == "moe" for layer in ckpt.arch.layers)
    training = json.loads((MOE_DEMO / "training.json").read_text())
    for name, r in training["budgets"].items():  # the run ended within its tolerance
        assert abs(r["parameters"] / r["target_parameters"] - 1) <= training["config"]["budget_tolerance"], name
    # the router cut experts or their widths somewhere: the budgets are not all-dense cuts
    resolved = json.loads((MOE_DEMO / "elastic_config.json").read_text())["resolved"]
    assert len({json.dumps(v, sort_keys=True) for v in resolved.values()}) == len(resolved)


@pytest.mark.heavy
@pytest.mark.parametrize("budget", ["100%", "75%", "50%"])
def test_every_budget_slices_to_what_the_masked_parent_computes(budget, tmp_path):
    from elastic.slicer.slice import choose_spec

    result = slice_checkpoint(MOE_DEMO, tmp_path / budget, budget=budget, dtype="float32")
    parent = load_model(MOE_DEMO, dtype=torch.float32)
    spec = choose_spec(Checkpoint.open(MOE_DEMO), budget, None)[0]
    child = load_model(tmp_path / budget, dtype=torch.float32)
    # parameters: every tensor of the checkpoint, the router's correction bias (a buffer) included
    assert sum(t.numel() for t in child.state_dict().values()) == result.parameters
    ids = torch.randint(4, parent.arch.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(child(ids), masked_forward(parent, spec, ids), rtol=1e-5, atol=1e-5)
        a = greedy(TorchBackend(child), ids[:, :12], 16)
        b = greedy(_Masked(parent, spec), ids[:, :12], 16)
    assert a.tokens == b.tokens
    # transformers loads the slice as it is: nothing missing, unexpected or mismatched, the same logits
    remote = Checkpoint.open(tmp_path / budget).arch.config_form() != "nemotron_h"
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / budget, trust_remote_code=remote, output_loading_info=True, dtype=torch.float32)
    assert not any(info.values()), info
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits.float(), child(ids), rtol=1e-4, atol=1e-4)


def test_a_spec_cut_keeps_the_positions_written_by_hand(tmp_path):
    """DESIGN.md section 5 applied by hand (not through the slicer's rules) to a cut of the demo in NVIDIA's
    vocabulary: hidden 48 of 64; 6 of 8 Mamba heads = the first 3 of each of the 2 groups of 4 (heads
    0, 1, 2, 4, 5, 6); 6 of 8 routed experts = the first 3 of each of the 2 routing groups of 4, child
    expert j being parent expert [0, 1, 2, 4, 5, 6][j]; expert widths 32 of 48, the shared expert 64 of 96."""
    from safetensors.torch import load_file

    spec = {"hidden_size": 48, "mamba_num_heads": 6, "mamba_head_dim": 16, "num_moe_experts": 6,
            "moe_ffn_hidden_size": 32, "moe_shared_expert_intermediate_size": 64}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    slice_checkpoint(MOE_DEMO, tmp_path / "out", spec=tmp_path / "spec.json", dtype="float32")
    src = load_file(MOE_DEMO / "model.safetensors")
    got = load_file(tmp_path / "out" / "model.safetensors")
    d = list(range(48))
    heads = [0, 1, 2, 4, 5, 6]
    x = [h * 16 + c for h in heads for c in range(16)]  # 16 channels per head, all kept
    experts = [0, 1, 2, 4, 5, 6]
    want = {"backbone.embeddings.weight": (list(range(512)), d), "lm_head.weight": (list(range(512)), d),
            "backbone.norm_f.weight": (d,)}
    for i in (0, 2, 5):  # the Mamba layers of MEM*EME; in_proj rows [z | x | B | C | dt], I = 128, 2GN = 64
        m = f"backbone.layers.{i}.mixer."
        want |= {m + "in_proj.weight": (x + [128 + c for c in x] + list(range(256, 320)) + [320 + h for h in heads], d),
                 m + "conv1d.weight": (x + list(range(128, 192)), [0], list(range(4))),
                 m + "A_log": (heads,), m + "dt_bias": (heads,), m + "D": (heads,),
                 m + "norm.weight": (x,), m + "out_proj.weight": (d, x)}
    for i in (1, 4, 6):  # the MoE layers
        m = f"backbone.layers.{i}.mixer."
        want |= {m + "gate.weight": (experts, d), m + "gate.e_score_correction_bias": (experts,),
                 m + "shared_experts.up_proj.weight": (list(range(64)), d),
                 m + "shared_experts.down_proj.weight": (d, list(range(64)))}
        for j, e in enumerate(experts):
            want |= {m + f"experts.{j}.up_proj.weight": ((m + f"experts.{e}.up_proj.weight"), list(range(32)), d),
                     m + f"experts.{j}.down_proj.weight": ((m + f"experts.{e}.down_proj.weight"), d, list(range(32)))}
    for name, axes in want.items():
        source, axes = (axes[0], axes[1:]) if isinstance(axes[0], str) else (name, axes)
        t = src[source]
        for dim, idx in enumerate(axes):
            t = t.index_select(dim, torch.tensor(idx))
        assert got[name].shape == t.shape and torch.equal(got[name], t), name


@pytest.mark.heavy
@pytest.mark.parametrize("algo", ["FP8", "NVFP4"])
def test_quantized_moe_sources_slice_to_their_kept_quantized_values(algo, tmp_path):
    """FP8 and NVFP4 copies of the MoE demo (written in Model Optimizer's layout: it does not quantize
    transformers' merged experts here) slice without dequantizing: the slice's dequantized weights are
    the source's kept entries exactly, per-tensor scales bit for bit, the logits those of the masked
    dequantized source (test_quant_slice.check_slice)."""
    from quant_layout_writer import write_quantized_layout
    from test_quant_slice import check_slice

    from elastic.slicer.slice import choose_spec

    from elastic.slicer.errors import ConfigError
    from elastic.slicer.formats.spec import SliceSpec

    src = write_quantized_layout(MOE_DEMO, tmp_path / algo, algo)
    ckpt = Checkpoint.open(src)
    cuts = [(budget, choose_spec(ckpt, budget, None)[0]) for budget in ("75%", "50%")]
    if algo == "NVFP4":  # the trained budgets cut NVFP4's blocks of 16 inputs, refused with the reason:
        # 75% keeps 56 hidden channels (the block [48, 64) cut); 50% keeps 8 of each Mamba head's 16
        # channels (out_proj's inputs [0, 8) of the block [0, 16))
        for budget, cut in (("75%", r"\[48, 64\)"), ("50%", r"columns \[0, 8\) cut through \[0, 16\)")):
            with pytest.raises(ConfigError, match=cut + r".*NVFP4 keeps one fp8 scale per block of 16"):
                slice_checkpoint(src, tmp_path / budget, budget=budget)
            assert not (tmp_path / budget).exists()
        # a cut in whole blocks, in NVIDIA's vocabulary: hidden 48, 6 of 8 experts, widths 32 and 64
        nvidia = {"hidden_size": 48, "mamba_num_heads": 6, "mamba_head_dim": 16, "num_moe_experts": 6,
                  "moe_ffn_hidden_size": 32, "moe_shared_expert_intermediate_size": 64}
        (tmp_path / "spec.json").write_text(json.dumps(nvidia))
        cuts = [(tmp_path / "spec.json", SliceSpec.from_json(nvidia, ckpt.arch))]
    for i, (what, spec) in enumerate(cuts):
        out = tmp_path / f"slice{i}"
        slice_checkpoint(src, out, **({"budget": what} if isinstance(what, str) else {"spec": what}))
        check_slice(src, out, spec)


@pytest.mark.heavy
def test_export_refuses_moe_and_fit_my_gpu_says_why(tmp_path):
    """The reference MoE layer's expert dispatch depends on the tokens, which the ONNX tracer cannot
    follow: export refuses with the reason, the manifest does not claim ONNX Runtime, and fit-my-gpu
    slices, skips the export saying why, and runs its smoke test on PyTorch."""
    from elastic.export.pipeline import export_model
    from elastic.slicer.errors import ElasticError

    result = slice_checkpoint(MOE_DEMO, tmp_path / "s", budget="50%")
    assert result.manifest["runtimes"]["onnxruntime"]["loads"] is False
    with pytest.raises(ElasticError, match="MoE layers"):
        export_model(tmp_path / "s", tmp_path / "e")
    assert not (tmp_path / "e").exists()
    from typer.testing import CliRunner

    from elastic.cli.main import app

    import elastic.export.workflow as workflow

    with pytest.MonkeyPatch.context() as m:  # the ONNX route (no llama.cpp, or a GPU target)
        m.setattr(workflow, "llama_cpp_engine", lambda p, name: False)
        r = CliRunner().invoke(app, ["fit-my-gpu", "-c", str(MOE_DEMO), "--target", "cpu", "--out",
                                     str(tmp_path / "fit"), "--json"])
    assert r.exit_code == 0, r.output
    fit = json.loads(r.stdout)
    assert "MoE" in fit["export"]["skipped"] and fit["smoke"]["new_tokens"] >= 1
    if importlib.util.find_spec("llama_cpp") is not None:  # on a CPU host llama.cpp runs MoE slices
        r = CliRunner().invoke(app, ["fit-my-gpu", "-c", str(MOE_DEMO), "--target", "cpu", "--out",
                                     str(tmp_path / "fit-gguf"), "--json"])
        fit = json.loads(r.stdout)
        assert fit["export"]["architecture"] == "nemotron_h_moe" and fit["smoke"]["backend"] == "llama.cpp"
