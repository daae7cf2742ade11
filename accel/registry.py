"""The registries: names to "module:attribute" strings, imported lazily when a name is used, so
printing ``--help`` never imports torch and no import order fills a table. This is the plug-in seam
of the layers (``docs/ARCHITECTURE.md``): a lower layer finds a stage, a dataset, a quality metric
or a backend's runtime here by name, without importing the layer that implements it (the digits
demo plugs its dataset and FD-digits in here). Tests add their own rows by patching the tables.

- ``STAGES``: stage names (the one place they are defined) to ``Stage`` objects;
- ``DATASETS``: training data by name, functions ``(size=None, channels=1, captions=False)`` ->
  (images N x C x H x W in [-1, 1], int64 labels or one caption per image) (``distill.data``);
- ``METRICS``: image-quality metrics (``accel.core.metrics.Metric``) by the name a model's
  ``accel.json`` and the gate configs use;
- ``BACKENDS``: the engine backends, one ``Backend`` row each (``accel.runtime.backends``)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from accel.core.errors import RecipeError

if TYPE_CHECKING:  # the stage module imports pydantic, which the torch-free runtime does not
    from accel.core.stage import Stage

STAGES: dict[str, str] = {
    "progressive": "distill.configs:PROGRESSIVE",
    "consistency": "distill.configs:CONSISTENCY",
    "scm": "distill.configs:SCM",
    "meanflow": "distill.configs:MEANFLOW",
    "adversarial": "distill.configs:ADVERSARIAL",
    "add": "distill.configs:ADD",
    "guidance": "distill.configs:GUIDANCE",
    "lora": "distill.configs:LORA",
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

DATASETS: dict[str, str] = {"digits": "accel.demo.digits:digits_dataset"}

METRICS: dict[str, str] = {
    "image_rmse": "accel.core.metrics:ImageRMSE",
    "fd_digits": "accel.demo.digits:FDDigits",
}


@dataclass(frozen=True)
class Backend:
    """One engine backend. Its ``name`` is the one name it has everywhere: its compile stage
    (a ``STAGES`` key), ``accel compile --backend``, an engine description's ``backend``, a
    bundle's manifest and a target's ``backends``."""

    name: str
    runtime: str  # "module:Class" with a from_engine(file, info, spin) classmethod
    library: str  # the library that builds and runs its engines (manifest "libraries" key)
    distributions: tuple[str, ...]  # the PyPI names that library installs as
    exact_version: bool  # engines run only under the version that built them (unless
    # built version-compatible); otherwise any later minor of the same major
    concurrent: bool  # one runtime serves concurrent calls; else calls are serialised
    triton: str | None  # Triton's backend / platform for it; None: Triton cannot serve it
    suffix: str  # engine file suffix in a Triton repository
    options: dict[str, type]  # the engine description's options: name -> JSON type
    legacy: tuple[str, ...] = ()  # the names engine descriptions and bundles written before
    # accel.engine/2 (and targets before it) gave it; read, never written

    @property
    def stage(self) -> str:
        """The compile stage that builds its engines."""
        return self.name


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("ort", "accel.runtime.ort:OrtRuntime", "onnxruntime",
                ("onnxruntime", "onnxruntime-gpu"), False, True, "onnxruntime", ".onnx",
                {"provider": str, "provider_options": dict},
                ("onnxruntime", "onnxruntime-cuda", "onnxruntime-tensorrt")),
        Backend("tensorrt", "accel.runtime.tensorrt:TensorRTRuntime", "tensorrt",
                ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"), True, False, "tensorrt_plan",
                ".plan",
                {"gpu": str, "compute_capability": str, "hardware_compatibility": str,
                 "version_compatible": bool, "strongly_typed": bool, "cuda_graph": bool}),
        Backend("aoti", "export.torch_runtime:AotiRuntime", "torch", ("torch",), True,
                False, None, ".pt2", {"inputs": list}, ("aotinductor",)),
        # a folder (the checkpoint) compiled in-process: no bundle, no Triton (export.torch_compile)
        Backend("torch_compile", "export.torch_compile:TorchEngineRuntime", "torch", ("torch",),
                True, False, None, "",
                {"mode": str, "cuda_graph": bool, "opt_batch": int, "target_fingerprint": str},
                ("torch-compiled", "torch")),
    )
}  # fmt: skip


def backend_name(name: str) -> str | None:
    """The backend ``name`` is, or was before accel.engine/2 (``onnxruntime`` is ``ort``), or None."""
    if name in BACKENDS:
        return name
    return next((b.name for b in BACKENDS.values() if name in b.legacy), None)


def resolve(ref: str) -> Any:
    """The attribute a registry's "module:attribute" string names, imported now."""
    module_name, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def get_stage(name: str) -> Stage:
    """Import and return the stage registered under `name`."""
    from accel.core.stage import Stage, did_you_mean

    if name not in STAGES:
        known = ", ".join(sorted(STAGES))
        best = did_you_mean(name, STAGES)
        hint = f"did you mean {best!r}? " if best else ""
        raise RecipeError(f"unknown stage {name!r}; {hint}known stages: {known}")
    stage = resolve(STAGES[name])
    if not isinstance(stage, Stage) or stage.name != name:
        raise TypeError(f"STAGES[{name!r}] = {STAGES[name]!r} is not a Stage named {name!r}")
    return stage
