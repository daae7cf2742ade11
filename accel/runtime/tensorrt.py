"""TensorRT as a runtime: a serialized engine on the current GPU, fed through cuda-python device
buffers (``accel.runtime.cudart``), with no torch (imports tensorrt when an engine opens).

With ``cuda_graph`` (the engine description's provider option, on by default: trtexec's
``--useCudaGraph``) each batch bucket of the engine's range (``accel.runtime.loop.ShapeBuckets``)
gets its own execution context with fixed input shapes and device buffers; its
``execute_async_v3`` is run once (TensorRT's shape-dependent setup), then captured with
``cudaStreamBeginCapture``/``cudaStreamEndCapture`` and replayed with ``cudaGraphLaunch``; a
query's feeds are zero-padded up to the bucket and its outputs sliced back."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from accel.core.engine_info import EngineInfo
from accel.core.errors import CheckpointError
from accel.core.sections import section
from accel.runtime.cudart import Stream, check
from accel.runtime.loop import ShapeBuckets, infer_in_chunks, pad_rows


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
        runtime.engine_host_code_allowed = info.options.get("version_compatible", False)
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise CheckpointError(
                f"TensorRT {trt.__version__} cannot load {path} (built with TensorRT "
                f"{info.library_version} for compute capability "
                f"{info.options.get('compute_capability', '?')}); rebuild it on this machine"
            )
        self._engine, self._context = engine, engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._in = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._out = [n for n in names if n not in self._in]
        self._dtype = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self._lock = threading.Lock()
        self._max_batch = info.max_batch
        self.name = "tensorrt"
        self._buckets = None
        if info.options.get("cuda_graph") and info.batch_range:
            lo, hi = info.batch_range
            self._buckets = ShapeBuckets(lo, lo, hi, str(path))
            self.name = "tensorrt+cudagraph"
        self._graphs: dict[
            tuple, tuple
        ] = {}  # bucket key -> (context, graph exec, out shapes, tag)

    @classmethod
    def from_engine(cls, file: Path, info: EngineInfo, spin: bool = True) -> TensorRTRuntime:
        return cls(file, info)

    def inputs(self) -> dict[str, tuple[list, str]]:
        return {n: (["batch"], str(self._dtype[n])) for n in self._in}

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Batches above the engine's profile run in chunks of its maximum."""
        return infer_in_chunks(self._infer, feeds, self._max_batch)

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._buckets is not None:
            return self._replay(feeds)
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

    def _capture(self, tag: int, feeds: dict[str, np.ndarray]) -> tuple:
        """A context bound to this bucket's buffers, and its enqueue captured as a CUDA graph."""
        stream, rt = self._stream, self._stream.rt
        context = self._engine.create_execution_context()
        for n in self._in:
            if not context.set_input_shape(n, tuple(feeds[n].shape)):
                raise CheckpointError(
                    f"input {n!r} of shape {feeds[n].shape} is outside this TensorRT engine's "
                    "optimisation profile; rebuild it for a target whose shapes cover it"
                )
            context.set_tensor_address(n, stream.upload(f"{n}@{tag}", feeds[n]))
        shapes = {}
        for n in self._out:
            dims = context.get_tensor_shape(n)
            shapes[n] = tuple(dims[i] for i in range(len(dims)))
            nbytes = int(np.prod(shapes[n])) * self._dtype[n].itemsize
            context.set_tensor_address(n, stream.buffer(f"{n}@{tag}", nbytes))
        if not context.execute_async_v3(int(stream.handle)):  # setup outside the capture
            raise RuntimeError("TensorRT execute_async_v3 failed (see its log)")
        stream.synchronize()
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(rt.cudaStreamBeginCapture(stream.handle, mode), "cudaStreamBeginCapture")
        ok = context.execute_async_v3(int(stream.handle))
        graph = check(rt.cudaStreamEndCapture(stream.handle), "cudaStreamEndCapture")
        if not ok:
            raise RuntimeError("TensorRT execute_async_v3 failed while capturing a CUDA graph")
        graph_exec = check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        return context, graph_exec, shapes, tag

    def _replay(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self._buckets is not None
        stream, rt = self._stream, self._stream.rt
        n_rows = len(feeds[self._in[0]])
        rows = self._buckets.bucket(n_rows)
        padded = {
            n: np.ascontiguousarray(pad_rows(np.asarray(feeds[n], self._dtype[n]), rows))
            for n in self._in
        }
        key = (rows, *((n, padded[n].shape[1:]) for n in self._in))
        with self._lock:
            if key not in self._graphs:
                self._graphs[key] = self._capture(len(self._graphs), padded)
            _, graph_exec, shapes, tag = self._graphs[key]
            with section("h2d"):
                for n in self._in:
                    stream.upload(f"{n}@{tag}", padded[n])
            with section("compute"):
                check(rt.cudaGraphLaunch(graph_exec, stream.handle), "cudaGraphLaunch")
                stream.synchronize()
            with section("d2h"):
                return {
                    n: stream.download(stream.buffer(f"{n}@{tag}", 0), shapes[n], self._dtype[n])[
                        :n_rows
                    ].astype(np.float32)
                    for n in self._out
                }
