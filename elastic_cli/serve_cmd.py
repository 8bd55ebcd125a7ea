"""``elastic serve``: an OpenAI-compatible HTTP server over one resident elastic parent."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from elastic.export.serve import DEFAULT_MAX_CONTEXT

from .common import CheckpointOpt, boundary


def serve(
    checkpoint: CheckpointOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.", min=1, max=65535)] = 8000,
    budgets: Annotated[Optional[list[str]], typer.Option("--budgets", help="A budget to serve (repeat "
                                                         "for several). Default: every trained budget.",
                                                         show_default=False)] = None,
    max_context: Annotated[int, typer.Option("--max-context", help="Refuse requests whose prompt + max_tokens "
                                             "is longer than this.", min=1)] = DEFAULT_MAX_CONTEXT,
    allow_off_curve: Annotated[bool, typer.Option("--allow-off-curve", help="Serve a size between the trained "
                                                  "budgets even where the checkpoint's size_curve.json measured "
                                                  "it outside its trained neighbours.")] = False,
    device: Annotated[str, typer.Option("--device", help="Where the parent lives and every budget runs: cpu, "
                                        "cuda or cuda:N (a CUDA build of PyTorch).")] = "cpu",
) -> None:
    """Serve every budget of one elastic checkpoint from one copy of its weights (OpenAI API).

    The request's `model` names a budget (GET /v1/models lists them); each runs on views of the
    parent's tensors. Greedy decoding, one request at a time. Needs the serve extra (starlette, uvicorn).

    Examples:

      elastic serve -c ./elastic-ckpt --port 8000

      elastic serve -c ./elastic-ckpt --device cuda --budgets 50% --budgets 100%

      curl localhost:8000/v1/completions -d '{"model": "50%", "prompt": "Hello", "max_tokens": 16}'
    """
    from elastic.export.serve import serve as run
    from elastic.slicer.planning.describe import default_checkpoint

    def ready(engine) -> None:
        typer.echo(f"serving {', '.join(engine.budgets)} of {engine.resident.root} on http://{host}:{port}/v1 "
                   "(greedy, one request at a time; Ctrl-C stops)", err=True)

    with boundary():
        run(checkpoint or default_checkpoint(), host=host, port=port, budgets=budgets or None,
            max_context=max_context, on_ready=ready, allow_off_curve=allow_off_curve, device=device)
