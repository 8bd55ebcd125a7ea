"""A slice that keeps the stored dtype copies element bits with numpy and never imports torch.

Each slice runs in a fresh interpreter that reports whether torch got imported; its output is
compared, element bit for element bit, with the source tensors indexed at the kept positions.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file as load_torch

from elastic.slicer.formats.rules import indices, tensor_rules
from elastic.slicer.formats.spec import SliceSpec
from elastic.slicer.planning.describe import DEMO_CHECKPOINT
from elastic.slicer.slice import slice_checkpoint
from elastic.slicer.storage.reader import Checkpoint

from conftest import make_hf_checkpoint

# n_groups=2 and per-layer sizes: kept ranges are several per axis (rows and columns)
PARENT = dict(hybrid_override_pattern="M-M*-M", n_groups=2, mamba_num_heads=8, mamba_head_dim=6,
              num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, hidden_size=32)
SPEC = {"hidden_size": 24, "layers": [
    {"index": 0, "mamba_num_heads": 4, "mamba_head_dim": 5}, {"index": 2, "mamba_num_heads": 6},
    {"index": 3, "num_attention_heads": 2}, {"index": 1, "intermediate_size": 40},
    {"index": 4, "intermediate_size": 16}, {"index": 5, "mamba_head_dim": 3}]}


def run_clean(code: str) -> dict:
    """Run ``code`` in a new interpreter; it prints one JSON line, to which torch's presence is added."""
    code += "\nimport json, sys; print(json.dumps({'torch': 'torch' in sys.modules}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def kept(source_dir, out_dir):
    """Every output tensor's name, the source tensor indexed at its kept positions, the output tensor."""
    ckpt = Checkpoint.open(source_dir)
    manifest = json.loads((out_dir / "slice_manifest.json").read_text())
    spec = SliceSpec.from_json(manifest["spec"], ckpt.arch)
    src = {f.name: load_torch(f) for f in ckpt.weight_files}
    got = {k: v for f in Checkpoint.open(out_dir).weight_files for k, v in load_torch(f).items()}
    rules = tensor_rules(ckpt.arch, spec)
    assert sorted(got) == sorted(r.name for r in rules)
    for r in rules:
        t = src[ckpt.tensors[r.source].file.name][r.source]
        for dim, ranges in enumerate(r.axes):
            t = t.index_select(dim, torch.tensor(indices(ranges), dtype=torch.long))
        yield r.name, t, got[r.name]


def test_demo_slice_via_cli_imports_no_torch(tmp_path):
    out = tmp_path / "m50"
    code = ("from typer.testing import CliRunner; from elastic.cli.main import app; "
            f"r = CliRunner().invoke(app, ['slice', '-c', {str(DEMO_CHECKPOINT)!r}, '--budget', '50%', "
            f"'--out', {str(out)!r}, '--json']); assert r.exit_code == 0, r.output")
    assert run_clean(code) == {"torch": False}
    assert json.loads((out / "slice_manifest.json").read_text())["dtype"] == "float32"
    # numpy's own reader and indexing as the oracle: exact values (a float32 source keeps float32)
    src = load_numpy(DEMO_CHECKPOINT / "model.safetensors")
    ckpt = Checkpoint.open(DEMO_CHECKPOINT)
    spec = SliceSpec.from_json(json.loads((out / "slice_manifest.json").read_text())["spec"], ckpt.arch)
    got = load_numpy(out / "model.safetensors")
    rules = tensor_rules(ckpt.arch, spec)
    assert sorted(got) == sorted(r.name for r in rules)
    for r in rules:
        want = src[r.source][np.ix_(*(indices(a) for a in r.axes))]
        assert got[r.name].dtype == np.float32 and got[r.name].shape == want.shape, r.name
        assert np.array_equal(got[r.name].view(np.uint32), want.view(np.uint32)), r.name


@pytest.fixture(scope="module")
def bf16_source(tmp_path_factory):
    """A tiny random checkpoint cast to bfloat16 by a (torch) slice that keeps everything."""
    root = tmp_path_factory.mktemp("bf16")
    make_hf_checkpoint(root / "f32", seed=5, **PARENT)
    arch = Checkpoint.open(root / "f32").arch
    slice_checkpoint(root / "f32", root / "bf16", spec=SliceSpec.full(arch), dtype="bfloat16", max_shard_bytes=20_000)
    assert {t.dtype for t in Checkpoint.open(root / "bf16").tensors.values()} == {"BF16"}
    (root / "spec.json").write_text(json.dumps(SPEC))
    return root


@pytest.mark.parametrize("block_bytes", [16 * 2**20, 200])  # one block per tensor; a few rows per block
def test_bf16_slice_keeps_bits_without_torch(bf16_source, tmp_path, block_bytes):
    src, out = bf16_source / "bf16", tmp_path / "out"
    code = ("from elastic.slicer import slice as s; "
            f"s.BLOCK_BYTES = {block_bytes}; "
            f"s.slice_checkpoint({str(src)!r}, {str(out)!r}, spec={str(bf16_source / 'spec.json')!r}, "
            "max_shard_bytes=8_000)")
    assert run_clean(code) == {"torch": False}
    assert len(Checkpoint.open(out).weight_files) > 1
    n = 0
    for name, want, got in kept(src, out):
        assert got.dtype == torch.bfloat16 and got.shape == want.shape, name
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), name
        n += got.numel()
    assert n == json.loads((out / "slice_manifest.json").read_text())["parameters"]["total"]


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_cast_matches_torch(bf16_source, tmp_path, dtype):
    """A cast goes through torch: the same bits as torch's ``.to`` of the kept source elements."""
    src = bf16_source / "bf16"
    slice_checkpoint(src, tmp_path / "out", spec=bf16_source / "spec.json", dtype=dtype)
    to = getattr(torch, dtype)
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[to.itemsize]
    for name, want, got in kept(src, tmp_path / "out"):
        assert got.dtype == to and torch.equal(got.view(bits), want.to(to).view(bits)), name


def test_kept_positions_written_by_hand(bf16_source, tmp_path):
    """DESIGN.md section 5 applied by hand to SPEC on PARENT (not through tensor_rules): Mamba keeps the
    first heads of each of the 2 groups of 4, attention the first query head of each KV group, every
    hidden axis its first 24 entries, FFNs a prefix. Each listed tensor equals the source at exactly
    these positions."""
    src, out = bf16_source / "bf16", tmp_path / "out"
    slice_checkpoint(src, out, spec=bf16_source / "spec.json")
    ckpt = Checkpoint.open(src)
    source = {k: v for f in ckpt.weight_files for k, v in load_torch(f).items()}
    got = {k: v for f in Checkpoint.open(out).weight_files for k, v in load_torch(f).items()}
    d = list(range(24))  # hidden 32 -> 24
    I, BC = 48, list(range(96, 116))  # 8 heads x 6 channels; B and C: 2 groups x 5 states x 2
    # layer 0: 4 of 8 Mamba heads -> heads 0, 1 (group 0) and 4, 5 (group 1); 5 of 6 channels each
    h0 = [0, 1, 4, 5]
    x0 = [h * 6 + c for h in h0 for c in range(5)]
    # layer 2: 6 of 8 heads -> 0, 1, 2 and 4, 5, 6; all 6 channels
    h2 = [0, 1, 2, 4, 5, 6]
    x2 = [h * 6 + c for h in h2 for c in range(6)]
    # layer 3: 2 of 4 query heads, 2 KV groups of 2 -> heads 0 and 2 (8 channels each)
    q3 = [h * 8 + c for h in (0, 2) for c in range(8)]
    # layer 5: all 8 heads, 3 of 6 channels
    x5 = [h * 6 + c for h in range(8) for c in range(3)]
    want = {
        "backbone.embeddings.weight": (list(range(97)), d),
        "backbone.norm_f.weight": (d,),
        "lm_head.weight": (list(range(97)), d),
        "backbone.layers.0.norm.weight": (d,),
        # in_proj rows: [z | x | B | C | dt]
        "backbone.layers.0.mixer.in_proj.weight": (x0 + [I + i for i in x0] + BC + [116 + h for h in h0], d),
        "backbone.layers.0.mixer.conv1d.weight": (x0 + list(range(48, 68)), [0], [0, 1, 2, 3]),  # [x | B | C]
        "backbone.layers.0.mixer.conv1d.bias": (x0 + list(range(48, 68)),),
        "backbone.layers.0.mixer.A_log": (h0,),
        "backbone.layers.0.mixer.D": (h0,),
        "backbone.layers.0.mixer.dt_bias": (h0,),
        "backbone.layers.0.mixer.norm.weight": (x0,),
        "backbone.layers.0.mixer.out_proj.weight": (d, x0),
        "backbone.layers.1.mixer.up_proj.weight": (list(range(40)), d),
        "backbone.layers.1.mixer.down_proj.weight": (d, list(range(40))),
        "backbone.layers.2.mixer.in_proj.weight": (x2 + [I + i for i in x2] + BC + [116 + h for h in h2], d),
        "backbone.layers.2.mixer.dt_bias": (h2,),
        "backbone.layers.2.mixer.out_proj.weight": (d, x2),
        "backbone.layers.3.mixer.q_proj.weight": (q3, d),
        "backbone.layers.3.mixer.k_proj.weight": (list(range(16)), d),
        "backbone.layers.3.mixer.v_proj.weight": (list(range(16)), d),
        "backbone.layers.3.mixer.o_proj.weight": (d, q3),
        "backbone.layers.4.mixer.up_proj.weight": (list(range(16)), d),
        "backbone.layers.5.mixer.in_proj.weight": (x5 + [I + i for i in x5] + BC + list(range(116, 124)), d),
        "backbone.layers.5.mixer.norm.weight": (x5,),
        "backbone.layers.5.mixer.out_proj.weight": (d, x5),
    }
    for name, axes in want.items():
        t = source[name]
        for dim, idx in enumerate(axes):
            t = t.index_select(dim, torch.tensor(idx))
        assert got[name].shape == t.shape and torch.equal(got[name].view(torch.int16), t.view(torch.int16)), name
