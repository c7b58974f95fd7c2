"""The bwrap backend against hostile code: real bwrap, real cgroups, real
loop mounts. Each test states one thing the sandbox guarantees
(SECURITY.md) and checks it from both sides where it can."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import secrets
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import require_bwrap
from waiting import wait_until
from pipcook_sandbox.runner.backends import bwrap, cgroups
from pipcook_sandbox.runner.backends.base import (
    REASON_CANCELLED,
    REASON_DISK,
    REASON_MEMORY,
    REASON_OUTPUT,
    REASON_PIDS,
    REASON_TIMEOUT,
    Limits,
    Mount,
    StageOptions,
    StageSpec,
)

REPO = Path(__file__).resolve().parent.parent
MAPPED = bwrap.uid_mode() == "mapped"
SMALL = Limits(memory=512 << 20, cpus=1.0, pids=128, disk=64 << 20, timeout=60, output=4 << 20, tmp=64 << 20)

pytestmark = pytest.mark.hostile


@pytest.fixture(autouse=True)
def _bwrap() -> None:
    require_bwrap()


def needs_cgroup(*controllers: str):
    have = cgroups.available()["controllers"]
    return pytest.mark.skipif(not set(controllers) <= set(have),
                              reason=f"no writable cgroup with {controllers} here (a degraded host)")


def spec_for(tmp: Path, code: str, *, limits: Limits = SMALL, name: str = "stage", **kw) -> StageSpec:
    return StageSpec(run_id=cgroups.new_run_id(), name=name, mounts=kw.pop("mounts", []), limits=limits,
                     log_path=tmp / f"{name}.log", argv=["-I", "-S", "-c", textwrap.dedent(code), *kw.pop("args", [])],
                     **kw)


def run(tmp: Path, code: str, *, timeout: float = 60, **kw):
    """Run `code` in a fresh sandbox to the end; (outcome, log text, handle)."""
    spec = spec_for(tmp, code, **kw)
    h = bwrap.start(spec)
    try:
        out = bwrap.enforce_deadline(h, timeout)
    finally:
        h.cleanup()
    return out, spec.log_path.read_text(errors="replace"), h


def wait_printed(spec) -> None:
    """Until the stage's snippet has printed its JSON line to its log (20 s at most)."""
    wait_until(lambda: spec.log_path.exists() and "{" in spec.log_path.read_text(), 20, "the stage's JSON line")


def result(text: str) -> dict:
    """The JSON line a sandboxed snippet printed last."""
    lines = [l for l in text.splitlines() if l.startswith("{")]
    assert lines, text
    return json.loads(lines[-1])


def host_processes(marker: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd:
                found.append(f"{pid}: {cmd[:120]}")
    return found


# --- who the stage is -------------------------------------------------------------


@pytest.mark.parametrize("launcher", ["setpriv", "python"])
def test_uid_65534_and_no_capabilities(tmp_path: Path, monkeypatch, launcher: str) -> None:
    """Mapped mode drops to 65534 with util-linux's setpriv where the host has it,
    else with the Python launcher: the same ids, groups and capabilities either way."""
    if launcher == "python":
        monkeypatch.setattr(bwrap, "setpriv", lambda: None)
    elif MAPPED and bwrap.setpriv() is None:
        pytest.skip("no setpriv on this host: the Python launcher is used (the other case)")
    marker = f"pcsb-id-{secrets.token_hex(4)}"
    spec = spec_for(tmp_path, """
        import json, os, sys, time
        caps = {l.split(":")[0]: l.split()[1] for l in open("/proc/self/status") if l.startswith("Cap")}
        nnp = [l.split()[1] for l in open("/proc/self/status") if l.startswith("NoNewPrivs")][0]
        print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
                          "caps": caps, "nnp": nnp}), flush=True)
        time.sleep(30)
    """, args=[marker])
    h = bwrap.start(spec)
    try:
        wait_printed(spec)
        # Seen from the host: the stage's python is not root.
        pids = [p.split(":")[0] for p in host_processes(marker) if "import json" in p]
        uids = {[l for l in Path(f"/proc/{p}/status").read_text().splitlines() if l.startswith("Uid:")][0]
                for p in pids if Path(f"/proc/{p}/status").exists()}
    finally:
        h.terminate()
        h.cleanup()
    got = result(spec.log_path.read_text())
    assert got["uid"] == 65534 and got["gid"] == 65534 and got["groups"] == []
    assert got["nnp"] == "1"
    for key in ("CapEff", "CapPrm", "CapAmb", "CapInh"):
        assert int(got["caps"][key], 16) == 0, got["caps"]
    if MAPPED:
        assert int(got["caps"]["CapBnd"], 16) == 0
        assert uids and all(u.split()[1:] == ["65534"] * 4 for u in uids), uids


def test_mapped_mode_starts_one_interpreter(tmp_path: Path, monkeypatch) -> None:
    """With setpriv, bwrap's command is setpriv exec'ing the stage's python: no
    second interpreter (the Python launcher) before the stage's own."""
    if bwrap.setpriv() is None:
        pytest.skip("no setpriv on this host")
    spec = spec_for(tmp_path, "pass")
    kw = dict(mode="mapped", etc={}, seccomp_fd=3, writable={}, info_fd=4, block_fd=5)
    _, command = bwrap.build_parts(spec, **kw)
    py = str(bwrap.interpreter().executable)
    assert command[0] == bwrap.setpriv() and command.count(py) == 1, command
    assert command[command.index("--") + 1:] == [py, *spec.argv]
    for flag in ("--bounding-set=-all", "--inh-caps=-all", "--keep-groups"):
        assert flag in command
    monkeypatch.setattr(bwrap, "setpriv", lambda: None)
    _, fallback = bwrap.build_parts(spec, **kw)
    assert fallback[:4] == [py, "-I", "-S", "-c"] and fallback.count(py) == 2


@needs_cgroup("cpu")
def test_running_stage_weighs_its_cpus(tmp_path: Path) -> None:
    """Read from the cgroup files of a running stage: its CPU weight is that of
    --cpus ordinary tasks, and the pipcook-sandbox parent weighs at least that."""
    spec = spec_for(tmp_path, "import time; print('{}', flush=True); time.sleep(30)",
                    limits=dataclasses.replace(SMALL, cpus=2.0))
    h = bwrap.start(spec)
    try:
        assert h.cgroup is not None
        deadline = time.monotonic() + 20  # until the stage's script runs
        while "{}" not in (spec.log_path.read_text() if spec.log_path.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.05)
        v = h.cgroup.version
        d = h.cgroup.dirs["cpu"] if v == 1 else h.cgroup.dirs[""]
        assert h.cgroup.pids(), "the stage is not in its cgroup"
        stage = int((d / cgroups.WEIGHT_FILE[v]).read_text())
        parent = int((d.parent / cgroups.WEIGHT_FILE[v]).read_text())
    finally:
        h.terminate()
        h.cleanup()
    assert stage == 2 * cgroups.WEIGHT_PER_CPU[v]
    assert parent >= stage


@pytest.mark.skipif(not MAPPED, reason="the id handshake is mapped mode's")
def test_a_failed_id_handshake_stops_the_stage_and_says_so(tmp_path: Path, monkeypatch) -> None:
    """The uid/gid maps are written after start() returns (the next stage starts
    meanwhile): maps the kernel refuses stop the stage before its script runs,
    and the outcome names the cause."""
    marker = f"pcsb-nomap-{secrets.token_hex(4)}"
    monkeypatch.setattr(bwrap.owner, "stage_ids", lambda: (4294967295, 4294967295))  # (uid_t)-1: EINVAL
    out, text, h = run(tmp_path, "print('SCRIPT RAN', flush=True)", args=[marker], timeout=30)
    assert "SCRIPT RAN" not in text
    assert out.exit_code != 0 and "could not start" in out.detail, out
    assert not host_processes(marker)
    assert h.cgroup is not None and not any(d.exists() for d in h.cgroup.all_dirs())


@needs_cgroup("pids")
def test_every_process_of_the_stage_is_in_its_cgroup_with_its_rlimits(tmp_path: Path) -> None:
    """bwrap, its pid 1 and the script (in mapped mode put there by the runner during the
    id handshake, in plain mode by the wrapper) are in the stage's cgroup, with the
    stage's nofile, fsize and core limits."""
    marker = f"pcsb-rl-{secrets.token_hex(4)}"
    limits = dataclasses.replace(SMALL, nofile=333, disk=48 << 20)
    spec = spec_for(tmp_path, """
        import json, resource, time
        print(json.dumps({n: resource.getrlimit(getattr(resource, n)) for n in
                          ("RLIMIT_NOFILE", "RLIMIT_FSIZE", "RLIMIT_CORE")}), flush=True)
        time.sleep(30)
    """, args=[marker], limits=limits)
    h = bwrap.start(spec)
    try:
        wait_printed(spec)
        assert h.cgroup is not None and h.pid is not None
        inside = h.cgroup.pids()
        stage = [int(p.split(":")[0]) for p in host_processes(marker)]
    finally:
        h.terminate()
        h.cleanup()
    got = result(spec.log_path.read_text())
    assert got["RLIMIT_NOFILE"] == [333, 333] and got["RLIMIT_FSIZE"] == [48 << 20, 48 << 20]
    assert got["RLIMIT_CORE"] == [0, 0]
    assert stage and set(stage) <= inside, (stage, inside)
    assert h.pid in inside  # bwrap itself


def test_host_home_is_invisible(tmp_path: Path) -> None:
    planted = Path.home() / f"pcsb-planted-{secrets.token_hex(4)}"
    planted.write_text("host secret")
    try:
        out, text, _ = run(tmp_path, f"""
            import json, os
            home = {str(Path.home())!r}
            print(json.dumps({{"exists": os.path.exists({str(planted)!r}),
                              "listing": os.listdir(home) if os.path.isdir(home) else []}}))
        """)
    finally:
        planted.unlink()
    got = result(text)
    assert out.exit_code == 0 and got["exists"] is False
    assert planted.name not in got["listing"]


def test_etc_shadow_and_host_etc_absent(tmp_path: Path) -> None:
    out, text, _ = run(tmp_path, """
        import json, os
        try:
            open("/etc/shadow").read()
            shadow = "readable"
        except OSError as e:
            shadow = e.errno
        print(json.dumps({"shadow": shadow, "etc": sorted(os.listdir("/etc")),
                          "passwd": open("/etc/passwd").read()}))
    """)
    got = result(text)
    assert got["shadow"] == errno.ENOENT
    assert set(got["etc"]) <= {"passwd", "group", "hosts", "ld.so.cache", "localtime"}
    assert "nobody" in got["passwd"] and "/bin/bash" not in got["passwd"]


def test_runner_environment_is_not_inherited(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PCSB_RUNNER_SECRET", "s3cr3t")
    out, text, _ = run(tmp_path, """
        import json, os
        print(json.dumps(dict(os.environ)))
    """, env={"STAGE_VAR": "given"})
    env = result(text)
    assert "PCSB_RUNNER_SECRET" not in env and "s3cr3t" not in text
    assert env["STAGE_VAR"] == "given" and env["HOME"] == "/tmp"


def test_proc_sys_is_read_only(tmp_path: Path) -> None:
    """A host-root stage could rewrite kernel.core_pattern (host code
    execution); neither the uid nor the mount may allow it."""
    out, text, _ = run(tmp_path, """
        import json, os
        res = {}
        for p in ("/proc/sys/kernel/core_pattern", "/proc/sys/vm/drop_caches", "/proc/sys/kernel/hostname"):
            try:
                os.close(os.open(p, os.O_WRONLY))
                res[p] = "writable"
            except OSError as e:
                res[p] = e.errno
        print(json.dumps(res))
    """)
    got = result(text)
    assert all(v in (errno.EROFS, errno.EACCES, errno.EPERM) for v in got.values()), got


# --- what the stage may write ------------------------------------------------------------


def test_read_only_mounts_and_root(tmp_path: Path) -> None:
    src = tmp_path / "scripts"
    src.mkdir()
    (src / "s.py").write_text("x = 1\n")
    os.chmod(tmp_path, 0o755)
    out, text, _ = run(tmp_path, """
        import json
        res = {}
        for p in ("/pipcook/scripts/s.py", "/pipcook/scripts/new", "/usr/evil", "/evil", "/etc/passwd"):
            try:
                open(p, "a").write("x")
                res[p] = "written"
            except OSError as e:
                res[p] = e.errno
        res["read"] = open("/pipcook/scripts/s.py").read()
        print(json.dumps(res))
    """, mounts=[Mount(src, "/pipcook/scripts")])
    got = result(text)
    assert got.pop("read") == "x = 1\n"
    assert all(v in (errno.EROFS, errno.EACCES) for v in got.values()), got
    assert (src / "s.py").read_text() == "x = 1\n" and not (src / "new").exists()


def test_writable_dir_is_copied_out(tmp_path: Path) -> None:
    host_out = tmp_path / "model"
    out, text, h = run(tmp_path, """
        import os
        os.makedirs("/workspace/model/sub")
        open("/workspace/model/sub/weights.bin", "wb").write(b"\\x00\\x01" * 1000)
        open("/tmp/scratch", "w").write("private")
    """, writable={"/workspace/model": host_out})
    assert out.exit_code == 0, text
    assert (host_out / "sub" / "weights.bin").read_bytes() == b"\x00\x01" * 1000
    assert not h.skipped


def test_symlink_in_writable_dir_is_not_followed(tmp_path: Path) -> None:
    host_out = tmp_path / "data"
    out, text, h = run(tmp_path, """
        import os
        os.symlink("/etc/passwd", "/workspace/data/passwd")
        os.symlink("/", "/workspace/data/root")
        os.mkfifo("/workspace/data/fifo")
        open("/workspace/data/real.txt", "w").write("ok")
    """, writable={"/workspace/data": host_out})
    assert out.exit_code == 0, text
    assert (host_out / "real.txt").read_text() == "ok"
    for name in ("passwd", "root", "fifo"):
        assert not os.path.lexists(host_out / name)
    assert sorted(h.skipped) == ["w0/fifo", "w0/passwd", "w0/root"]


# --- no network -------------------------------------------------------------------


def test_no_network_to_host_loopback(tmp_path: Path) -> None:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tcp6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    tcp6.bind(("::1", 0))
    tcp6.listen()
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"\0pcsb-test-{secrets.token_hex(4)}"
    abstract.bind(name)
    abstract.listen()
    try:
        out, text, _ = run(tmp_path, f"""
            import errno, json, socket
            def attempt(fam, typ, addr, send=False):
                try:
                    s = socket.socket(fam, typ)
                    s.settimeout(3)
                    s.sendto(b"x", addr) if send else s.connect(addr)
                    return "connected"
                except OSError as e:
                    return errno.errorcode.get(e.errno, str(e))
            print(json.dumps({{
                "tcp": attempt(socket.AF_INET, socket.SOCK_STREAM, ("127.0.0.1", {tcp.getsockname()[1]})),
                "udp": attempt(socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", {udp.getsockname()[1]}), True),
                "tcp6": attempt(socket.AF_INET6, socket.SOCK_STREAM, ("::1", {tcp6.getsockname()[1]})),
                "metadata": attempt(socket.AF_INET, socket.SOCK_STREAM, ("169.254.169.254", 80)),
                "abstract": attempt(socket.AF_UNIX, socket.SOCK_STREAM, {name!r}),
            }}))
        """)
        got = result(text)
        assert "connected" not in got.values(), got
        assert got["tcp"] == got["udp"] == got["tcp6"] == "EAFNOSUPPORT"  # seccomp, before the netns
        assert got["abstract"] in ("ECONNREFUSED", "ENOENT")  # another network namespace
        # And nothing arrived on the host side.
        for s in (tcp, udp, tcp6, abstract):
            s.setblocking(False)
        with pytest.raises(BlockingIOError):
            tcp.accept()
        with pytest.raises(BlockingIOError):
            udp.recv(10)
        with pytest.raises(BlockingIOError):
            abstract.accept()
    finally:
        for s in (tcp, udp, tcp6, abstract):
            s.close()


def test_socket_af_inet_denied_by_seccomp(tmp_path: Path) -> None:
    out, text, _ = run(tmp_path, """
        import errno, socket
        try:
            socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            print("created")
        except OSError as e:
            print("errno", errno.errorcode[e.errno])
    """)
    assert "errno EAFNOSUPPORT" in text


# --- no view of, or grip on, other processes -------------------------------------


def test_ptrace_and_unshare_denied(tmp_path: Path) -> None:
    out, text, _ = run(tmp_path, """
        import ctypes, errno, json
        libc = ctypes.CDLL(None, use_errno=True)
        def call(*args, fn="ptrace"):
            r = getattr(libc, fn)(*args)
            return "ok" if r == 0 else errno.errorcode[ctypes.get_errno()]
        print(json.dumps({"traceme": call(0, 0, None, None), "attach1": call(16, 1, None, None),
                          "unshare_user": call(0x10000000, fn="unshare"),
                          "unshare_ns": call(0x00020000, fn="unshare")}))
    """)
    got = result(text)
    assert got == {"traceme": "EPERM", "attach1": "EPERM", "unshare_user": "EPERM", "unshare_ns": "EPERM"}


def test_only_the_sandbox_pids_are_visible(tmp_path: Path) -> None:
    out, text, _ = run(tmp_path, """
        import json, os
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
        cmds = [open(f"/proc/{p}/cmdline", "rb").read().split(b"\\0")[0].decode() for p in pids]
        print(json.dumps({"pids": pids, "me": os.getpid(), "cmds": cmds}))
    """)
    got = result(text)
    assert got["pids"] == [1, got["me"]] and got["me"] <= 3, got
    assert os.getpid() not in got["pids"] or os.getpid() <= 3


# --- limits ---------------------------------------------------------------------------


@needs_cgroup("memory")
def test_memory_bomb_is_stopped_and_named(tmp_path: Path) -> None:
    out, text, _ = run(tmp_path, """
        chunks = []
        while len(chunks) < 32:              # 2 GiB, touched
            chunks.append(b"x" * (64 << 20))
        print("survived")
    """, limits=SMALL.replace(memory=256 << 20))
    assert "survived" not in text
    assert out.reason == REASON_MEMORY and out.detail == "memory limit 256 MiB", out


@needs_cgroup("pids")
def test_fork_bomb_is_stopped_and_host_is_fine(tmp_path: Path) -> None:
    t0 = time.monotonic()
    out, text, h = run(tmp_path, """
        import os, sys, time
        for i in range(10000):
            try:
                if os.fork() == 0:
                    time.sleep(100)
                    os._exit(0)
            except OSError:
                print("fork refused after", i)
                sys.exit(3)
    """, limits=SMALL.replace(pids=64))
    assert out.reason == REASON_PIDS and out.detail == "process limit 64", (out, text)
    assert "fork refused after" in text
    assert time.monotonic() - t0 < 30
    assert subprocess.run(["true"]).returncode == 0  # the host can still fork
    assert not any(d.exists() for d in h.cgroup.all_dirs())


def test_cpu_spin_is_stopped_by_the_deadline(tmp_path: Path) -> None:
    t0 = time.monotonic()
    out, text, _ = run(tmp_path, "while True:\n    pass\n", timeout=2)
    elapsed = time.monotonic() - t0
    assert out.reason == REASON_TIMEOUT and out.detail == "wall-clock limit 2 s", out
    assert 2 <= elapsed < 6, elapsed


def test_disk_fill_fails_with_enospc(tmp_path: Path) -> None:
    out, text, h = run(tmp_path, """
        import errno, sys
        try:
            with open("/workspace/data/fill", "wb") as f:
                for _ in range(64):
                    f.write(b"x" * (1 << 20))
        except OSError as e:
            print("write failed:", errno.errorcode[e.errno], flush=True)
            sys.exit(1)
    """, limits=SMALL.replace(disk=32 << 20), writable={"/workspace/data": tmp_path / "data"})
    assert "write failed: ENOSPC" in text
    assert out.reason == REASON_DISK and out.detail == "disk quota 32 MiB", out
    assert h.volume.kind == "loop" or not os.geteuid() == 0
    # What was written within the quota is still handed back, no more.
    assert (tmp_path / "data" / "fill").stat().st_size <= 32 << 20


def test_stdout_flood_is_cut(tmp_path: Path) -> None:
    cap = 1 << 20
    t0 = time.monotonic()
    out, text, _ = run(tmp_path, """
        import sys
        line = "y" * 1023 + "\\n"
        while True:
            sys.stdout.write(line)
    """, limits=SMALL.replace(output=cap))
    assert out.reason == REASON_OUTPUT, out
    size = (tmp_path / "stage.log").stat().st_size
    assert cap <= size <= cap + 200, size
    assert "output cut at" in text.splitlines()[-1]
    assert time.monotonic() - t0 < 20


# --- nothing outlives the stage -------------------------------------------------------

DAEMON = """
    import os, sys, time
    tag = sys.argv[1] + "-d" + "aemon"      # the full tag appears only in the daemon
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            # the file is written after the exec, by the program that carries the tag
            os.execv(sys.executable, [sys.executable, "-c", "import time; open('/workspace/out/daemon-started', 'w')"
                                      ".close(); time.sleep(1000)", tag])
        os._exit(0)
    while not os.path.exists("/workspace/out/daemon-started"):
        time.sleep(0.01)
    print("main done", flush=True)
    if len(sys.argv) > 2:
        time.sleep(1000)
"""


@pytest.mark.parametrize("how", ["main exits", "terminated"])
def test_double_forked_daemon_dies(tmp_path: Path, how: str) -> None:
    marker = f"pcsb-daemon-{secrets.token_hex(4)}"
    args = [marker] + (["stay"] if how == "terminated" else [])
    spec = spec_for(tmp_path, DAEMON, args=args, writable={"/workspace/out": tmp_path / "out"})
    h = bwrap.start(spec)
    try:
        wait_until(lambda: spec.log_path.exists() and "main done" in spec.log_path.read_text(), 20,
                   "the stage to print 'main done'")
        if how == "terminated":
            assert host_processes(marker + "-daemon"), "the daemon should be running before terminate"
            h.terminate(REASON_CANCELLED)
        else:
            h.wait(20)
    finally:
        h.cleanup()
    assert (tmp_path / "out" / "daemon-started").exists()
    assert host_processes(marker + "-daemon") == []
    assert h.outcome().reason == (REASON_CANCELLED if how == "terminated" else None)


def test_cleanup_leaves_no_mount_cgroup_or_state(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, "open('/workspace/out/f', 'w').write('x')",
                    writable={"/workspace/out": tmp_path / "out"})
    h = bwrap.start(spec)
    h.wait(30)
    mnt = str(h.volume.mountpoint)
    assert mnt in Path("/proc/mounts").read_text()
    dirs = h.cgroup.all_dirs() if h.cgroup else []
    assert all(d.exists() for d in dirs)
    h.cleanup()
    h.cleanup()  # idempotent
    h.terminate()  # harmless afterwards
    assert mnt not in Path("/proc/mounts").read_text()
    assert str(h.state_dir) not in Path("/proc/self/mountinfo").read_text()
    assert not any(d.exists() for d in dirs)
    assert not h.state_dir.exists()
    assert (tmp_path / "out" / "f").read_text() == "x"
    assert h.outcome().exit_code == 0


CRASHING_RUNNER = """
import json, os, sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from pipcook_sandbox.runner.backends import bwrap, cgroups
from pipcook_sandbox.runner.backends.base import Limits, StageSpec
tmp = Path({tmp!r})
spec = StageSpec(run_id=cgroups.new_run_id(), name="crash", mounts=[],
                 limits=Limits(memory=256 << 20, pids=32, disk=16 << 20),
                 log_path=tmp / "crash.log", writable={{"/workspace/out": tmp / "out"}},
                 argv=["-I", "-S", "-c", "import time; print('up', flush=True); time.sleep(1000)", {marker!r}])
h = bwrap.start(spec)
print(json.dumps({{"state": str(h.state_dir), "mount": str(h.volume.mountpoint),
                  "cgroup": [str(d) for d in (h.cgroup.all_dirs() if h.cgroup else [])]}}), flush=True)
deadline = time.monotonic() + 30
log = tmp / "crash.log"
while not (log.exists() and "up" in log.read_text()):  # the stage runs, inside its sandbox
    assert time.monotonic() < deadline, "the stage did not start"
    time.sleep(0.02)
os._exit(0)   # the runner dies without cleaning up
"""


def test_clean_leftovers_after_a_runner_crash(tmp_path: Path) -> None:
    marker = f"pcsb-crash-{secrets.token_hex(4)}"
    code = CRASHING_RUNNER.format(repo=str(REPO), tmp=str(tmp_path), marker=marker)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    left = json.loads(proc.stdout.strip().splitlines()[-1])
    state = Path(left["state"])
    # The sandbox itself died with its runner (--die-with-parent)...
    wait_until(lambda: host_processes(marker) == [], 10, "the sandbox to die with its runner")
    # ...but the host resources need `clean`.
    assert state.is_dir() and left["mount"] in Path("/proc/mounts").read_text()
    assert all(Path(d).is_dir() for d in left["cgroup"])
    removed = bwrap.clean_leftovers()
    assert str(state) in removed
    assert not state.exists()
    assert left["mount"] not in Path("/proc/mounts").read_text()
    assert not any(Path(d).exists() for d in left["cgroup"])


def test_clean_leftovers_spares_live_runs(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, "import time; time.sleep(30)", writable={"/workspace/out": tmp_path / "out"})
    h = bwrap.start(spec)
    try:
        bwrap.clean_leftovers()
        assert h.state_dir.exists() and h.poll() is None
        assert str(h.volume.mountpoint) in Path("/proc/mounts").read_text()
    finally:
        h.terminate()
        h.cleanup()


def test_probe_reports_working_confinement() -> None:
    info = bwrap.probe()
    for key in ("bwrap", "userns", "seccomp", "pid_namespace", "network_namespace"):
        assert info[key], (key, info)


# --- the weaker variants, where a host needs them ----------------------------------------


def test_watched_quota_stops_the_stage(tmp_path: Path) -> None:
    out, text, h = run(tmp_path, """
        import time
        for i in range(64):
            open(f"/workspace/data/part{i}", "wb").write(b"x" * (2 << 20))
            time.sleep(0.02)
        print("wrote everything")
    """, limits=SMALL.replace(disk=16 << 20), writable={"/workspace/data": tmp_path / "data"},
        options=StageOptions(disk_quota="watch"))
    assert h.volume.kind == "watch" and any("weaker" in d for d in h.degraded)
    assert "wrote everything" not in text
    assert out.reason == REASON_DISK and out.detail == "disk quota 16 MiB", out
    # The copy-out is capped at the quota too.
    assert sum(p.stat().st_size for p in (tmp_path / "data").iterdir()) <= 16 << 20


@pytest.mark.skipif(os.geteuid() != 0, reason="plain mode is the only mode of a non-root runner")
def test_plain_mode_as_root_is_flagged_and_still_walled(tmp_path: Path) -> None:
    out, text, h = run(tmp_path, """
        import errno, json, os, socket
        try:
            os.close(os.open("/proc/sys/kernel/core_pattern", os.O_WRONLY))
            core = "writable"
        except OSError as e:
            core = errno.errorcode[e.errno]
        print(json.dumps({"uid": os.getuid(), "core_pattern": core,
                          "caps": [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0]}))
    """, options=StageOptions(uid_mode="plain"))
    got = result(text)
    assert any("host uid 0" in d for d in h.degraded)
    assert got["uid"] == 65534 and int(got["caps"], 16) == 0
    assert got["core_pattern"] in ("EROFS", "EACCES")
