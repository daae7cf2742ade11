"""Compiled torch and CUDA-graph engines: the fused few-step sampler (``export.fused_sampler``:
all steps and guidance in one module) run at fixed shape buckets.

A GPU at small batch is launch-bound under eager torch: a 4-step digits student spends its time
issuing kernels, not running them (../shared/FACTS.md: 6.66 ms per call eager, 0.97 ms replayed
from a CUDA graph). Two engines remove that overhead, the way TensorRT's ``--useCudaGraph`` and
``torch.compile(mode="reduce-overhead")`` do:

- ``CompiledEngine``: ``torch.compile`` (inductor; ``max-autotune`` where the target asks for it)
  of the module, in the target's precision (fp16/bf16 on CUDA targets, by autocast: matmuls and
  convolutions in half precision, the sampler's per-step arithmetic in fp32, the split
  ``export.fp16`` makes for ONNX), channels-last for convolutional models. Inductor's compiled
  kernels are cached on disk (``compile_cache``): accel keeps that cache in the store, one folder
  per target fingerprint and torch version, so a second build for the same target is a cache hit.
- ``CudaGraphEngine``: the module (eager or compiled) captured once per shape bucket into a
  ``torch.cuda.CUDAGraph`` over static input and output buffers (warm-up on a side stream first,
  as CUDA graphs require); a query copies its feeds into the bucket's buffers and replays.

Both run a query at the smallest bucket that holds its batch (``ShapeBuckets``: the powers of two
in the target's batch range, with its opt and max), zero-padding the batch and slicing the result,
so each compiled graph or captured graph serves every batch up to its size. A batch outside the
target's profile is refused, not recompiled. Padding rows are independent of the real ones: the
sampler has no cross-batch operation (no batch norm), and guidance doubles the batch inside the
module.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from accel.core.errors import CheckpointError
from accel.runtime.loop import ShapeBuckets, infer_in_chunks, pad_rows

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def compile_cache_dir(store_root: Path, fingerprint: str) -> Path:
    """The store's inductor cache for one target fingerprint under this torch."""
    import torch

    return Path(store_root) / "cache" / "torch-compile" / f"{fingerprint}-torch{torch.__version__}"


@contextlib.contextmanager
def compile_cache(folder: Path | None) -> Iterator[None]:
    """Inductor's on-disk caches (FX graphs, kernels, autotuning) in ``folder`` while inside;
    torch's default (a per-user temp folder) with None."""
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


def cache_counters() -> dict[str, int]:
    """Inductor's FX-graph cache hits and misses in this process so far."""
    from torch._dynamo.utils import counters

    c = counters["inductor"]
    return {"hits": int(c["fxgraph_cache_hit"]), "misses": int(c["fxgraph_cache_miss"])}


class BucketedEngine:
    """``module(**inputs) -> tensor`` run at ``buckets`` on ``device`` under autocast to
    ``precision``: batches padded up to their bucket (larger ones in chunks of the largest), the
    output sliced back to float32 numpy. ``runner(key, example)`` builds the callable for one
    bucket (key: batch and input shapes). ``shapes`` fixes the per-row shape of named inputs.
    ``half_weights``: weights and float inputs cast to ``precision`` instead of autocast (what
    diffusers' ``torch_dtype=torch.float16`` does), for components every op of which is fine in
    half precision (a UNet, a VAE decoder), not for samplers with fp32 arithmetic."""

    name = "torch-eager"

    def __init__(
        self,
        module: Any,
        names: list[str],
        buckets: ShapeBuckets,
        device: str = "cpu",
        precision: str = "fp32",
        output: str = "images",
        shapes: dict[str, tuple[int, ...]] | None = None,
        half_weights: bool = False,
        unbatched: list[str] | None = None,
    ) -> None:
        import torch

        if device != "cpu" and not torch.cuda.is_available():
            raise CheckpointError(f"torch sees no GPU here for device {device!r}")
        if precision not in DTYPES:
            raise CheckpointError(
                f"torch engines compute in {', '.join(DTYPES)}, not {precision!r}; quantized "
                "engines are ONNX or TensorRT engines"
            )
        self.device = torch.device(device)
        self.dtype = getattr(torch, DTYPES[precision])
        self.half_weights = half_weights and self.dtype != torch.float32
        self._torch = torch
        self.module = self._prepare(module)
        self.names, self.buckets, self.output = names, buckets, output
        self.shapes = shapes or {}
        self.unbatched = set(unbatched or ())  # inputs shared by the batch: never padded
        self._runners: dict[tuple, Callable[[dict], Any]] = {}

    def _prepare(self, module: Any) -> Any:
        module = module.eval().to(self.device)
        return module.to(self.dtype) if self.half_weights else module

    def _key(self, feeds: dict[str, np.ndarray], rows: int) -> tuple:
        shape = lambda n: feeds[n].shape if n in self.unbatched else feeds[n].shape[1:]  # noqa: E731
        return (rows, *((n, shape(n), str(feeds[n].dtype)) for n in self.names))

    def _tensors(self, feeds: dict[str, np.ndarray]) -> dict[str, Any]:
        torch = self._torch
        return {
            n: torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device) for n in self.names
        }

    def _autocast(self):
        torch = self._torch
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def runner(self, key: tuple, example: dict[str, Any]) -> Callable[[dict], Any]:
        """Eager torch at the bucket (subclasses compile or capture here)."""
        return lambda args: self.module(**args)

    def inputs(self) -> dict[str, tuple[list, str]]:
        return {n: (["batch"], "float32" if "noise" in n else "int64") for n in self.names}

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.names if n not in feeds]
        if missing:
            raise CheckpointError(f"missing input {missing[0]!r}; this engine takes {self.names}")
        rows = {len(feeds[n]) for n in self.names if n not in self.unbatched}
        if len(rows) > 1:
            raise CheckpointError(f"the inputs {self.names} have different batch sizes {rows}")
        for name, shape in self.shapes.items():
            if tuple(feeds[name].shape[1:]) != tuple(shape):
                raise CheckpointError(
                    f"input {name!r} has rows of shape {list(feeds[name].shape[1:])}; this engine "
                    f"was built for {list(shape)}"
                )
        shared = {n: feeds[n] for n in self.unbatched}
        batched = {n: feeds[n] for n in self.names if n not in self.unbatched}
        return infer_in_chunks(lambda f: self._infer({**f, **shared}), batched, self.buckets.hi)

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(feeds[self.names[0]])
        rows = self.buckets.bucket(n)
        padded = {
            k: feeds[k] if k in self.unbatched else pad_rows(feeds[k], rows) for k in self.names
        }
        key = self._key(padded, rows)
        with self._torch.inference_mode(), self._autocast():
            args = self._tensors(padded)
            if key not in self._runners:
                self._runners[key] = self.runner(key, args)
            out = self._runners[key](args)
            return {self.output: out[:n].float().cpu().numpy()}

    @property
    def built(self) -> list[int]:
        """The bucket sizes compiled or captured so far."""
        return sorted({k[0] for k in self._runners})


class CompiledEngine(BucketedEngine):
    """``torch.compile`` of the module (mode ``mode``: "default", "max-autotune" or
    "max-autotune-no-cudagraphs"), its inductor cache in ``cache``; one compiled graph per bucket
    (static shapes: the shapes CUDA-graph capture and autotuning need)."""

    def __init__(
        self,
        module: Any,
        names: list[str],
        buckets: ShapeBuckets,
        device: str = "cpu",
        precision: str = "fp32",
        mode: str = "default",
        cache: Path | None = None,
        channels_last: bool = False,
        shapes: dict[str, tuple[int, ...]] | None = None,
        half_weights: bool = False,
        unbatched: list[str] | None = None,
    ) -> None:
        super().__init__(
            module, names, buckets, device, precision, "images", shapes, half_weights, unbatched
        )
        torch = self._torch
        self.channels_last = channels_last
        if channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.cache = cache
        self.mode = mode
        self.compiled = torch.compile(self.module, mode=mode, dynamic=False)

    def _tensors(self, feeds):
        args = super()._tensors(feeds)
        if self.channels_last:
            cl = self._torch.channels_last
            args = {k: v.to(memory_format=cl) if v.dim() == 4 else v for k, v in args.items()}
        return args

    def runner(self, key, example):
        with compile_cache(self.cache):
            self.compiled(**example)  # compiles this bucket now (or loads it from the cache)
        # queries at this bucket run the compiled graph: no cache folder to switch to per call
        return lambda args: self.compiled(**args)


class CudaGraphEngine(BucketedEngine):
    """The module (eager, or a ``CompiledEngine``'s compiled module) captured into one CUDA graph
    per bucket over static buffers and replayed per query."""

    def __init__(
        self,
        module: Any,
        names,
        buckets,
        device: str = "cuda",
        precision="fp32",
        shapes=None,
        half_weights: bool = False,
        unbatched: list[str] | None = None,
    ):
        import torch

        if not str(device).startswith("cuda") or not torch.cuda.is_available():
            raise CheckpointError(
                "a CUDA-graph engine captures CUDA kernels: it needs a CUDA device, and torch "
                f"sees {'none here' if not torch.cuda.is_available() else 'device ' + device}; "
                "on the CPU run the compiled or the eager torch engine"
            )
        if isinstance(module, CompiledEngine):  # its precision and weights, compiled
            super().__init__(
                module.module, names, buckets, device, precision, "images", shapes,
                unbatched=unbatched,
            )  # fmt: skip
            self.half_weights = module.half_weights
            self.inner: CompiledEngine | None = module
            self._tensors = module._tensors  # type: ignore[method-assign]
            self._autocast = module._autocast  # type: ignore[method-assign]
        else:
            super().__init__(
                module, names, buckets, device, precision, "images", shapes, half_weights,
                unbatched,
            )  # fmt: skip
            self.inner = None

    def runner(self, key, example):
        torch = self._torch
        static = {k: v.clone() for k, v in example.items()}
        # the compiled engine compiles this bucket first (from its cache), outside the capture
        call = self.inner.runner(key, static) if self.inner else lambda a: self.module(**a)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: allocator and lazy init outside the capture
            for _ in range(3):
                call(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call(static)

        def replay(args):
            for k, v in args.items():
                static[k].copy_(v)
            graph.replay()
            return out

        return replay
