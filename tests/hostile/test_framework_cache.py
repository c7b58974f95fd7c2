"""A framework archive fetched under --allow-private is not served to a run without it.

Scripts and `ctx.download` key their cache on the network policy they were
fetched under; the framework-archive cache used to key on the URL alone, so
a second run, without the permission, got the archive from a loopback
server that its own policy refuses. Backend-independent (the fetch happens
before any stage): bwrap.
"""
from __future__ import annotations

import pytest
from httpserver import http_server  # noqa: F401  (fixture)

from .attack import limit_args, private_cache, run_attack
from .conftest import require_backend

pytestmark = pytest.mark.hostile
# These runs must succeed (or fail for the attack's reason) on a busy shared host: a long stage timeout.
SLOW_HOST = limit_args(timeout="120")

MODEL = '''
import tinyfw

def train(runtime, options, ctx):
    runtime.log_metrics(answer=tinyfw.ANSWER)
'''


def test_an_unpinned_framework_url_is_not_served_past_the_policy(tmp_path, http_server):  # noqa: F811
    require_backend("bwrap")
    from pipcook_sandbox.runner import mirror
    from test_mirror import _fake_framework

    archive = mirror.pack(_fake_framework(tmp_path), tmp_path / "mirror", "tinyfw", "1.0", cuda=False)
    http_server.routes["/fw.zip"] = (200, {}, archive.read_bytes())
    env = private_cache(tmp_path)
    extra = {"options": {"framework": http_server.url("/fw.zip")}}
    first = run_attack(tmp_path / "first", "bwrap", model=MODEL, extra=extra, env=env,
                       args=["--allow-private", "127.0.0.1"], limits=SLOW_HOST)
    assert first.returncode == 0, first.describe()
    assert first.metrics()[-1]["answer"] == 42
    assert http_server.hits["/fw.zip"] == 1
    second = run_attack(tmp_path / "second", "bwrap", model=MODEL, extra=extra, env=env, limits=SLOW_HOST)
    assert second.returncode == 1, second.describe()
    assert "127.0.0.1" in second.error and "internal error" not in second.stderr, second.describe()
    assert not second.metrics(), second.describe()  # the model never ran with the framework
