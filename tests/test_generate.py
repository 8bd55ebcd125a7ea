"""The one greedy loop (``elastic.slicer.nn.generate``) over its backends, the streaming text, the
tokenizer loader it uses, and ``elastic generate`` on top. Oracles: greedy by full recomputation
(no cache), the PyTorch backend for ONNX Runtime, the tokenizer's decode of all ids for the stream."""

import json

import pytest
import torch
from typer.testing import CliRunner

from elastic.cli.main import app
from elastic.slicer.formats.arch import Arch
from elastic.slicer.formats.tokenizer import ByteTok, load_tokenizer
from elastic.slicer.nn.generate import TextStream, generate_text, greedy
from elastic.slicer.nn.model import TorchBackend, build_model, generate, load_model, save_model
from elastic.slicer.planning.describe import DEMO_CHECKPOINT

from conftest import randomize_, tiny_config

runner = CliRunner()
CONTEXT = 64  # the export's recorded maximum context (TensorRT settings)


def naive_greedy(model, ids: torch.Tensor, n: int, eos: int | None = None) -> list[list[int]]:
    """Oracle: the whole sequence through the model at every step, no cache, argmax of the last logits."""
    seq = ids
    with torch.no_grad():
        for _ in range(n):
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)  # (b, 1)
            seq = torch.cat([seq, nxt], dim=1)
            if eos is not None and bool((seq[:, ids.shape[1]:] == eos).any(-1).all()):
                break
    return seq[:, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def tiny():
    model = build_model(Arch.from_config(tiny_config()))
    randomize_(model, seed=3)
    return model.eval()


@pytest.fixture(scope="module")
def demo():
    return load_model(DEMO_CHECKPOINT)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model dir, export dir) of the demo checkpoint at 100%, with engine settings recording CONTEXT."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from elastic.export.pipeline import export_model
    from elastic.slicer.slice import slice_checkpoint

    root = tmp_path_factory.mktemp("gen")
    model_dir = slice_checkpoint(DEMO_CHECKPOINT, root / "model", budget="100%").out
    summary = export_model(model_dir, root / "onnx", format="tensorrt", target="orin-nano-8gb",
                           max_context=CONTEXT).to_json()
    assert summary["parity"]["ok"] and summary["tensorrt"]["settings"]["max_context"] == CONTEXT
    return model_dir, root / "onnx"


# ---- the loop ----------------------------------------------------------------------------------


@pytest.mark.parametrize("b,l", [(1, 1), (2, 9), (3, 11)])  # one token; several chunks of 4 + padding
def test_torch_backend_equals_full_recompute(tiny, b, l):
    ids = torch.randint(0, 97, (b, l), generator=torch.Generator().manual_seed(l))
    out = greedy(TorchBackend(tiny), ids, 10)
    assert out.tokens == naive_greedy(tiny, ids, 10) and out.finite
    assert generate(tiny, ids, 10).tolist() == torch.cat([ids, torch.tensor(out.tokens)], 1).tolist()


def test_eos_stops_once_every_row_has_it(demo):
    ids = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(0))
    free = naive_greedy(demo, ids, 12)
    eos = free[1][0]  # row 1 produces it first, row 0 later: row 1 keeps going until row 0 has it
    assert eos in free[0][1:-1], "pick another seed: the case needs row 0 to produce eos mid-way"
    want = naive_greedy(demo, ids, 12, eos=eos)
    assert len(want[0]) < 12 and want[0][-1] == eos
    assert greedy(TorchBackend(demo), ids, 12, eos_token_id=eos).tokens == want
    assert generate(demo, ids, 0).tolist() == ids.tolist()  # zero new tokens: the prompt


def test_on_token_receives_the_tokens_in_order(tiny):
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    steps = []
    out = greedy(TorchBackend(tiny), ids, 7, on_token=steps.append)
    assert [list(r) for r in zip(*steps)] == out.tokens == naive_greedy(tiny, ids, 7)


@pytest.mark.heavy
def test_onnx_backend_equals_torch(exported, demo):
    from elastic.export.runtime import OnnxGenerator

    _, out = exported
    gen = OnnxGenerator(out)
    ids = torch.randint(0, 512, (2, 21), generator=torch.Generator().manual_seed(5))
    want = greedy(TorchBackend(demo), ids, 16).tokens
    assert greedy(gen, ids.numpy(), 16).tokens == want == naive_greedy(demo, ids, 16)
    assert gen.generate(ids.numpy(), 16)[:, 21:].tolist() == want


@pytest.mark.heavy
def test_onnx_sessions_share_one_arena_and_decode_as_with_malloc(exported):
    """Every session of every generator in the process takes the one arena registered in ONNX Runtime's
    environment; the tokens are those of sessions allocating from malloc, with or without ONNX
    Runtime's buffer reuse."""
    import onnxruntime as ort

    from elastic.export import runtime
    from elastic.export.runtime import OnnxGenerator

    _, out = exported
    ids = torch.randint(0, 512, (2, 21), generator=torch.Generator().manual_seed(7)).numpy()
    first, second = OnnxGenerator(out), OnnxGenerator(out)
    assert runtime._ARENA == [True] and runtime.shared_arena(ort)  # registered once, kept
    plain = OnnxGenerator(out, memory_arena=False)
    want = plain.generate(ids, 12).tolist()
    assert first.generate(ids, 12).tolist() == second.generate(ids, 12).tolist() == want
    assert OnnxGenerator(out, memory_arena=False, buffer_reuse=True).generate(ids, 12).tolist() == want


# ---- text ----------------------------------------------------------------------------------------


def test_text_stream_holds_back_split_characters():
    tok = ByteTok()
    ids = tok.encode("aé€z")  # 1 + 2 + 3 + 1 bytes
    stream = TextStream(tok.decode)
    pieces = [stream.push(i) for i in ids]
    assert pieces == ["a", "", "é", "", "", "€", "z"] and stream.finish() == ""
    stream = TextStream(tok.decode)
    assert [stream.push(i) for i in ids[:2]] == ["a", ""] and stream.finish() == "\ufffd"  # cut short


@pytest.mark.heavy
def test_streamed_text_is_the_text(demo):
    tok = load_tokenizer(DEMO_CHECKPOINT)
    pieces = []
    r = generate_text(TorchBackend(demo), tok, "The model", 24, on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == r["text"] == tok.decode(r["tokens"], skip_special_tokens=True)
    assert r["tokens"] == naive_greedy(demo, torch.tensor([tok.encode("The model")]), 24)[0]
    assert r["prompt_tokens"] == len(tok.encode("The model")) and r["new_tokens"] == 24


def test_one_tokenizer_loader(tmp_path, tiny):
    from elastic.trainer import tokenizer as trainer_tok

    assert trainer_tok.load_tokenizer is load_tokenizer  # the trainer uses the slicer's loader
    assert isinstance(load_tokenizer(tmp_path), ByteTok)
    save_model(tiny, tmp_path / "m")  # no tokenizer.json, vocabulary 97 < 256 bytes: ids folded, no text
    r = generate_text(TorchBackend(tiny), load_tokenizer(tmp_path / "m"), "Hello", 5)
    assert r["text"] is None and r["new_tokens"] == 5
    assert r["tokens"] == naive_greedy(tiny, torch.tensor([[b % 97 for b in b"Hello"]]), 5)[0]


# ---- the CLI -------------------------------------------------------------------------------------


@pytest.mark.heavy
def test_cli_streams_prompt_then_text(exported, monkeypatch):
    import elastic.export.runtime as runtime

    model_dir, out = exported
    real, pieces = runtime.generate_text, []

    def spy(*args, on_text=None, **kw):
        assert on_text is not None  # the CLI streams
        return real(*args, on_text=lambda s: (pieces.append(s), on_text(s)), **kw)

    for path in (model_dir, out):
        r = runner.invoke(app, ["generate", str(path), "The model", "-n", "12", "--json"])
        assert r.exit_code == 0, r.output
        want = json.loads(r.stdout)
        assert {"backend", "tokens", "text", "prompt_tokens", "new_tokens", "prefill_s", "tokens_per_s"} <= set(want)
        monkeypatch.setattr(runtime, "generate_text", spy)
        pieces.clear()
        r = runner.invoke(app, ["generate", str(path), "The model", "-n", "12"])
        monkeypatch.setattr(runtime, "generate_text", real)
        assert r.exit_code == 0, r.output
        assert r.stdout == f"The model{want['text']}\n" and len(pieces) > 1 and "".join(pieces) == want["text"]
        assert f"[{want['backend']}]" in r.stderr and "tokens/s" in r.stderr


@pytest.mark.heavy
def test_cli_refuses_a_request_longer_than_the_export(exported):
    from elastic.export.runtime import max_context

    _, out = exported
    assert max_context(out) == CONTEXT
    n = len(load_tokenizer(out).encode("Hello", add_special_tokens=True))
    r = runner.invoke(app, ["generate", str(out), "Hello", "-n", str(CONTEXT - n + 1)])
    assert r.exit_code == 2 and "maximum context of 64" in r.stderr and "Traceback" not in r.output
    assert f"--max-new-tokens {CONTEXT - n}" in r.stderr and r.stdout == ""  # the hint: what fits
    r = runner.invoke(app, ["generate", str(out), "Hello", "-n", str(CONTEXT - n), "--json"])  # exactly the limit
    assert r.exit_code == 0, r.output


def test_max_context_only_where_recorded(tmp_path):
    from elastic.export.runtime import max_context

    assert max_context(tmp_path) is None  # nothing recorded: no limit invented
    (tmp_path / "export_manifest.json").write_text(json.dumps({"tensorrt": None}))  # an ONNX-only export
    assert max_context(tmp_path) is None
    (tmp_path / "engine_meta.json").write_text(json.dumps({"settings": {"max_context": 128}}))
    assert max_context(tmp_path) == 128
