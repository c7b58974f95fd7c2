"""Secrets of the host never reach anything a run produces.

The test plants three secrets: a file under the real $HOME, a variable in the
runner's environment, and a file in a neighbouring workspace. Every stage of
a hostile pipeline then tries hard to find them (the known paths, a walk of
/, every /proc/*/environ and cmdline, /proc/1/root) and pushes whatever it
finds out through every channel a stage has: stdout, its log, samples to the
next stage, metrics, progress, files in data/ and model/, the zip artifact.
The test then greps the whole workspace and the runner's output.

A canary the stages *are* given (an option) goes through the same channels,
so the absence of the secrets means something: the channels work, the
secrets were not there to find.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .attack import grep_workspace, limit_args, run_attack, token

pytestmark = pytest.mark.hostile

SNOOP = r'''
import json, os, stat, sys, time

CFG = json.loads(__CFG__)
PREFIX = CFG["prefix"]
loot = []


def note(where, text):
    if PREFIX in text:
        loot.append(f"{where}: {text[:500]}")


def read(path, limit=1 << 16):
    try:  # non-blocking: a fifo must not hang the search
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        return f"<{type(e).__name__}>"
    try:
        return os.read(fd, limit).decode("utf-8", "replace")
    except OSError as e:
        return f"<{type(e).__name__}>"
    finally:
        os.close(fd)


def snoop(stage):
    seen = {"walked": 0, "pids": 0, "env_keys": len(os.environ)}
    for path in CFG["paths"] + ["/etc/shadow", "/etc/passwd", os.path.expanduser("~"), "/root"]:
        note(path, read(path))
        try:
            note(path + "/ (listing)", " ".join(os.listdir(path)))
        except OSError:
            pass
    note("os.environ", json.dumps(dict(os.environ)))
    for pid in [p for p in os.listdir("/proc") if p.isdigit()] + ["self", "1"]:
        seen["pids"] += 1
        for what in ("environ", "cmdline", "mountinfo"):
            note(f"/proc/{pid}/{what}", read(f"/proc/{pid}/{what}").replace("\0", " "))
        for path in CFG["paths"]:
            note(f"/proc/{pid}/root{path}", read(f"/proc/{pid}/root{path}"))
    deadline = time.monotonic() + 5
    for dirpath, dirnames, filenames in os.walk("/", followlinks=False):
        if dirpath == "/":
            dirnames[:] = [d for d in dirnames if d not in ("proc", "sys", "dev")]
        if time.monotonic() > deadline:
            break
        for name in filenames:
            seen["walked"] += 1
            path = os.path.join(dirpath, name)
            note(path + " (name)", path)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_size < (1 << 16):
                note(path, read(path))
    canary = CFG["canary"]
    loot.append(f"{stage} canary {canary}")
    print("LOOT", stage, json.dumps(loot), flush=True)
    print("REPORT", json.dumps({**seen, "loot": len(loot)}), flush=True)
    return loot


def datasource(options, ctx):
    from sandbox import sdk
    found = snoop("datasource")
    with open(os.path.join(ctx.workspace.data_dir, "loot.txt"), "w") as f:
        f.write("\n".join(found))
    with open(os.path.join(ctx.workspace.cache_dir, "loot.txt"), "w") as f:
        f.write("\n".join(found))
    samples = [{"data": line, "label": "datasource"} for line in found]
    return sdk.from_lists(train=samples, meta={"type": "text", "loot": found})


def dataflow(pool, options, ctx):
    found = snoop("dataflow")
    return pool.transform(lambda s: {"data": s["data"] + " | " + " ".join(found), "label": s["label"]},
                          lambda meta: {**meta, "dataflow_loot": found})


def train(runtime, options, ctx):
    found = snoop("model")
    samples = runtime.dataset.train.next_batch(0)
    everything = found + [s["data"] for s in samples] + [json.dumps(runtime.dataset.meta)]
    with open(os.path.join(runtime.read_model(), "loot.txt"), "w") as f:
        f.write("\n".join(everything))
    for i, line in enumerate(everything[:200]):
        runtime.log_metrics(step=i, **{line[:120]: 1.0})
        runtime.notify_progress(min(99, i), found=line[:1000])
    runtime.notify_progress(100, found=" ".join(everything)[:1000])
'''


@pytest.fixture
def secrets_planted(tmp_path):
    """(config for the script, the three secret values); everything planted is removed afterwards."""
    prefix = token("PCSB-SECRET")
    home_secret, env_secret, neighbour_secret = (f"{prefix}-{kind}-{os.urandom(8).hex()}"
                                                 for kind in ("home", "env", "neighbour"))
    home_file = Path(os.path.expanduser("~")) / f".{token('pcsb-hostile-home')}"
    home_file.write_text(home_secret + "\n")
    neighbour = tmp_path / "neighbour-ws"
    (neighbour / "data").mkdir(parents=True)
    (neighbour / "model").mkdir()
    (neighbour / "data" / "secret.txt").write_text(neighbour_secret + "\n")
    (neighbour / "model" / "weights.json").write_text(json.dumps({"key": neighbour_secret}))
    try:
        yield {
            "cfg": {"prefix": prefix, "canary": token("CANARY"),
                    "paths": [str(home_file), str(neighbour / "data" / "secret.txt"),
                              str(neighbour / "model" / "weights.json"), str(neighbour), str(tmp_path)]},
            "secrets": {"home": home_secret, "env": env_secret, "neighbour": neighbour_secret},
        }
    finally:
        home_file.unlink(missing_ok=True)


def test_host_secrets_never_reach_outputs_logs_metrics_or_model(tmp_path, isolation, secrets_planted):
    cfg, planted = secrets_planted["cfg"], secrets_planted["secrets"]
    script = SNOOP.replace("__CFG__", repr(json.dumps(cfg)))
    for value in planted.values():
        assert value not in script  # the script knows where to look, never what it will find
    attack = run_attack(tmp_path / "run", isolation, datasource=script, dataflow=[script], model=script,
                        env={"PCSB_HOSTILE_SECRET": planted["env"], "AWS_SECRET_ACCESS_KEY": planted["env"]},
                        extra={"artifact": [{"processor": "zip", "target": "model.zip"}]},
                        limits=limit_args(timeout="90"))  # three stages walk / at once
    assert attack.returncode == 0, attack.describe()

    # The script really searched, in every stage...
    for stage in ("datasource", "dataflow-1", "model"):
        report = attack.reports(stage)
        assert report["walked"] > 100 and report["pids"] >= 2 and report["env_keys"] > 0, (stage, report)
    # ...and its channels really carry what it finds (the canary made it everywhere).
    canary = cfg["canary"]
    for where in ("model/loot.txt", "data/loot.txt", "cache/loot.txt", "metrics.jsonl", "logs/model.log",
                  "logs/datasource.log", "logs/dataflow-1.log", "model.zip"):
        assert any(where in hit for hit in grep_workspace(attack.ws, canary)), where

    # No secret anywhere: workspace files, zip members, the runner's own output.
    for kind, value in planted.items():
        assert not grep_workspace(attack.ws, value), f"the {kind} secret leaked into the workspace"
        assert value not in attack.output, f"the {kind} secret leaked into the runner's output"
    assert planted["neighbour"] not in attack.output
    assert not attack.leftovers()
