"""`elastic tui`: Pilot tests against the library's own plan and the CLI's own messages, and
snapshots of the main screen (a fixed profile, so they do not depend on this machine)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("textual")

from textual.widgets import Input, ProgressBar, Select, Static
from typer.testing import CliRunner

from elastic.cli.main import app as cli
from elastic.cli.tui import build_app
from elastic.cli.tui.planner import EXPORT_MISSING, HERE
from elastic.cli.tui.widgets import BudgetTable
from elastic.profiles.devices import get_profile
from elastic.slicer.planning.describe import DEMO_CHECKPOINT
from elastic.slicer.planning.fit import plan, target_from_profile
from elastic.slicer.planning.memory import Workload

EXAMPLE_12B = Path(__file__).resolve().parent.parent / "examples" / "nemotron-elastic-12b"
runner = CliRunner()


def pilot(app, script, size=(100, 30)):
    """Run ``script(pilot)`` against ``app`` in a headless terminal."""
    async def main():
        async with app.run_test(size=size) as p:
            await p.pause()
            await script(p)
    asyncio.run(main())


async def until(p, cond, timeout=30.0):
    """Let the app run until ``cond()`` holds (a worker thread reports by message)."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out waiting for the app"
        await p.pause(0.02)


def text(app, selector) -> str:
    return str(app.query_one(selector, Static).render())


def library_plan(ckpt, profile, for_slicing=True, **workload):
    # what the TUI plans: dtype "auto" (Edge-LLM's fp16 on a Jetson, where bf16 would pin llama.cpp), for slicing
    return plan(ckpt, target_from_profile(get_profile(profile)), Workload(**{"dtype": "auto", **workload}),
                for_slicing=for_slicing).to_json()


def mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def test_context_changes_the_table():
    app = build_app(DEMO_CHECKPOINT, "orin-nx-16gb")

    async def script(p):
        table = app.query_one(BudgetTable)
        lib = library_plan(DEMO_CHECKPOINT, "orin-nx-16gb", context=8192)
        row = {b["name"]: b for b in lib["budgets"]}
        assert table.cursor_row == 0 and lib["chosen"] == "100%"  # the largest that fits, preselected
        assert table.cell("100%", "kv") == mib(row["100%"]["terms"]["kv_cache"])
        assert table.cell("75%", "total") == mib(row["75%"]["terms"]["total"])
        assert table.cell("50%", "headroom") == mib(row["50%"]["headroom_bytes"])
        kv8k = float(table.cell("100%", "kv"))

        await p.press("plus")  # the table has the focus: + doubles the context
        assert app.query_one("#context", Input).value == "16384"
        lib = library_plan(DEMO_CHECKPOINT, "orin-nx-16gb", context=16384)
        assert table.cell("100%", "kv") == mib(lib["budgets"][0]["terms"]["kv_cache"])
        assert float(table.cell("100%", "kv")) == pytest.approx(2 * kv8k, abs=0.01)
        assert "context 16,384" in text(app, "#summary")

        app.query_one("#context", Input).focus()  # typing replaces the selected value
        await p.press(*"1024")
        await p.pause()
        lib = library_plan(DEMO_CHECKPOINT, "orin-nx-16gb", context=1024)
        assert table.cell("100%", "kv") == mib(lib["budgets"][0]["terms"]["kv_cache"])
        await p.press("backspace", "backspace", "backspace")  # 102, 10, 1: planned as typed
        lib = library_plan(DEMO_CHECKPOINT, "orin-nx-16gb", context=1)
        assert table.cell("100%", "kv") == mib(lib["budgets"][0]["terms"]["kv_cache"])
        await p.press("backspace")  # empty: say so, keep the last plan
        assert "context must be a whole number >= 1" in text(app, "#summary")
        assert table.cell("100%", "total") == mib(lib["budgets"][0]["terms"]["total"])

        await p.press(*"512")
        app.query_one("#dtype", Select).value = "float32"
        await p.pause()
        lib = library_plan(DEMO_CHECKPOINT, "orin-nx-16gb", context=512, dtype="float32")
        assert table.cell("100%", "weights") == mib(lib["budgets"][0]["terms"]["weights"])

    pilot(app, script)


def test_target_changes_usable_memory_and_fit(monkeypatch):
    import elastic.slicer.planning.fit as fit

    monkeypatch.setattr(fit, "slice_precisions", lambda: fit.WEIGHTS)  # float slicing, as without modelopt
    app = build_app(EXAMPLE_12B, "rtx-4090")

    async def script(p):
        table = app.query_one(BudgetTable)
        lib = library_plan(EXAMPLE_12B, "rtx-4090")
        assert [b["fits"] for b in lib["budgets"]] == [False, True, True] and lib["chosen"] == "9B"
        assert [table.cell(n, "fits") for n in ("12B", "9B", "6B")] == ["no", "yes", "yes"]
        assert table.cursor_row == 1 and "chosen 9B" in text(app, "#summary")
        assert "selected 9B -> elastic-model-9B" in text(app, "#selected")

        app.query_one("#target", Select).value = "orin-nano-8gb"
        await p.pause()
        lib = library_plan(EXAMPLE_12B, "orin-nano-8gb")
        assert "Jetson Orin Nano 8GB" in text(app, "#device") and "6.50 GiB usable" in text(app, "#device")
        assert [table.cell(n, "fits") for n in ("12B", "9B", "6B")] == ["no", "no", "no"]
        assert table.cell("6B", "headroom") == f"{lib['budgets'][2]['headroom_bytes'] / 2**30:.2f}"
        summary = text(app, "#summary")
        assert "chosen none: no budget fits" in summary
        # the TUI's summary reads "[modelopt]" of the slicing note as markup and drops it (a known gap)
        assert lib["suggestions"] and all(s.replace("[modelopt]", "") in summary.replace("\n", " ")
                                          for s in lib["suggestions"])

        app.query_one("#target", Select).value = "a100-80gb"
        await p.pause()
        assert [table.cell(n, "fits") for n in ("12B", "9B", "6B")] == ["yes", "yes", "yes"]
        assert table.cursor_row == 0 and "80" in text(app, "#device")

        app.query_one("#target", Select).value = HERE  # detection: whatever this machine is
        await p.pause()
        assert " detected: " in text(app, "#device")

    pilot(app, script)


def test_slice_the_selected_budget(tmp_path):
    app = build_app(DEMO_CHECKPOINT, "orin-nx-16gb")
    out = tmp_path / "m75"

    async def script(p):
        await p.press("down")  # 100% -> 75%
        app.query_one("#out", Input).value = str(out)
        await p.pause()
        assert f"selected 75% -> {out}" in text(app, "#selected")
        await p.press("s")
        await until(p, lambda: app.job is None and app.logged[-1].startswith("next:"))
        bar = app.query_one("#bar", ProgressBar)
        assert bar.total and bar.progress == bar.total
        assert str(app.query_one("#state").render()) == "job: done"

    pilot(app, script)
    assert f"wrote {out.resolve()}" in app.logged
    assert f"next: elastic inspect {out}" in app.logged
    manifest = json.loads((out / "slice_manifest.json").read_text())
    lib = {b["name"]: b for b in library_plan(DEMO_CHECKPOINT, "orin-nx-16gb")["budgets"]}
    assert manifest["budget"] == "75%" and manifest["dtype"] == lib["75%"]["dtype"] == "bfloat16"
    assert manifest["parameters"]["total"] == lib["75%"]["parameters"]
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))


def last_error(app) -> str | None:
    """The error line of the last job, when it ended in one (a hint line may follow it)."""
    tail = app.logged[-2:]
    return next((line for line in reversed(tail) if line.startswith("error")), None)


def cli_error(*args) -> str:
    """The CLI's error message (its hint line, in the CLI's words, left out)."""
    r = runner.invoke(cli, list(args))
    assert r.exit_code == 2 and r.stderr.startswith("error: ")
    return r.stderr.strip().split("\nhint: ")[0]


def test_config_only_checkpoint_shows_the_cli_error(tmp_path):
    app = build_app(EXAMPLE_12B, "a100-80gb")
    out = tmp_path / "m12"

    async def script(p):
        app.query_one("#out", Input).value = str(out)
        await p.press("s")
        await until(p, lambda: app.job is None and app.logged[-1].startswith("error"))
        assert str(app.query_one("#state").render()) == "job: error"

    pilot(app, script)
    expected = cli_error("slice", "-c", str(EXAMPLE_12B), "--budget", "12B", "--out", str(out))
    assert "no weights" in expected and app.logged[-1] == expected
    assert not out.exists()


def test_existing_out_is_refused_unless_replace(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    app = build_app(DEMO_CHECKPOINT, "orin-nx-16gb")

    async def script(p):
        app.query_one("#out", Input).value = str(out)
        await p.press("s")
        await until(p, lambda: app.job is None and last_error(app) is not None)
        assert (out / "keep.txt").is_file()
        app.query_one("#force", Select).value = True
        await p.press("s")  # replace refuses a directory elastic did not write, too
        await until(p, lambda: app.job is None and "not written by elastic" in (last_error(app) or ""))
        assert (out / "keep.txt").read_text() == "mine"
        (out / "keep.txt").unlink()  # empty now: replace may take it
        await p.press("s")
        await until(p, lambda: app.job is None and app.logged[-1].startswith("next:"))

    pilot(app, script)
    expected = cli_error("slice", "-c", str(DEMO_CHECKPOINT), "--budget", "100%", "--out", str(out))
    assert "already exists" in expected and expected in app.logged
    # one hint, each front end's words: the TUI names its control, the CLI its flag
    assert "hint: to replace it (only an empty directory or one elastic wrote): set 'replace' to yes" in app.logged
    r = runner.invoke(cli, ["slice", "-c", str(DEMO_CHECKPOINT), "--budget", "100%", "--out", str(out)])
    assert "hint: to replace it (only an empty directory or one elastic wrote) (--force)" in r.stderr
    assert (out / "slice_manifest.json").is_file()


def test_export_without_the_onnx_extra_starts_nothing(tmp_path, monkeypatch):
    import elastic.cli.tui.planner as planner

    monkeypatch.setattr(planner, "unavailable", lambda action: EXPORT_MISSING if action != "slice" else None)
    app = build_app(DEMO_CHECKPOINT, "orin-nx-16gb")

    async def script(p):
        app.query_one("#out", Input).value = str(tmp_path / "x")
        app.query_one(BudgetTable).focus()
        for key in ("e", "b"):
            n = len(app.logged)
            await p.press(key)
            assert app.job is None and app.logged[n:] == [EXPORT_MISSING]

    pilot(app, script)
    assert not (tmp_path / "x").exists()


@pytest.mark.heavy
def test_slice_and_export_without_the_engines_exporter(tmp_path, monkeypatch):
    """On a Jetson the planned engine is TensorRT Edge-LLM; without its exporter installed the slice
    is written, the export is skipped saying how to install it, and the smoke test runs the slice."""
    from elastic.export import edgellm

    monkeypatch.setenv(edgellm.EXPORTER_ENV, "no-such-edgellm-exporter")
    app = build_app(DEMO_CHECKPOINT, "orin-nx-16gb")

    async def script(p):
        app.query_one("#out", Input).value = str(tmp_path / "m")
        app.query_one(BudgetTable).focus()
        await p.press("b")
        for _ in range(600):  # the export runs in a worker thread; the screen keeps answering
            await p.pause(0.1)
            if app.job is None:
                break

    pilot(app, script)
    assert (tmp_path / "m" / "slice_manifest.json").is_file() and not (tmp_path / "m" / "edgellm").exists()
    assert any(line.startswith("export skipped:") and edgellm.INSTALL in line for line in app.logged), app.logged
    assert any(line.startswith("smoke test:") for line in app.logged), app.logged


@pytest.mark.heavy
def test_cancel(tmp_path, monkeypatch):
    import elastic.slicer.slice

    def slow_slice(source, out, *, progress, **kw):  # stands in for a big checkpoint
        for i in range(3000):
            progress("slice", i, 3000)
            time.sleep(0.01)
        raise AssertionError("the job was not cancelled")

    app = build_app(DEMO_CHECKPOINT, "orin-nx-16gb")
    out = tmp_path / "never"

    async def script(p):
        await p.press("c")  # nothing runs: a notice, no crash
        assert app.job is None
        monkeypatch.setattr(elastic.slicer.slice, "slice_checkpoint", slow_slice)
        app.query_one("#out", Input).value = str(out)
        await p.press("s")
        await until(p, lambda: (app.query_one("#bar", ProgressBar).progress or 0) > 5)
        await p.press("s")  # one job at a time
        await p.press("plus")  # the interface answers while the job runs
        assert app.query_one("#context", Input).value == "16384" and app.job is not None
        await p.press("c")
        await until(p, lambda: app.job is None)
        assert str(app.query_one("#state").render()) == "job: cancelled"

    pilot(app, script)
    assert app.logged[-1] == f"cancelled: nothing was written to {out}" and not out.exists()


def test_quit_mid_job_stops_the_thread(tmp_path, monkeypatch):
    import threading

    import elastic.slicer.slice

    stopped = threading.Event()

    def slow_slice(source, out, *, progress, **kw):
        try:
            for i in range(3000):
                progress("slice", i, 3000)
                time.sleep(0.01)
        finally:
            stopped.set()

    monkeypatch.setattr(elastic.slicer.slice, "slice_checkpoint", slow_slice)
    app = build_app(DEMO_CHECKPOINT, "orin-nx-16gb")

    async def script(p):
        app.query_one("#out", Input).value = str(tmp_path / "never")
        await p.press("s")
        await until(p, lambda: (app.query_one("#bar", ProgressBar).progress or 0) > 5)
        await p.press("q")

    pilot(app, script)
    assert stopped.wait(5), "the slicing thread kept running after quit"


def test_quit_key():
    app = build_app(DEMO_CHECKPOINT, "orin-nx-16gb")

    async def script(p):
        await p.press("q")
        await p.pause()
        assert not app.is_running

    pilot(app, script)


def test_cli_errors_before_the_app_starts(monkeypatch):
    r = runner.invoke(cli, ["tui", "--target", "orin-nanoo-8gb"])
    assert r.exit_code == 2 and r.stderr == runner.invoke(cli, ["plan", "--target", "orin-nanoo-8gb"]).stderr
    r = runner.invoke(cli, ["tui", "-c", "/nonexistent/ckpt"])
    assert r.exit_code == 2 and "no such checkpoint directory" in r.stderr
    monkeypatch.setitem(sys.modules, "textual", None)  # as if textual were not installed
    r = runner.invoke(cli, ["tui"])
    assert r.exit_code == 2 and 'pip install -e ".[tui]"' in r.stderr and "Traceback" not in r.output


def test_help_imports_neither_textual_nor_torch():
    code = ("import sys; from typer.testing import CliRunner; from elastic.cli.main import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0 and 'tui' in r.output, r.output; "
            "r = CliRunner().invoke(app, ['tui', '--help']); assert r.exit_code == 0, r.output; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'textual', 'torch'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
def test_snapshot_demo(snap_compare, size):
    assert snap_compare(build_app(DEMO_CHECKPOINT, "orin-nx-16gb"), terminal_size=size)


def test_snapshot_nothing_fits(snap_compare, monkeypatch):
    """Without Model Optimizer slicing writes float weights only, and none of the 12B example's
    budgets fits an Orin Nano in bf16: the screen says so and what would fit (int4, once installed)."""
    import elastic.slicer.planning.fit as fit

    monkeypatch.setattr(fit, "slice_precisions", lambda: fit.WEIGHTS)
    assert snap_compare(build_app(EXAMPLE_12B, "orin-nano-8gb"), terminal_size=(80, 24))


@pytest.mark.heavy
def test_slice_and_export_is_fit_my_gpus_workflow(tmp_path, monkeypatch):
    """'both' runs fit-my-gpu's workflow on a Jetson: the engine the plan chose there, TensorRT
    Edge-LLM, gets its own exporter's bundle (a stand-in exporter here, tests/test_edgellm.py) for the
    planned target, context and batch, and the smoke test runs the slice."""
    from test_edgellm import _fake_exporter

    _fake_exporter(tmp_path, monkeypatch)
    app = build_app(DEMO_CHECKPOINT, "orin-nx-16gb")
    out = tmp_path / "m50"
    async def script(p):
        app.query_one("#context", Input).value = "2048"
        await p.press("down", "down")  # 100% -> 50%
        app.query_one("#out", Input).value = str(out)
        await p.pause()
        await p.press("b")

        await until(p, lambda: app.job is None and any(line.startswith("smoke test:") for line in app.logged[-3:]),
                    timeout=240)

    pilot(app, script)
    m = json.loads((out / "edgellm" / "export_manifest.json").read_text())
    assert m["device"]["profile"] == "orin-nx-16gb" and m["engine"]["max_input_len"] == 2048
    assert m["engine"]["max_batch"] == 1 and m["format"] == "edgellm"
    assert json.loads((out / "slice_manifest.json").read_text())["budget"] == "50%"
    assert any(line.startswith(f"exported {out / 'edgellm'} (TensorRT Edge-LLM bundle for Jetson Orin NX 16GB")
               for line in app.logged), app.logged
    assert not (out / "export").exists()  # no ONNX graphs of elastic's own: Edge-LLM exports its own
