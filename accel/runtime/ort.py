"""onnxruntime as a runtime (imports onnxruntime when a session opens).

On the CUDA and TensorRT execution providers the runtime binds inputs and outputs with IO binding
(inputs copied to the device once, outputs left there until read) and, where the engine was built
with onnxruntime's CUDA graph option (CUDA EP ``enable_cuda_graph``, TensorRT EP
``trt_cuda_graph_enable``), replays one captured graph per shape bucket: onnxruntime captures on
the first run of a ``gpu_graph_id`` and requires the same device addresses on every replay, so
each bucket keeps static input and output buffers that a query's feeds are copied into (padded up
to the bucket; ``accel.runtime.loop.ShapeBuckets``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from accel.core.engine_info import EngineInfo
from accel.core.errors import CheckpointError
from accel.runtime.loop import ShapeBuckets, infer_in_chunks, pad_rows

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def cuda_graph_enabled(options: dict[str, str] | None) -> bool:
    o = options or {}
    return o.get("enable_cuda_graph") == "1" or o.get("trt_cuda_graph_enable") == "true"


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
        batch_range: list[int] | None = None,
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
        self._output_shapes = {o.name: o.shape for o in self.session.get_outputs()}
        self.device_bound = provider in GPU_PROVIDERS
        self.buckets = None
        if cuda_graph_enabled(options):
            if not self.device_bound or not batch_range:
                raise CheckpointError(
                    f"{path}: onnxruntime's CUDA graphs need a GPU provider and the engine's "
                    "batch range (its engine description's batch_range)"
                )
            self.buckets = ShapeBuckets(batch_range[0], batch_range[0], batch_range[1], str(path))
            self.name += "+cudagraph"
        self._graphs: dict[
            tuple, tuple
        ] = {}  # bucket key -> (binding, inputs, outputs, run options)
        self._ort = ort

    @classmethod
    def from_engine(cls, file: Path, info: EngineInfo, spin: bool = True) -> OrtRuntime:
        return cls(
            file,
            provider=info.options.get("provider", "CPUExecutionProvider"),
            spin=spin,
            options=info.options.get("provider_options"),
            batch_range=info.batch_range,
        )

    def inputs(self) -> dict[str, tuple[list, str]]:
        return self._inputs

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: v for k, v in feeds.items() if k in self._inputs}
        if self.buckets is not None:
            return infer_in_chunks(self._replay, feeds, self.buckets.hi)
        if self.device_bound:
            return self._bound(feeds)
        return dict(zip(self._outputs, self.session.run(self._outputs, feeds), strict=True))

    def _bound(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """IO binding: inputs copied to the GPU, outputs allocated there and copied back once."""
        binding = self.session.io_binding()
        for k, v in feeds.items():
            binding.bind_cpu_input(k, np.ascontiguousarray(v))
        for o in self._outputs:
            binding.bind_output(o, "cuda")
        self.session.run_with_iobinding(binding)
        return dict(zip(self._outputs, binding.copy_outputs_to_cpu(), strict=True))

    def _output_shape(self, name: str, rows: int, feeds: dict[str, np.ndarray]) -> list[int]:
        """An output's shape at ``rows``: the graph's, batch substituted; a symbolic non-batch
        axis takes the shape of the first input of the same rank (x0 and images are shaped
        like the sample or the noise)."""
        shape = self._output_shapes[name]
        if all(isinstance(d, int) for d in shape[1:]):
            return [rows, *shape[1:]]
        like = next((v for v in feeds.values() if v.ndim == len(shape)), None)
        if like is None:
            raise CheckpointError(
                f"output {name!r} has symbolic axes {shape}: no CUDA graph for it"
            )
        return [rows, *like.shape[1:]]

    def _replay(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ort = self._ort
        assert self.buckets is not None
        n = len(next(iter(feeds.values())))
        rows = self.buckets.bucket(n)
        padded = {k: np.ascontiguousarray(pad_rows(v, rows)) for k, v in feeds.items()}
        key = (rows, *((k, v.shape[1:], str(v.dtype)) for k, v in padded.items()))
        if key not in self._graphs:
            binding = self.session.io_binding()
            inputs = {k: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for k, v in padded.items()}
            outputs = {
                o: ort.OrtValue.ortvalue_from_shape_and_type(
                    self._output_shape(o, rows, padded), np.float32, "cuda", 0
                )
                for o in self._outputs
            }
            for k, v in inputs.items():
                binding.bind_ortvalue_input(k, v)
            for o, v in outputs.items():
                binding.bind_ortvalue_output(o, v)
            run_options = ort.RunOptions()
            run_options.add_run_config_entry("gpu_graph_id", str(len(self._graphs) + 1))
            self._graphs[key] = (binding, inputs, outputs, run_options)
        binding, inputs, outputs, run_options = self._graphs[key]
        for k, v in padded.items():
            inputs[k].update_inplace(v)
        self.session.run_with_iobinding(binding, run_options)
        return {o: v.numpy()[:n] for o, v in outputs.items()}
