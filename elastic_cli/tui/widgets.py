"""The TUI's widgets: the plan controls and the budget table. Each posts one small message."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import DataTable, Input, Label, Select

from .planner import COLUMNS, DTYPES, HERE, Choice, budget_rows


class Controls(Horizontal):
    """Target, context, batch and dtype on one line. Posts ``Controls.Changed`` on every edit."""

    DEFAULT_CSS = """
    Controls { height: 1; }
    Controls Label { width: auto; margin-right: 1; }
    Controls Select, Controls Input { margin-right: 1; }
    Controls #target { width: 22; }
    Controls #context { width: 9; }
    Controls #batch { width: 5; }
    Controls #dtype { width: 12; }
    """

    @dataclass
    class Changed(Message):
        choice: Choice | None  # None while a field holds no valid value
        problem: str | None = None  # what is wrong with it, for people

    def __init__(self, choice: Choice, profiles: list[str], **kwargs):
        super().__init__(**kwargs)
        self._initial, self._profiles = choice, profiles

    def compose(self) -> ComposeResult:
        c = self._initial
        yield Label("target")
        yield Select([(n, n) for n in (HERE, *self._profiles)], value=c.target, allow_blank=False, compact=True,
                     id="target")
        yield Label("context")
        yield Input(str(c.context), type="integer", compact=True, id="context")
        yield Label("batch")
        yield Input(str(c.batch), type="integer", compact=True, id="batch")
        yield Label("dtype")
        yield Select([(d, d) for d in DTYPES], value=c.dtype, allow_blank=False, compact=True, id="dtype")

    def read(self) -> tuple[Choice | None, str | None]:
        """The choice the fields hold now, or None and why not."""
        numbers = {}
        for key in ("context", "batch"):
            text = self.query_one(f"#{key}", Input).value.strip()
            if not text.isdigit() or int(text) < 1:
                return None, f"{key} must be a whole number >= 1"
            numbers[key] = int(text)
        return Choice(target=self.query_one("#target", Select).value, dtype=self.query_one("#dtype", Select).value,
                      **numbers), None

    def set_context(self, tokens: int) -> None:
        self.query_one("#context", Input).value = str(tokens)  # posts Input.Changed -> Controls.Changed

    @on(Input.Changed)
    @on(Select.Changed)
    def _edited(self, event: Message) -> None:
        event.stop()
        self.post_message(self.Changed(*self.read()))


class BudgetTable(DataTable):
    """One row per budget, the numbers of `elastic plan`. Posts ``BudgetTable.Selected`` when the
    cursor moves; ``show`` puts the cursor on the plan's chosen budget."""

    DEFAULT_CSS = "BudgetTable { height: auto; max-height: 9; }"

    @dataclass
    class Selected(Message):
        budget: str

    def on_mount(self) -> None:
        self.cursor_type = "row"
        for c in COLUMNS:
            self.add_column(c if c in ("budget", "fits") else Text(c, justify="right"), key=c)

    def show(self, p) -> str:
        """Fill the table from plan ``p`` (a ``Plan``); returns the unit of its numbers."""
        unit, rows = budget_rows(p)
        self.clear()
        for row in rows:
            self.add_row(row[0], *(Text(v, justify="right") for v in row[1:-1]), row[-1], key=row[0])
        names = [r[0] for r in rows]
        self.move_cursor(row=names.index(p.chosen) if p.chosen in names else 0)
        return unit

    def cell(self, budget: str, column: str) -> str:
        """The text of one cell (for tests and screen readers)."""
        return str(self.get_cell(budget, column))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        if event.row_key.value is not None:
            self.post_message(self.Selected(event.row_key.value))
