"""Runtimes: one interface over torch eager and onnxruntime, and the sampler plan that drives them.

A runtime runs the denoiser graph (sample, timestep[, class_labels]) -> x0 on numpy feeds, the way
Polygraphy's runners do (``inputs()``, ``infer(feeds)``). A ``SamplerPlan`` holds the few numbers of
a deterministic DDIM run (timesteps and x_prev = a x + b x0 per step, guidance), computed at export
time, so that ``sample`` needs nothing but numpy and a runtime. torch is imported only by
``TorchRuntime``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from accel.core.errors import CheckpointError
from accel.core.plan import SamplerPlan
from accel.profile import recording, section


class Runtime(Protocol):
    name: str

    def inputs(self) -> dict[str, tuple[list, str]]: ...

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


Conditioning = dict[str, np.ndarray]


def as_conditioning(conditioning: Conditioning | np.ndarray | None) -> Conditioning:
    """Conditioning feeds: a dict of named arrays, or class labels (int64) for label graphs."""
    if conditioning is None:
        return {}
    if isinstance(conditioning, dict):
        return conditioning
    return {"class_labels": np.asarray(conditioning).astype(np.int64)}


def step_feeds(
    plan: SamplerPlan,
    x: np.ndarray,
    timestep: float | np.ndarray,
    conditioning: Conditioning | np.ndarray | None,
    null: Conditioning | None = None,
) -> dict[str, np.ndarray]:
    """The graph's feeds for one step of ``plan`` on x: when the plan applies classifier-free
    guidance, the batch is doubled, each per-example conditioning input followed by the null
    conditioning (``null``, batch 1; default: the plan's null class); w as an input for
    guidance-distilled graphs."""
    n = len(x)
    cond = as_conditioning(conditioning)
    guided = plan.guidance_scale != 1.0 and bool(cond) and not _w_input(plan)
    guided = guided and not plan.guidance_in_model
    t = np.resize(np.asarray(timestep, dtype=plan.timestep_dtype), n)
    feeds = {"sample": x, "timestep": t, **cond}
    if guided:
        if null is None:
            null = {"class_labels": np.array([plan.null_label], dtype=np.int64)}
        doubled = {"sample": x, "timestep": t}
        feeds = {k: np.concatenate([v, v]) for k, v in doubled.items()}
        for k, v in cond.items():
            if plan.is_batched(k):
                feeds[k] = np.concatenate([v, np.broadcast_to(null[k], (n, *null[k].shape[1:]))])
            else:
                feeds[k] = v
    if _w_input(plan):
        feeds["guidance_scale"] = np.full(len(feeds["sample"]), plan.guidance_scale, np.float32)
    return feeds


def _w_input(plan: SamplerPlan) -> bool:
    return bool(plan.notes.get("guidance_input"))


def sample(
    runtime: Runtime,
    plan: SamplerPlan,
    noise: np.ndarray,
    labels: Conditioning | np.ndarray | None,
    rng: np.random.Generator | None = None,
    on_step: Callable[[dict[str, np.ndarray]], None] | None = None,
) -> np.ndarray:
    """Run the plan: x_T = noise * init_noise_sigma, then per step x = a x + b x0_hat + c z, where
    x0_hat = x0_u + w (x0_c - x0_u) in one doubled batch when the plan guides (Ho & Salimans 2022)
    and z is fresh Gaussian noise from ``rng`` for stochastic (consistency) steps. ``labels`` is
    the conditioning: class labels, or a dict of named arrays (``run_pipeline`` encodes prompts
    into one). ``on_step`` sees the graph's feeds of every step (quantizers calibrate on them).
    Its stages are marked for the profiler's breakdown: conditioning (the feeds: labels,
    guidance's doubled batch, w), each denoising step, and the sampler's update. The result is
    the plan's sample (latents where the plan decodes)."""
    if plan.notes.get("fused"):  # the whole loop is one graph (export.fused_sampler)
        with section("conditioning"):
            feeds = fused_feeds(plan, noise, labels, rng)
        with section("fused sampler (all steps)"):
            return runtime.infer(feeds)["images"]
    x = noise.astype(np.float32) * np.float32(plan.init_noise_sigma)
    n = len(x)
    null = None
    if (
        plan.null_label is None
        and plan.guidance_scale != 1.0
        and hasattr(runtime, "null_conditioning")
    ):
        null = runtime.null_conditioning()
    for i, step in enumerate(plan.steps):
        with section("conditioning"):
            feeds = step_feeds(plan, x, step["timestep"], labels, null)
        if on_step is not None:
            on_step(feeds)
        t = step["timestep"]
        with section(
            f"step {i + 1} (t={t:g})" if isinstance(t, float) else f"step {i + 1} (t={t})"
        ):
            x0 = runtime.infer(feeds)["x0"]
        with section("sampler update"):
            if len(x0) == 2 * n:  # guided: conditional half, then unconditional
                x0 = x0[n:] + np.float32(plan.guidance_scale) * (x0[:n] - x0[n:])
            x = np.float32(step["a"]) * x + np.float32(step["b"]) * x0
            if step.get("c", 0.0):
                if rng is None:
                    raise ValueError("this sampler plan draws fresh noise: pass rng")
                x += np.float32(step["c"]) * rng.standard_normal(x.shape, dtype=np.float32)
    return x


def run_pipeline(
    runtime: Runtime,
    plan: SamplerPlan,
    noise: np.ndarray,
    prompts: list[str] | None = None,
    labels: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    on_step: Callable[[dict[str, np.ndarray]], None] | None = None,
) -> np.ndarray:
    """Prompt (or label) in, image out: the text encoders (profiler section "text encoding"),
    the sampler loop (``sample``) and the VAE decode ("vae decode") where the plan has them.
    Images in about [-1, 1], N x C x H x W."""
    if plan.conditioning_kind == "text":
        if prompts is None or len(prompts) != len(noise):
            raise CheckpointError(f"this {plan.family} model needs one prompt per image")
        with section("text encoding"):
            cond: Conditioning | np.ndarray | None = runtime.encode(prompts)  # type: ignore[attr-defined]
    elif plan.conditioning_kind == "class" and plan.conditioning:
        with section("conditioning"):
            cond = runtime.encode(labels=labels)  # type: ignore[attr-defined]
    else:
        cond = labels
    x = sample(runtime, plan, noise, cond, rng, on_step)
    if plan.decode:
        with section("vae decode"):
            x = runtime.decode(x)  # type: ignore[attr-defined]
    return x


def fused_feeds(
    plan: SamplerPlan,
    noise: np.ndarray,
    labels: Conditioning | np.ndarray | None,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Feeds of a fused-sampler graph: noise, labels and, for stochastic steps, the fresh noise the
    per-step loop would draw from ``rng``, in its order (batch x K x C x H x W)."""
    feeds = {"noise": noise.astype(np.float32), **as_conditioning(labels)}
    k = sum(1 for s in plan.steps if s.get("c", 0.0))
    if k:
        if rng is None:
            raise ValueError("this sampler plan draws fresh noise: pass rng")
        draws = [rng.standard_normal(noise.shape, dtype=np.float32) for _ in range(k)]
        feeds["step_noise"] = np.stack(draws, axis=1)
    return feeds


def infer_in_chunks(
    infer: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    feeds: dict[str, np.ndarray],
    max_rows: int,
) -> dict[str, np.ndarray]:
    """``infer`` on ``feeds`` in chunks of at most ``max_rows`` rows (an engine's largest batch),
    outputs concatenated back."""
    rows = len(next(iter(feeds.values())))
    if rows <= max_rows:
        return infer(feeds)
    parts = [
        infer({k: v[i : i + max_rows] for k, v in feeds.items()}) for i in range(0, rows, max_rows)
    ]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _device_section(name: str, cuda: bool):
    """Copies and compute are profiler sections of their own on a GPU; on the CPU there is no
    copy and the step is the compute."""
    return section(name) if cuda else contextlib.nullcontext()


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

    def inputs(self) -> dict[str, tuple[list, str]]:
        return self._inputs

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {k: v for k, v in feeds.items() if k in self._inputs}
        return dict(zip(self._outputs, self.session.run(self._outputs, feeds), strict=True))


class TorchRuntime:
    """torch eager on a DenoiserGraph or a FusedSampler (the modules ONNX graphs come from), on
    the CPU or a CUDA device (feeds copied in, results copied back, each a profiler section)."""

    def __init__(self, graph: Any, threads: int | None = None, device: str = "cpu") -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        if device != "cpu" and not torch.cuda.is_available():
            raise CheckpointError(f"torch sees no GPU here for device {device!r}")
        self.device = torch.device(device)
        self.graph = graph.eval().to(self.device)
        self.name = "torch-eager" if device == "cpu" else f"torch-eager:{device}"
        self._torch = torch

    def _to(self, array: np.ndarray | None):
        if array is None:
            return None
        return self._torch.from_numpy(array).to(self.device, non_blocking=False)

    def _section(self, name: str):
        return _device_section(name, self.device.type == "cuda")

    def _compute(self, fn):
        with self._section("compute"):
            out = fn()
            if recording() and self.device.type == "cuda":
                self._torch.cuda.synchronize(self.device)
        with self._section("d2h"):
            return out.cpu().numpy()

    def inputs(self) -> dict[str, tuple[list, str]]:
        from distill.denoiser import sample_shape

        if hasattr(self.graph, "input_names"):  # a fused sampler
            return {
                n: (["batch"], "float32" if "noise" in n else "int64")
                for n in self.graph.input_names()
            }
        spec = {
            "sample": (["batch", *sample_shape(self.graph.backbone)], "float32"),
            "timestep": (["batch"], "int64"),
        }
        if self.graph.conditional:
            spec["class_labels"] = (["batch"], "int64")
        if self.graph.guidance_input:
            spec["guidance_scale"] = (["batch"], "float32")
        return spec

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            if hasattr(self.graph, "input_names"):  # a fused sampler: noise in, images out
                with self._section("h2d"):
                    args = {k: self._to(feeds[k]) for k in self.graph.input_names()}
                return {"images": self._compute(lambda: self.graph(**args))}
            with self._section("h2d"):
                args = [
                    self._to(feeds["sample"]),
                    self._to(feeds["timestep"]),
                    self._to(feeds.get("class_labels") if self.graph.conditional else None),
                    self._to(feeds.get("guidance_scale") if self.graph.guidance_input else None),
                ]
            return {"x0": self._compute(lambda: self.graph(*args))}


class PipelineRuntime(TorchRuntime):
    """torch eager on a family adapter's pipeline (``distill.models``): the text encoders
    (``encode``), the denoiser graph (sample, timestep, **conditioning) -> x0 (``infer``) and the
    VAE decoder (``decode``), at one resolution, on numpy in and out."""

    def __init__(self, graph: Any, resolution: tuple[int, int], device: str = "cpu") -> None:
        super().__init__(graph, device=device)
        self.adapter = graph.adapter
        for module in self.adapter.modules.values():
            if hasattr(module, "to"):
                module.to(self.device)
        self.resolution = resolution
        self.adapter.resolution = resolution
        self.spec = self.adapter.conditioning_spec()
        self._null: dict[str, np.ndarray] | None = None
        self.name = f"torch-eager:{self.adapter.family}" + ("" if device == "cpu" else f":{device}")

    def _numpy(self, cond: dict) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy() for k, v in cond.items()}

    def encode(self, prompts: list[str] | None = None, labels: np.ndarray | None = None):
        h, w = self.resolution
        with self._torch.inference_mode():
            lab = None if labels is None else self._torch.from_numpy(np.asarray(labels))
            return self._numpy(self.adapter.encode(prompts, lab, h, w))

    def null_conditioning(self) -> dict[str, np.ndarray] | None:
        if self._null is None:
            with self._torch.inference_mode():
                null = self.adapter.null_conditioning(*self.resolution)
            self._null = None if null is None else self._numpy(null)
        return self._null

    def decode(self, x: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            images = self.adapter.decode(self._to(x.astype(np.float32)))
            return images.float().cpu().numpy()

    def inputs(self) -> dict[str, tuple[list, str]]:
        h, w = self.resolution
        t_type = "float32" if self.graph.flow else "int64"
        spec = {
            "sample": (["batch", *self.adapter.latent_shape(h, w)], "float32"),
            "timestep": (["batch"], t_type),
        }
        spec.update({k: (list(v.axes), v.dtype) for k, v in self.spec.items()})
        return spec

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._torch.inference_mode():
            with self._section("h2d"):
                args = {k: self._to(feeds[k]) for k in ("sample", "timestep", *self.spec)}
            return {"x0": self._compute(lambda: self.graph(**args))}


class AotiRuntime:
    """An AOTInductor package (``.pt2``) on the device it was compiled for. ``info`` is its engine
    manifest's info: device, input names and the batch range torch.export's guards allow."""

    def __init__(self, path: str | Path, info: dict) -> None:
        import torch

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"AOTInductor package not found: {path}")
        self.device = info.get("device", "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise CheckpointError(f"{path} was compiled for CUDA, and torch sees no GPU here")
        self.batch_range = info.get("batch_range", [1, 2**31])
        self._names = info.get("inputs", ["sample", "timestep", "class_labels"])
        try:
            self.model = torch._inductor.aoti_load_package(str(path))
        except Exception as e:
            raise CheckpointError(
                f"torch cannot load the AOTInductor package {path} (built with torch "
                f"{info.get('torch_version', '?')}, this is {torch.__version__}): "
                f"{str(e).strip()[:300]}"
            ) from None
        self.name = f"aotinductor:{self.device}"
        self._torch = torch

    def inputs(self) -> dict[str, tuple[list, str]]:
        types = {"sample": "float32", "guidance_scale": "float32"}
        return {n: (["batch"], types.get(n, "int64")) for n in self._names}

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Batches above the engine's range run in chunks: its guards fixed the range at build."""
        return infer_in_chunks(self._infer, feeds, self.batch_range[1])

    def _infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        cuda = self.device == "cuda"
        with torch.inference_mode():
            with _device_section("h2d", cuda):
                args = {k: torch.from_numpy(feeds[k]).to(self.device) for k in self._names}
            with _device_section("compute", cuda):
                out = self.model(**args)
                if cuda and recording():
                    torch.cuda.synchronize()
            with _device_section("d2h", cuda):
                return {"x0": out.cpu().numpy()}


def open_engine(
    path: str | Path, target: Any = None, spin: bool = True
) -> tuple[Runtime, SamplerPlan]:
    """An engine artifact's runtime and sampler plan, after checking its file hashes and, when a
    target is given, that the engine was built for it."""
    from accel.core.artifact import Artifact
    from accel.core.errors import TargetMismatch
    from accel.core.plan import PLAN_FILE

    engine = Artifact.load(path)
    if engine.kind != "engine":
        raise CheckpointError(f"{path} is a {engine.kind} artifact, not an engine")
    engine.verify()
    if target is not None and engine.target and engine.target["fingerprint"] != target.fingerprint:
        raise TargetMismatch(
            f"{path} was built for target {engine.target['name']!r} ({engine.target['fingerprint']}), "
            f"not {target.name!r} ({target.fingerprint}); rebuild it with "
            f"`accel compile ONNX_ARTIFACT --target {target.name}`"
        )
    file = Path(path) / engine.info.get("engine_file", "model.onnx")
    runtime: Runtime
    if engine.info.get("backend") == "aotinductor":
        runtime = AotiRuntime(file, engine.info)
    elif engine.info.get("backend") == "tensorrt":
        from export.tensorrt_compile import TensorRTRuntime

        runtime = TensorRTRuntime(file, engine.info)
    else:
        runtime = OrtRuntime(
            file,
            provider=engine.info.get("provider", "CPUExecutionProvider"),
            spin=spin,
            options=engine.info.get("provider_options"),
        )
    return runtime, SamplerPlan.load(Path(path) / PLAN_FILE)


def _installed_versions() -> dict[str, str | None]:
    """Versions of the engine libraries installed here, read without importing them."""
    from accel.hardware import installed_version

    return {
        "onnxruntime": installed_version("onnxruntime", "onnxruntime-gpu"),
        "tensorrt": installed_version("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
        "torch": installed_version("torch"),
    }


class Bundle:
    """A deployable bundle (``accel bundle``), run with numpy and the engine's own runtime.

    Opening one checks, before the engine is touched, every file's sha256 against the manifest
    and the machine against the bundle's target (CPU flags, GPU compute capability, library
    versions: ``accel.hardware.bundle_mismatch``); either failure raises a clear error and
    leaves nothing open. ``sample`` runs the few-step loop of the sampler plan (or the fused
    graph in one call). One bundle serves concurrent callers: onnxruntime sessions run
    concurrent calls; the other engines' calls are serialised by a lock (a TensorRT execution
    context is not reentrant)."""

    def __init__(self, path: str | Path, target: Any = None) -> None:
        from accel.core.artifact import Artifact
        from accel.core.errors import TargetMismatch
        from accel.core.plan import PLAN_FILE
        from accel.hardware import bundle_mismatch

        bundle = Artifact.load(path)
        if bundle.kind != "bundle":
            raise CheckpointError(
                f"{path} is a {bundle.kind} artifact, not a bundle; make one with `accel bundle`"
            )
        info = bundle.info
        on_disk = {
            p.relative_to(bundle.path).as_posix()
            for p in bundle.path.rglob("*")
            if p.is_file() and p.name != "manifest.json"
        }
        needed = {info.get("engine_file", ""), PLAN_FILE}
        try:
            if info.get("format") != "accel.bundle/1":
                raise CheckpointError(f"its format is {info.get('format')!r}, not accel.bundle/1")
            unlisted = sorted((on_disk | needed) - set(bundle.files))
            if unlisted:
                raise CheckpointError(f"files without a sha256 in manifest.json: {unlisted}")
            bundle.verify()
        except CheckpointError as e:
            raise CheckpointError(
                f"bundle {path} failed its integrity check: {e}. Rebuild it with `accel bundle`, "
                "or copy it again"
            ) from None
        if target is not None and info["target"]["fingerprint"] != target.fingerprint:
            raise TargetMismatch(
                f"bundle {path} was built for target {info['target']['name']!r} "
                f"({info['target']['fingerprint']}), not {target.name!r} ({target.fingerprint})"
            )
        why = bundle_mismatch(info, _installed_versions())
        if why:
            raise TargetMismatch(f"bundle {path} cannot run here: {why}")
        self.path, self.info = Path(path), info
        self.plan = SamplerPlan.load(self.path / PLAN_FILE)
        file = self.path / info["engine_file"]
        self.runtime: Runtime
        self._lock: Any
        engine_info = info.get("engine", {})
        if info["backend"] == "onnxruntime":
            import onnxruntime as ort

            provider = info.get("provider") or "CPUExecutionProvider"
            if provider not in ort.get_available_providers():
                raise TargetMismatch(
                    f"bundle {path} cannot run here: its engine runs on {provider}, which this "
                    f"onnxruntime build lacks (it has {ort.get_available_providers()}); install "
                    "the matching onnxruntime build"
                )
            self.runtime = OrtRuntime(file, provider=provider, options=info.get("provider_options"))
            self._lock = contextlib.nullcontext()
        else:
            if info["backend"] == "tensorrt":
                from export.tensorrt_compile import TensorRTRuntime

                self.runtime = TensorRTRuntime(file, engine_info)
            else:
                self.runtime = AotiRuntime(file, engine_info)
            self._lock = threading.Lock()
        self.name = f"bundle:{self.runtime.name}"

    def inputs(self) -> dict[str, tuple[list, str]]:
        return self.runtime.inputs()

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            return self.runtime.infer(feeds)

    def sample(
        self, noise: np.ndarray, labels: np.ndarray | None = None, seed: int | None = 0
    ) -> np.ndarray:
        """Images (N x C x H x W, about [-1, 1]) from ``noise`` (N x C x H x W standard normal)
        and class ``labels`` (int64, for class-conditional models); ``seed`` draws the fresh
        noise of stochastic (consistency) steps."""
        shape = tuple(self.plan.sample_shape)
        if noise.ndim != 4 or tuple(noise.shape[1:]) != shape:
            raise ValueError(f"noise must be N x {' x '.join(map(str, shape))}, got {noise.shape}")
        if self.plan.num_classes and labels is None:
            raise ValueError(f"this model is class-conditional: pass {len(noise)} labels")
        labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        rng = np.random.default_rng(seed)
        return sample(self, self.plan, noise.astype(np.float32), labels, rng)


def open_model(
    path: str | Path,
    steps: int | None = None,
    guidance: float | None = None,
    device: str = "cpu",
    resolution: tuple[int, int] | None = None,
) -> tuple[TorchRuntime, SamplerPlan]:
    """A diffusers directory in torch eager on ``device``, with the DDIM plan (Euler steps for
    flow models) for ``steps`` (default: a student's own step count, else 50), ``guidance``
    (default: the model's) and, for latent families, ``resolution`` (H, W; default the model's)."""
    from distill.denoiser import DenoiserGraph, load_denoiser
    from distill.samplers import sampler_plan

    den, info = load_denoiser(path, guidance_scale=guidance)
    steps = steps or info.get("num_inference_steps") or 50
    if den.adapter is None:
        if resolution is not None:
            raise CheckpointError(f"{path} draws one size only: drop --height/--width")
        plan = sampler_plan(den, steps, info.get("num_classes"))
        return TorchRuntime(DenoiserGraph.of(den), device=device), plan
    plan = sampler_plan(den, steps, resolution=resolution)
    h, w = plan.resolution or (0, 0)
    return PipelineRuntime(DenoiserGraph.of(den), (h, w), device=device), plan


def open_runtime(
    path: str | Path,
    target: Any = None,
    steps: int | None = None,
    guidance: float | None = None,
    spin: bool = True,
    resolution: tuple[int, int] | None = None,
) -> tuple[Runtime, SamplerPlan]:
    """A bundle or an engine artifact (its own runtime), or a diffusers directory (torch eager),
    with its plan. An engine's step count and guidance are fixed at export time: asking for
    others is an error."""
    from accel.core.artifact import MANIFEST, Artifact

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model or engine not found: {path}")
    kind = Artifact.load(path).kind if (path / MANIFEST).is_file() else None
    runtime: Runtime
    if kind == "bundle":
        bundle = Bundle(path, target)
        runtime, plan = bundle, bundle.plan
    elif kind == "engine":
        runtime, plan = open_engine(path, target, spin=spin)
    else:
        device = "cuda" if target is not None and target.device == "cuda" else "cpu"
        return open_model(path, steps, guidance, device, resolution)
    if resolution is not None:
        raise CheckpointError(f"{path} is an engine for one resolution; drop --height/--width")
    if steps is not None and steps != len(plan.steps):
        raise CheckpointError(
            f"{path} is an engine for {len(plan.steps)} steps; its sampler plan "
            "is fixed at export time (drop --steps)"
        )
    if guidance is not None and guidance != plan.guidance_scale:
        raise CheckpointError(
            f"{path} samples with guidance {plan.guidance_scale}, fixed at export "
            "time (drop --guidance)"
        )
    return runtime, plan
