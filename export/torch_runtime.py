"""Torch runtimes: eager torch on a DenoiserGraph, a FusedSampler or a family pipeline
(text encoders, denoiser, VAE), and AOTInductor packages; ``open_model`` opens a diffusers
directory. They speak the runtime interface of ``accel.runtime`` (``inputs()``, ``infer(feeds)``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from accel.core.engine_info import EngineInfo
from accel.core.errors import CheckpointError
from accel.core.plan import SamplerPlan
from accel.core.sections import recording
from accel.runtime.loop import _device_section, infer_in_chunks


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
        if self.graph.flow_map:
            spec["r_timestep"] = (["batch"], t_type)
        spec.update({k: (list(v.axes), v.dtype) for k, v in self.spec.items()})
        return spec

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._torch.inference_mode():
            with self._section("h2d"):
                names = ("sample", "timestep", *(("r_timestep",) if self.graph.flow_map else ()))
                args = {k: self._to(feeds[k]) for k in (*names, *self.spec)}
            return {"x0": self._compute(lambda: self.graph(**args))}


class AotiRuntime:
    """An AOTInductor package (``.pt2``) on the device it was compiled for. ``info`` is its engine
    manifest's info: device, input names and the batch range torch.export's guards allow."""

    def __init__(self, path: str | Path, info: EngineInfo) -> None:
        import torch

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"AOTInductor package not found: {path}")
        self.device = info.device
        if self.device == "cuda" and not torch.cuda.is_available():
            raise CheckpointError(f"{path} was compiled for CUDA, and torch sees no GPU here")
        self.batch_range = info.batch_range or [1, 2**31]
        self._names = info.options.get("inputs") or ["sample", "timestep", "class_labels"]
        try:
            self.model = torch._inductor.aoti_load_package(str(path))
        except Exception as e:
            raise CheckpointError(
                f"torch cannot load the AOTInductor package {path} (built with torch "
                f"{info.library_version}, this is {torch.__version__}): "
                f"{str(e).strip()[:300]}"
            ) from None
        self.name = f"aoti:{self.device}"
        self._torch = torch

    @classmethod
    def from_engine(cls, file: Path, info: EngineInfo, spin: bool = True) -> AotiRuntime:
        return cls(file, info)

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
    from distill.checkpoint import load_denoiser
    from distill.graph import DenoiserGraph
    from distill.samplers import sampler_plan

    den, info = load_denoiser(path, guidance_scale=guidance)
    steps = steps or info.num_inference_steps or 50
    if den.adapter.pixel:  # one graph, one size
        if resolution is not None:
            raise CheckpointError(f"{path} draws one size only: drop --height/--width")
        plan = sampler_plan(den, steps, info)
        return TorchRuntime(DenoiserGraph.of(den), device=device), plan
    plan = sampler_plan(den, steps, info, resolution)
    h, w = plan.resolution or (0, 0)
    return PipelineRuntime(DenoiserGraph.of(den), (h, w), device=device), plan


class StockScheduler:
    """A checkpoint sampled as its stock diffusers pipeline samples it: the scheduler its
    ``scheduler/`` folder names (PNDM for SD1.5, Euler for SDXL, DPM-Solver for PixArt, FlowMatch
    Euler for SD3 and Flux), set to ``steps`` with the family's ``set_timesteps`` arguments, the
    initial noise scaled by ``init_noise_sigma``, each step ``scale_model_input``, the guided
    model output in its own prediction type, then ``scheduler.step``, as the pipelines'
    ``__call__`` loops do; in torch eager on the CPU. ``plan`` is the model's plan for the shape
    and conditioning of its inputs (its steps are not used). Schedulers that draw noise inside
    ``step`` (DDPM, the ancestral ones) are refused: their noise is not accel's to reproduce."""

    STOCHASTIC = (
        "DDPMScheduler",
        "EulerAncestralDiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "LCMScheduler",
        "TCDScheduler",
    )

    @classmethod
    def applies(cls, path: str | Path) -> bool:
        """Whether ``path`` is a teacher this loop samples: a diffusers folder, not a student,
        whose scheduler is a deterministic diffusers one (``accel sample``'s default then)."""
        import json

        import diffusers

        from accel.core.model_info import ModelInfo

        config = Path(path, "scheduler", "scheduler_config.json")
        if not config.is_file() or ModelInfo.read(path).is_student:
            return False
        try:
            name = json.loads(config.read_text()).get("_class_name", "")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return False
        return name not in cls.STOCHASTIC and hasattr(diffusers, name)

    def __init__(
        self,
        path: str | Path,
        steps: int | None = None,
        guidance: float | None = None,
        resolution: tuple[int, int] | None = None,
    ) -> None:
        import diffusers

        from distill.checkpoint import load_denoiser
        from distill.samplers import sampler_plan

        den, info = load_denoiser(path, guidance_scale=guidance)
        if info.is_student:
            raise CheckpointError(
                f"{path} is a distilled {info.method} student: it samples with its own few-step "
                "plan, not a scheduler's loop; drop --scheduler stock"
            )
        config = den.scheduler_config or {}
        name = config.get("_class_name", "")
        if name in self.STOCHASTIC or not hasattr(diffusers, name):
            raise CheckpointError(
                f"{path}: its scheduler {name or '(none)'} draws noise inside each step (or is "
                "not diffusers'); --scheduler stock runs deterministic schedulers only"
            )
        self.denoiser = den
        self.steps = steps or info.num_inference_steps or 50
        if den.adapter.pixel and resolution is not None:
            raise CheckpointError(f"{path} draws one size only: drop --height/--width")
        self.plan = sampler_plan(den, self.steps, info, None if den.adapter.pixel else resolution)
        self.scheduler_class = getattr(diffusers, name)
        self.config = config

    def __call__(
        self, noise: np.ndarray, prompts: list[str] | None, labels: np.ndarray | None
    ) -> np.ndarray:
        import torch

        den, adapter = self.denoiser, self.denoiser.adapter
        h, w = self.plan.resolution or adapter.default_resolution()
        adapter.resolution = (h, w)
        sched = self.scheduler_class.from_config(self.config)
        sched.set_timesteps(self.steps, **adapter.timestep_kwargs(self.steps, h, w))
        lab = None if labels is None else torch.as_tensor(labels).long()
        with torch.inference_mode():
            cond = adapter.encode(prompts, lab, h, w)
            # the flow schedulers neither scale the noise nor the model input
            x = torch.from_numpy(np.asarray(noise, np.float32))
            x = x * getattr(sched, "init_noise_sigma", 1.0)
            scale = getattr(sched, "scale_model_input", lambda x, t: x)
            for t in sched.timesteps:
                out = den.raw(scale(x, t), t, cond)
                x = sched.step(out, t, x, return_dict=False)[0]
            return adapter.decode(x).float().numpy()
