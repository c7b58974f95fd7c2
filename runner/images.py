"""Docker images for the docker backend (`pipcook-sandbox images build`).

An image holds a Python 3.11 interpreter and the worker's own dependencies
at /pipcook/site, pinned to the versions the runner itself uses (the same
pins as `workerenv.requirements()`), and nothing else: the `sandbox`
package, the framework, the script and the data are mounted read-only per
stage. The tag names the worker protocol version and a hash of the pins:

    pipcook-sandbox-worker:cpu-p1-2ac9887ba63c
    pipcook-sandbox-worker:cuda-p1-2ac9887ba63c

so a runner never uses an image built for another protocol or other
versions of msgpack/numpy: it asks for a rebuild instead.

Two recipes:

- online (default): `docker build` of images/cpu or images/cuda (needs a
  registry for the base image and PyPI for the pins);
- offline (`--offline`): `debootstrap --variant=minbase bookworm` (Debian
  12, whose python3 is 3.11) from a Debian mirror, stripped, plus the
  worker's dependencies copied in, then `docker import`. The debootstrap
  root filesystem is cached as a tarball, so a rebuild takes seconds.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pipcook_sandbox.runner.backends import mountinfo
from pipcook_sandbox.runner.backends.base import SANDBOX_GID, SANDBOX_UID
from pipcook_sandbox.sandbox.protocol import PROTOCOL_VERSION

from .errors import ImageError
from .fetch import cache_dir
from .workerpins import REPOSITORY, deps_hash, image_tag, requirements  # noqa: F401  (this module's API too)

if TYPE_CHECKING:
    from docker import DockerClient

IMAGES_DIR = Path(__file__).resolve().parent.parent / "images"
IMAGE_PYTHON = (3, 11)  # both recipes; the framework is built for the host's 3.11
SUITE = "bookworm"
ROOTFS_PACKAGES = ("python3",)
# Trimmed from the root filesystem: nothing a stage needs, and less to attack.
STRIP = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian",
         "var/cache/apt", "var/lib/apt/lists", "var/log", "var/cache/debconf")
IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def image_labels(cuda: bool, recipe: str) -> dict[str, str]:
    return {"pipcook-sandbox.protocol": str(PROTOCOL_VERSION),
            "pipcook-sandbox.requirements": " ".join(requirements()),
            "pipcook-sandbox.flavour": "cuda" if cuda else "cpu",
            "pipcook-sandbox.recipe": recipe}


def client():
    import docker

    try:
        engine = docker.from_env(timeout=600)
        engine.ping()
        return engine
    except Exception as exc:
        raise ImageError(f"cannot reach the Docker engine ({exc}); start dockerd or set DOCKER_HOST") from None


def exists(tag: str, engine: DockerClient | None = None) -> bool:
    import docker

    try:
        (engine or client()).images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


def build(cuda: bool = False, offline: bool = False, force: bool = False, log: Callable[[str], None] = print) -> str:
    """Build the image for this runner unless it exists; return its tag."""
    engine = client()
    tag = image_tag(cuda)
    if exists(tag, engine) and not force:
        log(f"image {tag} is already built")
        return tag
    replaced = engine.images.get(tag).id if exists(tag, engine) else None
    if offline:
        _build_offline(engine, cuda, tag, log)
    else:
        _build_dockerfile(engine, cuda, tag, log)
    check(engine, tag, log)
    if replaced and replaced != engine.images.get(tag).id:
        try:  # the image --force replaced would linger untagged
            engine.images.remove(replaced)
        except Exception:
            pass  # still used by a container: Docker keeps it, and so do we
    return tag


# --- online: a Dockerfile --------------------------------------------------------------


def _build_dockerfile(engine: DockerClient, cuda: bool, tag: str, log: Callable[[str], None]) -> None:
    import docker

    folder = IMAGES_DIR / ("cuda" if cuda else "cpu")
    log(f"building {tag} from {folder}/Dockerfile (needs a registry and PyPI; --offline does not)")
    try:
        for chunk in engine.api.build(path=str(folder), tag=tag, buildargs={"REQUIREMENTS": " ".join(requirements())},
                                      labels=image_labels(cuda, "dockerfile"), rm=True, forcerm=True, pull=True,
                                      decode=True):
            if "error" in chunk:
                raise ImageError(f"docker build of {tag} failed: {chunk['error'].strip()}")
            text = (chunk.get("stream") or "").rstrip()
            if text:
                log(text)
    except docker.errors.APIError as exc:
        raise ImageError(f"docker build of {tag} failed: {exc.explanation or exc}") from None


# --- offline: debootstrap + docker import ------------------------------------------------


def _run(argv: list[str], what: str, timeout: float = 1800) -> str:
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise ImageError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def _unmount_under(root: Path) -> None:
    """debootstrap mounts /proc and /sys in the target; a failed run can leave
    them, and deleting through a mounted /sys must never happen."""
    top = root.resolve()
    for point in mountinfo.points_below(top):
        if point != top:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _remove_tree(root: Path) -> None:
    if root.exists():
        _unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)


def rootfs_tarball(log: Callable[[str], None] = print, mirror: str | None = None) -> Path:
    """The stripped Debian root filesystem as a tarball, built once and cached."""
    mirror = mirror or os.environ.get("PIPCOOK_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    key = hashlib.sha256(f"{SUITE} {platform.machine()} {' '.join(ROOTFS_PACKAGES)} {STRIP}".encode()).hexdigest()[:12]
    folder = cache_dir() / "images"
    cached = folder / f"rootfs-{SUITE}-{key}.tar"
    if cached.is_file():
        return cached
    if os.geteuid() != 0:
        raise ImageError("the offline image build runs debootstrap, which needs root")
    if shutil.which("debootstrap") is None:
        raise ImageError("the offline image build needs debootstrap (apt-get install debootstrap)")
    folder.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".rootfs-", dir=folder))
    root = work / "root"
    try:
        log(f"debootstrap {SUITE} (minbase + {', '.join(ROOTFS_PACKAGES)}) from {mirror}, once; cached in {folder}")
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(ROOTFS_PACKAGES)}", SUITE, str(root), mirror],
             "debootstrap")
        _unmount_under(root)
        for rel in STRIP:
            target = root / rel
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
                target.mkdir(mode=0o755)  # apt and friends expect the folders
        # No set-id programs: no-new-privileges already makes them inert; belt and braces.
        _run(["find", str(root), "-xdev", "-type", "f", "-perm", "/6000", "-exec", "chmod", "ug-s", "{}", "+"],
             "removing set-id bits")
        version = _run(["chroot", str(root), "python3", "-c", "import sys; print(*sys.version_info[:2])"],
                       "python3 in the root filesystem").split()
        if tuple(map(int, version)) != IMAGE_PYTHON:
            raise ImageError(f"{SUITE}'s python3 is {'.'.join(version)}, not {'.'.join(map(str, IMAGE_PYTHON))}")
        partial = work / "rootfs.tar"
        _run(["tar", "--numeric-owner", "--xattrs", "-C", str(root), "--exclude=./dev/*", "--exclude=./proc/*",
              "--exclude=./sys/*", "--exclude=./tmp/*", "--exclude=./run/*", "-cf", str(partial), "."], "tar")
        os.replace(partial, cached)
    finally:
        _remove_tree(work)
    return cached


def _image_site(log: Callable[[str], None]) -> tuple[Path, bool]:
    """(dir holding the worker's pinned dependencies for Python 3.11, is it a temp dir)."""
    if sys.version_info[:2] == IMAGE_PYTHON and sys.platform == "linux":
        from .workerenv import ensure_worker_site

        return ensure_worker_site(log=log), False  # the very site bwrap uses: same files, same pins
    target = Path(tempfile.mkdtemp(prefix="pcsb-image-site-"))
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
    platforms = [f"manylinux_2_{minor}_{machine}" for minor in (36, 34, 28, 27, 17)]
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
          "--target", str(target), "--python-version", ".".join(map(str, IMAGE_PYTHON)), "--implementation", "cp",
          "--only-binary=:all:", *[f"--platform={p}" for p in platforms], *requirements()],
         "pip install of the worker's dependencies for Python 3.11")
    return target, True


def _site_filter(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    if not (info.isfile() or info.isdir()):
        return None  # no links or devices in the image's /pipcook/site
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode = 0o755 if info.isdir() or info.mode & 0o111 else 0o644
    return info


def _build_offline(engine: DockerClient, cuda: bool, tag: str, log: Callable[[str], None]) -> None:
    if cuda:
        # The CUDA libraries come from the framework (tensorflow[and-cuda] installs them with
        # pip) and the driver from the NVIDIA Container Toolkit, so the same root filesystem serves.
        log("note: the offline CUDA image is the Debian image; CUDA comes from the framework's "
            "pip packages and the driver from the NVIDIA Container Toolkit (untested without a GPU)")
    rootfs = rootfs_tarball(log)
    site, temporary = _image_site(log)
    work = Path(tempfile.mkdtemp(prefix="pcsb-image-"))
    try:
        image_tar = work / "image.tar"
        shutil.copyfile(rootfs, image_tar)
        with tarfile.open(image_tar, "a") as tar:
            for rel in ("pipcook", "workspace"):
                info = tarfile.TarInfo(f"./{rel}")
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            for entry in sorted(os.listdir(site)):
                if entry == ".complete":
                    continue
                tar.add(site / entry, arcname=f"./pipcook/site/{entry}", filter=_site_filter)
        changes = [f"USER {SANDBOX_UID}:{SANDBOX_GID}", "WORKDIR /tmp", "ENV HOME=/tmp", "ENV LANG=C.UTF-8",
                   "ENV PYTHONDONTWRITEBYTECODE=1", f"ENV PATH={IMAGE_PATH}", 'CMD ["python3"]']
        changes += [f"LABEL {json.dumps(k)}={json.dumps(v)}" for k, v in image_labels(cuda, "debootstrap").items()]
        repository, _, name = tag.partition(":")
        log(f"docker import {tag} ({image_tar.stat().st_size >> 20} MiB)")
        engine.api.import_image_from_file(str(image_tar), repository=repository, tag=name, changes=changes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if temporary:
            shutil.rmtree(site, ignore_errors=True)


# --- every recipe: check what was built --------------------------------------------------

CHECK = ("import os, sys; sys.path.insert(0, '/pipcook/site'); import zmq, msgpack, numpy, PIL; "
         "print(os.getuid(), *sys.version_info[:2], numpy.__version__)")


def check(engine: DockerClient, tag: str, log: Callable[[str], None] = print) -> None:
    """Run the image once, confined as a stage is: Python 3.11, uid 65534, the pins importable."""
    try:
        out = engine.containers.run(tag, ["python3", "-I", "-S", "-c", CHECK], network_mode="none", read_only=True,
                                    cap_drop=["ALL"], remove=True, stderr=True).decode().split()
    except Exception as exc:
        raise ImageError(f"the image {tag} was built but does not run the worker's imports: {exc}") from None
    if out[:3] != [str(SANDBOX_UID), *map(str, IMAGE_PYTHON)]:
        raise ImageError(f"the image {tag} runs as uid {out[0]} with Python {'.'.join(out[1:3])}; "
                         f"expected uid {SANDBOX_UID} and Python {'.'.join(map(str, IMAGE_PYTHON))}")
    log(f"image {tag} is ready (Python {out[1]}.{out[2]}, numpy {out[3]}, uid {out[0]})")
