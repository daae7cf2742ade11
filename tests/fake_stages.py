"""Tiny stages for tests of recipes and the store: registered by patching accel.registry.STAGES."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from accel.core.stage import Stage, StageConfig, StageContext


class ShrinkConfig(StageConfig):
    steps: int = Field(default=4, ge=1)
    learning_rate: float = 1e-4


class ExportConfig(StageConfig):
    opset_version: int = Field(default=18, ge=18)
    dynamic_batch: bool = True


class CompileConfig(StageConfig):
    optimization_level: int = 99


def _write_marker(ctx: StageContext) -> None:
    (ctx.out / "out.txt").write_text(ctx.config.model_dump_json())
    ctx.metrics["ok"] = 1


class SlowConfig(StageConfig):
    seconds: float = 1.0
    log: str = ""  # a file each run appends a line to (counts the computations)
    peers: str = ""  # a file each run that waits for this stage appends a line to
    runs: int = 1  # with peers: pause until runs - 1 runs wait (at most 60 s), then sleep


def _slow(ctx: StageContext) -> None:
    """A copy of its input checkpoint (so later stages can read it), after a pause (the config's,
    or FAKE_SLOW_SECONDS: one key, runs of different lengths)."""
    import os
    import shutil
    import time

    with open(ctx.config.log, "a") as f:
        f.write(f"{os.getpid()}\n")
    deadline = time.time() + 60
    while ctx.config.peers and time.time() < deadline:
        peers = Path(ctx.config.peers)
        if peers.is_file() and len(peers.read_text().splitlines()) >= ctx.config.runs - 1:
            break
        time.sleep(0.05)
    time.sleep(float(os.environ.get("FAKE_SLOW_SECONDS", ctx.config.seconds)))
    shutil.copytree(
        ctx.input.path, ctx.out, dirs_exist_ok=True, ignore=lambda d, n: ["manifest.json"]
    )
    _write_marker(ctx)


SLOW = Stage("slow", 1, SlowConfig, "checkpoint", "checkpoint", _slow)
SHRINK = Stage("shrink", 1, ShrinkConfig, "checkpoint", "checkpoint", _write_marker)
EXPORT = Stage("export", 1, ExportConfig, "checkpoint", "onnx", _write_marker)
COMPILE = Stage("compile", 2, CompileConfig, "onnx", "engine", _write_marker, target_specific=True)

TABLE = {
    "shrink": "fake_stages:SHRINK",
    "export": "fake_stages:EXPORT",
    "compile": "fake_stages:COMPILE",
    "slow": "fake_stages:SLOW",
}
