"""Slicing a quantized elastic checkpoint without dequantizing it (``elastic.slicer.quant.slicing``).

Sources: the bundled demo checkpoint quantized whole (its 100% budget) by elastic's own quantizer
(Model Optimizer 0.47, on the CPU), with the demo's elastic_config.json beside it, so it is a
quantized elastic checkpoint; slices are cut from it by budget or spec.

Oracles:
- every tensor: the slice's dequantized weight (``quant.dequant``) equals the source's dequantized
  weight indexed with the float rules' kept ranges, exactly; unquantized tensors equal the source's
  kept entries; per-tensor scales are bit-identical; the input quantizers (scale, pre_quant_scale)
  are the source's;
- the model: the slice loaded by ``load_model`` gives the logits of the masked forward of the
  dequantized source (``masked_forward`` on ``load_model(source)``) within float tolerance. The
  masked forward runs the child's float architecture, without the W8A8 input quantizers
  (``FakeQuantLinear``), so for FP8 and W8A8 the slice's are switched off for that comparison; the
  quantizers themselves are compared tensor by tensor.

The demo's widths: hidden 64 -> 48 keeps whole NVFP4 blocks (and AWQ groups of 16), and so does the
75% budget everywhere; the 50% budget keeps 8 of each Mamba head's 16 channels, which cuts every
Mamba out_proj's 16-element blocks (and, with 3 heads of 4 per group, splits AWQ's row pairs): it
is refused for NVFP4 and int4, and NVFP4 is tested at 50% with whole Mamba heads instead (NVFP4_50).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import types

import pytest
import torch

from elastic.slicer.planning.describe import DEMO_CHECKPOINT

HAVE_MODELOPT = all(importlib.util.find_spec(m) is not None for m in ("modelopt", "transformers", "requests"))
pytestmark = pytest.mark.skipif(not HAVE_MODELOPT, reason="making the quantized sources needs nvidia-modelopt, "
                                "transformers and requests (pip install 'elastic[modelopt]')")
CALIBRATION = dict(samples=4, seq_len=64)  # the oracles do not depend on how well it is calibrated
ELASTIC_FILES = ("elastic_config.json", "router.safetensors", "importance.safetensors")
# the demo's 50% budget with whole Mamba heads (16 channels): every kept input range is 16-aligned
NVFP4_50 = {"hidden_size": 48, "layers": [
    *({"index": i, "mamba_num_heads": 6} for i in (0, 2, 5)),
    {"index": 1, "intermediate_size": 64}, {"index": 3, "num_attention_heads": 2},
    {"index": 4, "intermediate_size": 128}]}
# drops two layers: layer 5 (a Mamba layer whose conv1d is excluded) becomes layer 3
DROPPED = {"hidden_size": 48, "layers": [{"index": 1, "keep": False}, {"index": 4, "keep": False},
                                         {"index": 3, "num_attention_heads": 2}]}
# two cuts of the demo written out (its trained budgets move when it is retrained): CUT75 keeps whole 16-blocks
# everywhere (hidden 48, FFN 128, 2 attention heads); CUT50 keeps 8 of 16 channels per Mamba head and 3 of 4
# heads per group (FP8 and INT8 slice it; NVFP4's blocks and AWQ's row pairs are cut)
CUT75 = {"hidden_size": 48, "layers": [{"index": 3, "num_attention_heads": 2}, {"index": 4, "intermediate_size": 128}]}
CUT50 = {"hidden_size": 48, "layers": [
    *({"index": i, "mamba_head_dim": 8, "mamba_num_heads": 6} for i in (0, 2, 5)),
    {"index": 1, "intermediate_size": 64}, {"index": 3, "num_attention_heads": 2}, {"index": 4, "intermediate_size": 128}]}
CASES = [("fp8", CUT75), ("fp8", CUT50), ("fp8", "75%"), ("nvfp4", CUT75), ("nvfp4", NVFP4_50), ("int8", CUT75),
         ("int8_wo", CUT50), ("int4", CUT75)]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """precision -> a quantized elastic checkpoint of the demo (built once, on first use)."""
    root = tmp_path_factory.mktemp("quantized")
    built = {}

    def get(precision: str):
        if precision not in built:
            built[precision] = _quantize(root, precision)
        return built[precision]
    return get


def _quantize(root, precision: str):
    from elastic.slicer.quantize.workflow import slice_and_quantize

    out = root / precision
    if precision == "int4":  # AWQ groups of 16 (the default, 64 for the demo, would be cut by hidden 48)
        from elastic.slicer.formats.tokenizer import load_tokenizer
        from elastic.slicer.quantize.workflow import load_hf, quantize_model, quantized_precision, write_quantized
        from elastic.slicer.quantize.text import calibration_ids
        from elastic.slicer.slice import slice_checkpoint

        float_dir = slice_checkpoint(DEMO_CHECKPOINT, root / "float32", budget="100%", dtype="float32").out
        ids, corpus = calibration_ids(load_tokenizer(float_dir), CALIBRATION["samples"], CALIBRATION["seq_len"])
        hf = quantize_model(load_hf(float_dir), quantized_precision("int4"), ids, group=16)
        write_quantized(hf, float_dir, out, "int4", group=16, corpus=corpus)
    else:
        slice_and_quantize(DEMO_CHECKPOINT, out, precision, budget="100%", **CALIBRATION)
    for f in ELASTIC_FILES:
        shutil.copy(DEMO_CHECKPOINT / f, out / f)
    return out


def _spec(ckpt, what):
    from elastic.slicer.formats.spec import SliceSpec
    from elastic.slicer.slice import choose_spec

    if isinstance(what, dict):
        spec = SliceSpec.from_json(what, ckpt.arch)
        return spec, {"spec": spec}
    return choose_spec(ckpt, what, None)[0], {"budget": what}


def _kept(t: torch.Tensor, axes) -> torch.Tensor:
    """``t`` restricted to the kept ranges of each axis."""
    for dim, ranges in enumerate(axes):
        t = torch.cat([t.narrow(dim, a, b - a) for a, b in ranges], dim=dim)
    return t


def _float_linear(model) -> None:
    """Switch off the W8A8 input quantizers of a loaded model (see the module docstring)."""
    from elastic.slicer.nn.model import FakeQuantLinear

    for m in model.modules():
        if isinstance(m, FakeQuantLinear):
            m.forward = types.MethodType(torch.nn.Linear.forward, m)


def check_slice(src_dir, out, spec) -> None:
    """Every tensor of the slice at ``out`` against the source, then the logits (the module's oracles)."""
    from elastic.slicer.formats.rules import tensor_rules
    from elastic.slicer.nn.masked import masked_forward
    from elastic.slicer.nn.model import load_model
    from elastic.slicer.quant.dequant import dequantize_module
    from elastic.slicer.quant.layout import linear_modules
    from elastic.slicer.storage.reader import Checkpoint

    src, child = Checkpoint.open(src_dir), Checkpoint.open(out)  # open validates the quantized layout
    assert child.quant.quant_algo == src.quant.quant_algo and child.quant.group_size == src.quant.group_size
    linears = linear_modules(src.arch.tensor_shapes())
    seen, quantized = set(), 0
    for rule in tensor_rules(src.arch, spec):
        module, cmod = rule.source.removesuffix(".weight"), rule.name.removesuffix(".weight")
        if module in linears and src.quant.is_quantized(module):
            assert child.quant.is_quantized(cmod), cmod
            w_src, act_src = dequantize_module(src, module)
            w, act = dequantize_module(child, cmod)
            assert torch.equal(w, _kept(w_src, rule.axes)), rule.name
            assert (act is None) == (act_src is None)
            if act is not None:
                assert (act.kind, act.scale) == (act_src.kind, act_src.scale)
                assert (act.pre_quant_scale is None) == (act_src.pre_quant_scale is None)
                if act.pre_quant_scale is not None:
                    assert torch.equal(act.pre_quant_scale, _kept(act_src.pre_quant_scale, rule.axes[1:]))
            scalars = ("input_scale", "weight_scale_2") + (("weight_scale",) if src.quant.quant_algo == "FP8" else ())
            for leaf in scalars:
                if f"{module}.{leaf}" in src.tensors:  # per-tensor scalars: bit for bit
                    a, b = src.read_bits(f"{module}.{leaf}"), child.read_bits(f"{cmod}.{leaf}")
                    assert a.shape == b.shape == () and a.tobytes() == b.tobytes()
            seen.update(n for n in child.tensors if n.startswith(cmod + "."))
            quantized += 1
        else:
            if module in linears:
                assert not child.quant.is_quantized(cmod), cmod
            got, full = child.read(rule.name), src.read(rule.source)
            assert got.dtype == full.dtype and torch.equal(got, _kept(full, rule.axes)), rule.name
            seen.add(rule.name)
    assert quantized > 10 and seen == set(child.tensors)

    ids = torch.randint(4, 512, (2, 24), generator=torch.Generator().manual_seed(5))
    sliced = load_model(out)
    _float_linear(sliced)
    with torch.no_grad():
        got = sliced(ids)
        want = masked_forward(load_model(src_dir), spec, ids)
    assert want.abs().max() > 1.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision,what", CASES, ids=[f"{p}-{w if isinstance(w, str) else {id(CUT75): 'cut75', id(CUT50): 'cut50'}.get(id(w), 'spec')}"
                                         for p, w in CASES])
@pytest.mark.heavy
def test_slice_of_a_quantized_source_keeps_its_quantized_values(source, tmp_path, precision, what):
    from elastic.slicer.slice import slice_checkpoint
    from elastic.slicer.storage.reader import Checkpoint

    src_dir = source(precision)
    ckpt = Checkpoint.open(src_dir)
    spec, how = _spec(ckpt, what)
    result = slice_checkpoint(src_dir, tmp_path / "out", **how)
    check_slice(src_dir, tmp_path / "out", spec)

    m = result.manifest
    assert m["source"]["quantized"] is True and m["dtype"] == "bfloat16"  # the source's unquantized tensors, kept
    assert m["quantization"]["quant_algo"] == ckpt.quant.quant_algo and m["precision"] == ckpt.quant.format.precision
    assert m["quantization"]["source_quantized"] is True and m["quantization"]["dequantized"] is False
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"] == ckpt.config["quantization_config"]  # no layer dropped: as it was
    assert json.loads((tmp_path / "out" / "hf_quant_config.json").read_text()) == \
        json.loads((src_dir / "hf_quant_config.json").read_text())


@pytest.mark.heavy
def test_dropped_layers_renumber_the_exclude_lists(source, tmp_path):
    """FP8 source with one more Linear left unquantized (layer 5's in_proj, as an exclude entry and a
    float weight): dropping layers 1 and 4 makes layer 5 the child's layer 3, in the tensors and in
    both exclude lists."""
    from elastic.slicer.quant.dequant import dequantize_module
    from elastic.slicer.slice import slice_checkpoint
    from elastic.slicer.storage.reader import Checkpoint

    src_dir = tmp_path / "src"
    shutil.copytree(source("fp8"), src_dir)
    _unquantize(src_dir, "backbone.layers.5.mixer.in_proj")
    ckpt = Checkpoint.open(src_dir)
    assert not ckpt.quant.is_quantized("backbone.layers.5.mixer.in_proj")
    spec, _ = _spec(ckpt, DROPPED)
    slice_checkpoint(src_dir, tmp_path / "out", spec=spec)
    check_slice(src_dir, tmp_path / "out", spec)

    want = ["backbone.embeddings", "backbone.layers.0.mixer.conv1d", "backbone.layers.1.mixer.conv1d",
            "backbone.layers.3.mixer.conv1d", "backbone.layers.3.mixer.in_proj", "lm_head"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    hf = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())
    assert sorted(config["quantization_config"]["ignore"]) == want
    assert sorted(hf["quantization"]["exclude_modules"]) == want
    child = Checkpoint.open(tmp_path / "out")
    assert child.tensors["backbone.layers.3.mixer.in_proj.weight"].dtype == "F32"
    assert "backbone.layers.3.mixer.in_proj.weight_scale" not in child.tensors
    assert child.tensors["backbone.layers.1.mixer.in_proj.weight"].dtype == "F8_E4M3"
    assert dequantize_module(child, "backbone.layers.1.mixer.in_proj")[1] is not None  # quantized, with its input_scale


def _unquantize(root, module: str) -> None:
    """Rewrite the checkpoint at ``root`` with ``module`` stored as a float weight and excluded."""
    from safetensors.torch import save_file

    from elastic.slicer.quant.dequant import dequantize_module
    from elastic.slicer.storage.reader import Checkpoint

    ckpt = Checkpoint.open(root)
    weight, _ = dequantize_module(ckpt, module)
    tensors = {n: ckpt.read(n) for n in ckpt.tensors if not n.startswith(module + ".")}
    tensors[f"{module}.weight"] = weight
    ckpt.close()
    save_file(tensors, root / "model.safetensors", metadata={"format": "pt"})
    for name, path in (("hf_quant_config.json", ("quantization", "exclude_modules")),
                       ("config.json", ("quantization_config", "ignore"))):
        data = json.loads((root / name).read_text())
        data[path[0]][path[1]] = sorted(data[path[0]][path[1]] + [module])
        (root / name).write_text(json.dumps(data))


@pytest.mark.heavy
def test_float_dtype_casts_only_the_unquantized_tensors(source, tmp_path):
    """dtype= casts the float tensors and pre_quant_scale; packed weights and scales keep theirs."""
    from elastic.slicer.nn.model import load_model
    from elastic.slicer.slice import slice_checkpoint
    from elastic.slicer.storage.reader import Checkpoint

    result = slice_checkpoint(source("int8"), tmp_path / "out", spec=_spec(Checkpoint.open(source("int8")), CUT75)[0],
                              dtype="bf16")
    child = Checkpoint.open(tmp_path / "out")
    t = child.tensors
    p = "backbone.layers.0.mixer.in_proj."
    assert (t[p + "weight"].dtype, t[p + "weight_scale"].dtype, t[p + "input_scale"].dtype,
            t[p + "pre_quant_scale"].dtype) == ("I8", "F32", "F32", "BF16")
    assert t["backbone.embeddings.weight"].dtype == "BF16" and t["backbone.layers.0.mixer.A_log"].dtype == "BF16"
    assert result.manifest["dtype"] == "bfloat16" and child.config["dtype"] == "bfloat16"
    assert load_model(child).lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("precision,message", [
    ("nvfp4", r"backbone.layers.0.mixer.out_proj.weight: kept input columns \[0, 8\) cut through \[0, 16\): NVFP4 "
              r"keeps one fp8 scale per block of 16"),
    ("int4", r"backbone.layers.0.mixer.in_proj.weight: kept output rows \[256, 323\) cut through \[322, 324\): "
             r"W4A16_AWQ packs output rows 2k and 2k\+1"),
])
@pytest.mark.heavy
def test_a_budget_that_cuts_blocks_is_refused_before_anything_is_written(source, tmp_path, monkeypatch,
                                                                         precision, message):
    """CUT50 keeps 8 of 16 channels per Mamba head (and 3 of 4 heads per group)."""
    from elastic.slicer import slice as slice_mod
    from elastic.slicer.errors import ConfigError
    from elastic.slicer.storage.reader import Checkpoint

    src_dir = source(precision)

    def no_writer(*a, **k):
        raise AssertionError("the writer was opened")

    monkeypatch.setattr(slice_mod, "ShardedWriter", no_writer)
    with pytest.raises(ConfigError, match="cannot be sliced along this spec without dequantizing") as e:
        slice_mod.slice_checkpoint(src_dir, tmp_path / "out", spec=_spec(Checkpoint.open(src_dir), CUT50)[0])
    assert any(re.match(message, p) for p in e.value.problems), e.value.problems
    assert e.value.hint is not None and e.value.hint.setting == "spec"
    assert not any(tmp_path.iterdir())


def test_renumbering_exclude_entries():
    """Oracle: the renaming written out by hand."""
    from elastic.slicer.quant.slicing import renumber

    names = ["lm_head", "backbone.layers.0.mixer.conv1d", "backbone.layers.4.mixer.conv1d",
             "backbone.layers.5.mixer.in_proj", "backbone.layers.*.mixer.conv1d", "*.experts.3.up_proj",
             "backbone.layers.12.mixer.experts.1.down_proj"]
    out, problems = renumber(names, [0, 2, 3, 5, 12])
    assert out == ["lm_head", "backbone.layers.0.mixer.conv1d", "backbone.layers.3.mixer.in_proj",
                   "backbone.layers.*.mixer.conv1d", "*.experts.3.up_proj",
                   "backbone.layers.4.mixer.experts.1.down_proj"]
    assert problems == []
    out, problems = renumber(["backbone.layers.1*.mixer.in_proj"], [0, 1])
    assert out == [] and "renumbering cannot follow it" in problems[0]


def test_mapping_follows_the_stored_layout_of_each_format():
    """Oracle: the shapes Model Optimizer writes (``QuantLayout.linear_tensors``) of a Linear of the
    kept size, and the rows/columns each stored tensor keeps, written out by hand."""
    from elastic.slicer.formats.rules import TensorRule
    from elastic.slicer.quant.layout import QuantLayout
    from elastic.slicer.quant.slicing import linear_rules

    rule = TensorRule("m.weight", "p.weight", (((0, 4), (8, 12)), ((0, 16), (32, 64))))  # (8 of 16, 48 of 64)
    present = {"p.weight", "p.weight_scale", "p.pre_quant_scale"}
    want = {
        "NVFP4": {"weight": (((0, 4), (8, 12)), ((0, 8), (16, 32))),
                  "weight_scale": (((0, 4), (8, 12)), ((0, 1), (2, 4))), "weight_scale_2": (), "input_scale": ()},
        "W4A16_AWQ": {"weight": (((0, 2), (4, 6)), ((0, 16), (32, 64))),
                      "weight_scale": (((0, 4), (8, 12)), ((0, 1), (2, 4))), "pre_quant_scale": (((0, 16), (32, 64)),)},
        "W8A8_SQ_PER_CHANNEL": {"weight": rule.axes, "weight_scale": (rule.axes[0],), "input_scale": (),
                                "pre_quant_scale": (rule.axes[1],)},
        "FP8": {"weight": rule.axes, "weight_scale": (), "input_scale": ()},
    }
    for algo, leaves in want.items():
        layout = QuantLayout.from_section({"quant_algo": algo, "group_size": 16, "exclude_modules": []})
        rules, problems = linear_rules(layout, rule, present)
        assert problems == []
        assert {r.name: r.axes for r in rules} == {f"m.{k}": v for k, v in leaves.items()}
        assert {r.source for r in rules} == {f"p.{k}" for k in leaves}
        shapes = layout.linear_tensors(8, 48)
        assert {r.name.removeprefix("m."): r.shape for r in rules} == {k: s for k, (_, s) in shapes.items()}


@pytest.mark.heavy
def test_the_cli_slices_a_quantized_source(source, tmp_path):
    """`elastic slice` passes a quantized source to the library (it refused one before)."""
    from typer.testing import CliRunner

    from elastic.cli.main import app
    from elastic.slicer.storage.reader import Checkpoint

    r = CliRunner().invoke(app, ["slice", "-c", str(source("fp8")), "--budget", "75%", "--out", str(tmp_path / "s"),
                                 "--json"])
    assert r.exit_code == 0, r.output
    child = Checkpoint.open(tmp_path / "s")
    assert child.quant is not None and child.quant.quant_algo == "FP8"
    manifest = json.loads((tmp_path / "s" / "slice_manifest.json").read_text())
    assert manifest["quantization"]["dequantized"] is False and json.loads(r.stdout)["parameters"] > 0
