"""One progress shape everywhere (``elastic.profiles.progress``): every producer calls
``progress(stage, done, total, **detail)`` with a str, an int and an int or None, positionally; the
front ends render it."""

from __future__ import annotations

import pytest

from elastic.slicer.formats.arch import Arch
from elastic.slicer.nn.model import build_model, save_model
from elastic.trainer.data import TokenDataset, build_token_shards, stdlib_corpus
from elastic.trainer.pretrain import fit
from elastic.trainer.tokenizer import load_tokenizer
from elastic.trainer.train import Stage, TrainConfig, train
from trainer_fixtures import TINY


def recorder():
    """A progress callback that keeps every call, refusing any that is not the one shape."""
    calls = []

    def progress(*args, **detail):
        stage, done, total = args  # exactly three positional arguments
        assert isinstance(stage, str) and stage, args
        assert isinstance(done, int) and not isinstance(done, bool), args
        assert total is None or (isinstance(total, int) and not isinstance(total, bool)), args
        calls.append((stage, done, total, detail))

    return calls, progress


@pytest.fixture(scope="module")
def parent_and_tokens(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    save_model(build_model(Arch.from_config(TINY), seed=0), root / "parent")
    calls, progress = recorder()
    files = stdlib_corpus(max_bytes=60_000)
    build_token_shards(files, load_tokenizer(root / "parent"), root / "tokens", progress=progress)
    return root, files, calls


def test_tokenizing_reports_bytes_per_file(parent_and_tokens):
    _, files, calls = parent_and_tokens
    total = sum(f.stat().st_size for f in files)
    assert {c[0] for c in calls} == {"tokenize"} and len(calls) == len(files)
    assert [c[2] for c in calls] == [total] * len(files)
    assert [c[1] for c in calls] == sorted(c[1] for c in calls) and calls[-1][1] == total
    assert [c[3]["file"] for c in calls] == [str(f) for f in files]


def test_pretrain_reports_steps_with_the_loss_as_detail(parent_and_tokens):
    root, _, _ = parent_and_tokens
    ds = TokenDataset(root / "tokens", "train")
    model = build_model(Arch.from_config(TINY), seed=1)
    calls, progress = recorder()
    out = fit(model, ds, 2, batch_size=2, context=8, warmup=1, progress=progress)
    assert [c[:3] for c in calls] == [("pretrain", 1, 2), ("pretrain", 2, 2)]
    assert [c[3]["loss"] for c in calls] == out["losses"]
    calls, progress = recorder()
    fit(model, ds, 1, batch_size=2, context=8, teacher=build_model(Arch.from_config(TINY), seed=0), progress=progress)
    assert [c[:3] for c in calls] == [("distill", 1, 1)]


def test_elastic_training_reports_the_stage_name_and_losses_as_detail(parent_and_tokens, tmp_path):
    root, _, _ = parent_and_tokens
    cfg = TrainConfig(stage1=Stage(2, 16), stage2=Stage(1, 16, (0.5, 0.3, 0.2)), batch_size=2, warmup=0,
                      drop_layers=1, save_every=1, budget_tolerance=0.9)
    calls, progress = recorder()
    train(root / "parent", root / "tokens", tmp_path / "out", cfg, work_dir=tmp_path / "work", stop_after=1,
          progress=progress)
    assert [c[:3] for c in calls] == [("stage 1", 1, 3)]  # a short name, never a formatted status line
    detail = calls[0][3]
    assert set(detail["kd"]) <= {name for name, _ in cfg.budgets} and detail["kd"]
    assert all(isinstance(v, float) for v in detail["kd"].values())
    assert [name for name, _ in detail["sampled"]] and all(isinstance(p, int) for _, p in detail["sampled"])


def test_the_export_cli_prints_one_line_per_stage_or_message(capsys):
    from elastic.cli.export_cmd import _stage

    say = _stage(True)
    say("open", 0, None, message="opening m")
    say("write weights", 0, 3, message="writing the weights once")
    for k in range(1, 4):
        say("write weights", k, 3)
    say("check onnx", 0, None, message="onnx.checker")
    say("build engine", 0, 2, message="building prefill.engine")
    say("build engine", 1, 2, message="building decode.engine")
    say("build engine", 2, 2)
    say("checksums", 0, None)
    assert capsys.readouterr().err.splitlines() == [
        "  opening m ...", "  writing the weights once ...", "  onnx.checker ...", "  building prefill.engine ...",
        "  building decode.engine ...", "  checksums ..."]
    assert _stage(False) is None


def test_writing_export_weights_reports_tensors(tmp_path):
    import torch

    from elastic.export.weights import Entry, write_weights

    tensors = {f"w{i}": torch.full((i + 1, 2), float(i)) for i in range(3)}
    calls, progress = recorder()
    write_weights(tmp_path / "weights.bin", [Entry(n, n, False) for n in tensors], tensors.__getitem__,
                  torch.float32, progress=progress)
    assert [c[:3] for c in calls] == [("write weights", 1, 3), ("write weights", 2, 3), ("write weights", 3, 3)]
