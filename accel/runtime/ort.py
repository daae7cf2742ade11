"""onnxruntime as a runtime (imports onnxruntime when a session opens)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from accel.core.engine_info import EngineInfo
from accel.core.errors import CheckpointError


class OrtRuntime:
    """An onnxruntime session on an ONNX file, refusing a silent fallback to another provider."""

    def __init__(
        self,
        path: str | Path,
        provider: str = "CPUExecutionProvider",
        threads: int | None = None,
        optimize: bool = True,
        spin: bool = True,
        options: dict[str, str] | None = None,
    ) -> None:
        """``spin=False`` stops idle worker threads from busy-waiting after a call, so that they do
        not take the cores of whatever runs next (another runtime measured in the same run).
        ``options`` are the provider's; cache paths in them are relative to the graph's folder."""
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"ONNX file not found: {path}")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if optimize
            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        if threads:
            opts.intra_op_num_threads = threads
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        try:
            # from a path, not bytes: a session made from bytes cannot find external data
            options = {
                k: str(path.parent / v) if k.endswith("cache_path") else v
                for k, v in (options or {}).items()
            }
            self.session = ort.InferenceSession(str(path), opts, providers=[(provider, options)])
        except Exception as e:
            raise CheckpointError(
                f"onnxruntime cannot load {path}: {str(e).strip()[:300]}"
            ) from None
        if provider not in self.session.get_providers():
            raise CheckpointError(
                f"onnxruntime did not enable {provider} (got {self.session.get_providers()}); "
                "install the matching onnxruntime build for this target"
            )
        self.name = f"onnxruntime:{provider}"
        self._inputs = {i.name: (i.shape, i.type) for i in self.session.get_inputs()}
        self._outputs = [o.name for o in self.session.get_outputs()]

    @classmethod
    def from_engine(cls, file: Path, info: EngineInfo, spin: bool = True) -> OrtRuntime:
        return cls(
            file,
            provider=info.provider or "CPUExecutionProvider",
            spin=spin,
            options=info.provider_options,
        )

    def inputs(self) -> dict[str, tuple[list, str]]:
        return self._inputs

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: v for k, v in feeds.items() if k in self._inputs}
        return dict(zip(self._outputs, self.session.run(self._outputs, feeds), strict=True))
