"""`pipcook-sandbox doctor`: what confinement each backend gives on this host.

An operator runs it before pointing the runner at untrusted pipelines; `run`
calls `require_backend` so a backend whose confinement is broken here is
refused with the reason, never used half-working.
"""
from __future__ import annotations

from typing import Any

from pipcook_sandbox.runner.backends import BACKENDS, get_backend

from .errors import BackendUnavailable

# What each backend must provide before it may run untrusted code.
REQUIRED = {
    "bwrap": ("bwrap", "userns", "seccomp", "pid_namespace", "network_namespace"),
    "docker": ("engine", "image"),
}


def probe(name: str) -> dict[str, Any]:
    try:
        return dict(get_backend(name).probe())
    except ImportError as exc:
        return {"error": f"backend {name} is not available: {exc}"}
    except Exception as exc:  # a probe must never take the runner down
        return {"error": f"probe failed: {type(exc).__name__}: {exc}"}


def problems(name: str, found: dict[str, Any]) -> list[str]:
    issues = [found["error"]] if found.get("error") else []
    for key in REQUIRED.get(name, ()):
        value = found.get(key)
        if value is False or value is None:
            issues.append(found.get(f"{key}_why") or f"{key} is not available")
    return issues


# Backends whose probe passed in this process. A runner takes one run, so this only spares a warm
# runner (runner/warmrunner.py), which probes before its job, a second probe when the job arrives.
_confirmed: set[str] = set()


def require_backend(name: str) -> None:
    if name in _confirmed:
        return
    found = probe(name)
    issues = list(dict.fromkeys(problems(name, found)))  # one probe failure is often every feature's reason
    first = REQUIRED.get(name, ("",))[0]
    if not found.get("error") and found.get(first) in (False, None) and issues:
        issues = issues[:1]  # no bwrap binary, no Docker engine: nothing else could be probed
    if issues:
        raise BackendUnavailable(
            f"the {name} backend cannot confine scripts on this host: {'; '.join(issues)}. "
            "Run `pipcook-sandbox doctor` for details.")
    _confirmed.add(name)


def _fmt(value: Any) -> str:
    if value is True:
        return "yes"
    if value is False or value is None:
        return "NO"
    return str(value)


def findings() -> dict[str, Any]:
    """`doctor --json`: {"ok": any backend usable, "backends": {name: {"usable", "problems", "found"}}}."""
    backends: dict[str, Any] = {}
    for name in BACKENDS:
        if name == "none":
            backends[name] = {"usable": True, "confined": False, "problems": [], "found": {}}
            continue
        found = probe(name)
        issues = problems(name, found)
        backends[name] = {"usable": not issues, "confined": True, "problems": issues, "found": found}
    ok = any(b["usable"] for n, b in backends.items() if n != "none")
    return {"ok": ok, "backends": backends}


def report() -> tuple[str, bool]:
    lines, any_ok = [], False
    for name in BACKENDS:
        if name == "none":
            continue
        found = probe(name)
        issues = problems(name, found)
        any_ok = any_ok or not issues
        lines.append(f"{name}: {'ready' if not issues else 'NOT USABLE'}")
        for key, value in found.items():
            if not key.endswith("_why") and key != "error":
                lines.append(f"  {key:<22} {_fmt(value)}")
        for issue in issues:
            lines.append(f"  problem: {issue}")
    lines.append("none: no confinement at all (scripts run as your user); for trusted code only")
    return "\n".join(lines), any_ok
