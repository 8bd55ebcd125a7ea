"""``elastic tui``: an interactive budget chooser (Textual). Importing this package imports neither
textual nor torch; the command imports them when it runs."""

from __future__ import annotations

from ..common import CheckpointOpt, boundary
from ..plan_cmd import TargetOpt


def build_app(checkpoint=None, target: str | None = None):
    """The app for ``checkpoint`` (default: as every command finds it) planned for ``target`` (a
    profile name; None detects this machine).

    Raises:
        MissingDependencyError: textual is not installed.
        ElasticError / ProfileError: what `elastic plan` raises for the same checkpoint and target.
    """
    try:
        import textual  # noqa: F401
    except ImportError:
        from elastic.slicer.errors import MissingDependencyError

        raise MissingDependencyError('the TUI needs textual: pip install -e ".[tui]"') from None
    from elastic.profiles.devices import load_profiles

    from .app import ElasticApp
    from .planner import HERE, Choice, Planner

    planner = Planner(checkpoint)
    choice = Choice(target=HERE if target is None else target.strip().lower())
    planner.plan(choice)  # fail here, with the CLI's message, rather than inside the app
    return ElasticApp(planner, choice, list(load_profiles()))


def tui(checkpoint: CheckpointOpt = None, target: TargetOpt = None) -> None:
    """Choose a budget interactively: the memory table, live, for this machine or any profile.

    Change target, context, batch and dtype and the table follows; the largest budget that fits is
    preselected; slice the one you pick. Needs the tui extra, which installs textual:
    pip install -e ".\\[tui]" in a clone, pip install "elastic\\[tui]" otherwise.

    Keys: s slice, c cancel, +/- context, tab between controls, q quit.

    Examples:

      elastic tui

      elastic tui -c ./Nemotron-Elastic-12B --target orin-nano-8gb
    """
    with boundary():
        app = build_app(checkpoint, target)  # bad input is said first, as `elastic plan` says it
        _require_terminal()
    app.run()


def _require_terminal() -> None:
    """The TUI reads keys from a terminal: refuse (exit 2) rather than wait on a pipe or a file."""
    import sys

    from elastic.slicer.errors import ElasticError

    missing = [name for name, stream in (("input", sys.stdin), ("output", sys.stdout))
               if stream is None or not stream.isatty()]
    if missing:
        raise ElasticError(f"the TUI needs a terminal, and its standard {' and '.join(missing)} "
                           f"{'is' if len(missing) == 1 else 'are'} not one; in a script use "
                           "`elastic plan` (the same table, --json for scripts) or `elastic fit-my-gpu`")
