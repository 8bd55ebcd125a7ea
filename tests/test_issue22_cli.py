"""What a new user hit at the CLI (issue 22): the words about precision, --json errors, help text
that loses its brackets, the TUI without a terminal, outputs left in a corpus or a git tree."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from elastic.cli.main import app
from elastic.slicer.planning.describe import DEMO_CHECKPOINT

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def _json_error(r, code=2) -> dict:
    """The one JSON object a failing --json command prints on stdout (and its words on stderr)."""
    assert r.exit_code == code, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.startswith("error: ")
    err = json.loads(r.stdout)  # one object, nothing else on stdout
    assert err["exit_code"] == code and err["error"] and err["error"] in r.stderr
    return err


@pytest.mark.parametrize("args", [
    ["inspect", "-c", "{missing}", "--json"],
    ["plan", "-c", "{missing}", "--json"],
    ["fit-my-gpu", "-c", "{missing}", "--json", "--dry-run"],
    ["slice", "-c", "{missing}", "--budget", "50%", "--out", "{out}", "--json"],
    ["export", "{missing}", "--out", "{out}", "--json"],
    ["eval", "{missing}", "--json"],
    ["generate", "{missing}", "hi", "--json"],
    ["train", "--parent", "{missing}", "--dry-run", "--json"],
])
def test_every_json_command_reports_its_error_as_one_json_object(tmp_path, args):
    args = [a.format(missing=tmp_path / "nope", out=tmp_path / "out") for a in args]
    err = _json_error(runner.invoke(app, args))
    assert "nope" in err["error"] and not (tmp_path / "out").exists()


def test_json_error_carries_the_hint_the_text_gives(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    r = runner.invoke(app, ["slice", "--budget", "50%", "--out", str(out), "--json"])
    err = _json_error(r)
    assert err["hint"] and err["hint"] in r.stderr
    assert (out / "mine.txt").read_text() == "keep me"


def test_fit_my_gpu_with_no_fit_prints_one_object_with_the_plan_and_the_error():
    r = runner.invoke(app, ["fit-my-gpu", "-c", str(REPO / "examples" / "nemotron-elastic-12b"),
                            "--target", "orin-nano-4gb", "--context", "1000000", "--json"])
    err = _json_error(r)
    assert "no budget fits" in err["error"]
    assert err["chosen"] is None and err["out"] is None and {b["name"] for b in err["budgets"]} >= {"6B", "12B"}
    assert not any(b["fits"] for b in err["budgets"])  # the plan's own verdict agrees with the error


def test_a_usage_error_with_json_is_json_too(tmp_path):
    """Typer's own parsing errors (a bad option value) come before any command runs: main() answers them."""
    r = subprocess.run([sys.executable, "-m", "elastic.cli.main", "plan", "--context", "abc", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = json.loads(r.stdout)
    assert "--context" in err["error"] and err["exit_code"] == 2


def test_dry_run_names_the_precision_it_would_write():
    r = runner.invoke(app, ["plan", "--target", "orin-nano-8gb", "--precision", "int8", "--json"])
    assert r.exit_code == 0, r.output
    planned = json.loads(r.stdout)
    chosen = next(b for b in planned["budgets"] if b["name"] == planned["chosen"])
    assert chosen["weights_precision"] == "int8"
    r = runner.invoke(app, ["fit-my-gpu", "--target", "orin-nano-8gb", "--precision", "int8", "--dry-run"])
    assert r.exit_code == 0, r.output
    assert f"would write budget {planned['chosen']} (int8 weights)" in r.stdout
    assert "bfloat16)" not in r.stdout.splitlines()[-1]


def test_help_keeps_brackets_and_says_no_false_limit():
    """Rich markup eats an unescaped ``[word]`` (pip extras): every option's help and every command's
    text must show the brackets it was written with."""
    import re

    import typer

    wide = {"COLUMNS": "1000", "TERMINAL_WIDTH": "1000"}
    cli = typer.main.get_command(app)
    for name, cmd in cli.commands.items():
        shown = re.sub(r"\s+", " ", runner.invoke(app, [name, "--help"], env=wide).stdout)
        texts = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        for text in texts:
            for extra in re.findall(r"\w+\\?\[\w+\]", text):  # elastic[modelopt], ".\\[tui]"
                assert extra.replace("\\", "") in shown, f"elastic {name} --help loses the brackets of {extra}"
    shown = runner.invoke(app, ["slice", "--help"], env=wide).stdout
    assert "elastic[modelopt]" in shown
    shown = re.sub(r"\s+", " ", runner.invoke(app, ["fit-my-gpu", "--help"], env=wide).stdout)
    assert "float weights only" not in shown and ".[modelopt]" in shown


def test_tui_without_a_terminal_says_so_and_exits():
    r = subprocess.run([sys.executable, "-m", "elastic.cli.main", "tui"], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "needs a terminal" in r.stderr and "Traceback" not in r.stderr


def test_a_corpus_directory_skips_what_elastic_wrote_and_hidden_files(tmp_path):
    from elastic.slicer.storage.outputs import MARKER
    from elastic.trainer.data import corpus_files

    (tmp_path / "notes.txt").write_text("text")
    model = tmp_path / "elastic-model-100"
    (model / "export").mkdir(parents=True)
    (model / MARKER).write_text("{}")
    (model / "config.json").write_text("{}")
    (model / "export" / "README.md").write_text("# export")
    (tmp_path / ".hidden.json").write_text("not json lines")
    assert corpus_files(tmp_path) == [tmp_path / "notes.txt"]


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
def test_the_main_jobs_default_output_is_ignored_by_git():
    from elastic.slicer.planning.fit import default_out

    for budget in ("100%", "6B"):
        path = f"{default_out(budget)}/model.safetensors"
        r = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
        assert r.returncode == 0, f"{path} would show up as untracked after the README's first command"
