"""The cache of traced ONNX graphs (export/onnx_export.py): a second export of the same architecture
loads the graphs instead of tracing them, and writes the same bytes as the first (the oracle)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import elastic.slicer as slicer_pkg

DEMO = Path(slicer_pkg.__file__).parent / "demo_checkpoint"


def _digests(d: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir())
            if f.suffix in (".onnx", ".bin")}


@pytest.mark.heavy
def test_second_export_loads_the_traced_graphs_and_writes_the_same_bytes(tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")
    import onnx

    import elastic.export.onnx_export as ox
    from elastic.export.pipeline import export_model
    from elastic.slicer.slice import slice_checkpoint

    monkeypatch.setenv("ELASTIC_CACHE_DIR", str(tmp_path / "cache"))
    slice_checkpoint(DEMO, tmp_path / "m", budget="50%")
    first = export_model(tmp_path / "m", tmp_path / "e1", format="onnx")
    cached = list((tmp_path / "cache" / "onnx-graphs").iterdir())
    assert len(cached) == 1 and sorted(f.name for f in cached[0].iterdir()) == ["decode.onnx", "extend.onnx", "prefill.onnx"]
    for f in cached[0].iterdir():  # graphs only: every initializer a reference into weights.bin, never its data
        g = onnx.load(f, load_external_data=False)
        assert g.graph.initializer and all(i.data_location == onnx.TensorProto.EXTERNAL and not i.raw_data
                                           for i in g.graph.initializer)

    def no_tracing(*a, **k):
        raise AssertionError("traced again")

    monkeypatch.setattr(ox, "trace", no_tracing)
    monkeypatch.setattr(ox, "_trace_in_child", no_tracing)
    second = export_model(tmp_path / "m", tmp_path / "e2", format="onnx")
    assert _digests(tmp_path / "e1") == _digests(tmp_path / "e2") and len(_digests(tmp_path / "e1")) == 4
    assert first.manifest["parity"]["ok"] and second.manifest["parity"]["ok"]
    # another architecture (the 75% slice) is not served from this entry: it would trace
    slice_checkpoint(DEMO, tmp_path / "m75", budget="75%")
    with pytest.raises(AssertionError, match="traced again"):
        export_model(tmp_path / "m75", tmp_path / "e3", format="onnx")


def test_cache_off(tmp_path, monkeypatch):
    import torch

    from elastic.export.onnx_export import _graph_cache
    from elastic.slicer.storage.reader import Checkpoint

    arch = Checkpoint.open(DEMO).arch
    monkeypatch.setenv("ELASTIC_CACHE_DIR", "off")
    assert _graph_cache(arch, torch.float32, 18) is None
    monkeypatch.setenv("ELASTIC_CACHE_DIR", str(tmp_path))
    a, b = _graph_cache(arch, torch.float32, 18), _graph_cache(arch, torch.float16, 18)
    assert a.parent == tmp_path / "onnx-graphs" and a != b  # the dtype is part of the key
