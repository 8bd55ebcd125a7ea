"""End to end: a tiny dense parent becomes an elastic checkpoint that the slicer reads."""

import json
import math
import shutil

import pytest
import torch

from elastic.slicer.storage.reader import Checkpoint
from elastic.slicer.formats.elastic_format import BUDGET_TOLERANCE
from elastic.slicer.errors import ConfigError
from elastic.slicer.nn.model import load_model
from elastic.slicer.slice import slice_checkpoint
from trainer_fixtures import make_parent_and_tokens
from elastic.trainer.train import Stage, TrainConfig, train

pytestmark = pytest.mark.heavy  # every test trains (several in two processes)

# a run of under a second: too short for the router to land every budget within 5% of its target on this
# tiny model (its choices are coarse), so the end-of-run check is loosened here and tested on its own below
CFG = TrainConfig(stage1=Stage(30, 16), stage2=Stage(20, 24, (0.5, 0.3, 0.2)), batch_size=2, warmup=2,
                  router_lr=3e-3, importance_batches=2, drop_layers=1, save_every=15, eval_batches=2,
                  budget_tolerance=0.5)


def slice_delivered(elastic, out, name, summary):
    """Slice a trained budget. Training resolves every budget by constrained choice within
    min(--budget-tolerance, BUDGET_TOLERANCE) of its target (DESIGN.md section 6), so each one slices:
    to the parameters the run reported, counted here in the written tensors, within BUDGET_TOLERANCE."""
    from safetensors import safe_open

    r = slice_checkpoint(elastic, out, budget=name)
    counted = 0
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            counted += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    want = summary["budgets"][name]
    assert r.parameters == counted == want["parameters"], name
    assert abs(counted / want["target_parameters"] - 1) <= BUDGET_TOLERANCE, (name, counted, want)
    return r


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_parent_and_tokens(tmp_path_factory.mktemp("train"), max_bytes=200_000)


def test_train_writes_an_elastic_checkpoint_the_slicer_reads(setup, tmp_path):
    summary = train(setup / "parent", setup / "tokens", tmp_path / "elastic", CFG)
    assert summary["steps"] == 50 and summary["tokens"] == 2 * (30 * 16 + 20 * 24)
    ckpt = Checkpoint.open(tmp_path / "elastic")
    assert ckpt.is_elastic and (tmp_path / "elastic" / "router.safetensors").is_file()
    assert (tmp_path / "elastic" / "importance.safetensors").is_file()
    for name in ("100%", "75%", "50%"):
        r = slice_delivered(tmp_path / "elastic", tmp_path / name, name, summary)
        assert r.manifest["spec_source"] == ("full model" if name == "100%" else "router")
        load_model(tmp_path / name)
    assert json.loads((tmp_path / "elastic" / "training.json").read_text())["steps"] == 50
    # without the router, a stored choice off its target is refused, naming the tolerance, and nothing is written
    shutil.copytree(tmp_path / "elastic", tmp_path / "off")
    (tmp_path / "off" / "router.safetensors").unlink()
    ec = json.loads((tmp_path / "off" / "elastic_config.json").read_text())
    ec["resolved"]["50%"] = ec["resolved"]["100%"]  # the parent's own sizes: twice the 50% target
    (tmp_path / "off" / "elastic_config.json").write_text(json.dumps(ec))
    with pytest.raises(ConfigError, match="tolerance"):
        slice_checkpoint(tmp_path / "off", tmp_path / "off-50", budget="50%")
    assert not (tmp_path / "off-50").exists()


def test_resume_continues_exactly(setup, tmp_path):
    full = train(setup / "parent", setup / "tokens", tmp_path / "a", CFG, work_dir=tmp_path / "wa")
    train(setup / "parent", setup / "tokens", tmp_path / "b", CFG, work_dir=tmp_path / "wb", stop_after=20)
    assert not (tmp_path / "b").exists()  # stopped: state saved, no checkpoint yet
    resumed = train(setup / "parent", setup / "tokens", tmp_path / "b", CFG, work_dir=tmp_path / "wb", resume=True)
    state_a = torch.load(tmp_path / "wa" / "train_state.pt", weights_only=False)
    state_b = torch.load(tmp_path / "wb" / "train_state.pt", weights_only=False)
    assert [h["kd"] for h in state_a["history"]] == [h["kd"] for h in state_b["history"]]
    # every optimizer step mixes budgets: one per micro-batch (3 budgets, batch 2 -> 2 micro-batches)
    steps: dict[int, list[str]] = {}
    for h in state_a["history"]:
        steps.setdefault(h["step"], []).append(h["budget"])
    assert len(steps) == CFG.total_steps and all(len(b) == 2 for b in steps.values())
    assert sum(len(set(b)) > 1 for b in steps.values()) > CFG.total_steps // 4
    assert resumed["budgets"] == full["budgets"]
    for k, v in state_a["student"].items():
        assert torch.equal(v, state_b["student"][k]), k


def test_two_gloo_processes_under_torchrun_match_one_process(setup, tmp_path):
    """DDP with two CPU processes (gloo) trains on the same sequences as one process with the same global
    batch and micro-batches (each process takes half of every micro-batch): the same budgets and sizes
    drawn, the same distillation losses and weights up to float32 summation order (gradients averaged
    across processes; the tolerances of the FSDP test below), the same resolved budgets."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    def run(out: str, procs: int) -> dict:
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if procs > 1 else []
        cmd = [sys.executable, *launch, "-m", "elastic.cli.main", "train", "--parent", str(setup / "parent"),
               "--data", str(setup / "tokens"), "--out", str(tmp_path / out), "--stage1-steps", "4",
               "--stage1-context", "16", "--stage2-steps", "2", "--stage2-context", "16", "--batch-size", "4",
               "--micro-batches", "2", "--warmup", "2", "--drop-layers", "1", "--budget-tolerance", "0.5", "--json"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout[r.stdout.index("{"):])

    one, ddp = run("one", 1), run("ddp", 2)
    assert (one["world_size"], ddp["world_size"]) == (1, 2)
    assert ddp["tokens"] == one["tokens"] == 4 * 6 * 16  # --batch-size: in all processes together
    sizes = {k: v["parameters"] for k, v in one["budgets"].items()}
    assert {k: v["parameters"] for k, v in ddp["budgets"].items()} == sizes
    ref = torch.load(tmp_path / "one.work" / "train_state.pt", weights_only=False)
    state = torch.load(tmp_path / "ddp.work" / "train_state.pt", weights_only=False)
    assert (ref["world_size"], state["world_size"]) == (1, 2) and len(state["history"]) == len(ref["history"]) > 0
    for x, y in zip(state["history"], ref["history"]):
        assert (x["step"], x["budget"], x["params"]) == (y["step"], y["budget"], y["params"])
        assert x["kd"] == pytest.approx(y["kd"], rel=1e-3, abs=1e-9), (x, y)
    wa, wb = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4)
    assert Checkpoint.open(tmp_path / "ddp").is_elastic
    for name in ("100%", "50%"):  # what the one-process run delivers, the two-process run delivers too
        a = slice_delivered(tmp_path / "one", tmp_path / f"one-{name}", name, one)
        b = slice_delivered(tmp_path / "ddp", tmp_path / f"ddp-{name}", name, ddp)
        assert a.parameters == b.parameters


def test_annealing_finishes_within_stage_1(setup, tmp_path, monkeypatch):
    """Stage 2 samples at the final temperature and logit scale: it trains the architectures the
    router settled on, which are the ones deployed."""
    import elastic.trainer.train as tr

    seen: list[tuple[int, float, float]] = []
    real = tr.ElasticModule.forward

    def forward(self, ids, budget, tau, scale, gen):
        seen.append((len(seen), tau, scale))
        return real(self, ids, budget, tau, scale, gen)

    monkeypatch.setattr(tr.ElasticModule, "forward", forward)
    tr.train(setup / "parent", setup / "tokens", tmp_path / "e", CFG, work_dir=tmp_path / "w",
             stop_after=CFG.stage1.steps + 3)
    per_step = len(seen) // (CFG.stage1.steps + 3)  # micro-batches per step
    stage2 = seen[CFG.stage1.steps * per_step:]
    assert stage2 and all(t == pytest.approx(CFG.tau[1]) and s == pytest.approx(CFG.logit_scale[1])
                          for _, t, s in stage2)
    assert seen[0][1] == pytest.approx(CFG.tau[0]) and seen[0][1] > seen[CFG.stage1.steps * per_step // 2][1]


def test_a_run_that_misses_a_budget_fails_with_both_numbers_and_keeps_its_work(setup, tmp_path):
    from dataclasses import replace

    from elastic.trainer.train import BudgetMissError

    cfg = replace(CFG, stage1=Stage(4, 16), stage2=Stage(2, 24, (0.5, 0.3, 0.2)), budget_tolerance=1e-4)
    with pytest.raises(BudgetMissError) as e:
        train(setup / "parent", setup / "tokens", tmp_path / "miss", cfg)
    written = json.loads((tmp_path / "miss" / "training.json").read_text())["budgets"]
    for name in ("75%", "50%"):  # the parent's own budget is exact; the others cannot be within 0.01%
        r = written[name]
        line = next(p for p in e.value.problems if p.startswith(f"budget {name}:"))
        assert f"{r['parameters']:,} parameters, target {r['target_parameters']:,}" in line
    assert not any(p.startswith("budget 100%") for p in e.value.problems)
    assert (tmp_path / "miss.work" / "train_state.pt").is_file()


FSDP_SCRIPT = """
import sys
from elastic.trainer.train import Stage, TrainConfig, train
parent, tokens, out, fsdp, work, stop, resume = sys.argv[1:8]
cfg = TrainConfig(stage1=Stage(6, 16), stage2=Stage(2, 24, (0.5, 0.3, 0.2)), batch_size=4, micro_batches=2, warmup=2,
                  router_lr=3e-3, importance_batches=2, drop_layers=1, save_every=3, eval_batches=2,
                  budget_tolerance=0.9, fsdp=fsdp, activation_checkpointing=fsdp == "on")
train(parent, tokens, out, cfg, work_dir=work, stop_after=int(stop) or None, resume=resume == "resume")
"""


def test_fsdp2_on_two_gloo_processes_matches_one_process(setup, tmp_path):
    """FSDP2 (with activation checkpointing) on two CPU processes trains on the same sequences as one
    process with the same global batch: same budgets and sizes drawn, the same distillation losses up
    to float32 summation order (each process sums its half of a micro-batch and the gradients are
    reduce-scattered, so the last bits differ and AdamW carries them on: 1e-3 relative over 8 steps;
    measured here: at most 4e-4), and a checkpoint the slicer slices, with the same weights. The state
    an FSDP run saves (whole, by name) resumes under FSDP and in one process alike."""
    import os
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file

    script = tmp_path / "run.py"
    script.write_text(FSDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(out: str, fsdp: str, work: str, stop: int = 0, resume: bool = False, procs: int = 1) -> None:
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] if procs > 1 else []
        r = subprocess.run([sys.executable, *launch, str(script), str(setup / "parent"), str(setup / "tokens"),
                            str(tmp_path / out), fsdp, str(tmp_path / work), str(stop), "resume" if resume else "-"],
                           capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]

    run("one", "off", "w-one")  # the reference: one process, no FSDP
    run("fsdp", "on", "w-fsdp", stop=4, procs=2)  # two processes, FSDP2: 4 steps, state saved
    shutil.copytree(tmp_path / "w-fsdp", tmp_path / "w-moved")
    run("fsdp", "on", "w-fsdp", resume=True, procs=2)  # resumed under FSDP
    run("moved", "off", "w-moved", resume=True)  # the same state resumed in one process
    ref = torch.load(tmp_path / "w-one" / "train_state.pt", weights_only=False)
    assert not ref["fsdp"] and ref["world_size"] == 1 and len(ref["history"]) == 16
    for work in ("w-fsdp", "w-moved"):
        state = torch.load(tmp_path / work / "train_state.pt", weights_only=False)
        assert (state["fsdp"], state["world_size"]) == ((True, 2) if work == "w-fsdp" else (False, 1))
        assert len(state["history"]) == 16
        for x, y in zip(state["history"], ref["history"]):
            assert (x["step"], x["budget"], x["params"]) == (y["step"], y["budget"], y["params"])
            assert x["kd"] == pytest.approx(y["kd"], rel=1e-3, abs=1e-9), (work, x, y)
    wb = load_file(tmp_path / "one" / "model.safetensors")
    for out in ("fsdp", "moved"):
        wa = load_file(tmp_path / out / "model.safetensors")
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-4)
    summary = json.loads((tmp_path / "fsdp" / "training.json").read_text())
    for name in ("100%", "50%"):
        slice_delivered(tmp_path / "fsdp", tmp_path / f"s{name}", name, summary)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_a_gpu(setup, tmp_path):
    """The CUDA path: importance accumulated on the GPU, the bf16 teacher, the loss bookkeeping on
    the device; with two or more GPUs, FSDP2 over NCCL too (the same script as the CPU test)."""
    import os
    import subprocess
    import sys

    from dataclasses import replace

    cfg = replace(CFG, stage1=Stage(6, 16), stage2=Stage(2, 24, (0.5, 0.3, 0.2)), budget_tolerance=0.9,
                  activation_checkpointing=True)
    summary = train(setup / "parent", setup / "tokens", tmp_path / "gpu", cfg)
    assert all(r["val_loss"] == r["val_loss"] for r in summary["budgets"].values())  # finite, not NaN
    slice_checkpoint(tmp_path / "gpu", tmp_path / "s", budget="100%")
    if torch.cuda.device_count() < 2:
        return
    script = tmp_path / "run.py"
    script.write_text(FSDP_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(setup / "parent"), str(setup / "tokens"), str(tmp_path / "fsdp"), "on",
                        str(tmp_path / "w"), "0", "-"], capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "fsdp" / "training.json").read_text())["fsdp"] is True
