"""`pipcook-sandbox run` end to end: real CLI, real bubblewrap, small non-TF pipelines.

What a user relies on: the workspace layout, streaming stages, metrics, a
self-contained model dir, artifacts, the script cache and pins, and errors
that name the stage, the script and the cause, without a traceback.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest
from httpserver import http_server  # noqa: F401  (fixture)
from conftest import REPO, TINY, _runner_alive, leftover_mounts, require_bwrap, run_cli, sandbox_processes, write_pipeline
from waiting import wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True)
def _bwrap():
    require_bwrap()


def test_tiny_pipeline_trains_and_fills_the_workspace(tmp_path):
    out = tmp_path / "ws"
    proc = run_cli("run", str(TINY / "pipeline.json"), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    for sub in ("pipeline.json", "scripts", "framework", "data", "cache", "model", "logs", "metrics.jsonl"):
        assert (out / sub).exists(), sub
    assert (out / "data" / "made.txt").read_text() == "200 samples\n"  # datasource wrote data/
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]  # epochs=3 from options.train
    assert all(m["stage"] == "model" and m["samples"] == 160 for m in metrics)
    assert metrics[-1]["accuracy"] > 0.9
    weights = json.loads((out / "model" / "weights.json").read_text())
    assert weights["categories"] == ["neg", "pos"]
    model_pipeline = json.loads((out / "model" / "pipeline.json").read_text())
    assert model_pipeline["model"].startswith("scripts/model.py#sha256=")
    assert (out / "model" / "scripts" / "dataflow.py").is_file()
    assert json.loads((out / "model" / "meta.json").read_text())["factor"] == 2.0
    with zipfile.ZipFile(out / "model.zip") as zf:
        assert "weights.json" in zf.namelist() and "pipeline.json" in zf.namelist()
    assert {p.name for p in (out / "logs").iterdir()} == {"datasource.log", "dataflow-1.log", "model.log"}
    assert "Traceback" not in proc.stderr
    assert not leftover_mounts()
    assert not [d for d in Path("/tmp").glob("pcsb-*") if (d / "run.json").is_file() and not _runner_alive(d)]


def test_stages_overlap_in_time(tmp_path):
    """The datasource is still producing while the model already consumes."""
    datasource = '''
        import time
        from sandbox import sdk

        class Slow(sdk.Dataset):
            def __len__(self): return 40
            def _get(self, i):
                time.sleep(0.02)
                return {"data": i, "label": time.time()}

        def datasource(options, ctx):
            return sdk.DatasetPool(train=Slow(), meta={"type": "general"})
    '''
    model = '''
        import time
        def train(runtime, options, ctx):
            first = runtime.dataset.train.next()
            received_first = time.time()
            rest = runtime.dataset.train.next_batch(0)
            produced_last = rest[-1]["label"]
            runtime.log_metrics(overlap=float(received_first < produced_last), n=1 + len(rest))
    '''
    pipeline = write_pipeline(tmp_path / "p", datasource=datasource, dataflow=[], model=model)
    proc = run_cli("run", str(pipeline), "-o", str(tmp_path / "ws"))
    assert proc.returncode == 0, proc.stderr
    metric = json.loads((tmp_path / "ws" / "metrics.jsonl").read_text().splitlines()[0])
    assert metric["n"] == 40
    assert metric["overlap"] == 1.0


def _error_run(tmp_path, **scripts) -> subprocess.CompletedProcess:
    pipeline = write_pipeline(tmp_path / "p", **scripts)
    return run_cli("run", str(pipeline), "-o", str(tmp_path / "ws"))


def test_syntax_error_names_stage_script_and_line(tmp_path):
    proc = _error_run(tmp_path, model="def train(runtime, options, ctx)\n    pass\n")
    assert proc.returncode == 1
    assert "stage 'model' (model.py)" in proc.stderr and "syntax error at line 1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "ws" / "logs").is_dir()  # the workspace is kept


def test_missing_entry_is_named(tmp_path):
    proc = _error_run(tmp_path, datasource="def not_it(options, ctx):\n    return None\n")
    assert proc.returncode == 1
    assert "stage 'datasource' (datasource.py)" in proc.stderr
    assert "has no function 'datasource'" in proc.stderr


def test_script_exception_names_line_and_traceback_only_with_debug(tmp_path):
    model = "def train(runtime, options, ctx):\n    raise ValueError('labels are all the same')\n"
    proc = _error_run(tmp_path, model=model)
    assert proc.returncode == 1
    assert "stage 'model' (model.py): ValueError: labels are all the same (model.py, line 2, in train)" in proc.stderr
    assert "Traceback" not in proc.stderr
    pipeline = tmp_path / "p" / "pipeline.json"
    debug = run_cli("run", str(pipeline), "-o", str(tmp_path / "ws2"), "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_sample_of_unsupported_type_names_stage_and_type(tmp_path):
    datasource = '''
        from sandbox import sdk
        def datasource(options, ctx):
            return sdk.from_lists(train=[{"data": {1, 2}, "label": 0}])
    '''
    proc = _error_run(tmp_path, datasource=datasource, dataflow=[])
    assert proc.returncode == 1
    assert "stage 'datasource' (datasource.py)" in proc.stderr
    assert "set" in proc.stderr and "cannot cross a sandbox boundary" in proc.stderr


def test_failing_dataflow_is_reported_not_the_waiting_model(tmp_path):
    dataflow = '''
        def dataflow(pool, options, ctx):
            def fn(sample):
                raise KeyError("no such column")
            return pool.transform(fn)
    '''
    proc = _error_run(tmp_path, dataflow=[dataflow])
    assert proc.returncode == 1
    assert "stage 'dataflow-1' (dataflow1.py)" in proc.stderr and "KeyError" in proc.stderr


def test_bad_pipeline_file_is_one_paragraph(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"specVersion": "1.0", "datasource": "a.py", "model": "b.py"}))
    proc = run_cli("run", str(bad), "-o", str(tmp_path / "ws"))
    assert proc.returncode == 1
    assert "specVersion" in proc.stderr and "Traceback" not in proc.stderr
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"specVersion": "2.0", "datasource": "a.py", "model": "b.py", "dataflows": []}))
    proc = run_cli("run", str(typo), "-o", str(tmp_path / "ws2"))
    assert proc.returncode == 1 and "dataflows" in proc.stderr
    proc = run_cli("run", str(tmp_path / "missing.json"))
    assert proc.returncode == 1 and "not found" in proc.stderr and "Traceback" not in proc.stderr


def test_existing_nonempty_output_is_never_clobbered(tmp_path):
    out = tmp_path / "ws"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    proc = run_cli("run", str(TINY / "pipeline.json"), "-o", str(out))
    assert proc.returncode == 1 and "not empty" in proc.stderr
    assert (out / "precious.txt").read_text() == "keep me"


def test_ctrl_c_stops_every_stage_and_keeps_the_workspace(tmp_path):
    marker = f"ctrlc-{os.getpid()}-{time.time_ns()}"
    model = f'''
        import time
        def train(runtime, options, ctx):
            runtime.notify_progress(1)
            tag = "{marker}"
            print("training", flush=True)
            time.sleep(300)
    '''
    pipeline = write_pipeline(tmp_path / "p", model=model)
    proc = subprocess.Popen([sys.executable, "-m", "pipcook_sandbox", "run", str(pipeline), "-o", str(tmp_path / "ws")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "ws" / "logs" / "model.log"
    wait_until(lambda: log.exists() and "training" in log.read_text(), 120, "the model stage to be training")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert (tmp_path / "ws" / "pipeline.json").is_file()
    # every sandbox of this run binds scripts from the workspace, so its path is in their command lines
    assert not sandbox_processes(str(tmp_path / "ws")), "sandbox processes outlived the run"
    assert not leftover_mounts()


def _route(body: bytes) -> tuple:
    return (200, {"Content-Type": "text/plain"}, body)


def test_remote_pipeline_with_pin_and_cache(tmp_path, http_server):
    """Served from a local HTTP server: pinned model, and a second run fetches no script."""
    import hashlib

    for name in ("datasource.py", "dataflow.py", "model.py"):
        http_server.routes[f"/{name}"] = _route((TINY / name).read_bytes())
    digest = hashlib.sha256((TINY / "model.py").read_bytes()).hexdigest()
    spec = {"specVersion": "2.0", "datasource": "datasource.py?count=100", "dataflow": ["dataflow.py"],
            "model": f"model.py#sha256={digest}", "options": {"train": {"epochs": 1}}}
    http_server.routes["/pipeline.json"] = _route(json.dumps(spec).encode())
    url = http_server.url("/pipeline.json")
    env = {"PIPCOOK_SANDBOX_CACHE": str(tmp_path / "cache")}
    refused = run_cli("run", url, "-o", str(tmp_path / "ws0"), env=env)
    assert refused.returncode == 1 and "127.0.0.1" in refused.stderr  # private address without --allow-private
    first = run_cli("run", url, "--allow-private", "127.0.0.1", "-o", str(tmp_path / "ws1"), env=env)
    assert first.returncode == 0, first.stderr
    assert {p: http_server.hits[p] for p in ("/datasource.py", "/dataflow.py", "/model.py")} == {
        "/datasource.py": 1, "/dataflow.py": 1, "/model.py": 1}
    second = run_cli("run", url, "--allow-private", "127.0.0.1", "-o", str(tmp_path / "ws2"), env=env)
    assert second.returncode == 0, second.stderr
    # the refused run never connected; the second run fetches the pipeline again but no script
    assert http_server.hits["/pipeline.json"] == 2
    assert sum(http_server.hits[p] for p in ("/datasource.py", "/dataflow.py", "/model.py")) == 3
    http_server.routes["/model.py"] = _route((TINY / "model.py").read_bytes() + b"\n# tampered\n")
    third = run_cli("run", url, "--allow-private", "127.0.0.1", "--nocache", "-o", str(tmp_path / "ws3"), env=env)
    assert third.returncode == 1
    assert "sha256" in third.stderr and "model.py" in third.stderr
    assert not (tmp_path / "ws3" / "logs" / "model.log").exists()  # nothing ran


def test_remote_pipeline_may_not_name_local_files(tmp_path, http_server):
    spec = {"specVersion": "2.0", "datasource": "file:///etc/passwd", "model": "model.py"}
    http_server.routes["/pipeline.json"] = _route(json.dumps(spec).encode())
    proc = run_cli("run", http_server.url("/pipeline.json"), "--allow-private", "127.0.0.1", "-o", str(tmp_path / "ws"))
    assert proc.returncode == 1
    assert "remote pipeline may not name local files" in proc.stderr


def test_gpu_is_refused_clearly_on_a_host_without_one(tmp_path):
    if any(Path("/dev").glob("nvidia[0-9]*")):
        pytest.skip("this host has an NVIDIA GPU: the refusal cannot be shown here")
    for args in (["--gpu"], ["--gpu", "--isolation", "docker"]):
        proc = run_cli("run", str(TINY / "pipeline.json"), "-o", str(tmp_path / f"ws{len(args)}"), *args)
        assert proc.returncode == 1 and "no NVIDIA GPU" in proc.stderr and "Traceback" not in proc.stderr
    pipeline = write_pipeline(tmp_path / "p", extra={"options": {"train": {"gpu": True}}})
    proc = run_cli("run", str(pipeline), "-o", str(tmp_path / "ws"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    # The error says the request came from the file, not the command line, and how to refuse it.
    assert "requested by the pipeline file (options.train.gpu" in proc.stderr and "--no-gpu" in proc.stderr
    assert not (tmp_path / "ws").exists()  # refused before anything ran


def test_no_gpu_overrides_a_gpu_the_pipeline_file_asks_for(tmp_path):
    """options.train.gpu is untrusted input: the operator's --no-gpu has the last word."""
    pipeline = write_pipeline(tmp_path / "p", extra={"options": {"train": {"gpu": True, "epochs": 1}}})
    proc = run_cli("run", str(pipeline), "-o", str(tmp_path / "ws"), "--no-gpu")
    assert proc.returncode == 0, proc.stderr
    assert "options.train.gpu" in proc.stderr and "--no-gpu refuses it" in proc.stderr
    assert (tmp_path / "ws" / "model" / "weights.json").is_file()  # trained, on the CPU


def _decide(train: dict, gpu: bool | None, isolation: str = "none") -> tuple[bool | None, list[str]]:
    from pipcook_sandbox.runner import spec
    from pipcook_sandbox.runner.training import RunOptions, check_gpu

    said: list[str] = []
    pipeline = spec.parse_pipeline({"specVersion": "2.0", "datasource": "d.py", "model": "m.py",
                                    "options": {"train": train}}, str(REPO / "pipeline.json"))
    return check_gpu(pipeline, RunOptions(isolation=isolation, gpu=gpu, log=said.append)).gpu, said


def test_who_decides_the_gpu():
    """--gpu asks, --no-gpu refuses, neither lets the pipeline ask and the log says so."""
    assert _decide({}, None) == (False, [])
    assert _decide({"gpu": False}, None) == (False, [])
    assert _decide({}, True) == (True, [])  # the command line asked: nothing to point out
    gpu, said = _decide({"gpu": True}, None)
    assert gpu is True and said and "pipeline file" in said[0] and "not the command line" in said[0]
    gpu, said = _decide({"gpu": True}, False)
    assert gpu is False and "--no-gpu refuses it" in said[0]
    assert _decide({}, False) == (False, [])


def test_a_backend_that_cannot_confine_here_is_refused_before_any_script_runs(tmp_path):
    """The backend probe runs beside the runner's imports, but its answer still comes first: with no
    Docker engine to reach, `run --isolation docker` stops with the reason and starts no stage."""
    marker = tmp_path / "ran"
    datasource = f"""
        open({str(marker)!r}, "w").close()  # would only work unconfined; must never run at all
        def datasource(options, ctx):
            return None
    """
    pipeline = write_pipeline(tmp_path / "p", datasource=datasource)
    ws = tmp_path / "ws"
    proc = run_cli("run", str(pipeline), "-o", str(ws), "--isolation", "docker",
                   env={"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "the docker backend cannot confine scripts on this host" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
    assert not (ws / "logs").exists() or not any((ws / "logs").iterdir())


def test_native_thread_pools_follow_the_stage_cpu_quota(tmp_path):
    """OpenBLAS/OpenMP would start one thread per host core; a stage gets as many as --cpus gives it,
    set before numpy is imported, whatever the runner's own environment says."""
    datasource = (TINY / "datasource.py").read_text().replace("def datasource(options, ctx):\n", (
        "def datasource(options, ctx):\n"
        "    print('threads', os.environ.get('OPENBLAS_NUM_THREADS'), os.environ.get('OMP_NUM_THREADS'), flush=True)\n"))
    pipeline = write_pipeline(tmp_path / "p", datasource=datasource)
    ws = tmp_path / "ws"
    proc = run_cli("run", str(pipeline), "-o", str(ws), "--cpus", "1", env={"OPENBLAS_NUM_THREADS": "64"})
    assert proc.returncode == 0, proc.stderr
    assert "threads 1 1" in (ws / "logs" / "datasource.log").read_text()


# --- the end of a run: a worker flushes what a script left open (sandbox/fastexit.py), the
# serving stages are stopped at the model's done --------------------------------------------------------

LAST_WRITES_MODEL = '''
    import atexit, os, threading
    from pipcook_sandbox_tiny_model import train as tiny_train

    KEPT = []  # a file the script never closes: its buffered tail is written only by the process's end

    def train(runtime, options, ctx):
        tiny_train(runtime, options, ctx)
        model_dir = runtime.read_model()
        f = open(os.path.join(model_dir, "unclosed.txt"), "w")
        f.write("x" * 100_000)
        f.write("END")  # a small write: it sits in the file's buffer when train() returns
        KEPT.append(f)
        atexit.register(lambda: open(os.path.join(model_dir, "atexit.txt"), "w").write("atexit ran"))
        if options.get("thread"):
            def later():  # a thread that is not a daemon: the interpreter waits for it, so must the worker
                threading.Event().wait(0.5)
                with open(os.path.join(model_dir, "thread.txt"), "w") as out:
                    out.write("thread finished")
            threading.Thread(target=later).start()
'''


def _tiny_model_module() -> str:
    """LAST_WRITES_MODEL, with the tiny model's train() pasted in (a stage script is one file)."""
    tiny = (TINY / "model.py").read_text().replace("def train(", "def tiny_train(")
    return tiny + textwrap.dedent(LAST_WRITES_MODEL).replace(
        "from pipcook_sandbox_tiny_model import train as tiny_train\n", "")


@pytest.mark.parametrize("thread", [False, True], ids=["files-and-atexit", "with-a-thread"])
def test_a_stages_last_writes_reach_the_workspace(tmp_path, thread):
    """What a stage wrote just before its end is all there: a buffered file it never closed, an atexit
    handler's file and (with-a-thread) a non-daemon thread's that finishes after train() returned."""
    pipeline = write_pipeline(tmp_path / "p", model=_tiny_model_module(),
                              extra={"options": {"train": {"epochs": 1, "thread": thread}}})
    out = tmp_path / "ws"
    proc = run_cli("run", str(pipeline), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "model" / "unclosed.txt").read_text() == "x" * 100_000 + "END"
    assert (out / "model" / "atexit.txt").read_text() == "atexit ran"
    assert (out / "model" / "thread.txt").is_file() == thread
    if thread:
        assert (out / "model" / "thread.txt").read_text() == "thread finished"
    assert (out / "model" / "weights.json").is_file()
    assert not leftover_mounts()


def test_an_exit_code_after_done_still_decides_the_run(tmp_path):
    """A model that reports done and then ends with status 3 (an atexit handler, now run by the worker
    itself) fails the run, and the paragraph names the model, not the stages stopped at its done."""
    model = (TINY / "model.py").read_text() + textwrap.dedent('''
        import atexit
        atexit.register(lambda: os._exit(3))
    ''')
    proc = _error_run(tmp_path, model=model)
    assert proc.returncode == 1, proc.stderr
    assert "stage 'model' (model.py)" in proc.stderr
    assert "datasource" not in proc.stderr.split("error:", 1)[-1]
    assert "Traceback" not in proc.stderr


def test_a_serving_stage_that_dies_of_its_stop_is_not_blamed_for_the_model(tmp_path):
    """The datasource ends with status 1 when it is stopped (at the model's done), and the model then
    ends with status 3: the run fails, and the paragraph names the model, whose failure it is."""
    datasource = (TINY / "datasource.py").read_text() + textwrap.dedent('''
        import atexit
        atexit.register(lambda: os._exit(1))
    ''')
    model = (TINY / "model.py").read_text() + textwrap.dedent('''
        import atexit
        atexit.register(lambda: os._exit(3))
    ''')
    proc = _error_run(tmp_path, datasource=datasource, model=model)
    assert proc.returncode == 1, proc.stderr
    error = proc.stderr.split("error:", 1)[-1]
    assert "stage 'model' (model.py)" in error and "exited with code 3" in error, proc.stderr
    assert "datasource" not in error, proc.stderr


def test_a_script_with_a_module_level_executor_ends_on_time(tmp_path):
    """A model script that keeps a concurrent.futures pool in a global (its idle workers are not
    daemons; the interpreter's shutdown wakes them) ends with its run, not at the wall-clock limit."""
    model = (TINY / "model.py").read_text() + textwrap.dedent('''
        from concurrent.futures import ThreadPoolExecutor
        POOL = ThreadPoolExecutor(2)
        _tiny_train = train

        def train(runtime, options, ctx):
            assert POOL.submit(sum, [1, 2]).result() == 3
            _tiny_train(runtime, options, ctx)
    ''')
    pipeline = write_pipeline(tmp_path / "p", model=model)
    # A stage still running at --timeout is stopped and fails the run: success means it ended by itself.
    proc = run_cli("run", str(pipeline), "-o", str(tmp_path / "ws"), "--timeout", "60", "--json")
    assert proc.returncode == 0, proc.stderr
    seen = [json.loads(line) for line in proc.stdout.splitlines()]
    assert seen[-1]["status"] == "succeeded"
    assert (tmp_path / "ws" / "model" / "weights.json").is_file()


def test_serving_stages_are_stopped_at_the_models_done_not_after_its_exit(tmp_path):
    """The model reports done, then takes a while to exit (a thread finishing): the datasource and the
    dataflow are stopped meanwhile, so they have exited before the model does, and the run succeeds."""
    model = (TINY / "model.py").read_text() + textwrap.dedent('''
        import threading
        _tiny_train = train

        def train(runtime, options, ctx):
            _tiny_train(runtime, options, ctx)
            threading.Thread(target=threading.Event().wait, args=(3.0,)).start()  # not a daemon: waited for
    ''')
    pipeline = write_pipeline(tmp_path / "p", model=model)
    proc = run_cli("run", str(pipeline), "-o", str(tmp_path / "ws"), "--json")
    assert proc.returncode == 0, proc.stderr
    seen = [json.loads(line) for line in proc.stdout.splitlines()]
    order = [e["stage"] for e in seen if e["event"] == "stage" and e.get("status") == "exited"]
    assert order[-1] == "model" and set(order[:-1]) == {"datasource", "dataflow-1"}, order
    assert seen[-1]["status"] == "succeeded"
