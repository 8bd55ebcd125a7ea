"""``elastic tui``: the budget chooser. One screen: device, controls, the budget table, a progress
bar and a log. Slicing runs in a thread worker that reports by message and can be cancelled."""

from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import Footer, Input, Label, ProgressBar, RichLog, Select, Static

from elastic.slicer.errors import ElasticError

from ..common import debug
import elastic.cli.tui.planner as pl  # the module, not its names: tests patch them there
from .widgets import BudgetTable, Controls


@dataclass
class JobProgress(Message):
    stage: str  # what the job is doing ("slice", an export stage, "smoke test")
    done: int  # in the stage's unit: bytes written so far, tensors, engines
    total: int | None  # the stage's size in that unit; None: a stage of unknown size
    message: str | None = None  # the library's sentence about the stage, if it gave one


@dataclass
class JobDone(Message):
    outcome: str  # "done" | "cancelled" | "error"
    lines: list[str]  # the report, for the log


class Cancelled(Exception):
    """Raised inside the library's progress callback to stop a cancelled job (the library then
    removes what it had written)."""


class ElasticApp(App):
    """The budget chooser for ``planner``'s checkpoint, starting from ``choice``."""

    TITLE = "elastic tui"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #title { text-style: bold; }
    #outrow { height: 1; margin-bottom: 1; }
    #outrow Label { width: auto; margin-right: 1; }
    #out { width: 1fr; margin-right: 1; }
    #force { width: 11; }
    #summary, #selected { height: auto; }
    #jobrow { height: 1; }
    #state { width: auto; margin-right: 1; }
    #log { height: 1fr; min-height: 3; border-top: solid $secondary; }
    """
    BINDINGS: ClassVar = [
        Binding("s", "run('slice')", "slice"),
        Binding("e", "run('export')", "export"),
        Binding("b", "run('both')", "both"),
        Binding("c", "cancel", "cancel"),
        Binding("plus", "context(2)", "ctx x2", key_display="+"),
        Binding("minus", "context(-2)", "ctx /2", key_display="-"),
        Binding("q", "quit", "quit"),
        Binding("escape", "focus_table", "table", show=False),
    ]

    def __init__(self, planner: pl.Planner, choice: pl.Choice, profiles: list[str]):
        super().__init__()
        self.planner, self.choice, self.profiles = planner, choice, profiles
        self.plan = None  # the current elastic.slicer.planning.fit.Plan
        self._stage_shown, self.job_action = ("", None), ""
        self.budget: str | None = None  # the row under the cursor
        # the running job's cancel flag, until its JobDone arrives. A flag rather than
        # Worker.cancel: that ends the worker at once while its thread runs on, and cancels a
        # thread that has not started yet without a word
        self.job: threading.Event | None = None
        self._target_shown: str | None = None
        self.logged: list[str] = []  # every line written to the log, as plain text

    def compose(self) -> ComposeResult:
        yield Static(pl.checkpoint_line(self.planner), id="title")
        yield Static(id="device")
        yield Controls(self.choice, self.profiles)
        with Horizontal(id="outrow"):
            yield Label("out")
            yield Input(placeholder="elastic-model-<budget>", compact=True, id="out")
            yield Label("if it exists")
            yield Select([("refuse", False), ("replace", True)], value=False, allow_blank=False, compact=True,
                         id="force")
        yield BudgetTable(id="budgets")
        yield Static(id="summary")
        yield Static(id="selected")
        with Horizontal(id="jobrow"):
            yield Label("job: idle", id="state")
            yield ProgressBar(total=1, show_eta=False, id="bar")
        yield RichLog(wrap=True, min_width=20, id="log")
        yield Footer()

    def on_mount(self) -> None:
        self.replan(self.choice)
        if pl.unavailable("export"):
            self.say(pl.EXPORT_MISSING)
        self.query_one(BudgetTable).focus()

    # ---- planning ------------------------------------------------------------------------------

    def replan(self, choice: pl.Choice) -> None:
        try:
            p = self.planner.plan(choice)
        except ElasticError as e:
            self.query_one("#summary", Static).update(pl.error_text(e))
            return
        self.choice, self.plan = choice, p
        self.query_one("#device", Static).update(pl.device_line(p))
        unit = self.query_one(BudgetTable).show(p)
        self.query_one("#summary", Static).update("\n".join(pl.summary_lines(p, unit)))
        if choice.target != self._target_shown:  # the target's notes once, not on every keystroke
            self._target_shown = choice.target
            self.say(*(f"target: {n}" for n in p.target.notes))

    def on_controls_changed(self, event: Controls.Changed) -> None:
        if event.choice is None:
            self.query_one("#summary", Static).update(f"{event.problem}; the table shows the last valid plan")
        elif event.choice != self.choice or self.plan is None:
            self.replan(event.choice)

    def on_budget_table_selected(self, event: BudgetTable.Selected) -> None:
        self.budget = event.budget
        self.show_selected()

    @on(Input.Changed, "#out")
    def show_selected(self) -> None:
        if self.budget is not None:
            self.query_one("#selected", Static).update(
                f"selected {self.budget} -> {self.out_path()}   s: slice it")

    def out_path(self) -> Path:
        text = self.query_one("#out", Input).value.strip()
        return Path(text).expanduser() if text else pl.default_out(self.budget or "")

    # ---- actions -------------------------------------------------------------------------------

    def action_context(self, factor: int) -> None:
        tokens = self.choice.context * factor if factor > 0 else max(1, self.choice.context // -factor)
        self.query_one(Controls).set_context(tokens)

    def action_focus_table(self) -> None:
        self.query_one(BudgetTable).focus()

    def action_run(self, action: str) -> None:
        why = pl.unavailable(action)
        if why:
            self.notify(why, severity="warning")
            self.say(why)
        elif self.job is not None:
            self.notify("a job is running: press c to cancel it first", severity="warning")
        elif self.plan is None or self.budget is None:
            self.notify("no valid plan to act on", severity="warning")
        else:
            out, force = self.out_path(), self.query_one("#force", Select).value
            self.say(f"{action} {self.budget} -> {out}")
            self.set_state(f"{action} {self.budget}")
            self.job_action, self._stage_shown = f"{action} {self.budget}", ("", None)
            self.query_one("#bar", ProgressBar).update(total=None, progress=0)
            self.job = threading.Event()
            self.run_job(action, self.plan, self.budget, out, force, self.job)

    def action_cancel(self) -> None:
        if self.job is None:
            self.notify("nothing to cancel")
            return
        self.job.set()
        self.set_state("cancelling")
        self.say("cancelling ...")

    def on_unmount(self) -> None:
        if self.job is not None:  # quitting mid-job: stop the thread at its next progress report
            self.job.set()

    @work(thread=True, exit_on_error=False, group="job")
    def run_job(self, action: str, p, budget: str, out: Path, force: bool, cancel: threading.Event) -> None:
        def progress(stage: str, done: int, total: int | None, /, message: str | None = None, **_) -> None:
            if cancel.is_set():
                raise Cancelled
            self.post_message(JobProgress(stage, done, total, message))

        try:
            done = JobDone("done", pl.run_action(action, p, budget, out, force, progress))
        except Cancelled:
            done = JobDone("cancelled", [f"cancelled: nothing was written to {out}"])
        except ElasticError as e:
            done = JobDone("error", pl.error_text(e).splitlines())
        except Exception as e:  # noqa: BLE001 (a bug: say so rather than leave the job hanging)
            done = JobDone("error", [f"error: unexpected {type(e).__name__}: {e} (a bug; please report it)",
                                     *(traceback.format_exc().splitlines() if debug() else [])])
        self.post_message(done)

    def on_job_progress(self, event: JobProgress) -> None:
        self.query_one("#bar", ProgressBar).update(total=event.total, progress=event.done)
        stage, message = self._stage_shown
        if event.stage != stage or (event.message and event.message != message):  # the library's own stages
            self._stage_shown = (event.stage, event.message or message)
            self.set_state(f"{self.job_action}: {event.stage}")
            if event.total is None or event.message:  # a stage without a size, or with a sentence: log it too
                self.say(f"  {event.message or event.stage}")

    def on_job_done(self, event: JobDone) -> None:
        self.job = None
        self.set_state(event.outcome)
        self.say(*event.lines)
        head = event.lines[0] if event.lines else event.outcome
        self.notify(head, severity="error" if event.outcome == "error" else "information")

    def set_state(self, text: str) -> None:
        self.query_one("#state", Label).update(f"job: {text}")

    def say(self, *lines: str) -> None:
        log = self.query_one("#log", RichLog)
        for line in lines:
            self.logged.append(line)
            log.write(line)
