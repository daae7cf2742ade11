"""The table of stages, the one place stage names are defined: names to "module:attribute"
strings, imported lazily, so checking a recipe or printing `--help` never imports torch, and there
is no import-order side effect to fill a registry. Tests add their own stages by patching
``STAGES``."""

from __future__ import annotations

import importlib

from accel.core.errors import RecipeError
from accel.core.stage import Stage, did_you_mean

STAGES: dict[str, str] = {
    "progressive": "distill.progressive:STAGE",
    "consistency": "distill.consistency:STAGE",
    "scm": "distill.scm:STAGE",
    "meanflow": "distill.meanflow:STAGE",
    "adversarial": "distill.dmd:STAGE",
    "add": "distill.add:STAGE",
    "guidance": "distill.guidance:STAGE",
    "onnx": "export.onnx_export:STAGE",
    "optimize": "export.optimize_onnx:STAGE",
    "fp16": "export.fp16:STAGE",
    "quantize": "export.quantize_onnx:STAGE",
    "quantize_torch": "export.quantize_torch:STAGE",
    "ort": "export.ort_compile:STAGE",
    "aoti": "export.aoti_compile:STAGE",
    "torch_compile": "export.torch_compile:STAGE",
    "tensorrt": "export.tensorrt_compile:STAGE",
    "profile": "accel.profile.stage:STAGE",
    "bundle": "accel.deploy.bundle:STAGE",
}


def get_stage(name: str) -> Stage:
    """Import and return the stage registered under `name`."""
    if name not in STAGES:
        known = ", ".join(sorted(STAGES))
        best = did_you_mean(name, STAGES)
        hint = f"did you mean {best!r}? " if best else ""
        raise RecipeError(f"unknown stage {name!r}; {hint}known stages: {known}")
    module_name, _, attr = STAGES[name].partition(":")
    stage = getattr(importlib.import_module(module_name), attr)
    if not isinstance(stage, Stage) or stage.name != name:
        raise TypeError(f"STAGES[{name!r}] = {STAGES[name]!r} is not a Stage named {name!r}")
    return stage
