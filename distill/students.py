"""Student kinds: what a distilled student is, apart from the method that trained it. Each kind
is one ``StudentKind`` object (``DDIM``, ``FLOW_EULER``, ``LCM``, ``FLOW_LCM``, ``TRIGFLOW``,
``FLOW_MAP``; ``KINDS``) that owns the stock diffusers scheduler config it writes (so the
student loads in its family's stock pipeline), its sampler plan's grid and the denoiser wrapper
its checkpoint loads as. Methods produce a kind; ``load_denoiser`` (``kind_of``, from accel.json)
and ``sampler_plan`` (``kind_of_denoiser``) dispatch on it, and no method imports another to
borrow one. The helpers each kind is built from:

- DDIM (progressive and guidance students; flow teachers: flow Euler): ``ddim_scheduler_config``;
- LCM (consistency, DMD2, ADD; flow teachers: flow LCM): ``lcm_scheduler_config``,
  ``save_lcm_student``;
- TrigFlow (sCM/rCM, Lu & Song 2024): ``trigflow_grid``, ``scm_flow_grid``,
  ``trigflow_scheduler_config``, ``load_sana_sprint_pipeline``;
- flow map (MeanFlow, Geng et al. 2025): the interval embedding that gives a stock transformer
  its r input (``attach_interval``, ``interval``, ``load_interval``), ``FlowMapDenoiser``,
  ``flow_map_sigmas``, ``flow_map_scheduler_config``, ``load_flow_map_pipeline``.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from accel.core.errors import CheckpointError
from accel.core.model_info import ConsistencySpec, ModelInfo
from distill.checkpoint import save_pipeline
from distill.denoiser import ConsistencyDenoiser, Denoiser, FlowConsistencyDenoiser, takes_w
from distill.parameterisation import TIMESTEP_SCALING
from distill.schedule import process_config
from distill.trainer import mean_tail, write_loss_log

if TYPE_CHECKING:
    from accel.core.stage import StageContext


def save_student(
    ctx: StageContext,
    backbone: nn.Module,
    scheduler_config: dict,
    info: ModelInfo,
    teacher: Denoiser,
    log: list[dict[str, float]] | dict,
    metrics: dict[str, Any],
) -> None:
    """The end of every training stage: the student's pipeline directory (``save_pipeline``:
    backbone, the kind's stock scheduler, ``info`` as accel.json, the teacher's other
    components), its figures in the artifact's ``metrics`` and its loss log."""
    from distill.lora import AdapterView, lora_size

    save_pipeline(ctx.out, backbone, scheduler_config, info, teacher)
    if isinstance(backbone, AdapterView):  # a LoRA student: its size beside the teacher's
        assert backbone.shape is not None
        named = backbone.base.named_parameters()
        teacher_params = sum(p.numel() for n, p in named if "lora_" not in n)
        metrics = {**metrics, "lora": {
            "rank": backbone.shape.rank, "alpha": backbone.shape.alpha,
            **lora_size(backbone.state()), "base_parameters": teacher_params,
        }}  # fmt: skip
    ctx.metrics.update(metrics)
    write_loss_log(ctx.out, log)


# ---------------------------------------------------------------- DDIM (and flow Euler)


def flow_match_config(teacher_scheduler: dict) -> dict:
    """A flow teacher's scheduler config in FlowMatch*Scheduler keys: Sana's
    DPMSolverMultistepScheduler (``use_flow_sigmas``) names its shift ``flow_shift``."""
    config = dict(teacher_scheduler)
    if "flow_shift" in config and "shift" not in config:
        config["shift"] = config.pop("flow_shift")
    return config


def ddim_scheduler_config(teacher_scheduler: dict, flow: bool = False) -> dict:
    """A stock DDIMScheduler whose loop (set_timesteps, step) is exactly accel's DDIM sampler; for
    flow teachers their own FlowMatchEulerDiscreteScheduler (its N-step grid is the student's)."""
    if flow:
        return dict(
            flow_match_config(teacher_scheduler), _class_name="FlowMatchEulerDiscreteScheduler"
        )
    return dict(
        process_config(teacher_scheduler),
        _class_name="DDIMScheduler",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="trailing",
        thresholding=False,
    )


# ---------------------------------------------------------------- LCM (and flow LCM)


def lcm_scheduler_config(teacher_scheduler: dict, solver_steps: int, flow: bool = False) -> dict:
    """A stock LCMScheduler whose set_timesteps/step loop is ``sample_consistency``; for flow
    teachers a FlowMatchLCMScheduler with the teacher's shift settings."""
    if flow:
        import inspect

        from diffusers import FlowMatchLCMScheduler

        keys = inspect.signature(FlowMatchLCMScheduler.__init__).parameters  # its own keys only
        teacher_scheduler = flow_match_config(teacher_scheduler)
        config = {k: v for k, v in teacher_scheduler.items() if k in keys and k != "self"}
        full = FlowMatchLCMScheduler(**config).config
        return {k: v for k, v in full.items() if not k.startswith("_")} | {
            "_class_name": "FlowMatchLCMScheduler"
        }
    return dict(
        process_config(teacher_scheduler),
        _class_name="LCMScheduler",
        original_inference_steps=solver_steps,
        timestep_scaling=TIMESTEP_SCALING,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        thresholding=False,
    )


def lcm_spec(solver_steps: int, flow: bool) -> ConsistencySpec:
    """An LCM-form student's boundary condition; flow students: x0 = z - s v, no boundary
    scalings (recorded as zeros)."""
    return ConsistencySpec(solver_steps, *((0.0, 0.0) if flow else (0.5, TIMESTEP_SCALING)))


def save_lcm_student(
    ctx: StageContext,
    student: ConsistencyDenoiser,
    teacher: Denoiser,
    info: ModelInfo,
    method: str,
    guidance_scale: float,
    log: list[dict[str, float]],
) -> None:
    """Write an adversarially distilled student (DMD2 or ADD) as an LCMScheduler checkpoint, with
    its final losses and loss log."""
    N = student.solver_steps
    flow = teacher.schedule.kind == "flow"
    kind = lcm_kind(flow)
    save_student(
        ctx,
        student.backbone,
        kind.scheduler_config(teacher.scheduler_config, solver_steps=N),
        info.student(
            method=method,
            num_inference_steps=N,
            # w is an input of LCM-form students (sample with w), else baked in (sample with 1)
            **(
                {"guidance_scale": guidance_scale}
                if takes_w(student.backbone)
                else {"guidance_scale": 1.0, "distilled_guidance_scale": guidance_scale}
            ),
            consistency=kind.spec(N),
        ),
        teacher,
        log,
        {"final_loss": {k: mean_tail(log, k) for k in log[-1]}},
    )


# ---------------------------------------------------------------- TrigFlow (sCM)


def flow_sigma(t: torch.Tensor) -> torch.Tensor:
    """The flow sigma s of TrigFlow time t: sin t / (sin t + cos t)."""
    return t.sin() / (t.sin() + t.cos())


def trigflow_grid(steps: int) -> list[float]:
    """``SCMScheduler``'s TrigFlow timesteps at ``steps`` (pi/2, 1.3, 0 at two; uniform else)."""
    if steps == 2:
        return [math.pi / 2, 1.3, 0.0]
    return [math.pi / 2 * (1 - i / steps) for i in range(steps + 1)]


def scm_flow_grid(steps: int, num_train_timesteps: int) -> list[float]:
    """The student's flow timesteps (sigma * T) at ``steps``: ``trigflow_grid`` mapped to flow."""
    t = torch.tensor(trigflow_grid(steps), dtype=torch.float64)
    return (flow_sigma(t) * num_train_timesteps).tolist()


def trigflow_scheduler_config(teacher_scheduler: dict) -> dict:
    """The student's stock ``FlowMatchLCMScheduler``, unshifted (shift 1): its sigmas are the
    TrigFlow grid's, which the sampler passes as ``sigmas`` (``scm_flow_grid``)."""
    config = lcm_scheduler_config(teacher_scheduler, 1000, flow=True)
    return config | {"shift": 1.0, "use_dynamic_shifting": False}


def load_sana_sprint_pipeline(path: str | Path, **kwargs):
    """A Sana sCM (or rCM) student as diffusers' ``SanaSprintPipeline`` with ``SCMScheduler``,
    the sampler SANA-Sprint ships: the pipeline converts TrigFlow states to the flow input
    (x_t / (cos t + sin t) at s = sin t / (sin t + cos t)) and the transformer's flow velocity to
    TrigFlow's F, which is how this stage trains (module docstring), so the student's weights run
    unchanged. Three things differ from a SANA-Sprint checkpoint and are set here: the transformer
    takes a guidance embedding (``guidance_embeds``; the student's is a zero-output
    ``guidance_embedder``, since its guidance is baked in), SANA-Sprint feeds the transformer s in
    [0, 1] where the student reads s x 1000 (the time projection's ``scale``), and
    ``sigma_data`` is 1 (the student's model units). ``kwargs`` go to ``from_pretrained``. Call
    it as SANA-Sprint is called: ``intermediate_timesteps=None`` at step counts other than 2 and
    ``use_resolution_binning=False`` at sizes outside its 1024 px bins."""
    from diffusers import SanaPipeline, SanaSprintPipeline, SanaTransformer2DModel, SCMScheduler

    path = Path(path)
    info = ModelInfo.read(path)
    index = json.loads((path / "model_index.json").read_text())
    if info.method != "scm" or index.get("_class_name") != "SanaPipeline":
        raise CheckpointError(
            f"{path} is not a Sana sCM student (accel.json method "
            f"{info.method!r}, pipeline {index.get('_class_name')!r})"
        )
    pipe = SanaPipeline.from_pretrained(str(path), **kwargs)
    old = pipe.transformer
    config = {k: v for k, v in old.config.items() if not k.startswith("_")}
    sprint = SanaTransformer2DModel.from_config({**config, "guidance_embeds": True})
    prefix = "time_embed.emb.timestep_embedder."
    state = {
        ("time_embed.timestep_embedder." + k[len(prefix) :] if k.startswith(prefix) else k): v
        for k, v in old.state_dict().items()
    }
    missing, unexpected = sprint.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("time_embed.guidance_embedder.") for k in missing):
        raise CheckpointError(
            f"{path}: the transformer's weights do not map onto SanaSprint's (missing "
            f"{missing[:3]}, unexpected {unexpected[:3]})"
        )
    torch.nn.init.zeros_(sprint.time_embed.guidance_embedder.linear_2.weight)
    torch.nn.init.zeros_(sprint.time_embed.guidance_embedder.linear_2.bias)
    sprint.time_embed.time_proj.scale = pipe.scheduler.config.num_train_timesteps
    sprint.to(old.dtype)
    return SanaSprintPipeline(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        transformer=sprint,
        scheduler=SCMScheduler(sigma_data=1.0),
    )


# ---------------------------------------------------------------- flow map (MeanFlow)


INTERVAL_FILE = "flow_map_interval.safetensors"


ATTR = "flow_map_interval"  # the interval embedding's name inside the backbone


class IntervalEmbedding(nn.Module):
    """h = t - r (in the transformer's timestep units) -> an embedding added to the output of
    the transformer's ``timestep_embedder`` (a forward hook), through copies of its
    ``time_proj`` and ``timestep_embedder``, the copy's last layer zero at initialisation.
    ``h`` is set per call (``interval``); unset, it is 0 (u(z, t, t) = v)."""

    def __init__(self, time_proj: nn.Module, timestep_embedder: nn.Module, zero: bool = True):
        super().__init__()
        self.proj = copy.deepcopy(time_proj)
        self.embed = copy.deepcopy(timestep_embedder)
        if zero:
            last = self.embed.linear_2
            nn.init.zeros_(last.weight)
            if last.bias is not None:
                nn.init.zeros_(last.bias)
        self.h: torch.Tensor | None = None

    def add(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        n = output.shape[0]
        h = self.h if self.h is not None else torch.zeros((), device=output.device)
        h = h.reshape(-1).to(output.device)
        if h.shape[0] != n:  # one interval for the batch, or a guided (doubled) batch
            h = h.repeat(n // h.shape[0]) if h.shape[0] > 1 else h.expand(n)
        return output + self.embed(self.proj(h).to(output.dtype))


def _time_modules(backbone: nn.Module) -> tuple[nn.Module, nn.Module]:
    for name, module in backbone.named_modules():
        if name.endswith("timestep_embedder") and hasattr(module, "linear_2"):
            parent = backbone.get_submodule(name.rpartition(".")[0]) if "." in name else backbone
            proj = getattr(parent, "time_proj", None)
            if proj is not None:
                return proj, module
    raise CheckpointError(
        f"{type(backbone).__name__} has no timestep_embedder beside a time_proj (diffusers' "
        "timestep embedding) to condition on the interval; MeanFlow students need one"
    )


def _core(backbone: nn.Module) -> nn.Module:
    return getattr(backbone, "module", backbone)  # DDP-wrapped during training


def has_interval(backbone: nn.Module) -> bool:
    return hasattr(_core(backbone), ATTR)


def attach_interval(backbone: nn.Module, state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Give ``backbone`` its r input: an ``IntervalEmbedding`` (zero-initialised, or ``state``)
    registered as ``backbone.flow_map_interval`` and hooked on its timestep embedder."""
    proj, embedder = _time_modules(backbone)
    interval = IntervalEmbedding(proj, embedder, zero=state is None)
    if state is not None:
        try:
            interval.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(
                f"{INTERVAL_FILE} does not fit this {type(backbone).__name__}: "
                f"{str(e).splitlines()[0]}"
            ) from None
    param = next(backbone.parameters())
    interval.to(device=param.device, dtype=param.dtype)
    setattr(backbone, ATTR, interval)
    embedder.register_forward_hook(interval.add)
    return backbone


@contextmanager
def interval(backbone: nn.Module, h: torch.Tensor | None) -> Iterator[None]:
    """Calls of ``backbone`` inside see the interval ``h`` = t - r (timestep units)."""
    module = getattr(_core(backbone), ATTR)
    old, module.h = module.h, h
    try:
        yield
    finally:
        module.h = old


def save_interval(backbone: nn.Module, folder: Path) -> None:
    from safetensors.torch import save_file

    state = getattr(_core(backbone), ATTR).state_dict()
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in state.items()}, str(folder / INTERVAL_FILE)
    )


def load_interval(backbone: nn.Module, folder: Path) -> nn.Module:
    """Attach the interval embedding saved in ``folder`` (safetensors only)."""
    from distill.models import load_safetensors

    file = folder / INTERVAL_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{file} is missing: a MeanFlow student's transformer needs its interval embedding; "
            "re-run the meanflow stage"
        )
    return attach_interval(backbone, load_safetensors(file))


@contextmanager
def without_interval(backbone: nn.Module) -> Iterator[nn.Module | None]:
    """The backbone without its interval module registered (its hook stays), so that
    ``save_pretrained`` writes the stock transformer's weights only."""
    module = getattr(backbone, ATTR, None)
    if module is not None:
        delattr(backbone, ATTR)
    try:
        yield module
    finally:
        if module is not None:
            setattr(backbone, ATTR, module)


class FlowMapDenoiser(Denoiser):
    """A flow-map student: inside ``interval(backbone, t - r)`` its x0 is x_hat = z_t - s_t u, u
    the average velocity over [r, t] (so x_r = (s_r/s_t) z_t + (1 - s_r/s_t) x_hat, the flow
    Euler step from x_hat: ``average_velocity``, ``DenoiserGraph``); outside, r = t."""

    flow_map = True
    consistency = False


def shifted(s: torch.Tensor, shift: float) -> torch.Tensor:
    """diffusers' static time shift s' = k s / (1 + (k - 1) s)."""
    return shift * s / (1 + (shift - 1) * s)


def flow_map_sigmas(steps: int, shift: float) -> list[float]:
    """``FlowMapEulerDiscreteScheduler(shift=shift).set_timesteps(steps)``'s sigmas: the shifted
    uniform grid from 1, then 0."""
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    return [*shifted(s, shift).tolist(), 0.0]


def flow_map_scheduler_config(shift: float) -> dict:
    return {
        "_class_name": "FlowMapEulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "shift": shift,
    }


def load_flow_map_pipeline(path: str | Path, **kwargs):
    """The student as its family's stock diffusers pipeline (``DiffusionPipeline.from_pretrained``:
    StableDiffusion3Pipeline, SanaPipeline) with ``FlowMapEulerDiscreteScheduler``, its transformer
    given the r input: the interval embedding from ``flow_map_interval.safetensors`` and a hook
    that sets h = t - r for each call from the scheduler's schedule (r = the next sigma after t,
    as ``FlowMapEulerDiscreteScheduler.step`` takes it). FluxPipeline passes ``mu`` to its
    scheduler, which FlowMapEulerDiscreteScheduler does not take: Flux students sample in accel."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(path), **kwargs)
    if type(pipe.scheduler).__name__ != "FlowMapEulerDiscreteScheduler":
        raise CheckpointError(
            f"{path} is not a flow-map student (its scheduler is {type(pipe.scheduler).__name__})"
        )
    backbone = pipe.transformer
    load_interval(backbone, Path(path) / "transformer")
    sched = pipe.scheduler

    def set_interval(module, args, kwargs):
        t = kwargs["timestep"] if "timestep" in kwargs else args[2]
        T = sched.config.num_train_timesteps
        idx = sched.index_for_timestep(t)
        if idx is None:
            raise ValueError(f"timestep {float(t.flatten()[0])} is not on the scheduler's schedule")
        r = sched.sigmas[idx + 1].to(t.device, torch.float32) * T
        getattr(module, ATTR).h = (t.float() - r).expand(len(t))

    backbone.register_forward_pre_hook(set_interval, with_kwargs=True)
    return pipe


# ---------------------------------------------------------------- the kinds as objects


class StudentKind:
    """One kind of student (or teacher, as accel samples it): the denoiser wrapper its checkpoint
    loads as, the sampling grid of its sampler plan and the stock diffusers scheduler config it
    is saved with. ``kind_of`` (from a checkpoint's accel.json) and ``kind_of_denoiser`` (from a
    denoiser) find it; ``load_denoiser``, ``sampler_plan`` and every training stage's ending
    dispatch through it."""

    name = ""
    flow = False
    wrapper: type[Denoiser] = Denoiser

    def scheduler_config(self, teacher_scheduler: dict, **kw: Any) -> dict:
        """The stock scheduler config the student is saved with (from its teacher's)."""
        raise NotImplementedError(f"{self.name} students are not saved")

    def denoiser(
        self, args: tuple, kwargs: dict, info: ModelInfo, scheduler_config: dict, folder: Path
    ) -> Denoiser:
        """The wrapper of a checkpoint loaded from ``folder`` (``args``, ``kwargs``: ``Denoiser``'s;
        ``scheduler_config``: the checkpoint's)."""
        return self.wrapper(*args, **kwargs)

    def steps(
        self, denoiser: Denoiser, steps: int, size: tuple[int, int] = (0, 0)
    ) -> tuple[list[dict[str, float]], str, dict | None]:
        """The plan's step coefficients at image size ``size``, its sampler name and, where the
        kind sets it, the plan's ``flow_shift`` (None: the adapter's)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<student kind {self.name}>"


class _Ddim(StudentKind):
    """DDIM on a discrete VP schedule (progressive and guidance students, VP teachers):
    ``DDIMScheduler``, trailing spacing."""

    name = "ddim"

    def scheduler_config(self, teacher_scheduler: dict, **kw: Any) -> dict:
        return ddim_scheduler_config(teacher_scheduler)

    def steps(self, denoiser, steps, size=(0, 0)):
        from distill.samplers import ddim_coefficients

        return ddim_coefficients(denoiser.schedule, steps), "ddim", None


class _FlowEuler(StudentKind):
    """Euler steps of a flow-matching ODE (flow teachers, their progressive and guidance
    students): ``FlowMatchEulerDiscreteScheduler``, the adapter's shifted grid."""

    name = "flow_euler"
    flow = True

    def scheduler_config(self, teacher_scheduler: dict, **kw: Any) -> dict:
        return ddim_scheduler_config(teacher_scheduler, flow=True)

    def steps(self, denoiser, steps, size=(0, 0)):
        from distill.samplers import flow_coefficients

        grid = denoiser.adapter.timestep_grid(steps, *size)
        return flow_coefficients(grid, denoiser.schedule.num_train_timesteps), "flow_euler", None


class _Lcm(StudentKind):
    """Multistep consistency sampling (Luo et al. 2023, LCM) on a discrete schedule (consistency,
    DMD2 and ADD students): ``LCMScheduler``."""

    name = "lcm"

    wrapper = ConsistencyDenoiser

    def scheduler_config(self, teacher_scheduler: dict, **kw: Any) -> dict:
        return lcm_scheduler_config(teacher_scheduler, kw["solver_steps"], flow=self.flow)

    def spec(self, solver_steps: int) -> ConsistencySpec:
        """The student's boundary condition, for its accel.json."""
        return lcm_spec(solver_steps, self.flow)

    def denoiser(self, args, kwargs, info, scheduler_config, folder):
        if float(scheduler_config.get("timestep_scaling", TIMESTEP_SCALING)) != TIMESTEP_SCALING:
            raise CheckpointError(
                f"{folder}: timestep_scaling other than {TIMESTEP_SCALING} is not "
                "supported for consistency students"
            )
        assert info.consistency is not None
        return self.wrapper(*args, solver_steps=info.consistency.solver_steps, **kwargs)

    def steps(self, denoiser, steps, size=(0, 0)):
        from distill.samplers import consistency_coefficients, consistency_timesteps

        T = denoiser.schedule.num_train_timesteps
        timesteps = consistency_timesteps(T, denoiser.solver_steps, steps)
        return consistency_coefficients(denoiser.schedule, timesteps), "consistency", None


class _FlowLcm(_Lcm):
    """Multistep consistency sampling on a flow schedule (x0 = z - s v):
    ``FlowMatchLCMScheduler`` with the teacher's shift, the adapter's grid."""

    name = "flow_lcm"
    flow = True
    trigflow = False  # SCMScheduler's grid (the TrigFlow kind)

    wrapper = FlowConsistencyDenoiser

    def denoiser(self, args, kwargs, info, scheduler_config, folder):
        assert info.consistency is not None
        denoiser = self.wrapper(*args, solver_steps=info.consistency.solver_steps, **kwargs)
        denoiser.trigflow = self.trigflow  # type: ignore[attr-defined]
        return denoiser

    def grid(self, denoiser, steps, size) -> list[float]:
        return denoiser.adapter.timestep_grid(steps, *size)

    def steps(self, denoiser, steps, size=(0, 0)):
        from distill.samplers import consistency_coefficients

        grid = self.grid(denoiser, steps, size)
        return consistency_coefficients(denoiser.schedule, grid[:-1]), "consistency", None


class _TrigFlow(_FlowLcm):
    """sCM/rCM students (Lu & Song 2024): the flow form of LCM on ``SCMScheduler``'s TrigFlow
    grid (``scm_flow_grid``), saved with an unshifted ``FlowMatchLCMScheduler``."""

    name = "trigflow"
    trigflow = True

    def scheduler_config(self, teacher_scheduler: dict, **kw: Any) -> dict:
        return trigflow_scheduler_config(teacher_scheduler)

    def grid(self, denoiser, steps, size) -> list[float]:
        return scm_flow_grid(steps, denoiser.schedule.num_train_timesteps)

    def spec(self, solver_steps: int) -> ConsistencySpec:
        return ConsistencySpec(solver_steps, 0.0, 0.0, grid="trigflow")


class _FlowMap(StudentKind):
    """Flow-map students (MeanFlow, Geng et al. 2025): ``FlowMapDenoiser`` with the interval
    embedding, ``FlowMapEulerDiscreteScheduler``'s jumps from t to r."""

    name = "flow_map"
    flow = True
    wrapper = FlowMapDenoiser

    def scheduler_config(self, teacher_scheduler: dict, **kw: Any) -> dict:
        return flow_map_scheduler_config(kw["shift"])

    def denoiser(self, args, kwargs, info, scheduler_config, folder):
        load_interval(args[0], folder)
        denoiser = FlowMapDenoiser(*args, **kwargs)
        denoiser.flow_map_shift = float(scheduler_config.get("shift", 1.0))  # type: ignore[attr-defined]
        return denoiser

    def steps(self, denoiser, steps, size=(0, 0)):
        from distill.samplers import flow_coefficients

        shift = float(getattr(denoiser, "flow_map_shift", 1.0))
        T = denoiser.schedule.num_train_timesteps
        grid = [s * T for s in flow_map_sigmas(steps, shift)]
        coefficients = [
            {**c, "r_timestep": r}
            for c, r in zip(flow_coefficients(grid, T), grid[1:], strict=True)
        ]
        return coefficients, "flow_map", {"shift": shift}


DDIM, FLOW_EULER, LCM, FLOW_LCM = _Ddim(), _FlowEuler(), _Lcm(), _FlowLcm()
TRIGFLOW, FLOW_MAP = _TrigFlow(), _FlowMap()
KINDS: dict[str, StudentKind] = {
    k.name: k for k in (DDIM, FLOW_EULER, LCM, FLOW_LCM, TRIGFLOW, FLOW_MAP)
}


def euler_kind(flow: bool) -> StudentKind:
    """The kind of a teacher and of its step-halving students: DDIM, or flow Euler."""
    return FLOW_EULER if flow else DDIM


def lcm_kind(flow: bool) -> _Lcm:
    """The kind of an LCM-form student: LCM, or flow LCM."""
    return FLOW_LCM if flow else LCM


def kind_of(info: ModelInfo, flow: bool) -> StudentKind:
    """The kind of the checkpoint whose accel.json is ``info`` (``flow``: a flow schedule)."""
    if info.method == "meanflow":
        return FLOW_MAP
    if info.consistency is not None:
        if flow:
            return TRIGFLOW if info.consistency.grid == "trigflow" else FLOW_LCM
        return LCM
    return euler_kind(flow)


def kind_of_denoiser(denoiser: Denoiser) -> StudentKind:
    """The kind a denoiser samples as (loaded, or built by a training stage)."""
    if denoiser.flow_map:
        return FLOW_MAP
    flow = denoiser.schedule.kind == "flow"
    if denoiser.consistency:
        if flow:
            return TRIGFLOW if getattr(denoiser, "trigflow", False) else FLOW_LCM
        return LCM
    return euler_kind(flow)
