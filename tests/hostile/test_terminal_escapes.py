"""Nothing a pipeline or a stage chooses drives the operator's terminal.

Every message path that quotes such text is attacked with the same payload:
OSC 52 (writes the clipboard), OSC 0 (sets the window title), CSI (clears
the screen), the 8-bit C1 CSI, a bidi override, and a carriage return plus
erase-line that would rewrite the line into a fake `done:`. Whatever the
runner prints must hold none of them raw (every Unicode Cc, Cf, Zl and Zp
character but newline and tab is written as a visible escape), and the
escaped form must be there, so the path was really taken.
"""
from __future__ import annotations

import json
import unicodedata

import pytest
from conftest import run_cli, write_pipeline

from .attack import limit_args, run_attack
from .conftest import require_backend

pytestmark = pytest.mark.hostile
# These runs must succeed (or fail for the attack's reason) on a busy shared host: a long stage timeout.
SLOW_HOST = limit_args(timeout="120")

PAYLOAD = "\x1b]52;c;cHduZWQ=\x07\x1b]0;owned\x07\x1b[2J\x9b31m\u202eevil\r\x1b[2Kdone: fake"


def assert_inert(text: str) -> None:
    raw = sorted({f"U+{ord(c):04X}" for c in text
                  if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") and c not in "\n\t"})
    assert not raw, f"raw control characters reached the terminal: {raw}\n{text[-3000:]!r}"
    assert "\\x1b]52" in text or "\\u001b]52" in text, f"the payload never came through this path:\n{text[-3000:]}"


@pytest.fixture
def bwrap() -> str:
    require_backend("bwrap")
    return "bwrap"


LEAVES_A_LINK = f'''
import os

def train(runtime, options, ctx):
    os.symlink("/etc/passwd", os.path.join(runtime.read_model(), {PAYLOAD!r}))
    with open(os.path.join(runtime.read_model(), "w.txt"), "w") as f:
        f.write("1")
'''


def test_file_names_left_in_model_dir(tmp_path, isolation):
    attack = run_attack(tmp_path, isolation, model=LEAVES_A_LINK, limits=SLOW_HOST)
    assert attack.returncode == 0, attack.describe()
    assert_inert(attack.output)


def test_artifact_target(tmp_path, bwrap):
    attack = run_attack(tmp_path, bwrap, extra={"artifact": [{"processor": "zip", "target": f"/x/{PAYLOAD}.zip"}]}, limits=SLOW_HOST)
    assert attack.returncode == 0, attack.describe()
    assert_inert(attack.output)


def test_script_name_in_an_error(tmp_path, bwrap):
    root = tmp_path / "p"
    pipeline = write_pipeline(root)
    name = "x" + PAYLOAD.replace("\r", "") + ".py"  # urlsplit drops leading C0 and CR: the file must match
    (root / name).write_text("def datasource(options, ctx):\n    raise ValueError('no data')\n")
    spec = json.loads(pipeline.read_text())
    spec["datasource"] = name
    pipeline.write_text(json.dumps(spec))
    proc = run_cli("run", str(pipeline), "-o", str(tmp_path / "ws"), "--isolation", bwrap, timeout=300)
    assert proc.returncode == 1
    assert "no data" in proc.stderr, proc.stderr  # the script ran, and its name is in the error
    assert_inert(proc.stdout + proc.stderr)


def test_pin_fragment_in_an_error_and_the_debug_traceback(tmp_path):
    pipeline = write_pipeline(tmp_path / "p")
    spec = json.loads(pipeline.read_text())
    spec["model"] = f"model.py#{PAYLOAD}"
    pipeline.write_text(json.dumps(spec))
    proc = run_cli("run", str(pipeline), "-o", str(tmp_path / "ws"), "--debug", timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr, proc.stderr
    assert_inert(proc.stdout + proc.stderr)


def test_unknown_key_in_an_error(tmp_path):
    pipeline = write_pipeline(tmp_path / "p", extra={PAYLOAD: 1})
    proc = run_cli("run", str(pipeline), "-o", str(tmp_path / "ws"), timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert_inert(proc.stdout + proc.stderr)


def test_framework_url_in_progress_lines(tmp_path, bwrap):
    pipeline = write_pipeline(tmp_path / "p", extra={"options": {"framework": f"http://127.0.0.1:9/fw{PAYLOAD}.zip"}})
    proc = run_cli("run", str(pipeline), "-o", str(tmp_path / "ws"), "--allow-private", "127.0.0.1",
                   "--isolation", bwrap, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "fetching framework archive" in proc.stderr, proc.stderr
    assert_inert(proc.stdout + proc.stderr)


RAISES = f'''
def train(runtime, options, ctx):
    raise RuntimeError({PAYLOAD!r})
'''


def test_a_stage_error_and_its_debug_traceback(tmp_path, bwrap):
    attack = run_attack(tmp_path, bwrap, model=RAISES, args=["--debug"], limits=SLOW_HOST)
    assert attack.returncode == 1, attack.describe()
    assert "traceback inside the sandbox" in attack.stderr
    assert_inert(attack.output)
