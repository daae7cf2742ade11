"""The engine description (format ``accel.engine/1``): what a compile stage records about the engine
it built (the ``info`` of an engine artifact's manifest, and a bundle's ``engine``), read by the
engine's runtime, the bundle stage, ``Bundle`` and ``accel deploy triton``. A typed, versioned
contract: unknown keys, missing fields and wrong types are errors on load; descriptions written
before the format key existed (``onnxruntime_version``/``tensorrt_version``/``torch_version`` for
the library version) are read into the typed fields."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from accel.core.errors import CheckpointError

ENGINE_FORMAT = "accel.engine/1"
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
DEVICES = ("cpu", "cuda")
_LEGACY_VERSION_KEYS = {
    "onnxruntime": "onnxruntime_version",
    "tensorrt": "tensorrt_version",
    "aotinductor": "torch_version",
}


@dataclass(frozen=True)
class EngineInfo:
    backend: str  # a row of accel.runtime.backends.BACKENDS
    engine_file: str  # beside the manifest
    library_version: str  # of the library that built it (onnxruntime, tensorrt, torch)
    precision: str = "fp32"  # of the weights and activations the engine computes in
    device: str = "cpu"
    batch_range: list[int] | None = None  # [min, max] the engine accepts (None: any)
    inputs: list[str] | None = None  # graph input names in call order (AOTInductor packages)
    provider: str | None = None  # onnxruntime's execution provider
    provider_options: dict[str, str] | None = None
    gpu: str | None = None  # the GPU a TensorRT engine was built on
    compute_capability: str | None = None  # "9.0"
    hardware_compatibility: str | None = None  # TensorRT's hardware-compatibility level
    version_compatible: bool = False  # TensorRT --versionCompatible
    strongly_typed: bool = False  # TensorRT strongly-typed network (FP8 Q/DQ)
    format: str = ENGINE_FORMAT

    def __post_init__(self) -> None:
        for name in ("backend", "engine_file", "library_version"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if "/" in self.engine_file or self.engine_file.startswith("."):
            raise ValueError(
                f"engine_file must be a file name beside the manifest, got {self.engine_file!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r} is not one of {', '.join(DEVICES)}")
        b = self.batch_range
        if b is not None and not (
            isinstance(b, list)
            and len(b) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in b)
            and 1 <= b[0] <= b[1]
        ):
            raise ValueError(f"batch_range must be [min, max] with 1 <= min <= max, got {b!r}")
        if self.inputs is not None and not all(isinstance(n, str) for n in self.inputs):
            raise ValueError(f"inputs must be a list of names, got {self.inputs!r}")
        if self.provider_options is not None and not isinstance(self.provider_options, dict):
            raise ValueError("provider_options must be a JSON object")
        for name in ("version_compatible", "strongly_typed"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false")
        if self.format != ENGINE_FORMAT:
            raise ValueError(f"format {self.format!r} is not {ENGINE_FORMAT}")

    @property
    def max_batch(self) -> int:
        return self.batch_range[1] if self.batch_range else 2**31

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = "the engine") -> EngineInfo:
        """The description in ``data`` (a manifest's info); a clear error naming ``where``."""
        try:
            if not isinstance(data, dict):
                raise ValueError("it must be a JSON object")
            data = dict(data)
            if "format" not in data:  # written before the format existed
                legacy = _LEGACY_VERSION_KEYS.get(data.get("backend", ""), "")
                if legacy in data:
                    data["library_version"] = data.pop(legacy)
                for key in _LEGACY_VERSION_KEYS.values():
                    data.pop(key, None)
            unknown = sorted(set(data) - {f.name for f in fields(cls)})
            if unknown:
                raise ValueError(f"unknown keys {unknown}")
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"{where} has no valid engine description ({e}); rebuild it with `accel compile`"
            ) from None
