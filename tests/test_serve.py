"""Budgets run on the resident parent's views (``elastic generate --budget``, ``elastic serve``).

The oracle is the physically sliced child (``slice_checkpoint`` then the reference model on its
files): same greedy tokens and logits; the server's text equals the library's for the same budget.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import elastic.slicer as slicer_pkg
from elastic.cli.main import app
from elastic.export.runtime import generate_text
from elastic.slicer.nn.budget import RangeLinear, ResidentParent, storage_report
from elastic.slicer.nn.model import load_model
from elastic.slicer.slice import slice_checkpoint

DEMO = Path(slicer_pkg.__file__).parent / "demo_checkpoint"
MOE = Path(slicer_pkg.__file__).parent / "moe_demo_checkpoint"
PROMPT = "The capital of France is"
IDS = torch.tensor([[1, 5, 9, 33, 100, 7, 8, 200, 3, 4, 17, 18, 19, 20, 21, 22, 23, 24]])


@pytest.fixture(scope="module")
def demo() -> ResidentParent:
    return ResidentParent(DEMO)


@pytest.fixture(scope="module")
def moe() -> ResidentParent:
    return ResidentParent(MOE)


@pytest.fixture(scope="module")
def children(tmp_path_factory) -> dict:
    """(checkpoint, budget) -> the physically sliced child's directory."""
    out = {}
    for root in (DEMO, MOE):
        for budget in ("100%", "75%", "50%"):
            d = tmp_path_factory.mktemp("child") / "c"
            slice_checkpoint(root, d, budget=budget)
            out[root.name, budget] = d
    return out


@pytest.mark.parametrize("which", ["demo", "moe"])
@pytest.mark.parametrize("budget", ["100%", "75%", "50%"])
def test_budget_on_views_equals_sliced_child(request, children, which, budget):
    resident = request.getfixturevalue(which)
    child_dir = children[resident.root.name, budget]
    ref = generate_text(child_dir, PROMPT, backend="torch", max_new_tokens=16)
    got = resident.generate(budget, PROMPT, 16)
    assert got["tokens"] == ref["tokens"] and len(got["tokens"]) == 16
    assert got["text"] == ref["text"]
    with torch.no_grad():
        torch.testing.assert_close(resident.model(budget)(IDS), load_model(child_dir)(IDS), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("budget", ["75%", "50%"])
def test_budget_shares_the_parents_storage(demo, budget):
    model = demo.model(budget)
    spans = [(t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
             for t in demo.parent.parameters()]
    matrices = [t for t in [*model.parameters(), *model.buffers()] if t is not None and t.dim() == 2]
    assert matrices and all(any(a <= t.data_ptr() < b for a, b in spans) for t in matrices)  # every matrix a view
    assert any(isinstance(m, RangeLinear) for m in model.modules())  # the multi-range in_proj/out_proj
    r = storage_report(demo.parent, model)
    assert r["copied_bytes"] < 0.02 * r["view_bytes"]  # only per-channel vectors and conv taps are gathered
    assert all(n.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias", "weight", "bias") and ".in_proj" not in n
               and ".out_proj" not in n for n in r["copied"])
    # the view really is the parent: a change to the parent's weight shows in the budget's output
    w = demo.parent.lm_head.weight
    with torch.no_grad():
        before = model(IDS[:, :4])
        saved = w[0].clone()
        w[0] += 1.0
        after = model(IDS[:, :4])
        w[0] = saved
    assert not torch.equal(before, after)


@pytest.mark.parametrize("rows,cols", [
    (((0, 6), (8, 14), (16, 22), (24, 30), (40, 44), (50, 52), (60, 62)), ((0, 20),)),  # runs of rows (in_proj)
    (((0, 24),), ((0, 4), (8, 12), (16, 20), (30, 31))),  # dense columns: one matmul over their span
    (((0, 24),), ((0, 2), (10, 12), (20, 22), (30, 31))),  # sparse runs of columns: a batched matmul per run
    (((2, 5), (9, 12), (20, 30)), ((1, 3), (7, 9), (11, 18))),  # both axes split: block by block
    (((0, 17),), ((0, 9),)),  # one block
])
@pytest.mark.parametrize("layout", ["row-major", "column-major"])
def test_range_linear_equals_the_gathered_matrix(rows, cols, layout):
    """Both layouts (ResidentParent stores Mamba out_proj column-major), a decode-wide input (one row)
    and a prefill-wide one (10 rows > WIDE_INPUT: the span pass for a column-major weight)."""
    from elastic.slicer.formats.rules import indices
    from elastic.slicer.nn.budget import WIDE_INPUT, column_major

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(64, 32, generator=g), torch.randn(64, generator=g)
    if layout == "column-major":
        w = w.t().contiguous().t()
        assert column_major(w)
    r, c = torch.tensor(indices(rows)), torch.tensor(indices(cols))
    x = torch.randn(2, 5, len(c), generator=g)
    assert 2 * 5 > WIDE_INPUT
    for bias in (None, b):
        lin = RangeLinear(w, bias, rows, cols)
        ref = torch.nn.functional.linear(x, w[r][:, c], None if bias is None else bias[r])  # the gathered copy
        torch.testing.assert_close(lin(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lin(x[0, :1]), ref[0, :1], rtol=1e-5, atol=1e-5)
        # every weight the layer holds is a view into w's storage: same storage pointer, nothing allocated
        held = [t for t in lin.buffers()]
        assert held and all(t.untyped_storage().data_ptr() == w.untyped_storage().data_ptr() or
                            t.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() for t in held)


def test_resident_parent_stores_mamba_out_proj_column_major(demo):
    from elastic.slicer.nn.budget import column_major
    from elastic.slicer.nn.model import Mamba2Mixer, load_model

    mixers = [m for m in demo.parent.modules() if isinstance(m, Mamba2Mixer)]
    assert mixers and all(column_major(m.out_proj.weight) for m in mixers)
    plain = load_model(demo.root)
    assert not column_major(next(m for m in plain.modules() if isinstance(m, Mamba2Mixer)).out_proj.weight)
    torch.testing.assert_close(demo.parent(IDS), plain(IDS), rtol=1e-5, atol=1e-5)  # same model, other layout


def test_budget_views_share_storage_pointers(demo):
    """Every matrix of a budget model is the parent's storage itself (``untyped_storage().data_ptr()``)."""
    parent = {p.untyped_storage().data_ptr() for p in demo.parent.parameters()}
    for budget in ("75%", "50%"):
        held = [t for t in [*demo.model(budget).parameters(), *demo.model(budget).buffers()] if t.dim() == 2]
        assert held and {t.untyped_storage().data_ptr() for t in held} <= parent


def test_cli_generate_budget_equals_sliced_child(children):
    r = CliRunner().invoke(app, ["generate", "-c", str(DEMO), PROMPT, "--budget", "50%", "-n", "16", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    ref = generate_text(children["demo_checkpoint", "50%"], PROMPT, backend="torch", max_new_tokens=16)
    assert got["tokens"] == ref["tokens"] and got["budget"] == "50%"
    r = CliRunner().invoke(app, ["generate", "-c", str(DEMO), PROMPT, "--budget", "nope"])
    assert r.exit_code == 2 and "unknown budget 'nope'" in r.output and "75%" in r.output


# ---- the server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(demo):
    from elastic.export.serve import Engine

    return Engine(demo)


@pytest.fixture(scope="module")
def client(engine):
    from starlette.testclient import TestClient

    from elastic.export.serve import build_app

    return TestClient(build_app(engine))


def _sse(client, path: str, body: dict) -> list:
    with client.stream("POST", path, json={**body, "stream": True}) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in s.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    return [json.loads(line[6:]) for line in lines[:-1]]


def _file_parameters(folder: Path) -> int:
    """Elements of every tensor in a model folder's safetensors (its header's shapes)."""
    from math import prod

    from safetensors import safe_open

    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            total += sum(prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def test_models_and_health(client, children):
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["100%", "75%", "50%"]  # elastic_config.json's budgets
    # what each budget runs, counted from the sliced child's own file (safetensors header, router
    # buffer included, as `elastic inspect` counts), and what its training aimed at
    ec = json.loads((DEMO / "elastic_config.json").read_text())
    for m in models["data"]:
        assert m["parameters"] == _file_parameters(children["demo_checkpoint", m["id"]])
        assert m["target_parameters"] == next(b["target_parameters"] for b in ec["budgets"] if b["name"] == m["id"])
    assert client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("budget", ["75%", "50%"])
def test_completions_equal_generate_budget(client, children, budget):
    ref = generate_text(children["demo_checkpoint", budget], PROMPT, backend="torch", max_new_tokens=16)
    r = client.post("/v1/completions", json={"model": budget, "prompt": PROMPT, "max_tokens": 16})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == budget
    assert body["choices"][0]["text"] == ref["text"]
    assert body["usage"]["completion_tokens"] == 16 and body["usage"]["budgets"] == {budget: 16}
    chunks = _sse(client, "/v1/completions", {"model": budget, "prompt": PROMPT, "max_tokens": 16})
    assert "".join(c["choices"][0]["text"] for c in chunks) == ref["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"]["budgets"] == {budget: 16}


def test_chat_uses_the_fallback_template(client, demo):
    from elastic.export.serve import chat_prompt

    messages = [{"role": "user", "content": "Hello"}]
    prompt, source = chat_prompt(DEMO, messages)
    assert (prompt, source) == ("user: Hello\nassistant:", "fallback")  # the demo's tokenizer has no template
    ref = demo.generate("50%", prompt, 8)["text"]
    r = client.post("/v1/chat/completions", json={"model": "50%", "messages": messages, "max_tokens": 8})
    assert r.status_code == 200 and r.headers["x-elastic-chat-template"] == "fallback"
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": ref}
    chunks = _sse(client, "/v1/chat/completions", {"model": "50%", "messages": messages, "max_tokens": 8})
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == ref


def test_chat_template_from_the_checkpoint(tmp_path):
    from elastic.export.serve import chat_prompt

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "chat_template": "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}"
                                             "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"}))
    assert chat_prompt(tmp_path, [{"role": "user", "content": "hi"}]) == ("<s><user>hi<assistant>", "checkpoint")


@pytest.mark.parametrize("body,status,param", [
    ({"model": "9B", "prompt": "x"}, 404, "model"),
    ({"prompt": "x"}, 400, "model"),
    ({"model": "50%", "prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
    ({"model": "50%", "prompt": "x " * 3000, "max_tokens": 2000}, 400, "max_tokens"),  # past the context
    ({"model": "50%", "prompt": "x", "temperature": 0.7}, 400, "temperature"),
    ({"model": "50%", "prompt": 5}, 400, "prompt"),
    ({"model": "50%", "messages": "hi"}, 400, "messages"),
])
def test_bad_requests_get_openai_errors(client, body, status, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = client.post(path, json=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    if status == 404:
        assert "100%, 75%, 50%" in err["message"]
    assert client.post("/v1/completions", json={"model": "50%", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_malformed_json(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_client_against_a_running_server(engine, children):
    openai = pytest.importorskip("openai")
    import uvicorn

    from elastic.export.serve import build_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 10
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        ref = generate_text(children["demo_checkpoint", "50%"], PROMPT, backend="torch", max_new_tokens=16)["text"]
        assert [m.id for m in c.models.list()] == ["100%", "75%", "50%"]
        assert c.completions.create(model="50%", prompt=PROMPT, max_tokens=16).choices[0].text == ref
        stream = c.completions.create(model="50%", prompt=PROMPT, max_tokens=16, stream=True)
        assert "".join(ch.choices[0].text for ch in stream) == ref
        with pytest.raises(openai.NotFoundError, match="the budgets are"):
            c.completions.create(model="9B", prompt=PROMPT, max_tokens=4)
        chat = c.chat.completions.create(model="75%", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert chat.usage.completion_tokens == 4
    finally:
        server.should_exit = True
        thread.join(10)


# ---- budget control: think with one budget, answer with another ---------------------------------


class _Scripted:
    """A backend that emits ``script[k]`` as its k-th generated token (k = context length - prompt length)."""

    name, vocab_size = "scripted", 64

    def __init__(self, script, prompt_len):
        self.script, self.prompt_len, self.prefills = script, prompt_len, []

    def _logits(self, n):
        out = torch.zeros(1, 1, self.vocab_size)
        out[0, 0, self.script[min(n - self.prompt_len, len(self.script) - 1)]] = 1.0
        return out

    def prefill(self, ids):
        self.prefills.append(list(ids[0]))
        return self._logits(len(ids[0])), len(ids[0])

    def step(self, nxt, n):
        return self._logits(n + 1), n + 1


def test_think_end_detector_switches_models():
    from elastic.slicer.nn.budget import THINK_END, ends_thinking, split_decode, think_end_ids

    assert ends_thinking([5, 6, 40, 41], [40, 41]) and not ends_thinking([40, 41, 5], [40, 41])
    assert not ends_thinking([41], [40, 41]) and not ends_thinking([1, 2], [])
    tok = ResidentParent(DEMO).tokenizer
    assert think_end_ids(tok) == tok.encode(THINK_END, add_special_tokens=False) and think_end_ids(tok)
    prompt = [1, 2, 3]
    think = _Scripted([7, 8, 40, 41, 9, 9, 9], len(prompt))
    answer = _Scripted([0] * 4 + [20, 21, 22, 23], len(prompt))  # its k-th token, k counted from the prompt
    d = split_decode(think, answer, prompt, 8, end_ids=[40, 41], max_think_tokens=6)
    assert d["tokens"] == [7, 8, 40, 41, 20, 21, 22, 23] and d["think_ended_by"] == "</think>"
    assert (d["think_tokens"], d["answer_tokens"]) == (4, 4)
    assert answer.prefills == [[1, 2, 3, 7, 8, 40, 41]]  # one prefill of prompt + thinking
    d = split_decode(_Scripted([7, 8, 40, 41], 3), _Scripted([5] * 9, 3), prompt, 8, end_ids=[40, 41],
                     max_think_tokens=2)  # the token budget comes first
    assert d["tokens"] == [7, 8, 5, 5, 5, 5, 5, 5] and d["think_ended_by"] == "max_think_tokens"
    d = split_decode(_Scripted([7, 2, 9], 3), _Scripted([5], 3), prompt, 8, end_ids=[40], eos_token_id=2)
    assert d["tokens"] == [7, 2] and d["answer_tokens"] == 0 and d["think_ended_by"] == "eos"


def test_equal_think_and_answer_budgets_are_the_plain_request(client, demo):
    plain = client.post("/v1/completions", json={"model": "50%", "prompt": PROMPT, "max_tokens": 16}).json()
    split = client.post("/v1/completions", json={"think_budget": "50%", "answer_budget": "50%", "prompt": PROMPT,
                                                 "max_tokens": 16, "max_think_tokens": 5}).json()
    assert split["choices"][0]["text"] == plain["choices"][0]["text"] and split["model"] == "50%"
    assert split["usage"] == plain["usage"] and split["usage"]["budgets"] == {"50%": 16}
    assert demo.generate_split("50%", "50%", PROMPT, 16, max_think_tokens=5)["tokens"] == \
        demo.generate("50%", PROMPT, 16)["tokens"]


def test_think_small_answer_large_equals_the_sliced_children(client, demo, children):
    from elastic.slicer.nn.generate import encode_prompt, greedy
    from elastic.slicer.nn.model import TorchBackend

    r = demo.generate_split("50%", "100%", PROMPT, 16, max_think_tokens=6)
    assert (r["think_tokens"], r["answer_tokens"], r["think_ended_by"]) == (6, 10, "max_think_tokens")
    small = generate_text(children["demo_checkpoint", "50%"], PROMPT, backend="torch", max_new_tokens=6)
    assert r["tokens"][:6] == small["tokens"]  # the thinking: the small child's greedy tokens
    ids, _ = encode_prompt(demo.tokenizer, PROMPT, demo.ckpt.arch.vocab_size)
    large = greedy(TorchBackend(load_model(children["demo_checkpoint", "100%"])), [ids + r["tokens"][:6]], 10, 2)
    assert r["tokens"][6:] == large.tokens[0]  # the answer: the large child from prompt + thinking
    body = {"think_budget": "50%", "answer_budget": "100%", "model": "100%", "prompt": PROMPT, "max_tokens": 16,
            "max_think_tokens": 6}
    got = client.post("/v1/completions", json=body).json()
    assert got["choices"][0]["text"] == r["text"] and got["model"] == "100%"
    u = got["usage"]
    assert u["budgets"] == {"50%": 6, "100%": 10} and sum(u["budgets"].values()) == u["completion_tokens"] == 16
    chunks = _sse(client, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == r["text"]
    assert chunks[-1]["usage"]["budgets"] == {"50%": 6, "100%": 10}
    chat = client.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["usage"]["budgets"] == {"50%": 6, "100%": 10}


@pytest.mark.parametrize("extra,status,param", [
    ({"think_budget": "9B", "answer_budget": "100%"}, 404, "think_budget"),
    ({"think_budget": "50%", "answer_budget": "9B"}, 404, "answer_budget"),
    ({"think_budget": "50%"}, 400, "answer_budget"),
    ({"think_budget": "50%", "answer_budget": "100%", "model": "75%"}, 400, "model"),
    ({"think_budget": "50%", "answer_budget": "100%", "max_think_tokens": 0}, 400, "max_think_tokens"),
])
def test_budget_control_errors(client, extra, status, param):
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 4, **extra})
    assert r.status_code == status and r.json()["error"]["param"] == param and r.json()["error"]["message"]


def test_cli_think_and_answer_budgets(demo):
    args = ["generate", "-c", str(DEMO), PROMPT, "--think-budget", "50%", "--answer-budget", "100%", "-n", "12",
            "--max-think-tokens", "4"]
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert got["tokens"] == demo.generate_split("50%", "100%", PROMPT, 12, max_think_tokens=4)["tokens"]
    assert got["budgets"] == {"50%": 4, "100%": 8}
    r = CliRunner().invoke(app, ["generate", "-c", str(DEMO), PROMPT, "--think-budget", "50%"])
    assert r.exit_code != 0 and "--answer-budget" in r.output


def test_a_budget_on_another_backend_is_refused_with_words_not_a_crash():
    """The refusal is an ElasticError the CLI turns into one line (a Hint naming a setting the front
    ends do not know would raise ValueError instead)."""
    from elastic.export.runtime import generate_text
    from elastic.slicer.errors import ElasticError

    with pytest.raises(ElasticError, match="PyTorch reference model"):
        generate_text(DEMO, "Hello", backend="onnx", budget="50%")


def test_a_cuda_device_without_cuda_is_refused_in_words():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    from elastic.slicer.errors import ElasticError

    with pytest.raises(ElasticError, match="sees no CUDA device"):
        ResidentParent(DEMO, device="cuda")
    r = CliRunner().invoke(app, ["serve", "-c", str(DEMO), "--device", "cuda", "--port", "1"])
    assert r.exit_code != 0 and "sees no CUDA device" in r.output


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("budget", ["100%", "75%", "50%"])
def test_budget_on_cuda_views_equals_sliced_child_on_cuda(children, budget):
    """The resident parent on the GPU: its budgets' greedy tokens equal the sliced child's on the GPU."""
    resident = ResidentParent(DEMO, device="cuda")
    assert next(resident.parent.parameters()).is_cuda
    got = resident.generate(budget, PROMPT, 16, eos_token_id=-1)["tokens"]
    from elastic.slicer.formats.tokenizer import require_tokenizer
    from elastic.slicer.nn.generate import generate_text as run
    from elastic.slicer.nn.model import TorchBackend

    child = children["demo_checkpoint", budget]
    ref = run(TorchBackend(load_model(child, device="cuda")), require_tokenizer(child), PROMPT, 16, eos_token_id=-1)
    assert got == ref["tokens"]
