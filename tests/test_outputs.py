"""Output safety (slicer/outputs.py): every data-loss case of issue 11, through the CLI, with the
sha256 of every file in the user's tree checked before and after."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from elastic.cli.main import app
from elastic.slicer.planning.describe import DEMO_CHECKPOINT
from elastic.slicer.storage.outputs import MARKER

runner = CliRunner()


def tree_hashes(root: Path) -> dict[str, str]:
    """Relative path -> sha256 (or '<dir>') of everything under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "<link>" + os.readlink(p) if p.is_symlink() else "<dir>" if p.is_dir() else \
            hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def user_tree(tmp_path, monkeypatch):
    """A user's directory: the demo checkpoint, a folder of their own files, and the cwd elsewhere."""
    root = tmp_path / "home"
    shutil.copytree(DEMO_CHECKPOINT, root / "ckpt")
    (root / "docs").mkdir()
    (root / "docs" / "photo.jpg").write_bytes(os.urandom(256))
    (root / "docs" / "thesis.tex").write_text("\\section{Results}\n")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return root


def refused(args: list[str], needle: str):
    r = runner.invoke(app, args)
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert needle in r.stderr and "Traceback" not in r.output, r.stderr
    assert r.stderr.count("error:") == 1
    return r


@pytest.mark.parametrize("case", ["source", "inside_source", "foreign_dir", "parent_of_source", "cwd"])
def test_slice_never_destroys_user_data(user_tree, case, monkeypatch):
    src = user_tree / "ckpt"
    out, needle = {
        "source": (src, "is (or lies inside) the source"),
        "inside_source": (src / "sub", "is (or lies inside) the source"),
        "foreign_dir": (user_tree / "docs", "was not written by elastic"),
        "parent_of_source": (user_tree, "contains the source"),
        "cwd": (Path("."), "current directory"),
    }[case]
    if case == "cwd":
        monkeypatch.chdir(user_tree / "docs")
    before = tree_hashes(user_tree)
    refused(["slice", "-c", str(src), "--budget", "50%", "--out", str(out), "--force"], needle)
    assert tree_hashes(user_tree) == before
    assert not list(user_tree.parent.glob(".*partial*")) and not list(user_tree.glob(".*elastic-lock"))


def test_slice_through_a_symlink_to_the_source_is_refused(user_tree):
    link = user_tree / "link"
    link.symlink_to(user_tree / "ckpt")
    before = tree_hashes(user_tree)
    refused(["slice", "-c", str(user_tree / "ckpt"), "--budget", "50%", "--out", str(link / "x"), "--force"],
            "the source")
    assert tree_hashes(user_tree) == before


def test_export_onto_its_model_dir_is_refused(user_tree, tmp_path):
    model = tmp_path / "m50"
    assert runner.invoke(app, ["slice", "-c", str(user_tree / "ckpt"), "--budget", "50%", "--out", str(model)]
                         ).exit_code == 0
    before = tree_hashes(model)
    refused(["export", str(model), "--out", str(model), "--force", "--no-parity"], "source file")
    assert tree_hashes(model) == before


def test_force_replaces_only_what_elastic_wrote(user_tree, tmp_path):
    out = tmp_path / "out"
    args = ["slice", "-c", str(user_tree / "ckpt"), "--budget", "50%", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    first = tree_hashes(out)
    refused(args, "already exists")  # no --force
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0  # ours: replaced
    assert tree_hashes(out) == first and sorted(first)[0] == MARKER
    (out / "notes.txt").write_text("mine")  # the user adds a file: no longer only ours
    before = tree_hashes(out)
    refused([*args, "--force"], "notes.txt")
    assert tree_hashes(out) == before


_RACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from elastic.slicer.slice import slice_checkpoint
    src, out, started, go, action = sys.argv[1:6]
    def progress(stage, done, total, /, _first=[True], **detail):
        if _first[0]:
            _first[0] = False
            Path(started).touch()
            for _ in range(6000):  # wait for the test's signal (an event, not a timing guess)
                if Path(go).exists():
                    break
                time.sleep(0.01)
    try:
        slice_checkpoint(src, out, budget="50%", progress=progress, force=action == "force")
    except Exception as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print("wrote", out)
""")


def _start_racer(tmp_path, src, out, action="new"):
    started, go = tmp_path / "started", tmp_path / "go"
    p = subprocess.Popen([sys.executable, "-c", _RACER, str(src), str(out), str(started), str(go), action],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(60000):
        if started.exists() or p.poll() is not None:
            break
        import time

        time.sleep(0.01)
    assert started.exists(), p.communicate()
    return p, go


def test_two_concurrent_slices_exactly_one_wins(user_tree, tmp_path):
    """Run A is held mid-write while run B (the CLI, another process) targets the same output."""
    out = tmp_path / "same"
    a, go = _start_racer(tmp_path, user_tree / "ckpt", out)
    b = subprocess.run([sys.executable, "-m", "elastic.cli.main", "slice", "-c", str(user_tree / "ckpt"),
                        "--budget", "75%", "--out", str(out)], capture_output=True, text=True)
    go.touch()
    a_out, a_err = a.communicate(timeout=300)
    assert (a.returncode, b.returncode) == (0, 2), (a_err, b.stderr)
    assert "another elastic run is writing it" in b.stderr and "Traceback" not in b.stderr
    assert "wrote" in a_out
    import json

    assert json.loads((out / "slice_manifest.json").read_text())["budget"] == "50%"  # A's, intact
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


def test_output_appearing_mid_run_is_never_overwritten(user_tree, tmp_path):
    """Another program creates the output while the slice is being written: the slice reports it
    and leaves nothing; the other program's directory is untouched."""
    out = tmp_path / "same"
    a, go = _start_racer(tmp_path, user_tree / "ckpt", out)
    out.mkdir()
    (out / "theirs.txt").write_text("theirs")
    go.touch()
    _, a_err = a.communicate(timeout=300)
    assert a.returncode == 2 and "appeared while this run was writing" in a_err, a_err
    assert tree_hashes(out) == {"theirs.txt": hashlib.sha256(b"theirs").hexdigest()}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_replaced_output_changed_mid_run_is_kept(user_tree, tmp_path):
    """--force was valid at the start (elastic's own output), but the user adds a file meanwhile."""
    out = tmp_path / "same"
    assert runner.invoke(app, ["slice", "-c", str(user_tree / "ckpt"), "--budget", "75%", "--out", str(out)]
                         ).exit_code == 0
    a, go = _start_racer(tmp_path, user_tree / "ckpt", out, action="force")
    (out / "added.txt").write_text("new")
    before = tree_hashes(out)
    go.touch()
    _, a_err = a.communicate(timeout=300)
    assert a.returncode == 2 and "changed while this run was writing" in a_err, a_err
    assert tree_hashes(out) == before
