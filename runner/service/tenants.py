"""Tenants: who may submit runs, with what quotas, as which host uid.

A token is 32 random bytes (urlsafe base64, prefixed `pcsb_`), shown once
and stored only as its SHA-256: a token has the entropy of a key, so a fast
hash loses nothing, and a stolen database gives no usable token. A
presented token is compared with every tenant's hash by
`hmac.compare_digest`, so the time an answer takes says nothing about how
much of a hash matched.

Each tenant gets a host uid of its own from a range (default 200000 up),
never reused after `remove` (its files may outlive it), for its stages and
its directories (`DATA/tenants/<name>/`, mode 0700).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipcook_sandbox.runner.errors import TenantError

from .db import ACTIVE, CANCELED, QUEUED, Database

NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
TOKEN_PREFIX = "pcsb_"
UID_BASE = 200000
UID_SPAN = 100000


@dataclass(frozen=True)
class Tenant:
    name: str
    uid: int
    max_running: int
    max_queued: int
    cpus: float  # per stage
    memory: int  # bytes per stage
    disk: int  # bytes per stage
    timeout: float  # seconds per stage
    gpus: int

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Tenant:
        return cls(row["name"], row["uid"], row["max_running"], row["max_queued"], row["cpus"], row["memory"],
                   row["disk"], row["timeout"], row["gpus"])

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "uid": self.uid, "max_running": self.max_running, "max_queued": self.max_queued,
                "cpus": self.cpus, "memory": self.memory, "disk": self.disk, "timeout": self.timeout,
                "gpus": self.gpus}


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def tenant_dir(data: Path, name: str) -> Path:
    return Path(data) / "tenants" / name


def ensure_dirs(data: Path, tenant: Tenant) -> Path:
    """DATA/tenants/NAME (runs/, cache/), 0700, owned by the tenant's uid where we are root."""
    root = tenant_dir(data, tenant.name)
    (Path(data) / "tenants").mkdir(parents=True, exist_ok=True, mode=0o711)
    os.chmod(Path(data) / "tenants", 0o711)  # traversable, not listable: no tenant learns another's name
    for d in (root, root / "runs", root / "cache"):
        d.mkdir(exist_ok=True, mode=0o700)
        if os.geteuid() == 0:
            os.chown(d, tenant.uid, tenant.uid)
        os.chmod(d, 0o700)
    return root


def add(db: Database, data: Path, name: str, *, max_running: int = 2, max_queued: int = 20, cpus: float = 1.0,
        memory: int = 2 << 30, disk: int = 2 << 30, timeout: float = 3600.0, gpus: int = 0,
        uid_base: int = UID_BASE) -> tuple[Tenant, str]:
    """Create tenant NAME; returns it and its token (the only time the token is seen)."""
    if not NAME_RE.match(name):
        raise TenantError(f"tenant name {name!r} must be 1-32 characters of a-z, 0-9, '-' and '_', "
                          "starting with a letter")
    if max_running < 1 or max_queued < 0 or cpus <= 0 or memory <= 0 or disk <= 0 or timeout <= 0 or gpus < 0:
        raise TenantError("quotas must be positive (max-queued and gpus may be 0)")
    token = new_token()
    with db.transaction() as conn:
        if conn.execute("SELECT 1 FROM tenants WHERE name = ?", (name,)).fetchone():
            raise TenantError(f"tenant {name!r} exists already (rotate its token with `tenants token {name}`)")
        row = conn.execute("SELECT value FROM meta WHERE key = 'next_uid'").fetchone()
        uid = max(int(row[0]) if row else uid_base, uid_base)
        if uid >= uid_base + UID_SPAN:
            raise TenantError(f"no uid left in {uid_base}..{uid_base + UID_SPAN - 1}")
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('next_uid', ?)", (str(uid + 1),))
        conn.execute("INSERT INTO tenants (name, token_hash, uid, max_running, max_queued, cpus, memory, disk, "
                     "timeout, gpus, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (name, hash_token(token), uid, max_running, max_queued, cpus, memory, disk, timeout, gpus,
                      time.time()))
    tenant = get(db, name)
    assert tenant is not None
    ensure_dirs(data, tenant)
    return tenant, token


def get(db: Database, name: str) -> Tenant | None:
    row = db.one("SELECT * FROM tenants WHERE name = ?", (name,))
    return Tenant.from_row(row) if row else None


def all_tenants(db: Database) -> list[Tenant]:
    return [Tenant.from_row(r) for r in db.query("SELECT * FROM tenants ORDER BY name")]


def rotate(db: Database, name: str) -> str:
    token = new_token()
    if db.execute("UPDATE tenants SET token_hash = ? WHERE name = ?", (hash_token(token), name)) != 1:
        raise TenantError(f"no tenant {name!r}")
    return token


def remove(db: Database, data: Path, name: str) -> int:
    """Remove NAME: its token stops working at once, its queued runs are canceled; a running
    server cancels its running ones. Returns how many runs were canceled here. The tenant's
    files are deleted (its runs' workspaces too); its uid is never given out again."""
    with db.transaction() as conn:
        if conn.execute("DELETE FROM tenants WHERE name = ?", (name,)).rowcount != 1:
            raise TenantError(f"no tenant {name!r}")
        queued = [r[0] for r in conn.execute("SELECT id FROM runs WHERE tenant = ? AND state = ?", (name, QUEUED))]
        now = time.time()
        for run_id in queued:
            conn.execute("UPDATE runs SET state = ?, ended = ?, error = ? WHERE id = ?",
                         (CANCELED, now, "canceled: the tenant was removed", run_id))
            conn.execute("INSERT INTO transitions (run_id, state, at, note) VALUES (?, ?, ?, ?)",
                         (run_id, CANCELED, now, "tenant removed"))
        active = conn.execute(f"SELECT count(*) FROM runs WHERE tenant = ? AND state IN ({', '.join('?' * len(ACTIVE))})",
                              (name, *ACTIVE)).fetchone()[0]
    if not active:
        shutil.rmtree(tenant_dir(data, name), ignore_errors=True)
    return len(queued)


def authenticate(db: Database, token: str | None) -> Tenant | None:
    """The tenant whose token this is, or None. Constant time in the token's content."""
    if not token:
        return None
    presented = hash_token(token)
    found = None
    for row in db.query("SELECT * FROM tenants"):
        if hmac.compare_digest(presented, row["token_hash"]):
            found = row
    return Tenant.from_row(found) if found else None
