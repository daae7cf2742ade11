"""Deployable bundles (``accel bundle``) run with numpy and the engine's own runtime."""

from __future__ import annotations

import contextlib
import importlib.util
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from accel.core.engine_info import EngineInfo
from accel.core.errors import CheckpointError
from accel.core.hardware import cpu_info, gpu_info, jetson_model, names_gpu
from accel.core.plan import SamplerPlan
from accel.runtime.backends import backend, installed_versions
from accel.runtime.loop import Runtime, check_finite, run_pipeline

# /1 named backends as accel.engine/1 did (onnxruntime, aotinductor): read through their rows
BUNDLE_FORMATS = ("accel.deploy.bundle/2", "accel.deploy.bundle/1")


class Bundle:
    """A deployable bundle (``accel bundle``), run with numpy and the engine's own runtime.

    Opening one checks, before the engine is touched, every file's sha256 against the manifest
    and the machine against the bundle's target (CPU flags, GPU compute capability, library
    versions: ``accel.core.hardware.bundle_mismatch``); either failure raises a clear error and
    leaves nothing open. ``sample`` runs the few-step loop of the sampler plan (or the fused
    graph in one call). One bundle serves concurrent callers: onnxruntime sessions run
    concurrent calls; the other engines' calls are serialised by a lock (a TensorRT execution
    context is not reentrant)."""

    def __init__(self, path: str | Path, target: Any = None) -> None:
        from accel.core.artifact import Artifact
        from accel.core.errors import TargetMismatch
        from accel.core.plan import PLAN_FILE

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
        try:
            if info.get("format") not in BUNDLE_FORMATS:
                raise CheckpointError(
                    f"its format is {info.get('format')!r}, not {' or '.join(BUNDLE_FORMATS)}"
                )
            check_manifest(info)
            engine_info = EngineInfo.from_dict(info.get("engine"), "its manifest")
            plan = SamplerPlan.load(bundle.path / PLAN_FILE)
            needed = {engine_info.engine_file, PLAN_FILE, *pipeline_files(plan, bundle.path)}
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
        why = bundle_mismatch(info, installed_versions())
        if why:
            raise TargetMismatch(f"bundle {path} cannot run here: {why}")
        self.path, self.info = Path(path), info
        self.plan = plan
        engine = backend(engine_info.backend)
        if engine.name == "ort":
            import onnxruntime as ort

            provider = engine_info.options.get("provider", "CPUExecutionProvider")
            if provider not in ort.get_available_providers():
                raise TargetMismatch(
                    f"bundle {path} cannot run here: its engine runs on {provider}, which this "
                    f"onnxruntime build lacks (it has {ort.get_available_providers()}); install "
                    "the matching onnxruntime build"
                )
        from accel.runtime.engine import open_engines

        self.runtime: Runtime = open_engines(self.path, engine_info, plan)
        self._lock: Any = contextlib.nullcontext() if engine.concurrent else threading.Lock()
        self.name = f"bundle:{self.runtime.name}"

    def inputs(self) -> dict[str, tuple[list, str]]:
        return self.runtime.inputs()

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            return self.runtime.infer(feeds)

    def encode(self, prompts: list[str]) -> dict[str, np.ndarray]:
        with self._lock:
            return self.runtime.encode(prompts)  # type: ignore[attr-defined]

    def null_conditioning(self) -> dict[str, np.ndarray] | None:
        return getattr(self.runtime, "null_conditioning", lambda: None)()

    def decode(self, latents: np.ndarray) -> np.ndarray:
        with self._lock:
            return self.runtime.decode(latents)  # type: ignore[attr-defined]

    def sample(
        self,
        noise: np.ndarray,
        labels: np.ndarray | None = None,
        seed: int | None = 0,
        prompts: list[str] | None = None,
    ) -> np.ndarray:
        """Images (N x C x H x W, about [-1, 1]) from ``noise`` (N x sample_shape standard
        normal: latents for a pipeline) and class ``labels`` (int64, for class-conditional
        models) or ``prompts`` (one per image, for text-to-image pipelines, which decode the
        latents); ``seed`` draws the fresh noise of stochastic (consistency) steps."""
        shape = tuple(self.plan.sample_shape)
        if noise.ndim != 1 + len(shape) or tuple(noise.shape[1:]) != shape:
            raise ValueError(f"noise must be N x {' x '.join(map(str, shape))}, got {noise.shape}")
        if self.plan.num_classes and labels is None:
            raise ValueError(f"this model is class-conditional: pass {len(noise)} labels")
        if self.plan.conditioning_kind == "text" and (
            prompts is None or len(prompts) != len(noise)
        ):
            raise ValueError(f"this model is text-to-image: pass {len(noise)} prompts")
        labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        rng = np.random.default_rng(seed)
        images = run_pipeline(self, self.plan, noise.astype(np.float32), prompts, labels, rng)
        check_finite(images, f"bundle {self.path}")
        return images


# what Bundle and bundle_mismatch read from a manifest's info, and its JSON type
_TARGET_KEYS = {"name": str, "fingerprint": str, "device": str}
_TARGET_OPTIONAL = {
    "gpu": (str, type(None)), "compute_capability": (str, type(None)), "cpu_flags": list,
    "hardware_compatibility": str, "version_compatible": bool, "batch": dict,
}  # fmt: skip


def check_manifest(info: dict) -> None:
    """The parts of a bundle manifest's info the checks before opening read: the target's
    identity and device, the backend name, the libraries; a ``CheckpointError`` naming the
    first that is missing or of the wrong type."""
    target = info.get("target")
    if not isinstance(target, dict):
        raise CheckpointError("its target must be a JSON object")
    for key, kind in _TARGET_KEYS.items():
        if not isinstance(target.get(key), kind):
            raise CheckpointError(f"its target has no {key} string")
    for key, kinds in _TARGET_OPTIONAL.items():
        if key in target and not isinstance(target[key], kinds):
            raise CheckpointError(f"its target's {key} is of the wrong type")
    if target["device"] == "cuda" and not isinstance(target.get("gpu"), str):
        raise CheckpointError("its CUDA target names no gpu")
    if not isinstance(info.get("backend"), str):
        raise CheckpointError("it names no backend")
    libraries = info.get("libraries")
    if not isinstance(libraries, dict) or not all(
        isinstance(v, (str, type(None))) for v in libraries.values()
    ):
        raise CheckpointError("its libraries must map names to version strings")


def pipeline_files(plan: SamplerPlan, root: Path) -> list[str]:
    """The files of a pipeline besides the denoiser's engine and the plan, relative to ``root``:
    component engines (and their external data), tokenizer files, the conditioning file."""
    names = [*plan.components.values()]
    names += [f"{t['folder']}/tokenizer.json" for t in plan.tokenizers]
    names += [plan.conditioning_file] if plan.conditioning_file else []
    data = [f"{n}.data" for n in plan.components.values() if (root / f"{n}.data").is_file()]
    return names + data


def _version(text: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text or "")[:3])


def bundle_mismatch(info: dict, installed: dict[str, str | None]) -> str | None:
    """Why this machine cannot run a bundle whose manifest ``info`` this is, or None: the CPU
    lacks the target's instruction-set flags; the target's GPU is missing or of another compute
    capability; the engine's library is missing, or older than the one that built it (TensorRT
    and AOTInductor: another version, unless the plan is version-compatible). ``installed`` maps
    library names to the versions installed here (None: not installed). Reads NVML and
    /proc/cpuinfo; opens no engine."""
    t = info["target"]
    fix = "rebuild the bundle for this machine's target (`accel targets detect` names it)"
    if t["device"] == "cpu":
        missing = sorted(set(t.get("cpu_flags") or []) - set(cpu_info()["flags"]))
        if missing:
            return (
                f"the bundle was built for target {t['name']}, whose CPU has {', '.join(missing)}; "
                f"this CPU does not; {fix}"
            )
    elif importlib.util.find_spec("pynvml") is not None:  # without NVML the engine's runtime tells
        gpus = gpu_info() or []
        jetson = jetson_model()
        if not gpus and not (jetson and names_gpu(t["gpu"], jetson)):
            return (
                f"the bundle was built for a {t['gpu']} GPU (target {t['name']}) and NVML sees "
                f"no GPU here; {fix}"
            )
        cc = (gpus[0]["compute_capability"] if gpus else None) or t["compute_capability"]
        ampere_plus = t.get("hardware_compatibility") == "ampere_plus"
        if (ampere_plus and _version(cc) < (8, 0)) or (
            not ampere_plus and cc != t["compute_capability"]
        ):
            return (
                f"the bundle's engine was built for compute capability {t['compute_capability']} "
                f"({t['gpu']}, target {t['name']}); this GPU ({gpus[0]['name']}) is {cc}; {fix}"
            )
    engine = backend(info["backend"])
    library = engine.library
    built = info["libraries"].get(library)
    have = installed.get(library)
    if have is None:
        return (
            f"the bundle's {info['backend']} engine needs {library} ({built} built it); install it"
        )
    exact = engine.exact_version and not t.get("version_compatible")
    if (
        (exact and _version(have) != _version(built))
        or _version(have)[:1] != _version(built)[:1]  # another major version
        or _version(have)[:2] < _version(built)[:2]
    ):
        need = f"=={built}" if exact else f">={'.'.join(map(str, _version(built)[:2]))}"
        return (
            f"the bundle's engine was built with {library} {built}, this machine has {have}; "
            f"install {library}{need}"
        )
    return None
