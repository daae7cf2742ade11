"""The sampler loop with numpy alone: one interface over every engine (``Runtime``: ``inputs()``,
``infer(feeds)``, the way Polygraphy's runners do) and the ``SamplerPlan`` computed at export time
(timesteps and x_next = a x + b x0 [+ c z] per step, guidance, the conditioning spec), so that
sampling needs nothing but numpy and a runtime."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

import numpy as np

from accel.core import memory
from accel.core.errors import CheckpointError
from accel.core.plan import SamplerPlan
from accel.core.sections import section


class Runtime(Protocol):
    name: str

    def inputs(self) -> dict[str, tuple[list, str]]: ...

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


Conditioning = dict[str, np.ndarray]


def class_input(plan: SamplerPlan | None) -> str:
    """The graph input that takes class labels: the plan's one int64 conditioning input of a
    class-conditional model (``class_labels`` in plans written before they named it)."""
    if plan is not None and plan.conditioning_kind == "class":
        names = [k for k, v in plan.conditioning.items() if v.get("dtype") == "int64"]
        if len(names) == 1:
            return names[0]
    return "class_labels"


def as_conditioning(
    conditioning: Conditioning | np.ndarray | None, plan: SamplerPlan | None = None
) -> Conditioning:
    """Conditioning feeds: a dict of named arrays, or class labels (int64) as the plan's class
    input."""
    if conditioning is None:
        return {}
    if isinstance(conditioning, dict):
        return conditioning
    return {class_input(plan): np.asarray(conditioning).astype(np.int64)}


def step_feeds(
    plan: SamplerPlan,
    x: np.ndarray,
    timestep: float | np.ndarray,
    conditioning: Conditioning | np.ndarray | None,
    null: Conditioning | None = None,
    r_timestep: float | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The graph's feeds for one step of ``plan`` on x (and a flow map's ``r_timestep``, the
    step's end): when the plan applies classifier-free
    guidance, the batch is doubled, each per-example conditioning input followed by the null
    conditioning (``null``, batch 1; default: the plan's null class); w as an input for
    guidance-distilled graphs."""
    n = len(x)
    cond = as_conditioning(conditioning, plan)
    guided = plan.guidance_scale != 1.0 and bool(cond) and not _w_input(plan)
    guided = guided and not plan.guidance_in_model
    t = np.resize(np.asarray(timestep, dtype=plan.timestep_dtype), n)
    feeds = {"sample": x, "timestep": t, **cond}
    steps = {"sample": x, "timestep": t}
    if r_timestep is not None:
        steps["r_timestep"] = feeds["r_timestep"] = np.resize(
            np.asarray(r_timestep, dtype=plan.timestep_dtype), n
        )
    if guided:
        if null is None:
            null = {class_input(plan): np.array([plan.null_label], dtype=np.int64)}
        doubled = steps
        feeds = {k: np.concatenate([v, v]) for k, v in doubled.items()}
        for k, v in cond.items():
            if plan.is_batched(k):
                feeds[k] = np.concatenate([v, np.broadcast_to(null[k], (n, *null[k].shape[1:]))])
            else:
                feeds[k] = v
    if _w_input(plan):
        feeds["guidance_scale"] = np.full(len(feeds["sample"]), plan.guidance_scale, np.float32)
    return feeds


def plan_timesteps(plan: SamplerPlan) -> tuple[np.ndarray, np.ndarray | None]:
    """The plan's step timesteps and, for a flow map, the steps' ends (``r_timestep``): the
    feeds' timestep columns of parity and calibration batches (``step_feeds`` cycles them)."""
    t = np.array([s.timestep for s in plan.steps], plan.timestep_dtype)
    if plan.sampler != "flow_map":
        return t, None
    return t, np.array([s.r_timestep for s in plan.steps], plan.timestep_dtype)


def _w_input(plan: SamplerPlan) -> bool:
    return plan.guidance_input


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
    if plan.fused:  # the whole loop is one graph (export.fused_sampler)
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
            feeds = step_feeds(plan, x, step.timestep, labels, null, step.r_timestep)
        if on_step is not None:
            on_step(feeds)
        t = step.timestep
        with section(
            f"step {i + 1} (t={t:g})" if isinstance(t, float) else f"step {i + 1} (t={t})"
        ):
            x0 = runtime.infer(feeds)["x0"]
        with section("sampler update"):
            if len(x0) == 2 * n:  # guided: conditional half, then unconditional
                x0 = x0[n:] + np.float32(plan.guidance_scale) * (x0[:n] - x0[n:])
            x = np.float32(step.a) * x + np.float32(step.b) * x0
            if step.c:
                if rng is None:
                    raise ValueError("this sampler plan draws fresh noise: pass rng")
                x += np.float32(step.c) * rng.standard_normal(x.shape, dtype=np.float32)
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
    else:
        cond = as_conditioning(labels, plan)
    x = sample(runtime, plan, noise, cond, rng, on_step)
    if plan.decode and not plan.fused:  # a fused graph (images out) decoded already
        with section("vae decode"):
            x = runtime.decode(x)  # type: ignore[attr-defined]
    return x


def bounded_batch(plan: SamplerPlan, batch: int) -> int:
    """The batch a draw of ``plan`` takes: the target's ``batch``, fewer where the images are
    large (``DRAW_PIXELS``)."""
    h, w = plan.resolution or plan.sample_shape[-2:]
    return max(1, min(batch, memory.DRAW_PIXELS // (h * w)))


def draw(
    runtime: Runtime,
    plan: SamplerPlan,
    n: int,
    seed: int,
    batch: int,
    prompts: list[str] | None = None,
    num_classes: int | None = None,
    on_step: Callable[[dict], None] | None = None,
):
    """n samples as a stream of (images in [-1, 1], conditions) batches of at most ``batch`` (the
    target's batch, ``bounded_batch``), so that memory is one batch's whatever n is. The noise is
    drawn batch by batch from numpy's ``default_rng(seed)`` (the same numbers as one draw of all
    n), fresh step noise from ``default_rng([seed, 1])``. Conditions: a text model's prompts cycled (the
    conditions are each image's index in ``prompts``), a class model's labels 0..K-1 cycled
    (``num_classes``, default the plan's), else None. The draw behind the quality gate, INT8
    calibration and the profile's quality figures."""
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    batch = bounded_batch(plan, batch)
    text = plan.conditioning_kind == "text"
    if text and not prompts:
        raise ValueError("a text-to-image model draws from prompts, and none were given")
    num_classes = plan.num_classes if num_classes is None else num_classes
    noise_rng = np.random.default_rng(seed)
    step_noise = np.random.default_rng([seed, 1])  # for stochastic (consistency) steps
    for start in range(0, n, batch):
        rows = np.arange(start, min(start + batch, n))
        noise = noise_rng.standard_normal((len(rows), *plan.sample_shape)).astype(np.float32)
        if text:
            conditions = (rows % len(prompts)).astype(np.int64)  # type: ignore[arg-type]
            chosen = [prompts[k] for k in conditions]  # type: ignore[index]
            images = run_pipeline(runtime, plan, noise, chosen, rng=step_noise, on_step=on_step)
        else:
            conditions = (rows % num_classes).astype(np.int64) if num_classes else None
            images = sample(runtime, plan, noise, conditions, step_noise, on_step)
        yield np.clip(images, -1, 1), conditions


def check_finite(images: np.ndarray, what: str) -> None:
    """CheckpointError when ``images`` hold NaN or Inf: a healthy model draws finite images, so
    its weights, graph or sampler plan are damaged (or its fp16 range overflowed)."""
    finite = np.isfinite(images.reshape(len(images), -1)).all(axis=1)
    if not finite.all():
        raise CheckpointError(
            f"{what} drew NaN or Inf values in {int((~finite).sum())} of {len(images)} images: "
            "its weights, graph or sampler plan are damaged (or fp16 overflowed); rebuild it"
        )


def fused_feeds(
    plan: SamplerPlan,
    noise: np.ndarray,
    labels: Conditioning | np.ndarray | None,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Feeds of a fused-sampler graph: noise, labels and, for stochastic steps, the fresh noise the
    per-step loop would draw from ``rng``, in its order (batch x K x C x H x W)."""
    feeds = {"noise": noise.astype(np.float32), **as_conditioning(labels, plan)}
    k = sum(1 for s in plan.steps if s.c)
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


class ShapeBuckets:
    """The batch sizes an engine is compiled or captured at: the powers of two in [lo, hi] plus
    lo, opt and hi. ``bucket(n)`` is the smallest that holds n rows."""

    def __init__(self, lo: int, opt: int, hi: int, target: str = "the target") -> None:
        if not 1 <= lo <= opt <= hi:
            raise CheckpointError(f"batch profile min {lo} <= opt {opt} <= max {hi} does not hold")
        self.lo, self.hi, self.target = lo, hi, target
        powers = {1 << k for k in range(hi.bit_length()) if lo <= 1 << k <= hi}
        self.sizes = sorted(powers | {lo, opt, hi})

    @classmethod
    def of_target(cls, target) -> ShapeBuckets:
        b = target.shapes.batch
        return cls(b.min, b.opt, b.max, f"target {target.name!r}")

    def bucket(self, n: int) -> int:
        if not self.lo <= n <= self.hi:
            raise CheckpointError(
                f"batch {n} is outside the shape profile of {self.target} (batch {self.lo}.."
                f"{self.hi}); split the request, or rebuild the engine for a target whose "
                "[shapes] batch covers it"
            )
        return next(s for s in self.sizes if s >= n)


def pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """``a`` with zero rows appended up to ``rows``."""
    if len(a) == rows:
        return a
    return np.concatenate([a, np.zeros((rows - len(a), *a.shape[1:]), a.dtype)])


def _device_section(name: str, cuda: bool):
    """Copies and compute are profiler sections of their own on a GPU; on the CPU there is no
    copy and the step is the compute."""
    return section(name) if cuda else contextlib.nullcontext()
