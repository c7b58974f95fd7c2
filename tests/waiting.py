"""Waiting on a condition instead of sleeping: the one helper every test uses to order events.

`wait_until` polls until something is true and fails naming what it waited for; `holds_for`
is for what must NOT happen (a queue that must not grow), checked all through a window
rather than once after a sleep."""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll `predicate` every `interval` seconds until it returns something truthy, and return that;
    an AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def holds_for(predicate: Callable[[], object], seconds: float, what: str, interval: float = 0.02) -> None:
    """Check `predicate` every `interval` seconds for `seconds`; an AssertionError naming `what` at the
    first moment it is false."""
    deadline = time.monotonic() + seconds
    while True:
        if not predicate():
            raise AssertionError(f"{what} stopped holding")
        if time.monotonic() > deadline:
            return
        time.sleep(interval)
