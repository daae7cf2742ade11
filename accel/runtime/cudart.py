"""Device memory and streams through the CUDA runtime API of NVIDIA's cuda-python (the way
TensorRT's own Python samples move data), so that a TensorRT bundle runs with numpy, TensorRT and
cuda-python: no torch. Every call is checked; a failure names the call and CUDA's error.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from accel.core.errors import CheckpointError


def cudart() -> Any:
    """cuda-python's runtime module (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # type: ignore[no-redef]
        except ImportError:
            raise CheckpointError(
                "running a TensorRT engine needs NVIDIA's cuda-python for device memory: "
                "pip install cuda-python (the `gpu` extra installs it)"
            ) from None
    return runtime


def check(result: tuple, call: str) -> Any:
    """cuda-python returns (error, value...): the value(s), or CheckpointError on an error."""
    rt = cudart()
    err, *values = result
    if err != rt.cudaError_t.cudaSuccess:
        _, name = rt.cudaGetErrorName(err)
        raise CheckpointError(
            f"CUDA {call} failed: {name.decode() if isinstance(name, bytes) else name}"
        )
    return values[0] if len(values) == 1 else values


class Stream:
    """A CUDA stream, and device buffers that live as long as it is used."""

    def __init__(self) -> None:
        self.rt = cudart()
        self.handle = check(self.rt.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (pointer, bytes)

    def buffer(self, name: str, nbytes: int) -> int:
        """A device buffer of at least ``nbytes`` for ``name``, reused across calls."""
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                check(self.rt.cudaFree(ptr), "cudaFree")
            ptr = int(check(self.rt.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def upload(self, name: str, host: np.ndarray) -> int:
        host = np.ascontiguousarray(host)
        ptr = self.buffer(name, host.nbytes)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        check(
            self.rt.cudaMemcpyAsync(ptr, host.ctypes.data, host.nbytes, kind, self.handle),
            "cudaMemcpyAsync (host to device)",
        )
        self.synchronize()  # ``host`` may be freed once this returns
        return ptr

    def download(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        host = np.empty(shape, dtype)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(
            self.rt.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, kind, self.handle),
            "cudaMemcpyAsync (device to host)",
        )
        self.synchronize()
        return host

    def synchronize(self) -> None:
        check(self.rt.cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self.rt.cudaFree(ptr)
        self._buffers.clear()
        if self.handle is not None:
            self.rt.cudaStreamDestroy(self.handle)
            self.handle = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the CUDA runtime may be gone already
            pass
