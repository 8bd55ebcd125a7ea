"""The portable form: a slice with per-layer widths written as a stock nemotron_h by zero padding.

Oracles: transformers runs the padded slice (its own NemotronHForCausalLM, stock config) and the
compact slice (NVIDIA's Puzzle form through the shipped modeling code, or the stock class) on the
same tokens: the logits agree to float32 rounding (the padded matmuls add exact zeros, in another
summation order) and exactly enough in float64; the greedy tokens are the same.
"""

import json

import numpy as np
import pytest
import torch

from elastic.slicer.errors import ConfigError
from elastic.slicer.formats.arch import Arch
from elastic.slicer.formats.padding import TensorPad, pad_blocks, portable_form
from elastic.slicer.planning.describe import default_checkpoint
from elastic.slicer.slice import slice_checkpoint
from elastic.slicer.storage.reader import Checkpoint

transformers = pytest.importorskip("transformers")

DEMO = default_checkpoint()
FFN_SPEC = {"hidden_size": 64, "layers": [{"index": 1, "intermediate_size": 192}, {"index": 4, "intermediate_size": 128},
                                          {"index": 6, "intermediate_size": 64}]}
# (id, budget or spec, pad multiple): the demo's budgets (100% and 75% are homogeneous: a multiple
# that does not divide 256 pads every MLP) and a per-layer FFN spec
CASES = [("100%", "100%", 96), ("75%", "75%", 96), ("50%", "50%", None), ("50%-x160", "50%", 160),
         ("ffn-spec", FFN_SPEC, None)]


def _slice(tmp_path, name, what, **kw):
    kind = {"budget": what} if isinstance(what, str) else {"spec": tmp_path / "spec.json"}
    if not isinstance(what, str):
        (tmp_path / "spec.json").write_text(json.dumps(what))
    return slice_checkpoint(DEMO, tmp_path / name, **kind, **kw)


def _hf(path, dtype):
    cfg = json.loads((path / "config.json").read_text())
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, trust_remote_code=cfg["model_type"] != "nemotron_h", dtype=dtype, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _greedy(model, ids, steps=8):
    """transformers' greedy continuation with a plain forward per step (generate fails without an
    attention layer: the demo's 50%)."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return ids


@pytest.mark.heavy
@pytest.mark.parametrize("name,what,multiple", CASES, ids=[c[0] for c in CASES])
def test_padded_slice_computes_the_compact_one(tmp_path, name, what, multiple):
    compact = _slice(tmp_path, "compact", what, form="puzzle")
    padded = _slice(tmp_path, "padded", what, form="stock", pad_multiple=multiple)
    form = padded.manifest["form"]
    cfg = json.loads((padded.out / "config.json").read_text())
    assert cfg["model_type"] == "nemotron_h" and "block_configs" not in cfg and form["config_form"] == "nemotron_h"
    widths = [x.intermediate_size for x in Arch.from_file(compact.out).layers if x.kind == "mlp"]
    top = max(widths) if multiple is None else -(-max(widths) // multiple) * multiple
    assert cfg["intermediate_size"] == top
    assert [(p["from"], p["to"]) for p in form["padding"]] == [(w, top) for w in widths if w != top]
    d = cfg["hidden_size"]
    added = 2 * d * sum(top - w for w in widths)  # up rows + down columns, float32
    assert form["cost"] == {"parameters": added, "bytes": 4 * added, "fraction": added / compact.parameters}
    assert padded.parameters == compact.parameters + added

    ids = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(1))
    m = [_hf(p.out, torch.float32) for p in (compact, padded)]
    a, b = _logits(m[0], ids), _logits(m[1], ids)
    # float32: the padded matmuls sum the same products plus exact zeros in another order, so the
    # logits differ by float32 rounding: at most 1e-6 of the logits' scale (a few ulps)
    assert (b - a).abs().max() <= 1e-6 * a.abs().max()
    assert torch.equal(_greedy(m[0], ids[:1]), _greedy(m[1], ids[:1]))
    a, b = (_logits(_hf(p.out, torch.float64), ids) for p in (compact, padded))
    torch.testing.assert_close(b, a, atol=1e-12, rtol=0)  # float64: the zeros change nothing

    from elastic.export.runtime import generate_text

    ours = [generate_text(p.out, "def main():", backend="torch", max_new_tokens=12)["tokens"]
            for p in (compact, padded)]
    assert ours[0] == ours[1] and len(ours[0]) > 0


def test_moe_expert_widths_are_padded(tmp_path):
    """MoE expert and shared-expert widths (40 and 80 of the MoE demo's 48 and 96, 6 of its 8 experts,
    rounded up to a multiple of 32): transformers' own MoE layer computes the same logits."""
    from elastic.slicer.formats.spec import SliceSpec

    moe = DEMO.parent / "moe_demo_checkpoint"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"moe_ffn_hidden_size": 40, "moe_shared_expert_intermediate_size": 80,
                                "num_moe_experts": 6}))  # NVIDIA's names
    spec = SliceSpec.from_file(spec, Checkpoint.open(moe).arch)
    compact = slice_checkpoint(moe, tmp_path / "c", spec=spec, form="puzzle")
    padded = slice_checkpoint(moe, tmp_path / "p", spec=spec, form="stock", pad_multiple=32)
    assert {(p["field"], p["from"], p["to"]) for p in padded.manifest["form"]["padding"]} == {
        ("moe_intermediate_size", 40, 64), ("moe_shared_expert_intermediate_size", 80, 96)}
    ids = torch.randint(0, 512, (2, 13), generator=torch.Generator().manual_seed(1))
    a, b = (_logits(_hf(p.out, torch.float32), ids) for p in (compact, padded))  # no float64 MoE in transformers
    assert (b - a).abs().max() <= 1e-6 * a.abs().max()


def test_padded_tensors_hold_the_compact_ones_and_zeros(tmp_path):
    compact = Checkpoint.open(_slice(tmp_path, "c", "50%", form="puzzle").out)
    padded = Checkpoint.open(_slice(tmp_path, "p", "50%", form="stock", dtype="bfloat16").out)
    up, down = "backbone.layers.3.mixer.up_proj.weight", "backbone.layers.3.mixer.down_proj.weight"
    f = compact.tensors[up].shape[0]
    u, dn = padded.read_bits(up), padded.read_bits(down)  # raw bfloat16 bits
    assert u.shape == (256, 48) and dn.shape == (48, 256) and f == 128
    assert not u[f:].any() and not dn[:, f:].any() and u[:f].any() and dn[:, :f].any()


def test_attention_heads_are_padded_inside_their_kv_group(tmp_path):
    """Per-layer attention heads (elastic's extension form, one Mamba size): the stock form pads
    the smaller layer's query heads with zero heads at the end of each KV group."""
    from test_remote_code import load_hf, write_checkpoint

    blocks = [{"block_type": "mamba", "mamba_num_heads": 8, "mamba_head_dim": 6},
              {"block_type": "mlp", "intermediate_size": 96},
              {"block_type": "attention", "num_attention_heads": 4, "num_key_value_heads": 2},
              {"block_type": "mamba", "mamba_num_heads": 8, "mamba_head_dim": 6},
              {"block_type": "mlp", "intermediate_size": 40},
              {"block_type": "attention", "num_attention_heads": 2, "num_key_value_heads": 2},
              {"block_type": "mamba", "mamba_num_heads": 8, "mamba_head_dim": 6}]
    write_checkpoint(tmp_path / "src", "M-*M-*M", blocks)
    assert Arch.from_file(tmp_path / "src").config_form() == "nemotron_h_elastic"
    (tmp_path / "full.json").write_text(json.dumps({"hidden_size": 32, "layers": []}))
    r = slice_checkpoint(tmp_path / "src", tmp_path / "stock", spec=tmp_path / "full.json", form="stock")
    assert {(p["layer"], p["field"], p["from"], p["to"]) for p in r.manifest["form"]["padding"]} == {
        (4, "intermediate_size", 40, 96), (5, "num_attention_heads", 2, 4)}
    q = Checkpoint.open(r.out).read_bits("backbone.layers.5.mixer.q_proj.weight").view(np.float32)
    hd = 8  # head_dim: rows [kv 0: head 0, zero head | kv 1: head 1, zero head]
    assert not q[hd:2 * hd].any() and not q[3 * hd:].any() and q[:hd].any() and q[2 * hd:3 * hd].any()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = load_hf(tmp_path / "src")(ids, use_cache=False).logits
        b = load_hf(tmp_path / "stock", "nemotron_h")(ids, use_cache=False).logits
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_per_layer_mamba_sizes_are_refused_with_the_reason(tmp_path):
    spec = {"hidden_size": 64, "layers": [{"index": 0, "mamba_num_heads": 4}, {"index": 2, "mamba_head_dim": 12}]}
    with pytest.raises(ConfigError) as e:
        _slice(tmp_path, "x", spec, form="stock")
    text = e.value.render()
    assert "gated RMSNorm" in text and "layer 0: 4 heads x 16" in text and "layer 2: 8 heads x 12" in text
    assert e.value.hint is not None and not (tmp_path / "x").exists()
    r = _slice(tmp_path, "y", spec, form="auto", runtime="vllm")  # the compact form is written as before
    assert r.manifest["form"]["config_form"] == "nemotron_h_elastic" and r.manifest["form"]["padding"] == []


def test_auto_form_follows_the_runtime():
    arch = Checkpoint.open(DEMO).arch
    from elastic.slicer.formats.spec import SliceSpec

    child = SliceSpec.from_json(FFN_SPEC, arch).child_arch(arch)
    assert portable_form(child, "auto", runtime="edgellm").arch.config_form() == "nemotron_h"
    assert portable_form(child, "auto", runtime="vllm").arch is child
    assert portable_form(child, "puzzle", pad_multiple=128).arch.layers[6].intermediate_size == 128
    with pytest.raises(ConfigError):
        portable_form(child, "stock", quantized=True)  # packed blocks are never padded
    with pytest.raises(ConfigError):
        portable_form(child, "compact")


@pytest.mark.parametrize("axis,inserts", [(0, ((3, 2), (7, 4), (10, 1))), (0, ((0, 3),)), (1, ((2, 3), (5, 1)))])
def test_zeros_go_where_the_inserts_say_across_blocks(axis, inserts):
    full = np.arange(10 * 5, dtype=np.float32).reshape(10, 5) + 1
    blocks = [full[0:4], full[4:7], full[7:10]]  # the slicer streams rows in blocks
    got = np.concatenate(list(pad_blocks(iter(blocks), TensorPad(axis, inserts), full.shape)), axis=0)
    want = full
    for at, n in reversed(inserts):
        want = np.insert(want, [at] * n, 0, axis=axis)
    assert np.array_equal(got, want)
    t = [torch.from_numpy(b) for b in blocks]  # a cast slice streams torch tensors
    got_t = torch.cat(list(pad_blocks(iter(t), TensorPad(axis, inserts), full.shape)), dim=0)
    assert np.array_equal(got_t.numpy(), want)


def test_cli_form_and_json(tmp_path):
    from typer.testing import CliRunner

    from elastic.cli.main import app

    r = CliRunner().invoke(app, ["slice", "--budget", "50%", "--runtime", "edgellm", "--pad-multiple", "128",
                                 "--out", str(tmp_path / "s"), "--json"])
    assert r.exit_code == 0, r.output
    form = json.loads(r.stdout)["form"]
    assert form["config_form"] == "nemotron_h" and form["runtime"] == "edgellm" and form["pad_multiple"] == 128
    r = CliRunner().invoke(app, ["slice", "--budget", "50%", "--form", "stock", "--out", str(tmp_path / "t")])
    assert r.exit_code == 0 and "zero-padded: layer 3 intermediate_size 128 -> 256" in r.output
