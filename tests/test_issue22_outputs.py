"""Issue 22, outputs: what a killed run leaves is removed by the next one (and only what is
certainly dead), SIGTERM cleans up as Ctrl-C does, a full disk is said with its numbers (and
fit-my-gpu says the slice it kept, which the same command then reuses), and --force refusals name
the user's files, not elastic's."""

from __future__ import annotations

import errno
import os
import signal
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest
from typer.testing import CliRunner

import elastic.slicer.storage.outputs as outputs
import elastic.slicer.storage.writer as writer_mod
from elastic.cli.main import app
from elastic.slicer.errors import ElasticError
from elastic.slicer.planning.describe import DEMO_CHECKPOINT
from elastic.slicer.slice import slice_checkpoint
from elastic.slicer.storage.outputs import (MARKER, DiskFullError, OutputError, check_output, owner,
                                            remove_stale_leftovers, size_text)
from elastic.slicer.storage.reader import Checkpoint
from elastic.slicer.storage.writer import ShardedWriter

runner = CliRunner()


def dead_pid() -> int:
    """The pid of a process that has ended."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def leftover(parent: Path, name: str, who: str) -> Path:
    d = parent / f".{name}.partial-{who}-abc123xy"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"\0" * 64)
    return d


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---- 5: a killed run's partial directory --------------------------------------------------------

_HELD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from elastic.slicer.slice import slice_checkpoint
    src, out, started = sys.argv[1:4]
    def progress(stage, done, total, /, **detail):
        Path(started).touch()
        time.sleep(120)  # held mid-write until the test kills it
    slice_checkpoint(src, out, budget="50%", progress=progress)
""")


def held_slice(tmp_path: Path, out: Path) -> subprocess.Popen:
    """A slice in another process, stopped mid-write (its partial directory exists)."""
    started = tmp_path / "started"
    p = subprocess.Popen([sys.executable, "-c", _HELD, str(DEMO_CHECKPOINT), str(out), str(started)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not started.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert started.exists(), p.communicate()
    started.unlink()
    return p


def test_a_sigkilled_slice_leaves_a_partial_that_the_next_run_removes(tmp_path):
    parent = tmp_path / "models"
    parent.mkdir()
    p = held_slice(tmp_path, parent / "out")
    (partial,) = [q for q in parent.iterdir() if ".partial-" in q.name]
    assert f"@{p.pid}@" in partial.name  # its owner, in its name
    p.send_signal(signal.SIGKILL)
    stat = Path(f"/proc/{p.pid}/stat")
    while stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)  # dead, and not reaped yet (a zombie answers kill(pid, 0) as a live process does)
    assert partial.is_dir()  # nothing could clean up
    dead = leftover(parent, "dead", f"{owner().split('@')[0]}@{dead_pid()}@1")  # reaped long ago
    live = leftover(parent, "busy", owner())  # a run still going (this process): kept
    reused = leftover(parent, "gone", f"{owner().rsplit('@', 1)[0]}@12345")  # our pid, another start: reused
    elsewhere = leftover(parent, "nfs", f"other-host@{dead_pid()}@1")  # another machine's: never judged
    legacy = parent / ".old.partial-k2j4h5g6"  # an earlier version's, without an owner: left alone
    legacy.mkdir()
    slice_checkpoint(DEMO_CHECKPOINT, parent / "another", budget="50%")  # any later run writing here
    p.wait()
    assert not partial.exists() and not reused.exists() and not dead.exists()
    assert live.is_dir() and elsewhere.is_dir() and legacy.is_dir()
    assert (parent / "another" / MARKER).is_file()


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    p = held_slice(tmp_path, tmp_path / "out")
    assert [q for q in tmp_path.iterdir() if ".partial-" in q.name]
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert hidden(tmp_path) == [] and not (tmp_path / "out").exists()  # no partial, no lock


def test_a_writer_in_another_thread_leaves_signal_handlers_alone(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    seen, errors = [], []

    def write():
        try:
            with ShardedWriter(tmp_path / "t") as w:
                seen.append(signal.getsignal(signal.SIGTERM))
                w.add_text("config.json", "{}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=write)
    t.start()
    t.join()
    assert errors == [] and seen == [before] and (tmp_path / "t" / "config.json").is_file()
    with ShardedWriter(tmp_path / "m") as w:  # the main thread: handled while writing, restored after
        assert signal.getsignal(signal.SIGTERM) is writer_mod._terminate
    assert signal.getsignal(signal.SIGTERM) == before


def test_the_old_directory_of_a_replace_carries_its_owner(tmp_path, monkeypatch):
    """Without renameat2 the replaced directory is renamed aside before it is deleted: if the run
    dies there, the next run knows whose it was."""
    with ShardedWriter(tmp_path / "out") as w:
        w.add_text("config.json", "{}")
    removed = []
    real = outputs.shutil.rmtree
    monkeypatch.setattr(outputs, "_renameat2", lambda *a: False)
    monkeypatch.setattr(outputs.shutil, "rmtree", lambda p, *a, **k: (removed.append(Path(p).name), real(p, *a, **k)))
    with ShardedWriter(tmp_path / "out", force=True) as w:
        w.add_text("config.json", "{}")
    (old,) = [n for n in removed if ".old-" in n]
    assert outputs._LEFTOVER.match(old) and f"{owner()}-" in old


def test_a_dead_runs_partial_inside_an_output_counts_as_elastics(tmp_path):
    out = tmp_path / "model"
    with ShardedWriter(out) as w:
        w.add_text("config.json", "{}")
    leftover(out, "export", f"{owner().split('@')[0]}@{dead_pid()}@1")  # a killed export inside it
    check_output(out, force=True)  # replaceable: no error
    assert remove_stale_leftovers(out) and hidden(out) == [MARKER]


# ---- 10: fit-my-gpu on a full disk -----------------------------------------------------------------

def _child_full(*a, **k):
    """What the export's tracing child reports when the disk is full (its OSError, as text)."""
    raise ElasticError("tracing the decode.onnx graph failed: OSError: [Errno 28] No space left on device "
                       "(ELASTIC_DEBUG=1 shows the traceback)")


def test_fit_my_gpu_on_a_full_disk_names_the_slice_it_kept_and_the_rerun_reuses_it(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    import elastic.export.onnx_export as ox
    import elastic.export.workflow as workflow

    dest = tmp_path / "m"
    args = ["fit-my-gpu", "-c", str(DEMO_CHECKPOINT), "--target", "orin-nano-8gb", "--precision", "fp32",
            "--out", str(dest)]
    with monkeypatch.context() as m:
        m.setattr(ox, "write_graphs", _child_full)
        m.setattr(workflow, "llama_cpp_engine", lambda p, name: False)  # the ONNX export, which fills the disk
        r = runner.invoke(app, args)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    err = " ".join(r.stderr.split())
    for needle in (f"the slice in {dest} is complete and usable", "no space left on the device for the export",
                   "it needs about", "free there now", "Nothing of the export was kept",
                   "run the same command again", "the slice is reused"):
        assert needle in err, (needle, err)
    assert hidden(dest) == [MARKER] and not (dest / "export").exists() and hidden(tmp_path) == []
    shard = dest / "model.safetensors"
    stamp = shard.stat().st_mtime_ns
    # the same command again, no --force: the slice is kept, only the export is written (a stand-in
    # export and smoke test here: the real ones are tested in test_export.py)
    exports = []

    def fake_export(p, model_dir, progress=None, budget=None):
        with ShardedWriter(Path(model_dir) / "export", force=True, kind="export") as w:
            w.add_text("decode.onnx", "x")
        exports.append(model_dir)
        return None

    monkeypatch.setattr(workflow, "export_planned", fake_export)
    monkeypatch.setattr(workflow, "smoke", lambda p, d, e=None: {"new_tokens": 0})
    fit = workflow.fit_my_gpu(workflow.make_plan(DEMO_CHECKPOINT, target="orin-nano-8gb", dtype="fp32"), out=dest)
    assert fit.slice_reused and fit.to_json()["slice"]["reused"] and exports == [dest]
    assert shard.stat().st_mtime_ns == stamp and (dest / "export" / "decode.onnx").is_file()
    with pytest.raises(OutputError, match="already exists"):  # done now: a third run is refused as before
        workflow.fit_my_gpu(workflow.make_plan(DEMO_CHECKPOINT, target="orin-nano-8gb", dtype="fp32"), out=dest)


def test_export_on_a_full_disk_says_how_much_it_needs(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    import elastic.export.onnx_export as ox
    from elastic.export.pipeline import export_disk_bytes, export_model

    def full(model, out_dir, **k):
        (out_dir / "weights.bin").write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", str(out_dir / "weights.bin"))

    monkeypatch.setattr(ox, "write_graphs", full)
    with pytest.raises(DiskFullError, match="no space left on the device for the export") as e:
        export_model(DEMO_CHECKPOINT, tmp_path / "exp", parity=False)
    params = Checkpoint.open(DEMO_CHECKPOINT).arch.param_counts()["total"]
    assert export_disk_bytes(params) <= e.value.needed <= export_disk_bytes(params) + 2**20  # + tokenizer files
    assert f"it needs about {size_text(e.value.needed)}" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_fit_my_gpu_refuses_before_writing_when_it_cannot_fit(tmp_path, monkeypatch):
    from elastic.export.workflow import fit_my_gpu, make_plan

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 100_000, 100_000))
    with pytest.raises(DiskFullError, match="for the slice and its export .*nothing was written"):
        fit_my_gpu(make_plan(DEMO_CHECKPOINT, target="orin-nano-8gb", dtype="fp32"), out=tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_only_the_same_complete_slice_is_reused(tmp_path):
    from elastic.export.workflow import make_plan, reusable_slice

    p = make_plan(DEMO_CHECKPOINT, target="orin-nano-8gb", dtype="fp32")
    dest = tmp_path / "m"
    from elastic.slicer.planning.fit import slice_budget

    slice_budget(p, "50%", dest)
    assert reusable_slice(p, "50%", dest) is not None
    assert reusable_slice(p, "75%", dest) is None  # another budget
    (dest / "notes.txt").write_text("mine")
    assert reusable_slice(p, "50%", dest) is None  # the user's file in it
    (dest / "notes.txt").unlink()
    (dest / "model.safetensors").unlink()
    assert reusable_slice(p, "50%", dest) is None  # incomplete


# ---- 11: --force refusals name the user's files; a folder's mode is kept ------------------------

def fit_layout(out: Path) -> None:
    """OUT (a slice) with OUT/export (an export), as fit-my-gpu writes them."""
    with ShardedWriter(out, kind="slice") as w:
        w.add_text("config.json", "{}")
    with ShardedWriter(out / "export", kind="export") as w:
        for name in ("README.md", "decode.onnx", "prefill.onnx", "weights.bin"):
            w.add_text(name, "x")


def test_force_refusal_names_the_stray_file_in_a_nested_export_not_elastics(tmp_path):
    out = tmp_path / "model"
    fit_layout(out)
    (out / "export" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError) as e:
        check_output(out, force=True)
    msg = str(e.value)
    assert "1 entry elastic did not write: export/notes.txt)" in msg, msg
    assert "README.md" not in msg and MARKER not in msg.split("(", 1)[1]


def test_force_refusal_lists_the_foreign_files_then_how_many_more(tmp_path):
    out = tmp_path / "model"
    fit_layout(out)
    for k in range(13):
        (out / f"mine{k:02d}.txt").write_text("x")
    (out / "docs").mkdir()
    (out / "docs" / "a.txt").write_text("x")
    with pytest.raises(OutputError) as e:
        check_output(out, force=True)
    msg = str(e.value)
    assert "14 entries elastic did not write: docs/, mine00.txt" in msg and "and 4 more" in msg, msg


def test_force_keeps_the_mode_of_the_folder_it_replaces(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        r = runner.invoke(app, ["slice", "-c", str(DEMO_CHECKPOINT), "--budget", "50%", "--out", str(out), "--force"])
        assert r.exit_code == 0, r.output
        assert out.stat().st_mode & 0o777 == 0o555 and (out / MARKER).is_file()
    finally:
        out.chmod(0o755)


def test_force_refuses_a_folder_whose_files_could_not_be_removed(tmp_path, monkeypatch):
    out = tmp_path / "model"
    fit_layout(out)
    real = os.access
    monkeypatch.setattr(outputs.os, "access", lambda p, mode: False if Path(p) == out / "export" else real(p, mode))
    with pytest.raises(OutputError, match=r"you may not write into .*export .*make it writable"):
        check_output(out, force=True)


# ---- 12: a full disk while slicing says the slice's real size --------------------------------------

def test_disk_full_while_slicing_names_the_real_size(tmp_path, monkeypatch):
    real = slice_checkpoint(DEMO_CHECKPOINT, tmp_path / "real", budget="50%").bytes_written

    def full(path, tensors, on_bytes):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(writer_mod, "_write_safetensors", full)
    with pytest.raises(DiskFullError) as e:
        slice_checkpoint(DEMO_CHECKPOINT, tmp_path / "out", budget="50%")
    msg = str(e.value)
    # the size it needs is the slice's, never a rounded-away "0.00 GiB" (a free space of "70.00 GiB"
    # on the test machine's disk is not that)
    assert not re.search(r"(?<![\d.])0\.00 GiB", msg) and f"it needs about {size_text(e.value.needed)}" in msg, msg
    assert 0.97 * real <= e.value.needed <= real  # the slice's own bytes (its small JSON files aside)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real"]


def test_a_slice_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(DiskFullError, match=r"it needs about .* KiB; 4.00 KiB free there\): nothing was written"):
        slice_checkpoint(DEMO_CHECKPOINT, tmp_path / "out", budget="50%")
    assert list(tmp_path.iterdir()) == []
