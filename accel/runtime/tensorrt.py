"""TensorRT as a runtime: a serialized engine on the current GPU, fed through cuda-python device
buffers (``accel.runtime.cudart``), with no torch (imports tensorrt when an engine opens)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from accel.core.engine_info import EngineInfo
from accel.core.errors import CheckpointError
from accel.core.sections import section
from accel.runtime.cudart import Stream
from accel.runtime.loop import infer_in_chunks


def tensorrt_missing() -> str | None:
    """Why TensorRT cannot run here, or None: ``tensorrt`` must import and be the real library
    (tensorrt-stubs alone make it an empty namespace package)."""
    try:
        import tensorrt
    except ImportError:
        found = False
    else:
        found = hasattr(tensorrt, "Builder")
    if found:
        return None
    return (
        "TensorRT is not installed here: its wheels come from NVIDIA's package index "
        "(pip install tensorrt --extra-index-url https://pypi.nvidia.com) and it needs a CUDA "
        "GPU. Build TensorRT engines on a machine of the target's GPU model, or compile with "
        "--backend ort"
    )


class TensorRTRuntime:
    """A TensorRT engine (``model.plan``) on the current GPU: numpy feeds are copied into device
    buffers (cuda-python's CUDA runtime, ``accel.runtime.cudart``: no torch, so that TensorRT bundles run
    with numpy, TensorRT and cuda-python alone) and run with ``execute_async_v3`` on its own
    stream. One execution context, so calls are serialised by a lock."""

    def __init__(self, path: str | Path, info: EngineInfo) -> None:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"TensorRT engine not found: {path}")
        why = tensorrt_missing()
        if why:
            raise CheckpointError(why)
        import tensorrt as trt

        self._stream = Stream()  # fails with CUDA's reason where there is no usable GPU
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        runtime.engine_host_code_allowed = info.version_compatible
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise CheckpointError(
                f"TensorRT {trt.__version__} cannot load {path} (built with TensorRT "
                f"{info.library_version} for compute capability "
                f"{info.compute_capability or '?'}); rebuild it on this machine"
            )
        self._engine, self._context = engine, engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._in = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._out = [n for n in names if n not in self._in]
        self._dtype = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self._lock = threading.Lock()
        self._max_batch = info.max_batch
        self.name = "tensorrt"

    @classmethod
    def from_engine(cls, file: Path, info: EngineInfo, spin: bool = True) -> TensorRTRuntime:
        return cls(file, info)

    def inputs(self) -> dict[str, tuple[list, str]]:
        return {n: (["batch"], str(self._dtype[n])) for n in self._in}

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Batches above the engine's profile run in chunks of its maximum."""
        return infer_in_chunks(self._infer, feeds, self._max_batch)

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stream = self._stream
        with self._lock:
            for n in self._in:
                host = np.ascontiguousarray(feeds[n], dtype=self._dtype[n])
                if not self._context.set_input_shape(n, tuple(host.shape)):
                    raise CheckpointError(
                        f"input {n!r} of shape {host.shape} is outside this TensorRT engine's "
                        "optimisation profile; rebuild it for a target whose shapes cover it"
                    )
                with section("h2d"):
                    self._context.set_tensor_address(n, stream.upload(n, host))
            shapes = {}
            for n in self._out:
                dims = self._context.get_tensor_shape(n)
                shapes[n] = tuple(dims[i] for i in range(len(dims)))
                nbytes = int(np.prod(shapes[n])) * self._dtype[n].itemsize
                self._context.set_tensor_address(n, stream.buffer(n, nbytes))
            with section("compute"):
                if not self._context.execute_async_v3(int(stream.handle)):
                    raise RuntimeError("TensorRT execute_async_v3 failed (see its log)")
                stream.synchronize()
            with section("d2h"):
                return {
                    n: stream.download(stream.buffer(n, 0), shapes[n], self._dtype[n]).astype(
                        np.float32
                    )
                    for n in self._out
                }
