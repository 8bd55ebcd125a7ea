"""`elastic train` refuses bad settings and unsafe outputs up front: one `error:` line, exit 2,
no traceback, nothing written; a resume with other settings than the saved run is refused."""

import hashlib
import re
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from elastic.cli.main import app
from elastic.slicer.errors import ConfigError
from trainer_fixtures import make_parent_and_tokens
from elastic.trainer.train import Stage, TrainConfig, train

runner = CliRunner()

# the same run as CLI options (FAST) and as a library config (what the CLI builds from them)
FAST = ["--stage1-steps", "2", "--stage1-context", "16", "--stage2-steps", "1", "--stage2-context", "16",
        "--batch-size", "2", "--warmup", "0", "--drop-layers", "1", "--save-every", "1", "--budget-tolerance", "0.9"]
# three steps cannot land the budgets within 5%: the end-of-run check is loosened (tested in test_trainer_train)
FAST_CFG = TrainConfig(stage1=Stage(2, 16), stage2=Stage(1, 16, (0.5, 0.3, 0.2)), batch_size=2, warmup=0,
                       drop_layers=1, save_every=1, budget_tolerance=0.9)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_parent_and_tokens(tmp_path_factory.mktemp("trainval"), max_bytes=100_000)


def invoke(setup, out, *extra, parent=None):
    args = ["train", "--parent", str(parent or setup / "parent"), "--data", str(setup / "tokens"),
            "--out", str(out), *FAST, *extra]
    return runner.invoke(app, args)


def assert_refused(r, *snippets):
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert "Traceback" not in r.output and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("error:") == 1, r.stderr
    for s in snippets:
        assert s in r.stderr, (s, r.stderr)


def tree(root: Path) -> dict[str, str]:
    """Every file under root -> its sha256 (directories as 'dir')."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


BAD = [
    (["--stage1-steps", "-5", "--stage2-steps", "0"], ["stage1.steps (--stage1-steps) is -5"]),
    (["--stage1-steps", "0", "--stage2-steps", "0"], ["no training steps"]),
    (["--stage2-steps", "-1"], ["--stage2-steps"]),
    (["--batch-size", "0"], ["batch_size (--batch-size) is 0"]),
    (["--stage1-context", "0"], ["--stage1-context"]),
    (["--stage2-context", "-3"], ["--stage2-context"]),
    (["--lr", "0"], ["lr (--lr) is 0.0"]),
    (["--lr", "-0.001"], ["lr (--lr)"]),
    (["--lr", "nan"], ["lr (--lr) is nan"]),
    (["--lr", "inf"], ["lr (--lr) is inf"]),
    (["--router-lr", "0"], ["router_lr (--router-lr)"]),
    (["--router-lr", "nan"], ["router_lr (--router-lr)"]),
    (["--warmup", "-1"], ["warmup (--warmup) is -1"]),
    (["--save-every", "0"], ["save_every (--save-every) is 0"]),
    (["--drop-layers", "-1"], ["drop_layers (--drop-layers) is -1"]),
    (["--seed", "-1"], ["seed (--seed)"]),
    (["--stage2-weights", "a,b"], ["--stage2-weights", "'a', 'b' are not numbers"]),
    (["--stage2-weights", ""], ["--stage2-weights"]),
    (["--stage2-weights", "nan,0.3,0.2"], ["--stage2-weights", "finite"]),
    (["--stage2-weights", "0.5,-1,0.2"], ["--stage2-weights", ">= 0"]),
    (["--stage2-weights", "0,0,0"], ["--stage2-weights", "sum to more than 0"]),
    (["--stage2-weights", "0.5,0.5"], ["--stage2-weights", "one per budget (3)"]),
    (["--budgets", "50%=nan"], ["budget '50%': share nan"]),
    (["--budgets", "100%=inf,50%"], ["budget '100%': share inf"]),
    (["--budgets", "100%,50%=0"], ["budget '50%': share 0.0"]),
    (["--budgets", "150%,50%"], ["budget '150%': share 1.5"]),
    (["--budgets", "a,b"], ["--budgets: 'a' is not NAME=SHARE", "--budgets: 'b'"]),
    (["--budgets", "x=1.0,x=0.5"], ["repeated: x"]),
    (["--budgets", "=0.5"], ["non-empty name"]),
    (["--budgets", ","], ["--budgets is empty"]),
    (["--drop-layers", "5"], ["the parent has 5 layers"]),  # dropping every layer fails mid-training
    (["--stage1-context", "100000"], ["--stage1-context", "is 100000: needs a train shard of 100001 tokens"]),
]


@pytest.mark.parametrize("extra,snippets", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_numbers_are_one_error_and_nothing_is_written(setup, tmp_path, extra, snippets):
    before = tree(setup)
    r = invoke(setup, tmp_path / "out", *extra)
    assert_refused(r, *snippets)
    assert list(tmp_path.iterdir()) == []  # no output, no work directory, no tokens
    assert tree(setup) == before


def test_every_problem_is_listed_in_one_error(setup, tmp_path):
    r = invoke(setup, tmp_path / "out", "--batch-size", "0", "--lr", "nan", "--warmup", "-2", "--stage1-steps", "-5",
               "--save-every", "0")
    assert_refused(r, "--batch-size", "--lr", "--warmup", "--stage1-steps", "--save-every")
    assert len([line for line in r.stderr.splitlines() if line.startswith("  - ")]) == 5


def test_unparseable_budgets_and_weights_are_reported_together(setup, tmp_path):
    r = invoke(setup, tmp_path / "out", "--budgets", "100%,zz", "--stage2-weights", "q")
    assert_refused(r, "--budgets: 'zz'", "--stage2-weights: 'q' is not a number")


def test_library_collects_every_problem_before_any_work(setup, tmp_path):
    cfg = replace(FAST_CFG, batch_size=0, lr=float("nan"), stage1=Stage(-1, 0), budgets=(("a", 2.0),))
    with pytest.raises(ConfigError) as e:
        train(setup / "parent", setup / "tokens", tmp_path / "out", cfg)
    text = str(e.value)
    for s in ("batch_size", "lr (--lr) is nan", "stage1.steps", "stage1.context", "budget 'a': share 2.0",
              "stage2.weights"):
        assert s in text, (s, text)
    assert FAST_CFG.problems() == [] and TrainConfig().problems() == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["parent", "inside-parent", "tokens", "inside-work"])
def test_output_that_is_or_holds_a_source_is_refused_and_the_parent_is_untouched(setup, tmp_path, where):
    out = {"parent": setup / "parent", "inside-parent": setup / "parent" / "sub", "tokens": setup / "tokens",
           "inside-work": tmp_path / "work" / "out"}[where]
    before = tree(setup)
    r = invoke(setup, out, "--force", "--work-dir", str(tmp_path / "work"))
    assert_refused(r, "source")
    assert tree(setup) == before  # the sha256 of every file under the parent (and the data) unchanged
    assert not (tmp_path / "work").exists()


def test_force_does_not_replace_a_directory_elastic_did_not_write(setup, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    r = invoke(setup, tmp_path / "out", "--force")
    assert_refused(r, "not written by elastic")
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


@pytest.mark.heavy
def test_resume_with_other_budgets_names_both_lists(setup, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    train(setup / "parent", setup / "tokens", out, FAST_CFG, work_dir=work, stop_after=1)
    state = (work / "train_state.pt").read_bytes()
    r = invoke(setup, out, "--work-dir", str(work), "--resume", "--budgets", "100%,50%",
               "--stage2-weights", "0.6,0.4")
    assert_refused(r, "cannot resume", "saved 100%=1.0,75%=0.75,50%=0.5", "requested 100%=1.0,50%=0.5",
                   "--stage2-weights")
    r = invoke(setup, out, "--work-dir", str(work), "--resume", "--lr", "0.01", "--seed", "3")
    assert_refused(r, "lr (--lr): saved 0.001, requested 0.01", "seed (--seed): saved 0, requested 3")
    assert (work / "train_state.pt").read_bytes() == state and not out.exists()
    r = invoke(setup, out, "--work-dir", str(work), "--resume", "--save-every", "2")  # same run: continues
    assert r.exit_code == 0, r.output
    assert (out / "router.safetensors").is_file()
    # progress (stage, step, total): the last step's status line names the stage and every budget's loss
    last = [line for line in r.stderr.splitlines() if line.startswith("step ")][-1]
    assert last.startswith("step     3/3  stage 2: kd per budget ") and "(this step: " in last, last


def test_resume_past_the_requested_steps_is_refused(setup, tmp_path):
    work = tmp_path / "work"
    train(setup / "parent", setup / "tokens", tmp_path / "out", FAST_CFG, work_dir=work, stop_after=2)
    cfg = replace(FAST_CFG, stage1=Stage(1, 16), stage2=Stage(0, 16, (0.5, 0.3, 0.2)))
    with pytest.raises(ConfigError, match="past the 1 steps requested"):
        train(setup / "parent", setup / "tokens", tmp_path / "out", cfg, work_dir=work, resume=True)


def test_help_lists_the_data_formats_really_read():
    r = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert r.exit_code == 0
    text = re.sub(r"[\s│]+", " ", r.output)
    for s in ("*.txt, *.md, *.py", "*.jsonl, *.json", "one {\"text\": \"...\"} object per line", "meta.json"):
        assert s in text, (s, text)
