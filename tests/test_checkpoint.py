"""Broken checkpoints give one clear error naming the file; the writer is atomic and deterministic."""

import json
import shutil

import pytest
import torch

from elastic.slicer.storage.reader import Checkpoint

from elastic.slicer.storage.writer import OutTensor, ShardedWriter
from elastic.slicer.errors import CheckpointError, ConfigError
from elastic.slicer.nn.model import load_model

from conftest import make_hf_checkpoint


@pytest.fixture
def sharded(tmp_path):
    path = tmp_path / "ckpt"
    make_hf_checkpoint(path, max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    return path


def test_missing_shard(sharded):
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard {victim.name}") as e:
        Checkpoint.open(sharded)
    assert "model.safetensors.index.json" in str(e.value)


def test_truncated_shard(sharded):
    victim = sorted(sharded.glob("model-*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        Checkpoint.open(sharded)
    assert victim.name in str(e.value)


def test_truncated_inside_header(hf_ckpt):
    f = hf_ckpt[0] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        Checkpoint.open(hf_ckpt[0])


def test_shard_outside_directory_refused(sharded, tmp_path):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = next(iter(index["weight_map"]))
    outside = tmp_path / "evil.safetensors"
    shutil.copy(sorted(sharded.glob("model-*.safetensors"))[0], outside)
    index["weight_map"][name] = "../evil.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="is not a plain file name in the checkpoint directory"):
        Checkpoint.open(sharded)


def test_config_disagrees_with_weights(hf_ckpt):
    path = hf_ckpt[0]
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 64
    cfg["layers_block_type"].append("mlp")  # one layer more than the weights hold
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="disagree with config.json") as e:
        Checkpoint.open(path)
    text = str(e.value)
    assert "backbone.layers.1.mixer.up_proj.weight: config implies shape [64, 32]" in text
    assert "missing tensor backbone.layers.6.norm.weight" in text


def test_unknown_layer_type(hf_ckpt):
    path = hf_ckpt[0]
    cfg = json.loads((path / "config.json").read_text())
    cfg["layers_block_type"][2] = "hyena"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'hyena'") as e:
        load_model(path)
    assert "config.json" in str(e.value)


def test_config_only_mode(hf_ckpt):
    (hf_ckpt[0] / "model.safetensors").unlink()
    ckpt = Checkpoint.open(hf_ckpt[0])
    assert not ckpt.has_weights and ckpt.arch.num_hidden_layers == 6
    with pytest.raises(CheckpointError, match="no weights"):
        Checkpoint.open(hf_ckpt[0], require_weights=True)


def ones(name, n, blocks=None):
    return OutTensor(name, "F32", (n,), blocks or (lambda: [torch.ones(n)]))


def test_writer_failure_leaves_nothing(tmp_path):
    out = tmp_path / "model"
    def failing_blocks():
        yield torch.ones(2)
        raise RuntimeError("boom")  # e.g. a source shard that fails mid-read

    with pytest.raises(RuntimeError):
        with ShardedWriter(out) as w:
            w.add_json("config.json", {})
            w.write_tensors([ones("a", 4, failing_blocks)])
    assert list(tmp_path.iterdir()) == []


def test_writer_never_overwrites_without_force(tmp_path):
    from elastic.slicer.storage.outputs import MARKER, OutputError

    out = tmp_path / "model"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    with pytest.raises(OutputError, match="already exists"):
        ShardedWriter(out)
    with pytest.raises(OutputError, match="not written by elastic"):
        ShardedWriter(out, force=True)  # force replaces only what elastic wrote
    assert (out / "precious.txt").read_text() == "user data"
    (out / "precious.txt").unlink()
    with ShardedWriter(out, force=True) as w:  # an empty directory may be replaced
        w.write_tensors([ones("a", 3)])
    with ShardedWriter(out, force=True) as w:  # and so may one elastic wrote
        w.write_tensors([ones("b", 3)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "model.safetensors"]


def test_writer_is_deterministic_and_shards(tmp_path):
    tensors = {f"t{i}": torch.arange(100, dtype=torch.float32) * i for i in range(5)}
    for name in ("a", "b"):
        with ShardedWriter(tmp_path / name) as w:
            w.write_tensors([OutTensor(k, "F32", (100,), lambda t=t: [t[:30], t[30:]]) for k, t in tensors.items()],
                            max_shard_bytes=900)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "model.safetensors.index.json" in files and len(files) == 5  # 3 shards + index + marker
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    ckpt_tensors = Checkpoint._scan_weights(tmp_path / "a")
    assert sorted(ckpt_tensors) == sorted(tensors)


def test_streamed_file_reads_back_with_safetensors(tmp_path):
    from safetensors.torch import load_file

    t = torch.randn(7, 5).to(torch.bfloat16)
    with ShardedWriter(tmp_path / "m") as w:
        w.write_tensors([OutTensor("x", "BF16", (7, 5), lambda: [t[:3], t[3:]]), ones("y", 2)])
    back = load_file(tmp_path / "m" / "model.safetensors")
    assert torch.equal(back["x"], t) and torch.equal(back["y"], torch.ones(2))


def test_numpy_and_bytes_blocks_write_what_torch_blocks_write(tmp_path):
    t = torch.randn(7, 5).to(torch.bfloat16)
    bits = t.view(torch.int16).numpy().view("<u2")  # bfloat16 has no numpy dtype: its raw bits
    y = torch.arange(6, dtype=torch.float32)
    with ShardedWriter(tmp_path / "torch") as w:
        w.write_tensors([OutTensor("x", "BF16", (7, 5), lambda: [t[:3], t[3:, :]]),
                         OutTensor("y", "F32", (6,), lambda: [y])])
    with ShardedWriter(tmp_path / "numpy") as w:  # a strided view, raw bits, a real numpy dtype, bytes
        w.write_tensors([OutTensor("x", "BF16", (7, 5), lambda: [bits.T.copy().T[:3], bits[3:]]),
                         OutTensor("y", "F32", (6,), lambda: [y.numpy()[:2], y.numpy()[2:].tobytes()])])
    files = [tmp_path / d / "model.safetensors" for d in ("torch", "numpy")]
    assert files[0].read_bytes() == files[1].read_bytes()
    with pytest.raises(AssertionError, match="block dtype float16, expected bfloat16"):
        with ShardedWriter(tmp_path / "bad") as w:  # same size, other dtype: refused, not reinterpreted
            w.write_tensors([OutTensor("x", "BF16", (7, 5), lambda: [t.float().numpy().astype("float16")])])


def test_read_bits_is_read_without_torch(hf_ckpt):
    ckpt = Checkpoint.open(hf_ckpt[0])
    for name, info in ckpt.tensors.items():
        r = (1, min(3, info.shape[0]))
        t, b = ckpt.read(name, r), ckpt.read_bits(name, r)
        assert b.dtype.kind == "u" and b.dtype.itemsize == t.element_size() and b.shape == tuple(t.shape)
        assert b.tobytes() == t.contiguous().view(torch.uint8).numpy().tobytes(), name
