"""Archive attacks through `ctx.extract`: every trick is refused or neutralised.

The datasource builds each hostile archive itself (in its private /tmp),
extracts it into data/ with ctx.extract, and reports what happened; it then
looks for anything written outside the target. The test checks the report,
and the workspace and the host from outside.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from .attack import run_attack, token

pytestmark = pytest.mark.hostile

ARCHIVES = r'''
import io, json, os, stat, tarfile, zipfile
from sandbox import sdk

TOK = "__TOKEN__"


def tar(name, members, mode="w"):
    path = f"/tmp/{name}"
    with tarfile.open(path, mode) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def member(name, data=b"x", kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3  # /dev/null's numbers
    return info, data if kind == tarfile.REGTYPE else None


def zipped(name, entries):
    path = f"/tmp/{name}"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for entry, data, mode in entries:
            info = zipfile.ZipInfo(entry)
            info.compress_type = zipfile.ZIP_DEFLATED
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


def bomb_zip():
    path = "/tmp/bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("zeros.bin", "w", force_zip64=True) as f:
            chunk = b"\0" * (1 << 20)
            for _ in range(200):  # 200 MiB, a few hundred KiB compressed
                f.write(chunk)
    return path


def bomb_tgz():
    path = "/tmp/bomb.tar.gz"
    info = tarfile.TarInfo("zeros.bin")
    info.size = 200 << 20
    class Zeros(io.RawIOBase):
        left = info.size
        def readable(self):
            return True
        def readinto(self, b):
            n = min(len(b), self.left)
            b[:n] = b"\0" * n
            self.left -= n
            return n
    with tarfile.open(path, "w:gz") as tf:
        tf.addfile(info, io.BufferedReader(Zeros()))
    return path


CASES = {
    "tar dotdot": lambda: tar("dotdot.tar", [member(f"../escape-{TOK}")]),
    "tar nested dotdot": lambda: tar("nested.tar", [member(f"a/b/../../../escape-{TOK}")]),
    "tar absolute": lambda: tar("abs.tar", [member(f"/tmp/abs-{TOK}")]),
    "tar symlink": lambda: tar("symlink.tar", [member("passwd", kind=tarfile.SYMTYPE, linkname="/etc/passwd")]),
    "tar symlink dir then file": lambda: tar("symdir.tar", [
        member("d", kind=tarfile.SYMTYPE, linkname="/tmp"), member(f"d/through-{TOK}")]),
    "tar hardlink": lambda: tar("hardlink.tar", [member("hl", kind=tarfile.LNKTYPE, linkname="/etc/passwd")]),
    "tar char device": lambda: tar("chr.tar", [member("null", kind=tarfile.CHRTYPE)]),
    "tar block device": lambda: tar("blk.tar", [member("sda", kind=tarfile.BLKTYPE)]),
    "tar fifo": lambda: tar("fifo.tar", [member("fifo", kind=tarfile.FIFOTYPE)]),
    "tar setuid file": lambda: tar("suid.tar", [(lambda i: (setattr(i[0], "mode", 0o4755), i)[1])(member("suid"))]),
    "tar.gz bomb": bomb_tgz,
    "zip dotdot": lambda: zipped("dotdot.zip", [(f"../escape-zip-{TOK}", b"x", None)]),
    "zip backslash dotdot": lambda: zipped("bs.zip", [(f"..\\..\\escape-bs-{TOK}", b"x", None)]),
    "zip absolute": lambda: zipped("abs.zip", [(f"/tmp/abs-zip-{TOK}", b"x", None)]),
    "zip drive letter": lambda: zipped("drive.zip", [(f"C:/escape-{TOK}", b"x", None)]),
    "zip symlink": lambda: zipped("symlink.zip", [("passwd", b"/etc/passwd", stat.S_IFLNK | 0o777)]),
    "zip fifo": lambda: zipped("fifo.zip", [("fifo", b"", stat.S_IFIFO | 0o644)]),
    "zip bomb": bomb_zip,
    "tar into a planted symlink": lambda: tar("planted.tar", [member(f"pre/through-planted-{TOK}")]),
    "clean zip": lambda: zipped("clean.zip", [("ok/a.txt", b"hello", None), ("ok/b.txt", b"world", None)]),
    "clean tar": lambda: tar("clean.tar", [member("ok/c.txt", b"again")]),
}


def outside():
    """Files this run's tricks could have made outside the targets."""
    found = []
    for root in ("/tmp", "/workspace", "/"):
        for dirpath, dirnames, filenames in os.walk(root):
            if dirpath == "/":
                dirnames[:] = []
            for name in dirnames + filenames:
                if TOK in name and not name.startswith("elsewhere-"):
                    found.append(os.path.join(dirpath, name))
    return sorted(set(found))


def datasource(options, ctx):
    report = {}
    for i, (case, build) in enumerate(CASES.items()):
        path = build()
        dest = os.path.join(ctx.workspace.data_dir, f"case{i}")
        if "bomb" in case:
            dest = f"/tmp/bomb-out-{i}"  # memory-backed: the disk quota must not end the stage first
        if case == "tar into a planted symlink":  # a link left in the target by an earlier step
            os.makedirs(f"/tmp/elsewhere-{TOK}")
            os.makedirs(dest)
            os.symlink(f"/tmp/elsewhere-{TOK}", os.path.join(dest, "pre"))
        try:
            ctx.extract(path, dest)
            files = []
            for dirpath, dirnames, filenames in os.walk(dest):
                for name in filenames:
                    st = os.lstat(os.path.join(dirpath, name))
                    files.append([os.path.relpath(os.path.join(dirpath, name), dest), stat.filemode(st.st_mode)])
            report[case] = {"extracted": sorted(files)}
        except Exception as e:
            report[case] = {"refused": f"{type(e).__name__}: {e}"}
        os.unlink(path)
        if "bomb" in case:
            import shutil
            shutil.rmtree(dest, ignore_errors=True)
    report["outside"] = outside()
    print("REPORT", json.dumps(report), flush=True)
    return sdk.from_lists(train=[{"data": 1, "label": 0}], meta={"type": "general"})
'''

MODEL = "def train(runtime, options, ctx):\n    runtime.dataset.train.next_batch(0)\n"


def test_hostile_archives_are_refused_or_neutralised(tmp_path, isolation):
    tok = token("pcsb-arch")
    attack = run_attack(tmp_path, isolation, datasource=ARCHIVES.replace("__TOKEN__", tok), dataflow=[],
                        model=MODEL, timeout=300)
    assert attack.returncode == 0, attack.describe()
    report = attack.reports("datasource")
    assert report.pop("outside") == [], "an archive wrote outside its target"
    assert report.pop("clean zip") == {"extracted": [["ok/a.txt", "-rw-r--r--"], ["ok/b.txt", "-rw-r--r--"]]}
    assert report.pop("clean tar") == {"extracted": [["ok/c.txt", "-rw-r--r--"]]}
    suid = report.pop("tar setuid file")
    assert suid == {"extracted": [["suid", "-rw-r--r--"]]} or "refused" in suid, suid  # never set-id
    for case, outcome in report.items():
        assert "refused" in outcome and "ExtractError" in outcome["refused"], (case, outcome)
    for case in ("zip bomb", "tar.gz bomb"):
        assert "zip bomb" in report[case]["refused"] or "expands past" in report[case]["refused"], report[case]
    # From outside: no escapes on the host, no links or special files in the workspace.
    for base in (Path("/tmp"), tmp_path):
        # os.walk, not rglob: other runs' directories in /tmp come and go meanwhile
        assert not [name for _, dirs, files in os.walk(base) for name in dirs + files if tok in name], base
    for dirpath, dirnames, filenames in os.walk(attack.ws):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            assert path.is_dir() or (path.is_file() and not path.is_symlink()), path
            assert not path.stat().st_mode & 0o6000, path
    assert not attack.leftovers()
