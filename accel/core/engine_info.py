"""The engine description (format ``accel.engine/2``): what a compile stage records about the engine
it built (the ``info`` of an engine artifact's manifest, and a bundle's ``engine``), read by the
engine's runtime, the bundle stage, ``Bundle`` and ``accel deploy triton``. A typed, versioned
contract: unknown keys, missing fields and wrong types are errors on load. What only one backend
reads (an onnxruntime provider, a TensorRT engine's GPU, an AOTInductor package's input names) is
in ``options``, checked against the schema of the backend's row (``accel.registry.BACKENDS``).

Older descriptions are read into this one: ``accel.engine/1`` (backend names ``onnxruntime``,
``aotinductor``, ``torch-compiled``; the options as flat fields and string ``provider_options``),
and the descriptions before any format key (``onnxruntime_version``/``tensorrt_version``/
``torch_version`` for the library version)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from accel.core.errors import CheckpointError

ENGINE_FORMAT = "accel.engine/2"
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
DEVICES = ("cpu", "cuda")
_LEGACY_VERSION_KEYS = {
    "onnxruntime": "onnxruntime_version",
    "tensorrt": "tensorrt_version",
    "aotinductor": "torch_version",
}
# accel.engine/1's flat per-backend fields, now in options
_LEGACY_OPTION_KEYS = (
    "provider", "provider_options", "gpu", "compute_capability", "hardware_compatibility",
    "version_compatible", "strongly_typed", "inputs",
)  # fmt: skip


@dataclass(frozen=True)
class EngineInfo:
    backend: str  # a row of accel.registry.BACKENDS
    engine_file: str  # beside the manifest
    library_version: str  # of the library that built it (onnxruntime, tensorrt, torch)
    precision: str = "fp32"  # of the weights and activations the engine computes in
    device: str = "cpu"
    batch_range: list[int] | None = None  # [min, max] the engine accepts (None: any)
    options: dict[str, Any] = field(default_factory=dict)  # the backend's own (its row's schema)
    format: str = ENGINE_FORMAT

    def __post_init__(self) -> None:
        from accel.registry import BACKENDS

        for name in ("backend", "engine_file", "library_version"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
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
        if not isinstance(self.options, dict):
            raise ValueError("options must be a JSON object")
        schema = BACKENDS[self.backend].options
        unknown = sorted(set(self.options) - set(schema))
        if unknown:
            raise ValueError(
                f"unknown {self.backend} options {unknown} (it has {', '.join(sorted(schema))})"
            )
        for key, value in self.options.items():
            kind = schema[key]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"option {key} must be a JSON {kind.__name__}, got {value!r}")
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
            if data.get("format") in (None, "accel.engine/1"):
                data = _upgrade(data)
            unknown = sorted(set(data) - {f.name for f in fields(cls)})
            if unknown:
                raise ValueError(f"unknown keys {unknown}")
            return cls(**data)
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"{where} has no valid engine description ({e}); rebuild it with `accel compile`"
            ) from None


def _upgrade(data: dict) -> dict:
    """An ``accel.engine/1`` description (or an older one) as ``accel.engine/2``."""
    from accel.registry import BACKENDS, backend_name

    old = str(data.get("backend", ""))
    if "format" not in data:  # written before the format existed
        legacy = _LEGACY_VERSION_KEYS.get(old, "")
        if legacy in data:
            data["library_version"] = data.pop(legacy)
        for key in _LEGACY_VERSION_KEYS.values():
            data.pop(key, None)
    name = backend_name(old) or old
    flat = {k: data.pop(k) for k in _LEGACY_OPTION_KEYS if k in data}
    options: dict[str, Any] = {}
    if name == "ort":
        options = {k: flat[k] for k in ("provider", "provider_options") if flat.get(k) is not None}
    elif name in BACKENDS:  # provider_options were strings: typed by the row's schema
        schema = BACKENDS[name].options
        given = {**flat, **(flat.pop("provider_options", None) or {})}
        for key, value in given.items():
            if key not in schema or value is None:
                continue
            kind = schema[key]
            if kind is bool and isinstance(value, str):
                value = value == "1"
            elif kind is int and isinstance(value, str):
                value = int(value)
            options[key] = value
    return dict(data, backend=name, options=options, format=ENGINE_FORMAT)
