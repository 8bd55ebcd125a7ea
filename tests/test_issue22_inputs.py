"""What a new user's inputs did (issue 22): a checkpoint without a tokenizer, a Hugging Face cache
snapshot with a dangling link, a ``router.file`` that is never read, a truncated safetensors file."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from elastic.cli.main import app
from elastic.slicer.errors import CheckpointError, ConfigError
from elastic.slicer.formats.elastic_format import ElasticConfig, read_router, resolve_budget, router_warning
from elastic.slicer.formats.safetensors import read_header
from elastic.slicer.formats.tokenizer import ByteTok, load_tokenizer, missing_tokenizer, require_tokenizer
from elastic.slicer.planning.describe import DEMO_CHECKPOINT
from elastic.slicer.storage.reader import Checkpoint

runner = CliRunner()


@pytest.fixture
def demo(tmp_path) -> Path:
    d = tmp_path / "demo"
    shutil.copytree(DEMO_CHECKPOINT, d)
    return d


def _edit_router(ckpt: Path, value) -> None:
    path = ckpt / "elastic_config.json"
    data = json.loads(path.read_text())
    data["router"]["file"] = value
    path.write_text(json.dumps(data))


# ---- 6: no tokenizer ---------------------------------------------------------------------------------


def test_generate_refuses_a_model_without_a_tokenizer(demo):
    (demo / "tokenizer.json").unlink()
    r = runner.invoke(app, ["generate", str(demo), "def main(", "-n", "4"])
    assert r.exit_code == 2 and r.stdout == "", r.output  # before: exit 0 and `def main(QG...` as "text"
    assert "no tokenizer" in r.stderr and "tokenizer.json" in r.stderr and "copy" in r.stderr
    with pytest.raises(CheckpointError, match="no tokenizer"):
        require_tokenizer(demo)


def test_the_byte_stand_in_never_yields_text(demo):
    """Without a tokenizer, the byte-level stand-in is not the model's tokenizer: its ids are never
    decoded into text (before: `def main(QG...`), whatever runs them."""
    from elastic.slicer.nn.generate import generate_text
    from elastic.slicer.nn.model import TorchBackend, load_model
    from elastic.slicer.nn.smoke import smoke_test

    (demo / "tokenizer.json").unlink()
    tok = load_tokenizer(demo)
    assert isinstance(tok, ByteTok)  # still the stand-in for a training corpus
    pieces = []
    r = generate_text(TorchBackend(load_model(demo)), tok, "def main(", 4, on_text=pieces.append)
    assert r["text"] is None and pieces == [] and r["new_tokens"] == 4
    r = smoke_test(demo, "def main(", 4, on_text=pieces.append, need_tokenizer=False)  # proof that it runs
    assert r["text"] is None and pieces == [] and r["new_tokens"] == 4 and all(0 <= t < 512 for t in r["tokens"])


def test_missing_tokenizer_says_what_a_runtime_lacks(demo):
    assert missing_tokenizer(demo) is None
    (demo / "tokenizer.json").unlink()
    why = missing_tokenizer(demo)
    assert why is not None and "no tokenizer" in why and "token ids" in why
    (demo / "tokenizer.model").write_bytes(b"sentencepiece")  # transformers reads this one
    assert missing_tokenizer(demo) is None
    with pytest.raises(CheckpointError, match="tokenizer.model"):  # generation reads tokenizer.json only
        require_tokenizer(demo)


def test_a_slice_without_a_tokenizer_says_so(demo, tmp_path):
    (demo / "tokenizer.json").unlink()
    r = runner.invoke(app, ["slice", "-c", str(demo), "--budget", "50%", "--out", str(tmp_path / "s"), "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert any("no tokenizer" in w for w in out["warnings"])
    manifest = json.loads((tmp_path / "s" / "slice_manifest.json").read_text())
    assert any("no tokenizer" in w for w in manifest["warnings"])
    for name, entry in manifest["runtimes"].items():
        assert entry.get("text") is False or not entry["loads"], name


# ---- 7: a Hugging Face cache snapshot with dangling links ---------------------------------------------


def hf_snapshot(tmp_path: Path, src: Path = DEMO_CHECKPOINT) -> Path:
    """``models--org--demo/snapshots/rev1/FILE -> ../../blobs/SHA256``, as huggingface_hub lays it out."""
    repo = tmp_path / "hub" / "models--org--demo"
    snap = repo / "snapshots" / "rev1"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        h = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / h)
        (snap / f.name).symlink_to(Path("../../blobs") / h)
    return snap


def _drop_blob(snap: Path, name: str) -> str:
    """Delete the blob behind ``snap/name`` (an interrupted download); returns the link's target."""
    target = str((snap / name).readlink())
    (snap / name).resolve().unlink()
    return target


def test_a_dangling_elastic_config_link_is_named_with_its_fix(tmp_path):
    snap = hf_snapshot(tmp_path)
    target = _drop_blob(snap, "elastic_config.json")
    fix = f"hf download org/demo elastic_config.json --revision rev1 --cache-dir {tmp_path / 'hub'}"
    for args in (["inspect", "-c", str(snap)], ["plan", "-c", str(snap), "--target", "cpu"]):
        r = runner.invoke(app, args)  # before: exit 0, "elastic no" / one "full" budget
        assert r.exit_code == 2 and "Traceback" not in r.output, (args, r.output)
        assert f"elastic_config.json is a link to {target}" in r.stderr and "missing" in r.stderr
        assert fix in r.stderr


def test_every_dangling_sidecar_is_named_at_once(tmp_path):
    snap = hf_snapshot(tmp_path)
    names = ["router.safetensors", "config.json", "tokenizer.json", "importance.safetensors"]
    for name in names:
        _drop_blob(snap, name)
    (snap / "README.md").symlink_to("../../blobs/0000")  # documentation: nothing reads it
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(snap)
    assert [p.split(" ")[0] for p in e.value.problems] == sorted(names)
    assert "4 files of the checkpoint are links to a missing target" in e.value.message
    assert f"hf download org/demo {' '.join(sorted(names))} --revision rev1" in e.value.message


def test_readers_of_one_file_refuse_its_dangling_link(tmp_path):
    """Called on their own (as library users do), the readers of each sidecar refuse it too,
    instead of reading it as absent."""
    snap = hf_snapshot(tmp_path)
    ckpt = Checkpoint.open(snap)
    ec = ElasticConfig.read(snap, ckpt.arch)
    for name in ("router.safetensors", "tokenizer.json", "elastic_config.json"):
        _drop_blob(snap, name)
    with pytest.raises(ConfigError, match=r"router.safetensors is a link to \.\./\.\./blobs/.*missing.*hf download"):
        read_router(snap, ec)
    with pytest.raises(CheckpointError, match=r"tokenizer.json is a link to .*missing"):
        load_tokenizer(snap)
    with pytest.raises(ConfigError, match=r"elastic_config.json is a link to .*missing"):
        ElasticConfig.read(snap, ckpt.arch)  # before: "not an elastic checkpoint"


# ---- 8: router.file ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value, words", [
    ("../../../etc/passwd", "leaves the checkpoint directory"),
    ("/etc/passwd", "is an absolute path"),
    ("sub/../../router.safetensors", "leaves the checkpoint directory"),
    ("", "must name the router's file"),
    (7, "must name the router's file"),
    ("sub/", "names a directory"),
])
def test_router_file_must_stay_inside_the_checkpoint(demo, tmp_path, value, words):
    _edit_router(demo, value)
    r = runner.invoke(app, ["slice", "-c", str(demo), "--budget", "50%", "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and not (tmp_path / "s").exists(), r.output  # before: sliced, exit 0
    assert "router.file" in r.stderr and words in r.stderr and repr(value)[:20] in r.stderr


def test_router_file_is_the_router_that_is_read(demo):
    ckpt = Checkpoint.open(demo)
    (demo / "routers").mkdir()
    (demo / "router.safetensors").rename(demo / "routers" / "r.safetensors")
    assert resolve_budget(demo, ElasticConfig.read(demo, ckpt.arch), ckpt.arch, "50%")[1] == "elastic_config.json"
    _edit_router(demo, "routers/r.safetensors")
    ec = ElasticConfig.read(demo, ckpt.arch)
    assert ec.router_file == "routers/r.safetensors" and ec.to_json()["router"]["file"] == "routers/r.safetensors"
    assert router_warning(demo, ec) is None
    assert resolve_budget(demo, ec, ckpt.arch, "50%")[1] == "router"


def test_a_named_router_that_is_missing_is_said_and_not_needed(demo, tmp_path):
    _edit_router(demo, "nope.safetensors")
    ckpt = Checkpoint.open(demo)
    ec = ElasticConfig.read(demo, ckpt.arch)
    assert read_router(demo, ec) is None
    why = router_warning(demo, ec)
    assert why is not None and "'nope.safetensors'" in why and "elastic_config.json" in why
    assert resolve_budget(demo, ec, ckpt.arch, "50%")[1] == "elastic_config.json"  # every budget is stored
    assert router_warning(DEMO_CHECKPOINT, ElasticConfig.read(DEMO_CHECKPOINT, ckpt.arch)) is None


def test_another_models_router_is_refused_with_both_shapes(demo, tmp_path):
    """A router trained for four budgets (another model's), named by router.file: refused, each
    tensor's two shapes named; before, router.file was never read and the slice was written."""
    w = load_file(str(demo / "router.safetensors"))
    other = {k: np.concatenate([v, v[:, :1]], axis=1) if k.endswith(".0.weight") else v for k, v in w.items()}
    other["extra.0.bias"] = np.zeros(3, dtype=np.float32)
    save_file(other, str(demo / "other.safetensors"))
    _edit_router(demo, "other.safetensors")
    r = runner.invoke(app, ["slice", "-c", str(demo), "--budget", "50%", "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and not (tmp_path / "s").exists(), r.output
    assert "hidden_size.0.weight: elastic_config.json implies [256, 3], other.safetensors has [256, 4]" in r.stderr
    assert "unexpected router tensor extra.0.bias [3]" in r.stderr


# ---- 12: the numbers of a truncated safetensors file -------------------------------------------------


def test_truncated_safetensors_says_what_is_missing(tmp_path):
    data = (DEMO_CHECKPOINT / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    f = tmp_path / "model.safetensors"
    f.write_bytes(data[: 8 + n - 1])  # cut inside the header: before, "header says N bytes, file has N+7"
    with pytest.raises(CheckpointError) as e:
        read_header(f)
    assert (f"JSON header of {n:,} bytes, so the header alone ends at byte {8 + n:,}, but the file has "
            f"{7 + n:,} bytes: it stops 1 byte short") in e.value.message
    f.write_bytes(data[:500_000])  # cut inside the tensor data
    with pytest.raises(CheckpointError) as e:
        read_header(f)
    tensors = len(data) - 8 - n
    assert (f"8 + {n:,} bytes of header + {tensors:,} bytes of tensor data (as its data_offsets say) = "
            f"{len(data):,} bytes, but the file has 500,000 ({len(data) - 500_000:,} missing)") in e.value.message
    f.write_bytes(data + b"xx")
    with pytest.raises(CheckpointError) as e:
        read_header(f)
    assert f"= {len(data):,} bytes, but the file has {len(data) + 2:,} (2 bytes after the last tensor)" \
        in e.value.message
