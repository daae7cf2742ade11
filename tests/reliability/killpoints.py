"""`python killpoints.py ACCEL-ARGS...`: the accel command line, with the points at which the kill
campaign (test_kill.py) SIGKILLs it.

A point is a call that changes the file system (``os.replace``, ``rename``, ``mkdir``,
``makedirs``, ``unlink``, ``remove``, ``rmdir``, ``shutil.rmtree``, ``copyfile``, ``copy2``,
``move``, an ``open`` for writing) made while a stage runs: its own work (training checkpoints,
graphs, engines), the store's temp dir, manifest and commit, and its claim. With $KILL_STAGE and
$KILL_AT = k, the process kills itself with SIGKILL on entering that stage (k = 0) or right after
its k-th point; with $KILL_COUNTS it writes each stage's number of points to that file (JSON)."""

from __future__ import annotations

import builtins
import functools
import io
import json
import os
import shutil
import signal
import sys

OS_CALLS = ("replace", "rename", "mkdir", "makedirs", "unlink", "remove", "rmdir")
SHUTIL_CALLS = ("rmtree", "copyfile", "copy2", "move")


def install(stage_name: str | None, kill_at: int | None, counts_path: str | None) -> None:
    import accel.pipeline as pipeline

    state = {"stage": None, "points": 0}
    counts: dict[str, int] = {}

    def point() -> None:
        if state["stage"] is None:
            return
        state["points"] += 1
        if state["stage"] == stage_name and state["points"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def counted(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            finally:
                point()

        return call

    def counted_open(fn):
        @functools.wraps(fn)
        def call(file, mode="r", *args, **kwargs):
            f = fn(file, mode, *args, **kwargs)
            if any(c in mode for c in "wax+"):
                point()
            return f

        return call

    for name in OS_CALLS:
        setattr(os, name, counted(getattr(os, name)))
    for name in SHUTIL_CALLS:
        setattr(shutil, name, counted(getattr(shutil, name)))
    builtins.open = io.open = counted_open(builtins.open)

    run_stage = pipeline.run_stage

    @functools.wraps(run_stage)
    def watched(planned, *args, **kwargs):
        name = planned.plan.stage.name
        state["stage"], state["points"] = name, 0
        if name == stage_name and kill_at == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            return run_stage(planned, *args, **kwargs)
        finally:
            counts[name] = state["points"]
            state["stage"] = None
            if counts_path:
                with open(counts_path, "w") as f:
                    json.dump(counts, f)

    pipeline.run_stage = watched


if __name__ == "__main__":
    at = os.environ.get("KILL_AT")
    install(os.environ.get("KILL_STAGE"), int(at) if at else None, os.environ.get("KILL_COUNTS"))
    from accel.cli import main

    sys.argv[0] = "accel"
    main()
