"""The ``elastic`` console script. Commands import their libraries lazily: ``--help`` stays fast
and never imports torch."""

from __future__ import annotations

import typer

from .eval_cmd import eval_
from .export_cmd import export
from .generate_cmd import generate
from .inspect_cmd import inspect
from .plan_cmd import fit_my_gpu, plan, profiles_
from .serve_cmd import serve
from .slice_cmd import slice_
from .tui import tui
from .train_cmd import train

app = typer.Typer(
    name="elastic",
    help="Deploy elastic Nemotron-H models to edge GPUs: inspect a checkpoint, cut the nested model "
    "that fits your GPU, export it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version as v

        typer.echo(f"elastic {v('elastic')}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                 callback=_version, expose_value=True),
) -> None:
    """Deploy elastic Nemotron-H models to edge GPUs.

    Set ELASTIC_DEBUG=1 to see tracebacks instead of one-line errors.
    """


app.command(name="fit-my-gpu")(fit_my_gpu)
app.command(name="plan")(plan)
app.command(name="slice")(slice_)
app.command(name="inspect")(inspect)
app.command(name="profiles")(profiles_)
app.command(name="export")(export)
app.command(name="generate")(generate)
app.command(name="serve")(serve)
app.command(name="eval")(eval_)
app.command(name="tui")(tui)
app.command(name="train")(train)


def main() -> None:
    import sys

    if "--json" not in sys.argv[1:]:
        app()
        return
    # --json: a usage error (a bad option value) is one JSON object on stdout too, as every other error
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        sys.exit(130)
    except typer.TyperException as e:  # typer's usage errors (its own click underneath)
        from elastic.slicer.errors import ElasticError

        from .common import fail

        message = e.format_message() if hasattr(e, "format_message") else str(e)
        try:
            fail(ElasticError(message), code=getattr(e, "exit_code", 2), json_out=True)
        except typer.Exit as done:
            sys.exit(done.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
