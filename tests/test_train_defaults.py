"""`elastic train` takes every default and the stage-2 weighting rule from the library
(``elastic.trainer.config``): a CLI default that disagrees with ``TrainConfig`` fails here."""

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import elastic.cli.train_cmd as train_cmd
from elastic.cli.main import app
from elastic.trainer.config import CLI_OPTIONS, TrainConfig, defaults, flatten, stage2_weights

runner = CliRunner()
PARENT = str(Path(__file__).resolve().parent.parent / "examples" / "nemotron-elastic-12b")


def train_options() -> dict[str, object]:
    """The `elastic train` command's options by flag (both flags of an on/off pair)."""
    cmd = typer.main.get_command(app).commands["train"]
    return {flag: p for p in cmd.params for flag in (*p.opts, *p.secondary_opts)}


def cli_config(monkeypatch, *args: str) -> TrainConfig:
    """The TrainConfig `elastic train --dry-run ARGS` hands to the library (captured at its one call)."""
    seen = []
    real = train_cmd._plan
    monkeypatch.setattr(train_cmd, "_plan", lambda parent, cfg, gpus, mem: seen.append(cfg) or real(parent, cfg, gpus, mem))
    r = runner.invoke(app, ["train", "--parent", PARENT, "--dry-run", "--gpus", "1", "--gpu-memory", "80GB", *args])
    assert r.exit_code == 0, r.output
    assert len(seen) == 1
    return seen[0]


def test_every_cli_default_is_the_librarys():
    """Each option's own default, read from the command, against TrainConfig's field default."""
    options, lib = train_options(), defaults()
    checked = []
    for field, flag in CLI_OPTIONS.items():
        assert flag in options, f"{field}: messages name {flag}, which `elastic train` does not have"
        default = options[flag].default
        if field == "budgets":
            default = train_cmd._parse_budgets(default, [])
        elif field == "stage2.weights":  # None: the library's rule over the budgets given
            assert default is None
            default = stage2_weights(len(lib["budgets"]))
        elif field == "fsdp":
            default = default.value
        assert default == lib[field], f"{flag}: the CLI's default {default!r}, the library's {lib[field]!r}"
        checked.append(field)
    assert len(checked) == 20  # every option that sets a TrainConfig field


def test_no_options_is_the_library_default_config(monkeypatch):
    assert cli_config(monkeypatch) == TrainConfig()


@pytest.mark.parametrize("budgets,weights", [
    ("a=1.0,b=0.6,c=0.3", (0.5, 0.3, 0.2)),
    ("a=1.0,b=0.5", (0.5, 0.5)),
    ("a=1.0,b=0.8,c=0.6,d=0.4", (0.25, 0.25, 0.25, 0.25)),
])
def test_stage2_weights_follow_the_librarys_rule(monkeypatch, budgets, weights):
    cfg = cli_config(monkeypatch, "--budgets", budgets)
    assert cfg.stage2.weights == weights  # written out by hand: 0.5/0.3/0.2 for three, equal otherwise
    assert cfg == TrainConfig.from_flat({"budgets": cfg.budgets})
    assert cli_config(monkeypatch, "--budgets", budgets, "--stage2-weights", "3,1" + ",1" * (len(weights) - 2)
                      ).stage2.weights == (3.0, 1.0, *[1.0] * (len(weights) - 2))  # given weights are kept


def test_every_option_reaches_the_config(monkeypatch):
    """Each setting option lands in its own field (none dropped or crossed on the way)."""
    cfg = cli_config(monkeypatch, "--stage1-steps", "7", "--stage1-context", "9", "--stage2-steps", "5",
                     "--stage2-context", "11", "--batch-size", "6", "--lr", "0.5", "--router-lr", "0.25", "--warmup",
                     "3", "--drop-layers", "1", "--no-keep-attention", "--micro-batches", "2", "--per-layer-mamba",
                     "--budget-dead-zone", "0.01", "--budget-tolerance", "0.07", "--fsdp", "off",
                     "--activation-checkpointing", "--save-every", "4", "--seed", "13")
    want = {"stage1.steps": 7, "stage1.context": 9, "stage2.steps": 5, "stage2.context": 11, "batch_size": 6,
            "lr": 0.5, "router_lr": 0.25, "warmup": 3, "drop_layers": 1, "keep_attention": False, "micro_batches": 2,
            "per_layer_mamba": True, "budget_dead_zone": 0.01, "budget_tolerance": 0.07, "fsdp": "off",
            "activation_checkpointing": True, "save_every": 4, "seed": 13}
    got = flatten(cfg)
    assert {k: got[k] for k in want} == want
    assert {k: v for k, v in got.items() if k not in want} == {k: v for k, v in defaults().items() if k not in want}


def test_the_default_config_follows_the_rule_itself():
    cfg = TrainConfig()
    assert cfg.stage2.weights == stage2_weights(len(cfg.budgets)) == (0.5, 0.3, 0.2)
    assert TrainConfig.from_flat({}) == cfg
    with pytest.raises(TypeError, match="stage3.steps"):
        TrainConfig.from_flat({"stage3.steps": 1})
