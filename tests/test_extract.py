"""Safe unpacking of hostile archives (sandbox/extract.py)."""
from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from pipcook_sandbox.sandbox.extract import ExtractError, extract


def tree(root: Path) -> dict[str, bytes]:
    """Every regular file under root, relative path -> content; fails on anything else."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            assert not os.path.islink(full), f"a link was written: {full}"
        for name in filenames:
            full = os.path.join(dirpath, name)
            assert stat.S_ISREG(os.lstat(full).st_mode), full
            found[os.path.relpath(full, root)] = Path(full).read_bytes()
    return found


def written_bytes(root: Path) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(root) for f in files)


FILES = {"a.txt": b"alpha", "dir/b.bin": bytes(range(256)) * 10, "dir/sub/c.txt": b"", "d e.txt": "ünï".encode()}


def make_zip(path: Path, entries=None, *, dirs=("dir/", "empty/")) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for d in dirs:
            zf.writestr(zipfile.ZipInfo(d), b"")
        for name, data in (entries or FILES).items():
            zf.writestr(name, data)
    return path


def add_tar_file(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_tar(path: Path, entries=None, mode="w", extra=()) -> Path:
    with tarfile.open(path, mode) as tf:
        d = tarfile.TarInfo("empty")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in (entries or FILES).items():
            add_tar_file(tf, name, data)
        for info in extra:
            tf.addfile(info)
    return path


# ------------------------------------------------------------------ happy paths


def test_zip_happy_path(tmp_path: Path):
    archive = make_zip(tmp_path / "data.zip")
    dest = tmp_path / "out"
    assert extract(str(archive), str(dest)) == str(dest)
    assert tree(dest) == FILES
    assert (dest / "empty").is_dir()


@pytest.mark.parametrize("mode, suffix", [("w", "tar"), ("w:gz", "tar.gz"), ("w:bz2", "tar.bz2"), ("w:xz", "tar.xz")])
def test_tar_happy_path(tmp_path: Path, mode, suffix):
    archive = make_tar(tmp_path / f"data.{suffix}", mode=mode)
    dest = tmp_path / "out"
    assert extract(str(archive), str(dest)) == str(dest)
    assert tree(dest) == FILES
    assert (dest / "empty").is_dir()


def test_harmless_dot_components_are_normalised(tmp_path: Path):
    archive = make_zip(tmp_path / "a.zip", {"./x/./y.txt": b"1", "x//z.txt": b"2"}, dirs=())
    extract(str(archive), str(tmp_path / "out"))
    assert tree(tmp_path / "out") == {"x/y.txt": b"1", "x/z.txt": b"2"}


def test_dest_is_created(tmp_path: Path):
    archive = make_zip(tmp_path / "a.zip", {"f": b"x"}, dirs=())
    extract(str(archive), str(tmp_path / "deep" / "new" / "dest"))
    assert (tmp_path / "deep" / "new" / "dest" / "f").read_bytes() == b"x"


# ------------------------------------------------------------------ refused entries


ESCAPES = ["../evil.txt", "a/../../evil.txt", "a/b/../../../evil.txt", "..", "..\\evil.txt", "a\\..\\..\\evil.txt"]
ABSOLUTE = ["/tmp/evil.txt", "/etc/cron.d/evil", "\\evil.txt", "C:/evil.txt", "c:\\evil.txt", "//server/share/x"]


@pytest.mark.parametrize("name", ESCAPES + ABSOLUTE)
def test_zip_entries_that_escape_are_refused(tmp_path: Path, name):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr(zipfile.ZipInfo(name), b"owned")
    dest = tmp_path / "sub" / "out"
    with pytest.raises(ExtractError, match="escapes|absolute"):
        extract(str(archive), str(dest))
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "sub" / "evil.txt").exists()
    assert tree(dest) == {}


@pytest.mark.parametrize("name", ESCAPES + ABSOLUTE)
def test_tar_entries_that_escape_are_refused(tmp_path: Path, name):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        add_tar_file(tf, name, b"owned")
    dest = tmp_path / "sub" / "out"
    with pytest.raises(ExtractError, match="escapes|absolute"):
        extract(str(archive), str(dest))
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "sub" / "evil.txt").exists()
    assert tree(dest) == {}


def test_escape_after_good_entries_stops_there(tmp_path: Path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", b"fine")
        zf.writestr(zipfile.ZipInfo("../evil.txt"), b"owned")
    with pytest.raises(ExtractError):
        extract(str(archive), str(tmp_path / "out"))
    assert not (tmp_path / "evil.txt").exists()


def test_empty_entry_name_is_refused(tmp_path: Path):
    archive = tmp_path / "e.tar"
    with tarfile.open(archive, "w") as tf:
        add_tar_file(tf, "./", b"x")
    with pytest.raises(ExtractError, match="empty name"):
        extract(str(archive), str(tmp_path / "out"))


@pytest.mark.parametrize("mode", [stat.S_IFLNK | 0o777, stat.S_IFCHR | 0o666, stat.S_IFIFO | 0o644, stat.S_IFSOCK | 0o755,
                                  stat.S_IFBLK | 0o600])
def test_zip_symlink_and_special_entries_are_refused(tmp_path: Path, mode):
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("passwd")
        info.create_system = 3  # unix
        info.external_attr = mode << 16
        zf.writestr(info, b"/etc/passwd")  # a symlink's content is its target
    dest = tmp_path / "out"
    with pytest.raises(ExtractError, match="not a regular file"):
        extract(str(archive), str(dest))
    assert not os.path.lexists(dest / "passwd")


@pytest.mark.parametrize(
    "attr",
    [(stat.S_IFREG | 0o755) << 16, 0o600 << 16, 0],  # Info-ZIP; zipfile.writestr (no type bits); DOS/Windows (none)
    ids=["unix-regular", "permission-bits-only", "no-mode"],
)
def test_zip_regular_files_with_any_usual_mode_are_fine(tmp_path: Path, attr):
    archive = tmp_path / "ok.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("run.sh")
        info.create_system = 3 if attr else 0
        info.external_attr = attr
        zf.writestr(info, b"#!/bin/sh\n")
    extract(str(archive), str(tmp_path / "out"))
    assert tree(tmp_path / "out") == {"run.sh": b"#!/bin/sh\n"}


def tar_special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3  # /dev/null
    return info


@pytest.mark.parametrize(
    "member",
    [
        tar_special("link", tarfile.SYMTYPE, "/etc/passwd"),
        tar_special("link", tarfile.SYMTYPE, "../../outside"),
        tar_special("hard", tarfile.LNKTYPE, "a.txt"),
        tar_special("hard", tarfile.LNKTYPE, "/etc/shadow"),
        tar_special("null", tarfile.CHRTYPE),
        tar_special("disk", tarfile.BLKTYPE),
        tar_special("pipe", tarfile.FIFOTYPE),
    ],
    ids=lambda m: f"{m.name}-{m.type!r}",
)
def test_tar_links_and_special_entries_are_refused(tmp_path: Path, member):
    archive = make_tar(tmp_path / "evil.tar", {"a.txt": b"a"}, extra=[member])
    dest = tmp_path / "out"
    with pytest.raises(ExtractError, match="link or special"):
        extract(str(archive), str(dest))
    assert not os.path.lexists(dest / member.name)
    assert tree(dest) == {"a.txt": b"a"}


def test_symlink_then_write_through_it_is_impossible(tmp_path: Path):
    # the classic two-step: plant a link, then write "link/file"; the link is refused first
    archive = tmp_path / "two.tar"
    with tarfile.open(archive, "w") as tf:
        tf.addfile(tar_special("d", tarfile.SYMTYPE, str(tmp_path / "target")))
        add_tar_file(tf, "d/owned.txt", b"x")
    (tmp_path / "target").mkdir()
    with pytest.raises(ExtractError):
        extract(str(archive), str(tmp_path / "out"))
    assert list((tmp_path / "target").iterdir()) == []


# ------------------------------------------------------------------ limits


MB = 1 << 20


def test_zip_bomb_stops_at_max_bytes_without_writing_past_it(tmp_path: Path):
    archive = tmp_path / "bomb.zip"
    chunk = bytes(MB)
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("zeros.bin", "w", force_zip64=True) as f:
            for _ in range(200):
                f.write(chunk)
    assert archive.stat().st_size < 2 * MB  # 200 MB of zeros in a small file
    dest = tmp_path / "out"
    with pytest.raises(ExtractError, match="zip bomb"):
        extract(str(archive), str(dest), max_bytes=10 * MB)
    assert written_bytes(dest) <= 10 * MB


def test_many_small_files_count_against_max_bytes_together(tmp_path: Path):
    archive = make_zip(tmp_path / "many.zip", {f"f{i}": bytes(MB) for i in range(6)}, dirs=())
    with pytest.raises(ExtractError):
        extract(str(archive), str(tmp_path / "out"), max_bytes=4 * MB)
    assert written_bytes(tmp_path / "out") <= 4 * MB
    extract(str(archive), str(tmp_path / "ok"), max_bytes=6 * MB)  # exactly at the cap is fine
    assert written_bytes(tmp_path / "ok") == 6 * MB


def test_tar_gz_bomb_stops_at_max_bytes(tmp_path: Path):
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tf:
        info = tarfile.TarInfo("zeros.bin")
        info.size = 50 * MB

        class Zeros(io.RawIOBase):
            left = info.size

            def readinto(self, b):
                n = min(len(b), self.left)
                b[:n] = bytes(n)
                self.left -= n
                return n

        tf.addfile(info, Zeros())
    with pytest.raises(ExtractError, match="zip bomb"):
        extract(str(archive), str(tmp_path / "out"), max_bytes=5 * MB)
    assert written_bytes(tmp_path / "out") <= 5 * MB


def test_too_many_entries(tmp_path: Path):
    entries = {f"f{i}.txt": b"x" for i in range(20)}
    z = make_zip(tmp_path / "many.zip", entries, dirs=())
    t = make_tar(tmp_path / "many.tar", entries)
    for archive in (z, t):
        with pytest.raises(ExtractError, match="more than 10 entries"):
            extract(str(archive), str(tmp_path / f"out-{archive.suffix}"), max_files=10)
        assert len(tree(tmp_path / f"out-{archive.suffix}")) <= 10
    extract(str(z), str(tmp_path / "fine"), max_files=20)
    assert len(tree(tmp_path / "fine")) == 20


@pytest.mark.parametrize("content", [b"", b"just some text\n", b"PK\x03\x04 truncated zip", b"\x1f\x8b garbage gzip"])
def test_not_an_archive(tmp_path: Path, content):
    path = tmp_path / "data.zip"
    path.write_bytes(content)
    with pytest.raises(ExtractError, match="neither a zip nor a tar"):
        extract(str(path), str(tmp_path / "out"))


def test_extract_error_is_a_value_error():
    assert issubclass(ExtractError, ValueError)
