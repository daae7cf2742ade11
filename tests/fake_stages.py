"""Tiny stages for tests of recipes and the store: registered by patching accel.stages.STAGES."""

from __future__ import annotations

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


SHRINK = Stage("shrink", 1, ShrinkConfig, "checkpoint", "checkpoint", _write_marker)
EXPORT = Stage("export", 1, ExportConfig, "checkpoint", "onnx", _write_marker)
COMPILE = Stage("compile", 2, CompileConfig, "onnx", "engine", _write_marker, target_specific=True)

TABLE = {
    "shrink": "fake_stages:SHRINK",
    "export": "fake_stages:EXPORT",
    "compile": "fake_stages:COMPILE",
}
