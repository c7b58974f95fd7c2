"""Fixtures of the hostile-script suite.

`isolation` parametrises a test over the real backends. A backend that cannot
confine scripts on this host is skipped locally with the reason, and FAILS
the test with CI=true: a hostile suite that silently skips proves nothing.
"""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from .attack import BACKENDS, backend_cli

_usable: set[str] = set()


def _why_unusable(name: str) -> str | None:
    """None if `name` can run stages here, else the reason. Only a usable
    backend is remembered: an image being rebuilt meanwhile is asked again."""
    if name in _usable:
        return None
    why = _probe(name)
    if why is None:
        _usable.add(name)
    return why


def _probe(name: str) -> str | None:
    cli_name, env = backend_cli(name)
    if env:  # docker-gvisor: the docker backend as the runner will see it, with PIPCOOK_DOCKER_RUNTIME set
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            return _probe(cli_name)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    if name == "docker":
        if shutil.which("docker") is None:
            return "the docker CLI is not installed"
        try:
            info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"`docker info` failed: {exc}"
        if info.returncode != 0:
            return f"`docker info` failed: {(info.stderr or info.stdout).strip()[-300:]}"
        try:
            from pipcook_sandbox.runner import images

            tag = images.image_tag()
            if not images.exists(tag):
                return f"the worker image {tag} is not built (run `pipcook-sandbox images build --offline`)"
        except Exception as exc:  # the images module itself may be missing or broken
            return f"cannot check the worker image: {type(exc).__name__}: {exc}"
    elif shutil.which("bwrap") is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    from pipcook_sandbox.runner.doctor import probe, problems

    issues = problems(name, probe(name))
    return "; ".join(issues) if issues else None


def require_backend(name: str) -> None:
    why = _why_unusable(name)
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"the {name} backend is required in CI and is not usable: {why}")
    pytest.skip(f"{name} backend not usable on this machine: {why}")


@pytest.fixture(params=BACKENDS)
def isolation(request) -> str:
    """The backend to attack: every test runs against bwrap, docker (runc) and docker under gVisor."""
    require_backend(request.param)
    return request.param
