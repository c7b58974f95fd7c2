"""Which host uid and gid a root runner's stages run as.

By default every stage of a root runner is host uid/gid 65534 (nobody):
bwrap's "mapped" mode and the Docker container's `user`. A multi-tenant
host (`pipcook-sandbox server`) gives each tenant a uid of its own
(`run --stage-uid`), so that a kernel-level escape from one tenant's stage
lands as a uid that owns nothing of any other tenant. The CLI sets the process
default once (`set_stage_owner`); a stage's own `StageOptions.stage_owner`
wins over it, which is what a pool of sandboxes for several tenants needs.
"""
from __future__ import annotations

from .base import SANDBOX_GID as DEFAULT_GID
from .base import SANDBOX_UID as DEFAULT_UID

_chosen: tuple[int, int] | None = None


def set_stage_owner(uid: int, gid: int | None = None) -> None:
    """Run every later stage of this process as host UID (and GID, default UID)."""
    global _chosen
    gid = uid if gid is None else gid
    for value, what in ((uid, "uid"), (gid, "gid")):
        if not 0 < value < 2**32 - 1:
            raise ValueError(f"stage {what} {value} is out of range (1..4294967294)")
    _chosen = (uid, gid)


def stage_ids() -> tuple[int, int]:
    """The host (uid, gid) of a root runner's stages."""
    return _chosen or (DEFAULT_UID, DEFAULT_GID)


def resolve(chosen: tuple[int, int] | None) -> tuple[int, int]:
    """A stage's (uid, gid): its own StageOptions.stage_owner when it has one, else the process default."""
    return chosen if chosen is not None else stage_ids()


def parse(text: str) -> tuple[int, int]:
    """'200001' or '200001:200001' -> (uid, gid)."""
    uid_text, _, gid_text = text.partition(":")
    uid = int(uid_text)
    return uid, int(gid_text) if gid_text else uid
