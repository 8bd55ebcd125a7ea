"""The plan's per-layer transient bytes against the tensors the reference model really holds.

Oracle: a dispatch-mode tracer on the reference model itself. Every tensor an operator returns is
counted from its allocation until its storage is freed (a weakref finalizer), so the peak of the
count is the largest set of tensors alive at once inside one layer's forward. The plan's
``_layer_live_bytes`` is written from reading the code (slicer/nn/ssd.py, model.py); this checks it
against what runs, for float32 and bfloat16, for chunks that fill the scan's chunks and chunks that
are padded. (The process's RSS on top of the live tensors is bench/plan_accuracy.py's business.)
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from elastic.slicer.formats.arch import Arch
from elastic.slicer.nn.model import NemotronH
from elastic.slicer.planning.memory import _layer_live_bytes

DEMO = Path(__file__).resolve().parent.parent / "slicer" / "demo_checkpoint"


class LiveTensors(TorchDispatchMode):
    """Counts the bytes of storages created inside the mode that are still alive; ``peak`` is the max."""

    def __init__(self, skip: set[int]):
        super().__init__()
        self.skip, self.alive, self.live, self.peak = skip, set(), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map(self._track, out)
        return out

    def _track(self, t):
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key and key not in self.alive and key not in self.skip:
                self.alive.add(key)
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._free, key, storage.nbytes())
        return t

    def _free(self, key: int, n: int) -> None:
        self.alive.discard(key)
        self.live -= n


def _arch(**change) -> Arch:
    cfg = json.loads((DEMO / "config.json").read_text(), parse_constant=lambda c: float(c))
    return Arch.from_config({**cfg, **change})


def _layer_peak(arch: Arch, i: int, t: int, dtype: torch.dtype) -> int:
    torch.manual_seed(0)
    model = NemotronH(arch).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():  # defined values (some parameters start uninitialised)
            p.copy_(torch.randn_like(p) * 0.02)
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    x = torch.randn(1, t, arch.hidden_size, dtype=dtype)
    cache = model.new_cache()
    block = model.backbone.layers[i]
    with torch.no_grad():
        block(torch.randn(1, 8, arch.hidden_size, dtype=dtype), cache=cache, idx=i)  # a cache to continue
        mode = LiveTensors(skip)
        with mode:
            out = block(x, cache=cache, idx=i)
    del out
    return mode.peak


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t", [64, 40], ids=["full-chunks", "padded"])
@pytest.mark.parametrize("kind, change", [
    ("mamba", {}),
    ("mamba", {"mamba_num_heads": 16, "n_groups": 4, "ssm_state_size": 32, "chunk_size": 32, "hidden_size": 96}),
    ("mlp", {}),
    ("attention", {}),
], ids=["mamba-demo", "mamba-wide", "mlp", "attention"])
def test_layer_live_bytes_follow_the_reference_model(kind, change, t, dtype):
    arch = _arch(**change)
    i = next(j for j, la in enumerate(arch.layers) if la.kind == kind)
    measured = _layer_peak(arch, i, t, dtype)
    planned = _layer_live_bytes(arch, i, t, 1, torch.finfo(dtype).bits // 8)
    if kind == "mamba":  # the layer that sets the peak: within a few percent (the demo's T x T masks
        # and per-head vectors, which the plan leaves out, are a few percent of its tiny chunks)
        assert 0.95 * measured <= planned <= 1.1 * measured, (measured, planned)
    else:  # never under; over by the pre-norm's float32 temporaries, counted alive with the outputs
        assert measured <= planned <= 1.7 * measured, (measured, planned)
