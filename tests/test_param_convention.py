"""Parameter counts: one convention (the safetensors count, with the MoE routers' e_score_correction_bias
buffers), stated by every output that prints a count, and equal to an independent count: transformers'
``num_parameters()`` (which leaves buffers out) plus those buffers, on the MoE demo."""

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from elastic.cli.main import app
from elastic.slicer.planning.describe import PARAMETER_CONVENTION

MOE_DEMO = Path(__file__).resolve().parents[1] / "slicer" / "moe_demo_checkpoint"
transformers = pytest.importorskip("transformers")
runner = CliRunner()


@pytest.fixture(scope="module")
def independent() -> int:
    """transformers' count of the MoE demo: num_parameters() + every e_score_correction_bias buffer."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(MOE_DEMO, dtype=torch.float32)
    buffers = [b for name, b in hf.named_buffers() if name.endswith("e_score_correction_bias")]
    assert buffers, "the MoE demo's routers carry a correction bias (else this test checks nothing)"
    return hf.num_parameters() + sum(b.numel() for b in buffers)


def _run(*args: str) -> str:
    r = runner.invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r.stdout


def test_inspect_states_the_convention_and_counts_as_transformers_plus_buffers(independent):
    info = json.loads(_run("inspect", str(MOE_DEMO), "--json"))
    assert info["parameters"]["total"] == independent
    assert info["parameter_convention"] == PARAMETER_CONVENTION
    text = _run("inspect", str(MOE_DEMO))
    assert f"({independent:,})" in text and PARAMETER_CONVENTION in text


def test_plan_and_fit_my_gpu_state_the_convention(independent):
    """The full budget's row counts what inspect counts; the text and --json of plan and fit-my-gpu
    (dry run: its plan) say how."""
    p = json.loads(_run("plan", "-c", str(MOE_DEMO), "--target", "cpu", "--json"))
    assert p["parameter_convention"] == PARAMETER_CONVENTION
    assert next(b for b in p["budgets"] if b["name"] == "100%")["parameters"] == independent
    assert f"params      {PARAMETER_CONVENTION}" in _run("plan", "-c", str(MOE_DEMO), "--target", "cpu")
    fit = json.loads(_run("fit-my-gpu", "-c", str(MOE_DEMO), "--target", "cpu", "--dry-run", "--json"))
    assert fit["parameter_convention"] == PARAMETER_CONVENTION
    assert PARAMETER_CONVENTION in _run("fit-my-gpu", "-c", str(MOE_DEMO), "--target", "cpu", "--dry-run")


def test_a_slice_counts_as_transformers_plus_buffers(tmp_path):
    """The slice's manifest count of the 75% budget equals transformers' count of that slice plus its buffers."""
    from elastic.slicer.slice import slice_checkpoint
    from elastic.slicer.storage.reader import Checkpoint

    r = slice_checkpoint(MOE_DEMO, tmp_path / "s", budget="75%")
    remote = Checkpoint.open(r.out).arch.config_form() != "nemotron_h"  # per-layer sizes: the shipped code
    hf = transformers.AutoModelForCausalLM.from_pretrained(r.out, dtype=torch.float32, trust_remote_code=remote)
    bias = sum(b.numel() for name, b in hf.named_buffers() if name.endswith("e_score_correction_bias"))
    assert r.parameters == hf.num_parameters() + bias
