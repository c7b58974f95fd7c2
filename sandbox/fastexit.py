"""Ending a process without losing what it wrote, and ending the runner without its teardown.

`flush_open_files()` flushes every open Python file object. A stage's worker registers it as its
first atexit handler (atexit runs handlers last-registered first, and only once the threads that are
not daemons have ended), so it runs after every handler the script registered and after its threads:
a file a script opened and never closed gets its buffered tail written, which the interpreter's own
finalization did not guarantee (tests/test_run_e2e.py test_a_stages_last_writes_reach_the_workspace
failed on the buffered tail without it). The worker then ends through the interpreter's normal
shutdown: a script's native libraries may rely on it (C atexit handlers, stdio buffers, finalizers
that write a gzip trailer or an HDF5 superblock), and a stage's outputs are worth more than the tens of
milliseconds it costs.

`leave(code)` is for the runner's own command only (runner/cli.py `entry`), whose open files and
threads are its own: it does what the shutdown does that the command relies on (the threading
module's shutdown, which wakes and joins concurrent.futures' idle workers, then waits for every thread
that is not a daemon; the atexit handlers; every open file flushed), then `os._exit(code)`, skipping
the teardown of zmq, click and the display (tens of milliseconds at the end of every command that a
caller waiting for it sees).

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


def _shutdown_threads() -> None:
    """What the interpreter's shutdown does first: the threading module's own shutdown, which runs the
    callbacks registered with it (concurrent.futures wakes its idle workers there, so they end) and
    waits for every thread that is not a daemon."""
    threading._shutdown()  # type: ignore[attr-defined]  # what Py_FinalizeEx calls, public in effect


def flush_open_files() -> None:
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
    """End the runner's command now with `code` when that loses nothing; otherwise return `code` (the
    caller returns it to sys.exit, the normal shutdown)."""
    if code == INTERRUPTED:
        return code
    try:
        _shutdown_threads()
        atexit._run_exitfuncs()  # runs each handler once and clears them, as the shutdown would
        flush_open_files()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - whatever went wrong (Ctrl-C meanwhile), the normal shutdown ends it
        return code
    os._exit(code)
