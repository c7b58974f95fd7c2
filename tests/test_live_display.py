"""What `run` shows: a live table under a terminal (a real pseudo-terminal), plain lines otherwise,
a summary at the end; and stage output that reaches logs/ as it is printed, in order."""
from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, TINY, require_bwrap, run_cli, write_pipeline

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


@pytest.fixture(autouse=True)
def _bwrap():
    require_bwrap()


def run_in_pty(*args: str, timeout: float = 300) -> tuple[int, str]:
    """The CLI with a pseudo-terminal as stdout and stderr, as in an interactive shell; (status, screen text)."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "50"}
    env.pop("CI", None)  # rich treats CI as no terminal
    proc = subprocess.Popen([sys.executable, "-m", "pipcook_sandbox", *args], stdin=slave, stdout=slave,
                            stderr=slave, cwd=REPO, env=env, close_fds=True)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
        assert time.monotonic() < deadline, "run did not finish"
    os.close(master)
    return proc.wait(timeout=30), b"".join(chunks).decode("utf-8", "replace")


def test_live_display_under_a_terminal(tmp_path):
    out = tmp_path / "ws"
    code, raw = run_in_pty("run", str(TINY / "pipeline.json"), "-o", str(out))
    screen = ANSI.sub("", raw)
    assert code == 0, screen
    assert "\x1b[" in raw  # drawn as a live table, not plain lines
    lines = screen.splitlines()
    # the workspace line stands alone, never glued to a bar
    assert any(line.strip() == f"workspace: {out}" for line in lines), screen
    table = [line for line in lines if line.lstrip().startswith(("datasource ", "dataflow-1 ", "model "))]
    assert {line.split()[0] for line in table} == {"datasource", "dataflow-1", "model"}
    model_rows = [line for line in table if line.split()[0] == "model" and "epoch 3" in line]
    assert model_rows and "accuracy=" in model_rows[-1] and "100%" in model_rows[-1]
    assert ", epoch" not in screen  # the stray comma of the old bar
    # the summary: per-stage wall time and samples, final metrics, where things are
    summary = screen[screen.rindex("summary"):]
    assert re.search(r"datasource\s+done\s+[\d.]+s\s+480", summary), summary  # 160 train + 40 test, 3 epochs... sent
    assert "final metrics: accuracy=" in summary
    for what in ("model:", "logs:", "report:", "artifact:"):
        assert what in summary
    assert str(out / "report.html") in summary


def test_plain_lines_without_a_terminal(tmp_path):
    proc = run_cli("run", str(TINY / "pipeline.json"), "-o", str(tmp_path / "ws"))
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" not in proc.stderr  # a log file gets no escape sequences
    lines = proc.stderr.splitlines()
    assert "[model] started" in lines
    assert any(re.fullmatch(r"\[model\] 100%  epoch 3  accuracy=0\.\d+  samples=160", line) for line in lines), lines
    assert any(re.fullmatch(r"\[datasource\] done after [\d.]+s, \d+ samples sent", line) for line in lines), lines
    assert ", epoch" not in proc.stderr
    assert "summary" in proc.stderr and "final metrics: accuracy=" in proc.stderr


CHATTY_MODEL = '''
import sys, time
def train(runtime, options, ctx):
    print("out-1")
    print("err-2", file=sys.stderr)
    print("out-3")
    runtime.notify_progress(5.0, phase="printed")
    time.sleep(600)
'''


def test_stage_output_reaches_logs_while_it_runs_and_in_order(tmp_path):
    pipeline = write_pipeline(tmp_path / "p", model=CHATTY_MODEL)
    log = tmp_path / "ws" / "logs" / "model.log"
    proc = subprocess.Popen([sys.executable, "-m", "pipcook_sandbox", "run", str(pipeline), "-o", str(tmp_path / "ws")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not (log.is_file() and "out-3" in log.read_text()):
            assert proc.poll() is None, "the run ended before the output showed"
            assert time.monotonic() < deadline, log.read_text() if log.is_file() else "no log"
            time.sleep(0.1)
        assert proc.poll() is None  # the stage is still running: the lines came unbuffered
        text = log.read_text()
        assert text.index("out-1") < text.index("err-2") < text.index("out-3")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


# Visible text first: the display cuts long names, and the summary's "final metrics" line
# (always printed) must still show the kept, harmless text whatever the live table caught.
ESCAPES = "FAKE[bold]\x1b]52;c;cHduZWQ=\x07\x1b[2J\x1b[31mFAKE\x1b[0m\r\x9b1m\u202eevil"


def test_the_live_table_shows_what_a_stage_chose_inert(tmp_path):
    """Metric names and progress extras are the script's: terminal escapes in them (clipboard write,
    screen clear, colours, bidi override) and rich markup must not reach the terminal as such."""
    model = f'''
def train(runtime, options, ctx):
    runtime.notify_progress(50, **{{"epoch": 1, {ESCAPES!r}: {ESCAPES!r}}})
    runtime.log_metrics(step=1, **{{{ESCAPES!r}: 1.0}})
    runtime.notify_progress(100, note={ESCAPES!r})
'''
    pipeline = write_pipeline(tmp_path / "p", model=model)
    code, raw = run_in_pty("run", str(pipeline), "-o", str(tmp_path / "ws"))
    assert code == 0, raw[-3000:]
    for bad in ("\x1b]52", "\x1b[2J", "\x1b[31mFAKE", "\x9b", "\u202e", "\x07"):
        assert bad not in raw, (repr(bad), raw[-2000:])
    assert "FAKE" in raw and "[bold]" in raw  # the text is kept, made harmless, markup not applied
