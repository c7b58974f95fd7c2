"""Ending a finished worker without the interpreter's shutdown.

Once a stage has reported its end and the runner confirmed reading it (`sync`), what is left of the
process is CPython's finalization: every module torn down, numpy's, ZeroMQ's and a framework's (TF's)
native state freed object by object. None of it is seen by anyone, and it was the most part of the
time between a stage's last report and its exit (tens of milliseconds for a plain worker, measured,
more for a framework), which the end of every run waits on.

`leave(code)` does what the shutdown does that a stage could rely on, then `os._exit(code)`:
- the atexit handlers run (a script's, logging's, multiprocessing's joining of its children);
- every open Python file is flushed (a script's `open(...)` never closed: its last buffered write
  reaches the volume, as a normal exit's finalization would see to);
- stdout and stderr are flushed;
first of all, as the shutdown does, it waits for every thread that is not a daemon. It keeps the normal
shutdown (returns `code`) when the worker was interrupted. The flush is more than the normal shutdown
did: a file a script kept open lost its buffered tail there (measured: tests/test_run_e2e.py
test_a_stages_last_writes_reach_the_workspace failed on the buffered tail without it).

Imports nothing of the host side, by design (mounted into every stage).
"""
from __future__ import annotations

import _io
import atexit
import gc
import os
import sys
import threading

INTERRUPTED = 130


def _join_other_threads() -> None:
    """Wait for every thread that is not a daemon, as the interpreter's shutdown does first (its work is
    the stage's too); again for any such thread one of them started."""
    main = threading.current_thread()
    while waiting := [t for t in threading.enumerate() if t is not main and not t.daemon and t.is_alive()]:
        for thread in waiting:
            thread.join()


def _flush_open_files() -> None:
    """Flush every open Python file object (what finalizing them at shutdown would do)."""
    for obj in gc.get_objects():
        # The C base of every file class (io.IOBase is an ABC over it: its isinstance() took 4x as long)
        if isinstance(obj, _io._IOBase):
            try:
                if not obj.closed and obj.writable():
                    obj.flush()
            except Exception:  # noqa: BLE001 - a file a script broke is its own; the others still matter
                continue


def leave(code: int) -> int:
    """End the process now with `code` when that loses nothing; otherwise return `code` (the caller
    returns it to sys.exit, the normal shutdown)."""
    if code == INTERRUPTED:
        return code
    try:
        _join_other_threads()
        atexit._run_exitfuncs()  # runs each handler once and clears them, as the shutdown would
        _join_other_threads()  # one an atexit handler started
        _flush_open_files()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - whatever went wrong (Ctrl-C meanwhile), the normal shutdown ends it
        return code
    os._exit(code)
