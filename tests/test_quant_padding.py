"""int4 slices: the unquantized tensors in bf16 by default, the hidden size zero-padded where the AWQ group
would otherwise be too small (slicer/quantize/hidden_pad.py, planning.memory.int4_hidden), a narrower budget
never planned larger than a wider one, and the plan equal to the slice's file byte for byte."""

import json
import math
import struct
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from elastic.slicer.formats.precision import BFLOAT16, INT4
from elastic.slicer.formats.safetensors import DTYPES
from elastic.slicer.planning.describe import DEMO_CHECKPOINT
from elastic.slicer.planning.fit import budget_specs
from elastic.slicer.planning.memory import _quantized_tensors, int4_hidden, weights_bytes
from elastic.slicer.storage.reader import Checkpoint

HAVE_MODELOPT = all(find_spec(m) for m in ("modelopt", "transformers"))
needs_modelopt = pytest.mark.skipif(not HAVE_MODELOPT, reason="needs nvidia-modelopt (pip install 'elastic[modelopt]')")


def _children() -> dict[str, object]:
    ckpt = Checkpoint.open(DEMO_CHECKPOINT)
    return {name: spec.child_arch(ckpt.arch) for name, spec, _ in budget_specs(ckpt)}


def test_int4_plan_shrinks_with_the_budget_and_pads_only_where_it_pays():
    """The demo's int4 weights by budget: 100% 253,424 B, 75% 229,496 B (hidden 56 padded to 64: group 64
    instead of 8, whose float32 scales made it 263,048 B), 50% 163,224 B (hidden 48 kept: padding it would
    cost more than group 16's scales)."""
    kids = _children()
    sizes = {name: weights_bytes(a, "int4", "bf16") for name, a in kids.items()}
    assert sizes == {"100%": 253_424, "75%": 229_496, "50%": 163_224}
    assert [int4_hidden(kids[b]) for b in ("100%", "75%", "50%")] == [64, 64, 48]
    # the rule is "fewest bytes": as cut, the 75% budget would be the larger
    as_cut = _quantized_tensors(kids["75%"], INT4, BFLOAT16)
    assert sum(math.prod(s) * DTYPES[t][1] for t, s in as_cut.values()) == 263_048 > sizes["100%"]


def test_the_plan_says_it_pads():
    from elastic.profiles.devices import get_profile
    from elastic.slicer.planning.fit import plan, target_from_profile
    from elastic.slicer.planning.memory import Workload

    p = plan(DEMO_CHECKPOINT, target_from_profile(get_profile("rtx-4090")), Workload(weights="int4", dtype="auto"),
             runtime="tensorrt-llm").to_json()
    why = {c["budget"]: c["why"] for c in p["candidates"]}
    assert "hidden 56 zero-padded to 64 for int4 AWQ group 64 (8 as cut" in why["75%"]
    assert "padded" not in why["100%"] and "padded" not in why["50%"]


def test_zero_padding_the_hidden_size_computes_the_same_logits(tmp_path):
    """Oracle: the unpadded slice (reference model). With the norms' epsilon negligible the logits agree
    to float rounding; with the real epsilon the greedy tokens agree."""
    from elastic.slicer.nn.generate import greedy
    from elastic.slicer.nn.model import TorchBackend, load_model
    from elastic.slicer.quantize.hidden_pad import pad_hidden
    from elastic.slicer.slice import slice_checkpoint

    cut = slice_checkpoint(DEMO_CHECKPOINT, tmp_path / "cut", budget="75%", dtype="float32").out
    padded = pad_hidden(cut, tmp_path / "padded", 64)
    assert json.loads((padded / "config.json").read_text())["hidden_size"] == 64
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    a, b = load_model(cut, dtype=torch.float32), load_model(padded, dtype=torch.float32)
    with torch.no_grad():
        assert greedy(TorchBackend(a), ids[:1, :12], 16).tokens == greedy(TorchBackend(b), ids[:1, :12], 16).tokens
        for m in (a, b):  # the only difference left is epsilon over 64 channels instead of 56
            for mod in m.modules():
                if type(mod).__name__ == "RMSNorm":
                    mod.eps = 1e-12
        torch.testing.assert_close(b(ids), a(ids), rtol=1e-4, atol=1e-4)


def _tensor_bytes(path: Path) -> int:
    """The bytes of a safetensors file's tensors: the file less its 8-byte length and its header."""
    with path.open("rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    return path.stat().st_size - 8 - header


@needs_modelopt
@pytest.mark.slow
@pytest.mark.parametrize("budget", ["100%", "75%", "50%"])
def test_the_int4_slice_file_is_what_the_plan_counts(tmp_path, budget):
    """`elastic slice --budget B --precision int4` on the float32 demo, no --dtype: the unquantized tensors
    are bf16, and every byte of tensor data in the written file is the plan's int4 weights term (whole
    file: its size less the safetensors header). Before this change the 50% slice was 273,728 bytes, more
    than its bf16 slice (263,792)."""
    from elastic.slicer.quantize.workflow import slice_and_quantize

    out = tmp_path / "q"
    slice_and_quantize(DEMO_CHECKPOINT, out, "int4", budget=budget, samples=2, seq_len=32)
    m = json.loads((out / "slice_manifest.json").read_text())
    assert m["dtype"] == "bfloat16"
    files = [out / s["file"] for s in m["shards"]]
    assert sum(_tensor_bytes(f) for f in files) == weights_bytes(_children()[budget], "int4", "bf16")
    assert ("hidden_padding" in m) == (budget == "75%")
