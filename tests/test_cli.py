"""The CLI is a thin adapter: JSON keys, exit codes, no traceback, no torch for --help."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from elastic.cli.main import app
from elastic.slicer.planning.describe import DEMO_CHECKPOINT, describe

runner = CliRunner()


def test_inspect_json_on_the_bundled_demo(monkeypatch, tmp_path):
    monkeypatch.delenv("ELASTIC_CHECKPOINT", raising=False)
    monkeypatch.chdir(tmp_path)  # not an elastic checkpoint: falls back to the demo
    r = runner.invoke(app, ["inspect", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    for key in ("path", "layer_pattern", "parameters", "dtype", "bytes_on_disk", "elastic"):
        assert key in info
    assert info["path"] == str(DEMO_CHECKPOINT.resolve())
    assert info["layer_pattern"] == "M-M*-M-"
    p = info["parameters"]
    assert p["total"] == sum(v for k, v in p.items() if k not in ("total", "active"))
    assert p["active"] == p["total"]  # no MoE layer: every parameter computes
    assert {"mamba", "attention", "mlp"} <= set(p)
    assert info["parameters_stored"] == p["total"]
    assert info["dtype"] == "float32" and info["elastic"] is True
    budgets = {b["name"]: b["parameters"] for b in info["budgets"]}
    assert list(budgets) == ["100%", "75%", "50%"] and budgets["100%"] == p["total"]
    assert p["total"] > budgets["75%"] > budgets["50%"]  # nested: each smaller than the one before
    assert info == describe(DEMO_CHECKPOINT)  # the CLI adds nothing of its own


def test_inspect_counts_equal_transformers(hf_ckpt):
    r = runner.invoke(app, ["inspect", str(hf_ckpt[0]), "--json"])
    info = json.loads(r.stdout)
    assert info["parameters"]["total"] == sum(p.numel() for p in hf_ckpt[1].parameters())
    assert info["bytes_on_disk"] == sum(f.stat().st_size for f in hf_ckpt[0].iterdir())


def test_inspect_config_only(hf_ckpt):
    (hf_ckpt[0] / "model.safetensors").unlink()
    r = runner.invoke(app, ["inspect", str(hf_ckpt[0])])
    assert r.exit_code == 0
    assert "not present: parameter counts come from config.json" in r.stdout
    info = json.loads(runner.invoke(app, ["inspect", str(hf_ckpt[0]), "--json"]).stdout)
    assert info["weights_present"] is False
    assert info["parameters"]["total"] == sum(p.numel() for p in hf_ckpt[1].parameters())


def test_env_var_selects_checkpoint(hf_ckpt, monkeypatch):
    monkeypatch.setenv("ELASTIC_CHECKPOINT", str(hf_ckpt[0]))
    info = json.loads(runner.invoke(app, ["inspect", "--json"]).stdout)
    assert info["path"] == str(hf_ckpt[0].resolve())


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "elastic.cli.main", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_broken_checkpoint_exit_2_without_traceback(hf_ckpt):
    f = hf_ckpt[0] / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    r = run_cli("inspect", str(hf_ckpt[0]), env={"ELASTIC_DEBUG": "0"})
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "model.safetensors" in r.stderr and "truncated" in r.stderr
    r = run_cli("inspect", str(hf_ckpt[0]), env={"ELASTIC_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_missing_directory(tmp_path):
    r = runner.invoke(app, ["inspect", str(tmp_path / "nope")])
    assert r.exit_code == 2 and "no such checkpoint directory" in r.stderr


def test_help_does_not_import_torch():
    code = ("import sys; from typer.testing import CliRunner; from elastic.cli.main import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "r = CliRunner().invoke(app, ['inspect', '--json']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # neither --help nor inspect needs torch


def test_slice_json_on_the_demo(tmp_path, monkeypatch):
    monkeypatch.delenv("ELASTIC_CHECKPOINT", raising=False)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["slice", "--budget", "50%", "--out", "m50", "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["out"] == "m50" and info["bytes_written"] == sum(f.stat().st_size for f in (tmp_path / "m50").iterdir())
    demo = {b["name"]: b["parameters"] for b in describe(DEMO_CHECKPOINT)["budgets"]}
    assert info["parameters"] == demo["50%"]
    assert json.loads(runner.invoke(app, ["inspect", "m50", "--json"]).stdout)["parameters"]["total"] == demo["50%"]


def test_slice_errors_exit_2(tmp_path, hf_ckpt):
    r = runner.invoke(app, ["slice", "--budget", "6B", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown budget '6B'; this checkpoint has: 100%, 75%, 50%" in r.stderr
    r = runner.invoke(app, ["slice", "-c", str(hf_ckpt[0]), "--budget", "6B", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "not an elastic checkpoint" in r.stderr
    r = runner.invoke(app, ["slice", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "exactly one of" in r.stderr
    assert not (tmp_path / "x").exists()


TRAIN_12B = ["train", "--parent", str(Path(__file__).resolve().parent.parent / "examples" / "nemotron-elastic-12b")]


def test_train_dry_run_12b_on_8_x_80gb_json():
    """The issue's acceptance, and the CLI a thin adapter: its numbers are plan_training's."""
    from elastic.slicer.formats.arch import Arch
    from elastic.trainer.memory import plan_training
    from elastic.trainer.train import TrainConfig

    r = runner.invoke(app, [*TRAIN_12B, "--dry-run", "--gpus", "8", "--gpu-memory", "80GB", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["parallelism"] == "fsdp" and plan["world"] == 8 and plan["fits"] is True
    assert plan["gpu_bytes"] == 80 * 2**30 and set(plan["gpus_needed"]) == {"24GB", "48GB", "80GB", "141GB"}
    assert 1 < plan["gpus_needed"]["80GB"] <= 8
    per_rank = plan["per_rank"]
    assert per_rank["total"] == sum(v for k, v in per_rank.items() if k != "total")
    assert per_rank["activations"] == sum(plan["activation_parts"].values())
    lib = plan_training(Arch.from_file(TRAIN_12B[-1]), TrainConfig(), 8, 80 * 2**30).memory
    assert per_rank == {**{name: b for name, b, _ in lib.terms()}, "total": lib.total}


def test_train_dry_run_text_shows_every_term_with_its_formula():
    r = runner.invoke(app, [*TRAIN_12B, "--dry-run", "--gpus", "8", "--gpu-memory", "80GiB",
                            "--activation-checkpointing", "--fsdp", "on"])
    assert r.exit_code == 0, r.output
    assert "estimate" in r.stdout and "fits: yes" in r.stdout and "needs " in r.stdout
    rows = dict(m.groups() for m in re.finditer(r"^ +(\S.*?) +\d+\.\d\d GiB  (.+)$", r.stdout, re.M))
    for term in ("parameters", "gradients", "optimizer state", "teacher", "working (gathered)", "activations",
                 "layers", "weight copies", "masks", "logits"):
        assert len(rows.get(term, "")) > 20, (term, rows)  # every term with how it was computed
    assert "--fsdp on" in r.stdout and "activation checkpointing" in r.stdout


def test_train_without_data_is_refused_unless_dry_run(monkeypatch, tmp_path):
    r = runner.invoke(app, [*TRAIN_12B, "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "--data" in r.output and "--dry-run" in r.output
    assert not (tmp_path / "out").exists()
    r = runner.invoke(app, [*TRAIN_12B, "--dry-run", "--gpus", "8", "--gpu-memory", "80"])
    assert r.exit_code == 2 and "--gpu-memory '80'" in r.output  # a size needs its unit
    r = runner.invoke(app, [*TRAIN_12B, "--dry-run", "--gpus", "3", "--gpu-memory", "80GB"])
    assert r.exit_code == 2 and "divide among the 3 processes" in r.output

    from types import SimpleNamespace

    import elastic.profiles.detect as detect
    from elastic.profiles.devices import get_profile

    cpu = get_profile("cpu")
    host = detect.Device(kind="cpu", index=None, name="CPU host", total_bytes=0, free_bytes=0, usable_bytes=0,
                         unified=True, caps=cpu.caps, compute_capability=None, driver=None, profile=cpu,
                         runtime_overhead_bytes=0, notes=())
    monkeypatch.setattr(detect, "detect", lambda gpu=None: SimpleNamespace(chosen=host,
                                                                           reasons=("NVML: library not found",)))
    r = runner.invoke(app, [*TRAIN_12B, "--dry-run", "--gpus", "2"])
    assert r.exit_code == 2 and "--gpu-memory is needed to plan for 2 GPUs" in r.output
