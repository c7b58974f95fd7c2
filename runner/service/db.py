"""The service's state: tenants, runs and every state change, in SQLite.

WAL journal with synchronous=FULL: a committed change survives `kill -9` of
the server (and a power cut), and the `tenants` command can change tenants
while the server runs. Every state change of a run goes through `transition`,
which updates the run and appends to `transitions` in one transaction, and
only from a state it expects: two writers (the API cancelling, the scheduler
starting) can never both win.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipcook_sandbox.runner.errors import PipcookError

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED = "queued", "running", "succeeded", "failed", "canceled"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED)
ACTIVE = (QUEUED, RUNNING)
FINAL = (SUCCEEDED, FAILED, CANCELED)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL,
    uid INTEGER NOT NULL UNIQUE,
    max_running INTEGER NOT NULL,
    max_queued INTEGER NOT NULL,
    cpus REAL NOT NULL,
    memory INTEGER NOT NULL,
    disk INTEGER NOT NULL,
    timeout REAL NOT NULL,
    gpus INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    state TEXT NOT NULL,
    source TEXT NOT NULL,
    stages INTEGER NOT NULL,
    cpus REAL NOT NULL,
    memory INTEGER NOT NULL,
    disk INTEGER NOT NULL,
    timeout REAL NOT NULL,
    pids INTEGER NOT NULL,
    gpus INTEGER NOT NULL,
    created REAL NOT NULL,
    started REAL,
    ended REAL,
    job_id TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    exit_code INTEGER,
    error TEXT
);
CREATE INDEX IF NOT EXISTS runs_state ON runs (state, tenant, seq);
CREATE INDEX IF NOT EXISTS runs_tenant ON runs (tenant, seq);
CREATE TABLE IF NOT EXISTS transitions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    state TEXT NOT NULL,
    at REAL NOT NULL,
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS transitions_run ON transitions (run_id, seq);
"""


def data_dir(data: Path, mode: int = 0o700) -> Path:
    """`data` (the service's state directory, --data) made if missing and given `mode`; one that
    cannot be used (read-only, a file, not ours) is one paragraph naming it."""
    try:
        data.mkdir(parents=True, exist_ok=True, mode=0o700)
        if mode != 0o700:
            os.chmod(data, mode)
    except OSError as exc:
        raise _unusable(data, exc) from exc
    return data


def _unusable(data: Path, exc: Exception) -> PipcookError:
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if isinstance(exc, FileExistsError) and not data.is_dir():
        why = "it is a file, not a directory"
    return PipcookError(f"cannot use {data} as the service's state directory (--data, $PIPCOOK_SANDBOX_DATA): {why}; "
                        "give a directory this user may write")


class Database:
    """One connection shared by the server's threads, serialised by a lock (SQLite writes are serial anyway)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        data_dir(self.path.parent)
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            self.lock = threading.RLock()
            with self.lock:
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=FULL")
                self.conn.execute("PRAGMA foreign_keys=ON")
                self.conn.executescript(SCHEMA)
        except sqlite3.Error as exc:  # unwritable, or a file that is no SQLite database
            raise _unusable(self.path.parent, RuntimeError(f"its database {self.path.name}: {exc}")) from exc

    def close(self) -> None:
        with self.lock:
            self.conn.close()

    # --- plumbing -------------------------------------------------------------

    def query(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(row) for row in self.conn.execute(sql, args).fetchall()]

    def one(self, sql: str, args: tuple = ()) -> dict[str, Any] | None:
        rows = self.query(sql, args)
        return rows[0] if rows else None

    def execute(self, sql: str, args: tuple = ()) -> int:
        with self.lock:
            return self.conn.execute(sql, args).rowcount

    class _Tx:
        def __init__(self, db: Database) -> None:
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.lock.acquire()
            self.db.conn.execute("BEGIN IMMEDIATE")
            return self.db.conn

        def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
            try:
                self.db.conn.execute("ROLLBACK" if kind else "COMMIT")
            finally:
                self.db.lock.release()

    def transaction(self) -> Database._Tx:
        return Database._Tx(self)

    # --- meta -----------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        row = self.one("SELECT value FROM meta WHERE key = ?", (key,))
        return row["value"] if row else None

    # --- runs -----------------------------------------------------------------

    def insert_run(self, run: dict[str, Any]) -> None:
        columns = ", ".join(run)
        marks = ", ".join("?" for _ in run)
        with self.transaction() as conn:
            conn.execute(f"INSERT INTO runs ({columns}) VALUES ({marks})", tuple(run.values()))
            conn.execute("INSERT INTO transitions (run_id, state, at, note) VALUES (?, ?, ?, ?)",
                         (run["id"], run["state"], run["created"], "submitted"))

    def transition(self, run_id: str, to: str, *, expect: tuple[str, ...], note: str = "",
                   **fields: Any) -> bool:
        """Move RUN_ID to state TO if it is in one of EXPECT; set FIELDS with it. False if it was not."""
        now = time.time()
        if to == RUNNING:
            fields.setdefault("started", now)
        if to in FINAL:
            fields.setdefault("ended", now)
        sets = ", ".join(["state = ?"] + [f"{k} = ?" for k in fields])
        marks = ", ".join("?" for _ in expect)
        with self.transaction() as conn:
            cur = conn.execute(f"UPDATE runs SET {sets} WHERE id = ? AND state IN ({marks})",
                               (to, *fields.values(), run_id, *expect))
            if cur.rowcount != 1:
                return False
            conn.execute("INSERT INTO transitions (run_id, state, at, note) VALUES (?, ?, ?, ?)",
                         (run_id, to, now, note))
        return True

    def run(self, run_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        if tenant is None:
            return self.one("SELECT * FROM runs WHERE id = ?", (run_id,))
        return self.one("SELECT * FROM runs WHERE id = ? AND tenant = ?", (run_id, tenant))

    def runs(self, tenant: str, limit: int = 100, state: str | None = None) -> list[dict[str, Any]]:
        if state:
            return self.query("SELECT * FROM runs WHERE tenant = ? AND state = ? ORDER BY seq DESC LIMIT ?",
                              (tenant, state, limit))
        return self.query("SELECT * FROM runs WHERE tenant = ? ORDER BY seq DESC LIMIT ?", (tenant, limit))

    def in_state(self, *states: str) -> list[dict[str, Any]]:
        marks = ", ".join("?" for _ in states)
        return self.query(f"SELECT * FROM runs WHERE state IN ({marks}) ORDER BY seq", states)

    def count(self, tenant: str, state: str) -> int:
        row = self.one("SELECT count(*) AS n FROM runs WHERE tenant = ? AND state = ?", (tenant, state))
        return int(row["n"]) if row else 0

    def transitions(self, run_id: str) -> list[dict[str, Any]]:
        return self.query("SELECT state, at, note FROM transitions WHERE run_id = ? ORDER BY seq", (run_id,))

    def delete_run(self, run_id: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))
            conn.execute("DELETE FROM transitions WHERE run_id = ?", (run_id,))

    def iter_counts(self) -> Iterator[tuple[str, str, int]]:
        """(tenant, state, count) for every pair that has runs."""
        for row in self.query("SELECT tenant, state, count(*) AS n FROM runs GROUP BY tenant, state"):
            yield row["tenant"], row["state"], int(row["n"])
