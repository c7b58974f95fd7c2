"""What `run` shows while it trains: a live table of every stage on a terminal, plain lines otherwise,
and a summary at the end.

The orchestrator reports every stage event as data (`ExecOptions.on_record`);
`Tracker` keeps the latest state of each stage, and the displays only read
it. Everything a stage chose (metric names, progress extras) is escaped with
`control.shown` before it reaches the terminal: a script must not be able to
write terminal escape sequences onto the operator's screen.
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .control import shown
from .inert import inert

if TYPE_CHECKING:  # rich costs ~0.09 s to import: only a TTY's live table and the summary need it
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

MAX_SHOWN = 4  # metrics per stage in the live table (the summary and the report have them all)


def fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return shown(value, 40)
    return str(value)


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds + 0.5), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


@dataclass
class StageState:
    name: str
    started: float | None = None
    ended: float | None = None
    code: int | None = None
    serving: bool = False
    done: bool = False
    samples: int = 0
    progress: float | None = None
    extra: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # latest value of each metric
    recent: dict = field(default_factory=dict)  # the metrics of the latest log_metrics call: what the table shows
    # (time, value) of the first progress report above 0: the ETA is measured from there, not from the
    # stage's start, which includes importing the framework and building the model
    first_progress: tuple[float, float] | None = None
    last_progress: tuple[float, float] | None = None

    @property
    def wall(self) -> float | None:
        if self.started is None:
            return None
        return (self.ended or time.monotonic()) - self.started

    @property
    def status(self) -> str:
        if self.ended is not None:
            return "done" if self.code == 0 else f"exit {self.code}"
        if self.started is None:
            return "waiting"
        if self.done:
            return "finished"
        return "serving" if self.serving else "running"

    def eta(self) -> float | None:
        if self.first_progress is None or self.last_progress is None or self.ended is not None:
            return None
        (t0, v0), (t1, v1) = self.first_progress, self.last_progress
        if v1 <= v0 or v1 >= 100:
            return None
        rate = (v1 - v0) / max(t1 - t0, 1e-6)
        left = (100 - v1) / rate - (time.monotonic() - t1)
        return left if left > 0 else None  # overdue: the rate no longer tells, so say nothing

    def details(self) -> str:
        """'epoch 3/10  loss=0.41 accuracy=0.88' from the latest progress extras and metrics."""
        parts = []
        extra = dict(self.extra)
        epoch, epochs = extra.pop("epoch", None), extra.pop("epochs", None)
        if epoch is not None:
            parts.append(f"epoch {fmt_value(epoch)}" + (f"/{fmt_value(epochs)}" if epochs is not None else ""))
        parts += [f"{shown(k, 24)}={fmt_value(v)}" for k, v in extra.items()]
        parts += [f"{shown(k, 24)}={fmt_value(v)}" for k, v in list(self.recent.items())[:MAX_SHOWN] if v is not None]
        return "  ".join(parts)


class Tracker:
    """The latest state of every stage of one run, fed by the orchestrator's `on_record`."""

    def __init__(self) -> None:
        self.stages: dict[str, StageState] = {}
        self.started = time.monotonic()
        self.ended: float | None = None
        self.workspace: Path | None = None
        self.artifacts: list[Path] = []
        self.lock = threading.Lock()

    def stage(self, name: str) -> StageState:
        with self.lock:
            if name not in self.stages:
                self.stages[name] = StageState(shown(name, 40))
            return self.stages[name]

    def record(self, name: str, op: str, data: dict) -> None:
        now = time.monotonic()
        st = self.stage(name)
        if op == "started":
            st.started = now
        elif op == "exited":
            st.ended, st.code = now, data.get("code")
        elif op == "serving":
            st.serving = True
        elif op == "done":
            st.done = True
        elif op == "moved":
            st.samples = int(data.get("samples") or 0)
        elif op == "progress":
            value = float(data.get("value") or 0.0)
            st.progress = value
            st.extra = {shown(str(k), 24): v for k, v in (data.get("extra") or {}).items()}
            if value > 0 and st.first_progress is None:
                st.first_progress = (now, value)
            st.last_progress = (now, value)
        elif op == "metrics":
            st.recent = {}
            for key, value in (data.get("metrics") or {}).items():
                st.metrics[shown(str(key), 24)] = st.recent[shown(str(key), 24)] = value

    def final_metrics(self) -> dict:
        """The last value of every metric any stage logged (the model's, in practice)."""
        out: dict = {}
        for st in self.stages.values():
            out.update({k: v for k, v in st.metrics.items() if v is not None})
        return out


class Display:
    """A live table under a TTY (rich), plain lines otherwise; `log` prints above the table."""

    def __init__(self, tracker: Tracker, stream: IO[str] | None = None, live: bool | None = None,
                 debug: bool = False) -> None:
        self.tracker = tracker
        self.stream = stream or sys.stderr
        self.is_live = self.stream.isatty() if live is None else live
        self.debug = debug
        self._console: Console | None = None
        self._live: Live | None = None
        self._wanted = False
        self._last_line: dict[str, float] = {}

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(file=self.stream, force_terminal=self.is_live or None, highlight=False,
                                    soft_wrap=not self.is_live)
        return self._console

    # -- the hooks the runner calls
    def start(self) -> None:
        """Draw the live table from the first stage event on: a pipeline refused before any stage
        starts gets its error alone, without an empty table above it."""
        self._wanted = self.is_live

    def _ensure_live(self) -> None:
        if self._wanted and self._live is None:
            from rich.live import Live

            self._wanted = False
            self._live = Live(self._table(), console=self.console, refresh_per_second=4, transient=False,
                              get_renderable=self._table)
            self._live.start()

    def log(self, message: str) -> None:
        if not self.is_live:  # plain lines: what rich's print gives there, without importing rich
            self.stream.write(inert(message) + "\n")  # quotes pipeline text: runner/inert.py
            self.stream.flush()
            return
        from rich.text import Text

        # a line of its own above the live table: never glued to it
        self.console.print(Text(inert(message)), soft_wrap=True)

    def record(self, name: str, op: str, data: dict) -> None:
        self.tracker.record(name, op, data)
        self._ensure_live()
        if not self.is_live:
            self._plain(name, op)

    def event(self, name: str, what: str) -> None:
        """The orchestrator's text events: only with --debug (start/exit are in the table already)."""
        if self.debug:
            self.log(f"[{shown(name, 40)}] {shown(what, 2000)}")

    def close(self) -> None:
        if self._live is not None:
            self._live.update(self._table(), refresh=True)
            self._live.stop()
            self._live = None

    # -- plain lines (logs, CI)
    def _plain(self, name: str, op: str) -> None:
        st = self.tracker.stages[shown(name, 40)]
        if op == "started":
            self.log(f"[{st.name}] started")
        elif op == "exited":
            moved = f", {st.samples} samples sent" if st.samples else ""
            self.log(f"[{st.name}] {st.status} after {fmt_seconds(st.wall)}{moved}")
        elif op == "progress" and st.progress is not None:
            step = self._last_line.get(st.name, -10.0)
            if st.progress >= step + 10 or (st.progress >= 100 > step):
                self._last_line[st.name] = st.progress
                eta = st.eta()
                tail = f"  eta {fmt_seconds(eta)}" if eta is not None else ""
                self.log(f"[{st.name}] {st.progress:.0f}%  {st.details()}{tail}".rstrip())

    # -- the live table
    def _table(self) -> Table:
        from rich import box
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        table = Table(box=box.SIMPLE_HEAD, expand=False, pad_edge=False)
        # fixed columns keep their width; only "latest" (metrics) is cut when the terminal is narrow
        for column, width in (("stage", 10), ("status", 8), ("time", 6), ("samples", 7), ("progress", 17),
                              ("eta", 6)):
            table.add_column(column, no_wrap=True, min_width=width,
                             justify="right" if column in ("time", "samples") else "left")
        table.add_column("latest", no_wrap=True, overflow="ellipsis", ratio=1)
        for st in list(self.tracker.stages.values()):
            bar: Any = ""
            if st.progress is not None:  # one cell: a bar and its percentage stay together at any width
                bar = Table.grid(padding=(0, 1))
                bar.add_row(ProgressBar(total=100, completed=st.progress, width=12), f"{st.progress:3.0f}%")
            eta = st.eta()
            style = {"done": "green", "running": "cyan", "serving": "blue"}.get(st.status, "red" if st.ended else "")
            table.add_row(Text(st.name), Text(st.status, style=style), fmt_seconds(st.wall),
                          str(st.samples) if st.samples else "", bar,
                          fmt_seconds(eta) if eta is not None else "", Text(st.details()))
        return table

    # -- the end
    def summary(self, ws: Any = None, report: Path | None = None, failed: bool = False) -> None:
        tracker = self.tracker
        title = "summary" if not failed else "summary (the run failed)"
        header = ("stage", "result", "wall time", "samples sent")
        rows = [(st.name, st.status, fmt_seconds(st.wall), str(st.samples) if st.samples else "-")
                for st in tracker.stages.values()]
        lines = []
        metrics = tracker.final_metrics()
        if metrics:
            lines.append("final metrics: " + "  ".join(f"{k}={fmt_value(v)}" for k, v in metrics.items()))
        if ws is not None:
            lines.append(f"workspace:     {ws.root}")
            if not failed:
                lines.append(f"model:         {ws.model}")
            lines.append(f"logs:          {ws.logs}")
        lines += [inert(f"artifact:      {path}") for path in tracker.artifacts]  # its name came from the pipeline
        if report is not None:
            lines.append(f"report:        {report}")
        if self.is_live:
            self._rich_summary(title, header, rows, lines)
            return
        # Plain text where there is no terminal (logs, CI): the same table without importing rich.
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

        def row(cells: tuple[str, ...]) -> str:
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        table = [title, row(header), "  ".join("-" * w for w in widths), *map(row, rows)]
        self.stream.write("\n".join([*table, "", *lines]) + "\n")
        self.stream.flush()

    def _rich_summary(self, title: str, header: tuple[str, ...], rows: Sequence[tuple[str, ...]],
                      lines: list[str]) -> None:
        from rich import box
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
        for column in header:
            table.add_column(column, justify="right" if column != "stage" else "left")
        for r in rows:
            table.add_row(*r)
        self.console.print(Group(table, *(Text(line) for line in lines)))
