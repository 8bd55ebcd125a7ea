"""One CLI grammar (issue 12): -c/--checkpoint names the checkpoint in every command that reads
one, no short flag means two things, and every precision option takes every spelling."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from elastic.cli.main import app
from elastic.slicer.formats.precision import WEIGHTS
from elastic.slicer.planning.describe import DEMO_CHECKPOINT

runner = CliRunner()


def commands():
    group = typer.main.get_command(app)
    return {name: cmd for name, cmd in group.commands.items()}


def test_no_short_flag_has_two_meanings():
    """Every command's -x shares one long name with every other command's -x (train's
    --parent/--checkpoint -c is the same -c as everyone's --checkpoint)."""
    meanings: dict[str, list[set[str]]] = {}
    for name, cmd in commands().items():
        for p in cmd.params:
            longs = {o for o in p.opts if o.startswith("--")}
            for short in (o for o in p.opts if o.startswith("-") and not o.startswith("--")):
                meanings.setdefault(short, []).append(longs)
    twice = {s: m for s, m in meanings.items() if not set.intersection(*m)}
    assert twice == {}
    assert meanings["-c"] and meanings["-b"] and all(m == {"--budget"} for m in meanings["-b"])


CHECKPOINT_COMMANDS = ["fit-my-gpu", "plan", "slice", "inspect", "export", "generate", "tui", "train"]


@pytest.mark.parametrize("name", CHECKPOINT_COMMANDS)
def test_every_command_that_reads_a_checkpoint_takes_dash_c(name):
    opts = {o for p in commands()[name].params for o in p.opts}
    assert {"-c", "--checkpoint"} <= opts, name


SPELLINGS = [s for p in WEIGHTS for s in p.spellings] + [s.upper() for s in ("bf16", "fp16", "fp32")]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_plan_and_fit_take_every_spelling(spelling):
    from elastic.slicer.formats.precision import lookup

    want = lookup(spelling).name
    for cmd in (["plan"], ["fit-my-gpu", "--dry-run"]):
        r = runner.invoke(app, [*cmd, "-c", str(DEMO_CHECKPOINT), "--target", "rtx-4090", "--dtype", spelling,
                                "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["workload"]["dtype"] == want


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_slice_takes_every_spelling(spelling, tmp_path):
    from elastic.slicer.formats.precision import lookup

    r = runner.invoke(app, ["slice", "-c", str(DEMO_CHECKPOINT), "--budget", "50%", "--dtype", spelling,
                            "--out", str(tmp_path / "m"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m" / "slice_manifest.json").read_text())["dtype"] == lookup(spelling).name


@pytest.mark.parametrize("spelling", ["bf16", "BFloat16", "fp16", "half", "fp32", "float", "auto"])
def test_export_precision_takes_every_spelling(spelling):
    from elastic.export.trt import engine_settings
    from elastic.profiles.devices import get_profile
    from elastic.slicer.formats.precision import lookup

    want = "bf16" if spelling == "auto" else lookup(spelling).short
    assert engine_settings(get_profile("rtx-4090"), precision=spelling).precision == want
    # and the CLI accepts it (refused for another reason: no model given)
    r = runner.invoke(app, ["export", "--precision", spelling])
    assert r.exit_code == 2 and "no checkpoint given" in r.stderr


def test_export_graph_dtype_refuses_bf16_with_the_reason():
    r = runner.invoke(app, ["export", "-c", str(DEMO_CHECKPOINT), "--out", "x", "--dtype", "bf16"])
    assert r.exit_code == 2 and "ONNX graphs are written in float32 or float16" in r.stderr


@pytest.mark.parametrize("spelling", ["float32", "FP32", "f32", "float", "float16", "fp16", "F16", "half"])
def test_export_graph_dtype_takes_every_spelling(spelling):
    r = runner.invoke(app, ["export", "--dtype", spelling])  # accepted; refused only for the missing model
    assert r.exit_code == 2 and "no checkpoint given" in r.stderr
