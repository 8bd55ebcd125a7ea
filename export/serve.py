"""``elastic serve``: an OpenAI-compatible HTTP server over one resident elastic parent.

The parent loads once (``elastic.slicer.nn.budget.ResidentParent``); the request's ``model`` names
a budget, which runs on views of the parent's tensors. Endpoints: ``GET /health``, ``GET
/v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``"stream": true`` sends
server-sent events in OpenAI's chunk shapes, ending with ``data: [DONE]``).

Decoding is greedy: ``temperature`` must be 0 or absent, ``top_p`` 1 or absent, ``n`` 1; ``stop``,
``logprobs`` and ``best_of`` > 1 are refused (400) rather than silently ignored; other fields
(``user``, ``seed``, penalties) are ignored. Requests queue and run one at a time (one sequence,
no batching); the event loop stays free while a request runs in a worker thread.

Budget control: a request may name ``think_budget`` and ``answer_budget`` (both, served budgets)
and optionally ``max_think_tokens``: the reasoning segment decodes with the think budget until the
generated ids end with ``</think>`` as the tokenizer encodes it, or ``max_think_tokens`` tokens, or
eos / ``max_tokens`` (then there is no answer); the answer budget then prefills prompt + thinking
once and decodes the answer; thinking + answer <= ``max_tokens``. ``model`` may be left out (a
client that needs it: give the answer budget); one that differs from ``answer_budget`` is refused
(400, code ``model_mismatch``); the response's ``model`` is the answer budget. ``usage.budgets``
gives the tokens each budget generated (``{think: n1, answer: n2}``; one entry when they are one).

Chat prompts use the checkpoint's ``chat_template`` (tokenizer_config.json) when it has one, else a
plain fallback, ``"{role}: {content}\\n"`` per message then ``"assistant:"``; the response header
``x-elastic-chat-template`` says which (``checkpoint`` or ``fallback``).

Built on Starlette and uvicorn (the ``serve`` extra). Errors are OpenAI error objects:
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.

Example:
    >>> app = build_app(ResidentParent("./elastic-ckpt"))      # an ASGI app (starlette)
    >>> serve("./elastic-ckpt", port=8000)                      # blocks: uvicorn
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from elastic.slicer.errors import ElasticError, MissingDependencyError

FALLBACK_TEMPLATE = "fallback"
DEFAULT_MAX_CONTEXT = 4096  # the reference model has no positional limit: the server's own bound


def require_serve() -> None:
    """Raise MissingDependencyError unless starlette and uvicorn are installed."""
    import importlib.util

    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} needed by "
                                     "`elastic serve` but not installed; pip install 'elastic[serve]'")


class ApiError(ElasticError):
    """A request the server refuses: an HTTP status and an OpenAI error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- prompts ----------------------------------------------------------------------------------


def chat_prompt(root: str | Path, messages: list[dict[str, Any]]) -> tuple[str, str]:
    """(prompt text, "checkpoint" or "fallback") for chat ``messages``.

    The checkpoint's ``chat_template`` (tokenizer_config.json) rendered as transformers renders it
    (sandboxed Jinja, ``add_generation_prompt=True``, ``bos_token``/``eos_token``), else the fallback
    ``"{role}: {content}\\n"`` per message followed by ``"assistant:"``.
    """
    try:
        cfg = json.loads((Path(root) / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    template = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:", FALLBACK_TEMPLATE
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in cfg.items()
               if k in ("bos_token", "eos_token")}
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special), "checkpoint"


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list of {role, content}", param="messages")
    out = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # OpenAI's content parts: the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise ApiError(400, f"each message needs a string `role` and `content`; got {m!r}", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


# ---- one request ------------------------------------------------------------------------------


class Engine:
    """The resident parent, the budgets served, and the request checks.

    Args:
        resident: the loaded parent (``ResidentParent``).
        budgets: the budget names served (default: every trained budget); each is resolved now.
        max_context: refuse prompt + ``max_tokens`` above this many tokens.
    """

    def __init__(self, resident, budgets: Iterable[str] | None = None, max_context: int = DEFAULT_MAX_CONTEXT):
        self.resident, self.max_context = resident, max_context
        self.budgets = list(budgets) if budgets else resident.budgets
        for b in self.budgets:
            resident.model(b)  # resolve and build every served budget at start: refusals come before serving
        self.created = int(time.time())

    def model_list(self) -> dict[str, Any]:
        ec = self.resident.ec
        targets = {b.name: b.target_parameters for b in ec.budgets} if ec is not None else {}
        arch = self.resident.ckpt.arch
        # "parameters": what the budget runs (the resolved architecture's count, as `elastic inspect`
        # counts); "target_parameters": what its training aimed at, where the checkpoint says
        return {"object": "list", "data": [
            {"id": b, "object": "model", "created": self.created, "owned_by": "elastic",
             "parameters": self.resident.spec(b)[0].parameters(arch),
             **({"target_parameters": targets[b]} if b in targets else {})}
            for b in self.budgets]}

    def check(self, body: Any) -> tuple[str, int]:
        """(budget, max_tokens) of a request body, or an :class:`ApiError`."""
        if not isinstance(body, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
        model = body.get("model")
        if "think_budget" in body or "answer_budget" in body:
            model = self._answer_model(body)
        if model not in self.budgets:
            raise ApiError(404 if isinstance(model, str) else 400,
                           f"model {model!r} is not served here; the budgets are: {', '.join(self.budgets)}",
                           param="model", code="model_not_found")
        refused = {"temperature": lambda v: v not in (None, 0), "top_p": lambda v: v not in (None, 1),
                   "n": lambda v: v not in (None, 1), "best_of": lambda v: v not in (None, 1),
                   "stop": lambda v: v not in (None, [], ""), "logprobs": lambda v: v not in (None, False, 0),
                   "top_logprobs": lambda v: v not in (None, 0)}
        for key, bad in refused.items():
            if bad(body.get(key)):
                raise ApiError(400, f"`{key}`={body[key]!r} is not supported: this server decodes greedily "
                                    "(temperature 0, one choice, no stop strings or logprobs)", param=key,
                               code="unsupported_parameter")
        limit = self.max_context
        n = body.get("max_tokens", body.get("max_completion_tokens", 16))
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= limit:
            raise ApiError(400, f"`max_tokens` must be an integer from 1 to {limit} (this server's context), "
                                f"got {n!r}", param="max_tokens")
        return model, n

    def _answer_model(self, body: dict[str, Any]) -> str:
        """The answer budget of a budget-control request, checked: both budgets served, ``model`` absent or equal."""
        for key in ("think_budget", "answer_budget"):
            name = body.get(key)
            if name is None:
                raise ApiError(400, "`think_budget` and `answer_budget` go together: give both (or neither, and "
                                    "`model` alone)", param=key)
            if name not in self.budgets:
                raise ApiError(404 if isinstance(name, str) else 400, f"{key} {name!r} is not served here; the "
                               f"budgets are: {', '.join(self.budgets)}", param=key, code="model_not_found")
        model, answer = body.get("model"), body["answer_budget"]
        if model is not None and model != answer:
            raise ApiError(400, f"`model` ({model!r}) must equal `answer_budget` ({answer!r}) or be left out: the "
                                "answer budget is the model that answers", param="model", code="model_mismatch")
        return answer

    def think_plan(self, body: dict[str, Any], max_tokens: int) -> tuple[str, int | None] | None:
        """(think budget, max_think_tokens) of a checked budget-control request; None for a plain one."""
        if "think_budget" not in body:
            return None
        n = body.get("max_think_tokens")
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_tokens):
            raise ApiError(400, f"`max_think_tokens` must be an integer from 1 to max_tokens ({max_tokens}) or "
                                f"absent (think until </think>), got {n!r}", param="max_think_tokens")
        return body["think_budget"], n

    def prompt_tokens(self, prompt: str, max_tokens: int) -> int:
        from elastic.slicer.nn.generate import encode_prompt

        ids, _ = encode_prompt(self.resident.tokenizer, prompt, self.resident.ckpt.arch.vocab_size)
        if len(ids) + max_tokens > self.max_context:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) = "
                                f"{len(ids) + max_tokens} tokens is longer than this server's context of "
                                f"{self.max_context} tokens", param="max_tokens", code="context_length_exceeded")
        return len(ids)

    def run(self, budget: str, prompt: str, max_tokens: int, on_text=None,
            think: tuple[str, int | None] | None = None) -> dict[str, Any]:
        """Greedy generation (queued: one request at a time, ``ResidentParent.lock``); ``think``: (think
        budget, max_think_tokens) to think with that budget and answer with ``budget``."""
        if think is not None:
            r = self.resident.generate_split(think[0], budget, prompt, max_tokens, max_think_tokens=think[1],
                                             on_text=on_text, max_context=self.max_context)
        else:
            r = self.resident.generate(budget, prompt, max_tokens, on_text=on_text, max_context=self.max_context)
        eos = self.resident.tokenizer.eos_id
        finish = "stop" if r["tokens"] and eos is not None and r["tokens"][-1] == eos else "length"
        return {**r, "text": r["text"] or "", "finish_reason": finish}


def usage(r: dict[str, Any]) -> dict[str, Any]:
    return {"prompt_tokens": r["prompt_tokens"], "completion_tokens": r["new_tokens"],
            "total_tokens": r["prompt_tokens"] + r["new_tokens"],
            "budgets": r.get("budgets") or {r["budget"]: r["new_tokens"]}}


# ---- HTTP -------------------------------------------------------------------------------------


def _completion(kind: str, rid: str, budget: str, created: int, r: dict[str, Any]) -> dict[str, Any]:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": r["text"]}, "logprobs": None,
                  "finish_reason": r["finish_reason"]}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": r["text"], "logprobs": None, "finish_reason": r["finish_reason"]}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": budget, "choices": [choice], "usage": usage(r)}


def _chunk(kind: str, rid: str, budget: str, created: int, piece: str | None, finish: str | None,
           first: bool = False) -> dict[str, Any]:
    if kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": piece or ""} if first else \
            ({"content": piece} if piece is not None else {})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": budget, "choices": [choice]}
    choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
    return {"id": rid, "object": "text_completion", "created": created, "model": budget, "choices": [choice]}


def _sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _stream(engine: Engine, kind: str, rid: str, budget: str, prompt: str, max_tokens: int, think=None):
    """SSE events: the text pieces as they decode, a last chunk with finish_reason and usage, [DONE]."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    created, result = int(time.time()), {}

    def work() -> None:
        try:
            result["r"] = engine.run(budget, prompt, max_tokens,
                                     on_text=lambda piece: loop.call_soon_threadsafe(queue.put_nowait, piece),
                                     think=think)
        except Exception as e:  # reported in the stream: the status line has been sent already
            result["error"] = e
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=work, daemon=True).start()
    if kind == "chat":
        yield _sse(_chunk(kind, rid, budget, created, None, None, first=True))
    while (piece := await queue.get()) is not None:
        yield _sse(_chunk(kind, rid, budget, created, piece, None))
    if "error" in result:
        e = result["error"]
        yield _sse(ApiError(500, str(e), kind="server_error").body() if not isinstance(e, ApiError) else e.body())
    else:
        last = _chunk(kind, rid, budget, created, None, result["r"]["finish_reason"])
        yield _sse({**last, "usage": usage(result["r"])})
    yield _sse("[DONE]")


def build_app(engine: Engine):
    """The Starlette app over ``engine`` (see the module docstring for the endpoints)."""
    require_serve()
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    async def health(request: Request):
        return JSONResponse({"status": "ok", "budgets": engine.budgets, "checkpoint": str(engine.resident.root)})

    async def models(request: Request):
        return JSONResponse(engine.model_list())

    async def generate(request: Request, kind: str):
        try:
            try:
                body = json.loads(await request.body())
            except ValueError as e:
                raise ApiError(400, f"the request body is not valid JSON ({e})") from None
            budget, max_tokens = engine.check(body)
            think = engine.think_plan(body, max_tokens)
            headers = {}
            if kind == "chat":
                prompt, source = chat_prompt(engine.resident.root, _messages(body))
                headers["x-elastic-chat-template"] = source
            else:
                prompt = body.get("prompt")
                prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 else prompt
                if not isinstance(prompt, str):
                    raise ApiError(400, "`prompt` must be a string (or a list of one string)", param="prompt")
            engine.prompt_tokens(prompt, max_tokens)
        except ApiError as e:
            return error(e)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.get("stream"):
            return StreamingResponse(_stream(engine, kind, rid, budget, prompt, max_tokens, think),
                                     media_type="text/event-stream", headers=headers)
        try:
            r = await run_in_threadpool(engine.run, budget, prompt, max_tokens, None, think)
        except ElasticError as e:
            return error(ApiError(400, str(e)))
        return JSONResponse(_completion(kind, rid, budget, int(time.time()), r), headers=headers)

    async def completions(request: Request):
        return await generate(request, "text")

    async def chat(request: Request):
        return await generate(request, "chat")

    async def not_found(request: Request, exc):
        return error(ApiError(404, f"no route {request.method} {request.url.path}; the routes are /health, "
                                   "/v1/models, /v1/completions, /v1/chat/completions", code="not_found"))

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def serve(root: str | Path, *, host: str = "127.0.0.1", port: int = 8000, budgets: Iterable[str] | None = None,
          max_context: int = DEFAULT_MAX_CONTEXT, on_ready=None, allow_off_curve: bool = False,
          device: str = "cpu") -> None:
    """Load ``root`` once and serve its budgets until interrupted (uvicorn; blocks).

    Args:
        budgets: the budget names to serve (default: every trained budget of elastic_config.json).
        on_ready: called with the :class:`Engine` once the parent is loaded, before serving.
        allow_off_curve: serve a size the checkpoint's size curve measured outside its trained
            neighbours (refused at start otherwise, as ``elastic slice`` refuses it).
        device: where the parent lives and every budget runs ("cpu", "cuda").

    Raises:
        MissingDependencyError: starlette or uvicorn is not installed (``pip install 'elastic[serve]'``).
        ElasticError: the checkpoint does not load, or a budget does not resolve.
    """
    require_serve()
    import uvicorn

    from elastic.slicer.nn.budget import ResidentParent

    engine = Engine(ResidentParent(root, allow_off_curve=allow_off_curve, device=device), budgets, max_context)
    if on_ready is not None:
        on_ready(engine)
    uvicorn.run(build_app(engine), host=host, port=port, log_level="warning")
