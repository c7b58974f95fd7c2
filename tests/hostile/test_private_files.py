"""Workspaces and caches are private to the runner's user.

A workspace holds what untrusted scripts wrote and what the pipeline named;
the cache holds what pipelines fetched. On a shared host they were 0755 and
0644, readable by every local user. Now the workspace root is 0700 and
nothing below it is open to others; the cache and its folders are 0700.
The stages' uid (65534 on both backends when the runner is root) must
still read its scripts and, for predict, the model: the test runs predict
on the workspace it checked.
"""
from __future__ import annotations

import json
import os
import stat

import pytest
from conftest import run_cli

from .attack import backend_cli, limit_args, private_cache, run_attack

pytestmark = pytest.mark.hostile
# These runs must succeed (or fail for the attack's reason) on a busy shared host: a long stage timeout.
SLOW_HOST = limit_args(timeout="120")

DOWNLOADS = r'''
import os

def datasource(options, ctx):
    from sandbox import sdk
    import numpy as np
    with open(os.path.join(ctx.workspace.data_dir, "made.txt"), "w") as f:
        f.write("untrusted\n")
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=4).astype(np.float32) for _ in range(40)]
    return sdk.from_lists(train=[{"data": x, "label": int(x.sum() > 0)} for x in xs],
                          meta={"type": "general", "categories": ["neg", "pos"]})
'''


def _open_to_others(root) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o007:
                found.append(f"{oct(stat.S_IMODE(st.st_mode))} {path}")
    return found


def test_workspace_and_cache_are_private_and_stages_still_read(tmp_path, isolation):
    env = private_cache(tmp_path)
    attack = run_attack(tmp_path, isolation, datasource=DOWNLOADS, env=env,
                        extra={"artifact": [{"processor": "zip", "target": "model.zip"}]}, limits=SLOW_HOST)
    assert attack.returncode == 0, attack.describe()
    ws = attack.ws
    assert stat.S_IMODE(os.stat(ws).st_mode) == 0o700
    assert (ws / "data" / "made.txt").is_file() and (ws / "model.zip").is_file()
    assert not _open_to_others(ws), _open_to_others(ws)
    cache = tmp_path / "cache"
    for folder in [cache, *(p for p in cache.iterdir() if p.is_dir() and not p.is_symlink())]:
        assert stat.S_IMODE(os.stat(folder).st_mode) & 0o077 == 0, folder
    # The stages (another uid when the runner is root) still read their scripts and the model.
    cli_isolation, extra = backend_cli(isolation)  # docker-gvisor: --isolation docker under runsc
    proc = run_cli("predict", str(ws), "-s", "1,2,3,4", "--isolation", cli_isolation, *limit_args(timeout="120"),
                   env={**env, **extra}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["success"] is True
    assert "may not read" not in proc.stderr, proc.stderr  # no backend warning about unreadable mounts
