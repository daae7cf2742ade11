"""Concurrent runs on one store: overlapping recipes started at once compute each stage once (a
claim per key; the others wait and reuse it), leave one complete artifact per key, and a claim
held by a process that is killed does not block the next run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from accel.core.artifact import Artifact, Store

from record import record

TESTS = Path(__file__).resolve().parents[1]
RUN = """
import sys
sys.path.insert(0, {tests!r})
import accel.registry, fake_stages
accel.registry.STAGES.update(fake_stages.TABLE)
from accel.recipe import load_recipe
from accel.pipeline import default_store, run_recipe
def progress(m):
    print(m, flush=True)
    if m.startswith("slow: waiting for ") and len(sys.argv) > 3:  # tell the slow stage a peer waits
        with open(sys.argv[3], "a") as f:
            f.write(m + "\\n")
arts = run_recipe(load_recipe(sys.argv[1]), default_store(sys.argv[2]), progress)
print("KEYS", " ".join(a.key for a in arts), flush=True)
"""


def recipe(tmp_path, name, stages, source):
    body = f'name = "{name}"\nsource = "{source}"\ntarget = "cpu"\n'
    for stage, cfg in stages:
        body += f'[[stages]]\nstage = "{stage}"\n' + "".join(f"{k} = {v!r}\n".replace("'", '"')
                                                           for k, v in cfg.items())  # fmt: skip
    path = tmp_path / f"{name}.toml"
    path.write_text(body)
    return path


def launch(recipe_path, store, waits=None, **env):
    code = RUN.format(tests=str(TESTS))
    return subprocess.Popen(
        [sys.executable, "-c", code, str(recipe_path), str(store), *([str(waits)] if waits else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env},
    )  # fmt: skip


@pytest.mark.parametrize("runs", [2, 4])
def test_overlapping_recipes_at_once_compute_each_stage_once(tmp_path, runs):
    from tiny import write_tiny_pipeline

    source = write_tiny_pipeline(tmp_path / "teacher")
    log = tmp_path / "computed.txt"
    waits = tmp_path / "waits.txt"  # the slow stage holds its claim until every peer waits
    shared = ("slow", {"seconds": 0.5, "log": str(log), "peers": str(waits), "runs": runs})
    recipes = [
        recipe(tmp_path, f"r{i}", [shared, ("shrink", {"steps": 2 + i % 2})], source)
        for i in range(runs)
    ]  # every recipe shares the slow stage; two distinct second stages
    store = tmp_path / "store"
    procs = [launch(r, store, waits) for r in recipes]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-800:] for o in outs]
    assert len(log.read_text().split()) == 1  # the shared stage ran once
    # every run but the one that computed it waited, then reused it. Who holds the claim is
    # named if the holder wrote its pid before the waiter read the claim file ("waiting for
    # pid N"), else "waiting for another process": which one is a race, so either passes.
    logs = [o[0] for o in outs]
    waited = [o for o in logs if "slow: waiting for " in o and "computed meanwhile" in o]
    assert len(waited) == runs - 1, logs
    keys = [o[0].split("KEYS ")[1].split() for o in outs]
    assert len({k[0] for k in keys}) == 1 and len({k[1] for k in keys}) == min(runs, 2)
    st = Store(store)
    artifacts = list(st.artifacts.iterdir())
    assert len(artifacts) == 1 + 1 + min(runs, 2)  # the source, the shared stage, the shrinks
    for a in artifacts:
        Artifact.load(a).verify()
    assert not any(st.tmp.iterdir()) if st.tmp.is_dir() else True
    record("concurrent runs", runs=runs, shared_stage_computed=1, artifacts=len(artifacts),
           waited=len(waited))  # fmt: skip


def test_a_killed_claim_holder_does_not_block_the_next_run(tmp_path):
    from tiny import write_tiny_pipeline

    source = write_tiny_pipeline(tmp_path / "teacher")
    log = tmp_path / "computed.txt"
    slow = recipe(tmp_path, "slow", [("slow", {"log": str(log)})], source)
    store = tmp_path / "store"
    first = launch(slow, store, FAKE_SLOW_SECONDS="60")
    deadline = time.time() + 60
    while not (log.is_file() and log.read_text().strip()) and time.time() < deadline:
        time.sleep(0.1)
    os.kill(first.pid, signal.SIGKILL)  # dies holding the claim, mid-stage
    first.wait()
    second = launch(slow, store, FAKE_SLOW_SECONDS="0.1")  # the same stage and key
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err[-800:]
    assert "waiting" not in out  # the dead holder's claim is gone (no wall time asserted)
    assert len(log.read_text().split()) == 2  # the killed run's work was not kept
    record("killed claim holder", cases=1, next_run_waited=0)
