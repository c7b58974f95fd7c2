"""Links and special files a model plants in model/ never lead host code to
host files: not the copy-out, not the zip artifact, not `predict`.

(The Judge0 escapes, CVE-2024-28185/28189, were exactly this: the trusted
host following a symlink the sandboxed code planted.)
"""
from __future__ import annotations

import json
import os
import shutil
import stat
import zipfile
from pathlib import Path

import pytest

from .attack import run_attack, run_cli_tracked, token

pytestmark = pytest.mark.hostile

PLANT = r'''
import errno, json, os, socket, stat

SECRET_PATH, ETC_SECRET = __SECRET_PATHS__


def train(runtime, options, ctx):
    m = runtime.read_model()
    report = {}
    with open(os.path.join(m, "weights.json"), "w") as f:
        json.dump({"w": [1, 2, 3]}, f)
    plants = {
        "symlink to /etc/passwd": lambda: os.symlink("/etc/passwd", os.path.join(m, "passwd")),
        "symlink to the host secret": lambda: os.symlink(SECRET_PATH, os.path.join(m, "secret")),
        "symlink to a host file in /etc": lambda: os.symlink(ETC_SECRET, os.path.join(m, "etc-secret")),
        "relative symlink up": lambda: os.symlink("../../../../../../etc/shadow", os.path.join(m, "shadow")),
        "symlink to a dir": lambda: os.symlink("/etc", os.path.join(m, "etc")),
        "symlink as pipeline.json": lambda: os.symlink("/etc/passwd", os.path.join(m, "pipeline.json")),
        "symlink as scripts": lambda: os.symlink("/etc", os.path.join(m, "scripts")),
        "symlink as .pipeline.json.tmp": lambda: os.symlink("/etc/hostname", os.path.join(m, ".pipeline.json.tmp")),
        "hard link to /etc/passwd": lambda: os.link("/etc/passwd", os.path.join(m, "passwd-hard")),
        "hard link to the host secret": lambda: os.link(SECRET_PATH, os.path.join(m, "secret-hard")),
        "hard link to a host file in /etc": lambda: os.link(ETC_SECRET, os.path.join(m, "etc-secret-hard")),
        "hard link inside model/": lambda: os.link(os.path.join(m, "weights.json"), os.path.join(m, "weights-hard")),
        "fifo": lambda: os.mkfifo(os.path.join(m, "fifo")),
        "unix socket": lambda: socket.socket(socket.AF_UNIX).bind(os.path.join(m, "sock")),
        "char device": lambda: os.mknod(os.path.join(m, "null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3)),
        "setuid file": lambda: (open(os.path.join(m, "suid"), "w").write("#!/bin/sh\nid\n"),
                                os.chmod(os.path.join(m, "suid"), 0o6777)),
        "symlink in a subdir": lambda: (os.makedirs(os.path.join(m, "sub/deeper")),
                                        os.symlink("/etc/passwd", os.path.join(m, "sub/deeper/link"))),
    }
    for name, plant in plants.items():
        try:
            plant()
            report[name] = "planted"
        except OSError as e:
            report[name] = errno.errorcode.get(e.errno, str(e.errno))
    print("REPORT", json.dumps(report), flush=True)


def predict(runtime, options, ctx):
    """Read everything under the model dir, following every link there is."""
    m = runtime.read_model()
    seen = {}
    for dirpath, dirnames, filenames in os.walk(m, followlinks=True):
        for name in filenames + dirnames:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    seen[os.path.relpath(path, m)] = f.read(4096).decode("utf-8", "replace")
            except OSError as e:
                seen[os.path.relpath(path, m)] = type(e).__name__
    for name in ("passwd", "secret", "etc-secret", "shadow", "etc/passwd", "sub/deeper/link", SECRET_PATH, ETC_SECRET):
        try:
            with open(os.path.join(m, name), "rb") as f:
                seen["direct " + name] = f.read(4096).decode("utf-8", "replace")
        except OSError as e:
            seen["direct " + name] = type(e).__name__
    return [json.dumps(seen) for _ in runtime.dataset.predicted]
'''

MODEL_FLOW = "def dataflow(pool, options, ctx):\n    return pool\n"


@pytest.fixture
def host_secret():
    """The same secret in a file under the host's $HOME and one in the host's /etc
    (a sandbox has an /etc of its own: a link to /etc/passwd proves nothing)."""
    value = token("PCSB-LINK-SECRET") + "-" + os.urandom(8).hex()
    home = Path(os.path.expanduser("~")) / f".{token('pcsb-hostile-link')}"
    etc = Path("/etc") / token("pcsb-hostile-link")
    for path in (home, etc):
        path.write_text(value + "\n")
    try:
        yield home, etc, value
    finally:
        home.unlink(missing_ok=True)
        etc.unlink(missing_ok=True)


def _assert_no_links_or_specials(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(Path(dirpath) / name)
            assert stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode), (Path(dirpath) / name, oct(st.st_mode))
            assert not st.st_mode & 0o7022, (Path(dirpath) / name, oct(st.st_mode))  # no set-id, sticky, g/o write
            assert st.st_nlink == 1 or stat.S_ISDIR(st.st_mode), Path(dirpath) / name


def _plant(home: Path, etc: Path) -> str:
    return PLANT.replace("__SECRET_PATHS__", repr((str(home), str(etc))))


def test_links_planted_in_model_never_lead_host_code_to_host_files(tmp_path, isolation, host_secret):
    home, etc, secret = host_secret
    attack = run_attack(tmp_path, isolation, dataflow=[MODEL_FLOW], model=_plant(home, etc),
                        extra={"artifact": [{"processor": "zip", "target": "model.zip"}]})
    assert attack.returncode == 0, attack.describe()
    report = attack.reports("model")
    assert report["symlink to /etc/passwd"] == "planted" and report["fifo"] == "planted", report
    for what in ("hard link to the host secret", "hard link to a host file in /etc"):
        assert report[what] in ("ENOENT", "EACCES", "EXDEV", "EPERM"), report  # not even reachable
    model = attack.ws / "model"
    # Copy-out kept regular files and dirs only; set-id and write bits dropped; no hard links.
    _assert_no_links_or_specials(attack.ws)
    assert json.loads((model / "weights.json").read_text()) == {"w": [1, 2, 3]}
    assert (model / "weights-hard").read_text() == (model / "weights.json").read_text()  # a copy, not a link
    for name in ("passwd", "secret", "etc-secret", "shadow", "etc", "fifo", "sock", "null", "sub/deeper/link"):
        assert not os.path.lexists(model / name), name
    assert json.loads((model / "pipeline.json").read_text())["specVersion"] == "2.0"  # the runner's, not a link
    assert (model / "scripts").is_dir() and not (model / "scripts").is_symlink()
    # The zip artifact holds the model's own files, nothing of the host.
    with zipfile.ZipFile(attack.ws / "model.zip") as zf:
        blob = b"".join(zf.read(info) for info in zf.infolist())
        assert all(not (info.external_attr >> 16) & 0o170000 or stat.S_ISREG(info.external_attr >> 16)
                   for info in zf.infolist())
    assert secret.encode() not in blob

    # `predict` on the workspace and on the zip: the model reads its dir, following every link.
    for location in (attack.ws, attack.ws / "model.zip"):
        proc, _, _ = run_cli_tracked(["predict", str(location), "--isolation", isolation, "-s", "1,2,3,4"])
        assert proc.returncode == 0, proc.stderr
        assert secret not in proc.stdout
        seen = json.loads(json.loads(proc.stdout)["data"][0])
        assert seen["direct secret"] == seen["direct etc-secret"] == "FileNotFoundError", seen
    assert not attack.leftovers()


def test_a_model_dir_with_links_handed_to_predict_leaks_nothing(tmp_path, isolation, host_secret):
    """A model directory from elsewhere (say, unpacked by the user) may hold links made
    on the host. The runner refuses them where it reads itself; the stage sees them
    resolve inside its sandbox, where the host's files are not."""
    home, etc, secret = host_secret
    attack = run_attack(tmp_path, isolation, dataflow=[MODEL_FLOW], model=_plant(home, etc))
    assert attack.returncode == 0, attack.describe()
    crafted = tmp_path / "crafted-model"
    shutil.copytree(attack.ws / "model", crafted)
    os.symlink(home, crafted / "secret")
    os.symlink(etc, crafted / "etc-secret")
    os.symlink("/etc", crafted / "etc")
    proc, _, _ = run_cli_tracked(["predict", str(crafted), "--isolation", isolation, "-s", "1,2,3,4"])
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(json.loads(proc.stdout)["data"][0])
    assert secret not in proc.stdout, {k: v for k, v in seen.items() if secret in v or secret in k}
    # resolved inside the sandbox: not there (bwrap), or the image's own 0700 /root (docker)
    assert seen["direct secret"] in ("FileNotFoundError", "PermissionError"), seen
    # (not there, or not readable: a copied model dir keeps the workspace's 0750/0640 modes, SECURITY.md)
    assert seen["direct etc-secret"] in ("FileNotFoundError", "PermissionError"), seen

    # Where the runner itself reads (meta.json, pipeline.json, the scripts), a link is refused.
    for name in ("meta.json", "pipeline.json", "scripts/model.py"):
        bad = tmp_path / f"bad-{name.replace('/', '-')}"
        shutil.copytree(attack.ws / "model", bad)
        (bad / name).unlink()
        os.symlink(home, bad / name)
        proc, _, _ = run_cli_tracked(["predict", str(bad), "--isolation", isolation, "-s", "1,2,3,4"])
        assert proc.returncode == 1, (name, proc.stdout, proc.stderr)
        assert secret not in proc.stdout + proc.stderr, name
        assert "Traceback" not in proc.stderr
