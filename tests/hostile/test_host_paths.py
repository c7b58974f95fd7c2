"""A stage sees no host path: not in any process's command line or environment.

Under bwrap, pid 1 of the stage's pid namespace is bwrap itself, and its
argv used to hold every mount source (the workspace, the cache, the run's
state dir under /tmp): a stage read them in /proc/1/cmdline. The runner now
hands bwrap its options through `--args FD`. Docker's pid 1 (docker-init)
only ever held in-container paths; the test holds both.
"""
from __future__ import annotations

import json

import pytest

from .attack import limit_args, private_cache, run_attack

pytestmark = pytest.mark.hostile
# These runs must succeed (or fail for the attack's reason) on a busy shared host: a long stage timeout.
SLOW_HOST = limit_args(timeout="120")

PEEK = r'''
import json, os


def read(path):
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20).replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError as e:
        return f"<{type(e).__name__}>"


def train(runtime, options, ctx):
    seen = {}
    for pid in [p for p in os.listdir("/proc") if p.isdigit()] + ["self"]:
        for what in ("cmdline", "environ"):
            seen[f"/proc/{pid}/{what}"] = read(f"/proc/{pid}/{what}")
    print("REPORT", json.dumps(seen), flush=True)
'''


def test_no_host_path_in_any_cmdline_or_environ(tmp_path, isolation):
    env = private_cache(tmp_path)
    attack = run_attack(tmp_path, isolation, model=PEEK, env=env, limits=SLOW_HOST)
    assert attack.returncode == 0, attack.describe()
    seen = attack.reports("model")
    assert "/proc/1/cmdline" in seen and seen["/proc/1/cmdline"].strip(), seen  # pid 1's argv was read
    host_paths = [str(tmp_path), env["PIPCOOK_SANDBOX_CACHE"], "/tmp/pcsb-", str(attack.ws)]
    leaks = {where: text[:300] for where, text in seen.items() if any(p in text for p in host_paths)}
    assert not leaks, json.dumps(leaks, indent=1)
