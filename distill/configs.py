"""The distillation stages' declarations, torch-free: their configs (the recipe keys and
``accel distill`` options, with the fields every training stage takes, ``TrainingConfig``) and
their ``Stage`` rows, whose ``run`` is the method module's, imported when the stage runs. So a
recipe is checked, its artifact keys computed (``accel plan``) and a command's ``--help`` printed
without importing torch; the loss and the training loop stay in the file named after the method
(``distill/<method>.py``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from accel.core.stage import Stage, StageConfig
from accel.registry import DATASETS

KINDS = ("imagefolder", "prompts")


def check_dataset_name(name: str) -> str:
    """A stage config validator: ``name`` is a table name or KIND:PATH."""
    kind, _, path = name.partition(":")
    if name in DATASETS or (kind in KINDS and path):
        return name
    raise ValueError(
        f"unknown dataset {name!r}; use one of {', '.join(DATASETS)}, imagefolder:DIR (images "
        "with captions in metadata.jsonl) or prompts:FILE (one prompt per line)"
    )


Dataset = Annotated[str, AfterValidator(check_dataset_name)]
"""A stage config's ``dataset`` field."""


class TrainingConfig(StageConfig):
    """Fields every training stage takes (the recipe keys and `accel distill` options)."""

    batch_size: int = Field(64, ge=1)
    """Training examples per optimizer step (per process under accelerate launch)."""
    learning_rate: float = Field(1e-4, gt=0)
    """AdamW learning rate of the student."""
    seed: int = 0
    """Seed of the weights' noise, the data order and every random draw of training."""
    checkpoint_every: int = Field(500, ge=0)
    """Optimizer steps between resumable checkpoints in the stage's work dir (0: none)."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches whose gradients add up to one optimizer step."""
    mixed_precision: Literal["no", "fp16", "bf16", "target"] = "no"
    """Autocast precision (Accelerate; FSDP's MixedPrecisionPolicy under ``fsdp``); fp16 needs a
    GPU; "target": bf16 on a CUDA target with compute capability 8.0 and up, fp16 below, fp32 on
    a CPU target."""
    fsdp: bool = False
    """Fully shard every trained model over the processes (FSDP2); see the module docstring."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them."""
    compile: bool = False
    """``torch.compile`` (inductor) the trained models and the frozen teacher, in place; on CUDA
    the teacher's no-grad calls are also captured as CUDA graphs (mode "reduce-overhead": a
    training batch has static shapes). Pays where a step is launch-bound (small models on GPUs);
    the first steps compile. The JVP methods (``scm``, ``meanflow`` with ``objective = "jvp"``)
    refuse it: forward-mode AD through compiled graphs is not supported."""

    def for_target(self, target) -> TrainingConfig:
        if self.mixed_precision != "target":
            return self
        return self.model_copy(update={"mixed_precision": training_precision(target)})


def training_precision(target) -> Literal["no", "fp16", "bf16"]:
    """The mixed precision to train in for a deployment target: bf16 where the GPU has it
    (compute capability 8.0 and up: Ampere, Ada, Hopper, Blackwell), fp16 on older GPUs, none
    (fp32) on CPU targets."""
    if target.device != "cuda":
        return "no"
    return "bf16" if float(target.compute_capability) >= 8.0 else "fp16"


class LoraFields(StageConfig):
    """A LoRA student (``distill.lora``): adapters on one frozen base instead of full copies."""

    lora_rank: int = Field(0, ge=0, le=1024)
    """Rank r of a LoRA student's adapters (LCM-LoRA: 64); 0 trains every weight."""
    lora_alpha: float | None = Field(None, gt=0)
    """The adapters' scale numerator: they add (alpha / r) B A (default: alpha = r)."""
    base_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """The frozen base's precision: "auto" computes in bf16 on GPUs that have it (fp16 on older
    ones) and on CPUs with AVX512-BF16 or AMX, float32 on other CPUs; the adapters train in
    float32."""

    @model_validator(mode="after")
    def _lora_alone(self):
        if self.lora_rank and getattr(self, "fsdp", False):
            raise ValueError("fsdp shards full-weight students; a LoRA student (lora_rank) trains "
                             "its adapters on one process, drop fsdp")  # fmt: skip
        if not self.lora_rank and (self.lora_alpha is not None or self.base_dtype != "auto"):
            raise ValueError("lora_alpha and base_dtype are a LoRA student's: set lora_rank")
        return self


class LoraConfig(StageConfig):
    """A user's LoRA fused into a checkpoint's weights (``distill.fuse_lora``)."""

    file: str
    """The LoRA, a .safetensors file in diffusers' keys or kohya's (as ``load_lora_weights``
    reads them)."""
    scale: float = 1.0
    """Strength: the adapters add scale x (alpha / r) B A (``fuse_lora``'s ``lora_scale``)."""
    sha256: str | None = None
    """The file's sha256; read from the file when the config is made, so that an edited file is
    a new artifact (given, it must match)."""

    @model_validator(mode="after")
    def _digest(self) -> LoraConfig:
        import hashlib
        from pathlib import Path

        path = Path(self.file)
        if path.suffix != ".safetensors" or not path.is_file():
            raise ValueError(
                f"LoRA file {self.file} not found or not a .safetensors file (accel reads LoRAs "
                "in safetensors only)"
            )
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if self.sha256 is not None and self.sha256 != digest.hexdigest():
            raise ValueError(f"{self.file} has sha256 {digest.hexdigest()}, not {self.sha256}")
        object.__setattr__(self, "sha256", digest.hexdigest())
        return self


LORA = Stage(
    name="lora",
    version=1,
    config=LoraConfig,
    consumes="checkpoint",
    produces="checkpoint",
    run="distill.fuse_lora:run",
    description="fuse a LoRA (diffusers or kohya keys) into a teacher's or a student's weights",
    requires=(),
)


class ProgressiveConfig(TrainingConfig):
    teacher_steps: int = Field(16, ge=2, le=1000)
    """DDIM steps of the teacher where halving starts: pick where its DDIM is already close to its
    50-step quality, each round only inherits what the previous one reached."""
    student_steps: int = Field(4, ge=1)
    """Sampling steps of the final student; the teacher's steps halve each round until they reach
    it."""
    guidance_scale: float = Field(1.0, ge=0)
    """Classifier-free guidance scale of the teacher's output that the first round distils."""
    iterations_per_round: int = Field(1000, ge=1)
    """Optimizer steps per halving round."""
    dataset: Dataset = "digits"
    """Training images x ~ D of Algorithm 2 (``distill.data``): ``digits``, ``imagefolder:DIR``
    (images with captions), or ``prompts:FILE`` (data-free: the teacher's own samples at those
    prompts; Algorithm 2 only needs noised points to match the teacher's two DDIM steps from, and
    the teacher's samples are points of its own distribution)."""

    @model_validator(mode="after")
    def _halvings(self) -> ProgressiveConfig:
        ratio = self.teacher_steps // max(self.student_steps, 1)
        if (
            self.student_steps < 1
            or ratio < 2
            or ratio * self.student_steps != self.teacher_steps
            or ratio & (ratio - 1)
        ):
            raise ValueError(
                f"teacher_steps / student_steps must be a power of two >= 2 "
                f"(got {self.teacher_steps} / {self.student_steps})"
            )
        return self


class ConsistencyConfig(TrainingConfig, LoraFields):
    solver_steps: int = Field(50, ge=2, le=1000)
    """N of the skipping-step grid (k = T / N): LCM's original_inference_steps."""
    num_inference_steps: int = Field(4, ge=1)
    """The student's default step count (it samples with any count from 1 to solver_steps)."""
    guidance_scale: float = Field(1.0, ge=0)
    """Classifier-free guidance scale of the teacher's DDIM step, distilled into the student."""
    iterations: int = Field(2000, ge=1)
    """Optimizer steps of training."""
    ema_decay: float = Field(0.95, ge=0, lt=1)
    """Decay of the target network theta- (LCM uses 0.95)."""
    loss: Literal["l2", "huber"] = "huber"
    """Distance between the student's and the target network's x0: l2, or LCM's pseudo-Huber."""
    dataset: Dataset = "digits"
    """Training images (``distill.data``)."""

    @model_validator(mode="after")
    def _steps(self) -> ConsistencyConfig:
        if self.num_inference_steps > self.solver_steps:
            raise ValueError(
                f"num_inference_steps ({self.num_inference_steps}) cannot exceed solver_steps "
                f"({self.solver_steps})"
            )
        return self


class SCMConfig(TrainingConfig):
    num_inference_steps: int = Field(2, ge=1)
    """The student's default step count (a consistency model samples at any count)."""
    guidance_scale: float = Field(1.0, ge=0)
    """Classifier-free guidance scale of the teacher's velocity, distilled into the student."""
    iterations: int = Field(2000, ge=1)
    """Optimizer steps of training."""
    p_mean: float = -1.0
    """Mean of tau's normal proposal (with p_std below)."""
    p_std: float = Field(1.4, gt=0)
    """The log-normal time proposal: t = arctan(exp(tau) / sigma_data), tau ~ N(p_mean, p_std^2)."""
    sigma_data: float = Field(1.0, gt=0)
    """The data's standard deviation in model units (the time proposal's sigma_d)."""
    tangent_warmup: int = Field(500, ge=0)
    """Iterations over which r of the tangent's second term rises from 0 to 1."""
    adaptive_weighting: bool = True
    """Learn sCM's adaptive weight w(t) of the loss (sCM's Eq. 8)."""
    ema_decay: float = Field(0.99, ge=0, lt=1)
    """Decay of the EMA weights the student is sampled with (0: the trained weights)."""
    dmd_weight: float = Field(0.0, ge=0)
    """rCM's lambda: weight of the DMD regulariser (0: plain sCM)."""
    critic_learning_rate: float | None = Field(None, gt=0)
    """rCM: learning rate of the fake score (default: ``learning_rate``)."""
    dataset: Dataset = "digits"
    """Training images (``distill.data``)."""

    @model_validator(mode="after")
    def _no_compile_with_jvp(self):
        if self.compile:
            raise ValueError(
                "compile: sCM's tangent is a forward-mode JVP, which torch.compile does not "
                "support; drop compile"
            )
        return self


class MeanFlowConfig(TrainingConfig):
    num_inference_steps: int = Field(2, ge=1)
    """The student's default step count (it samples at any count)."""
    guidance_scale: float = Field(1.0, ge=0)
    """Classifier-free guidance scale of the teacher's velocity, distilled into the student."""
    iterations: int = Field(2000, ge=1)
    """Optimizer steps of training."""
    flow_map_ratio: float = Field(0.75, ge=0, le=1)
    """Share of the batch with r != t (MeanFlow from scratch: 25%; the rest is velocity
    distillation, which a student initialised at the teacher already does)."""
    objective: Literal["jvp", "split"] = "split"
    """"split": the interval-splitting form (SplitMeanFlow) with the teacher's Euler step over the
    first sub-interval; "jvp": MeanFlow's identity with du/dt by forward-mode AD (module
    docstring; on the shipped flow teacher "split" reads FD 50.4 at 1 step, "jvp" 144-157)."""
    split_step: float = Field(1 / 28, gt=0, le=1)
    """"split": length of the sub-interval [s, t] the teacher's Euler step covers (default: one
    step of the teacher's 28-step sampler)."""
    p_mean: float = -0.4
    """Mean of the logit-normal proposal (with p_std below)."""
    p_std: float = Field(2.0, gt=0)
    """The logit-normal time proposal of t and r (MeanFlow's best from scratch: -0.4, 1.0; wider
    here, so that the long jumps of 1-step sampling are drawn)."""
    shift: float | None = Field(None, gt=0)
    """Time shift of the proposal and of the student's scheduler (default: the teacher's, e^mu at
    its default resolution for a dynamic shift)."""
    adaptive_p: float = Field(1.0, ge=0)
    """p of the adaptive weight 1 / (||delta||^2 + c)^p (0: plain squared error)."""
    adaptive_c: float = Field(1e-3, gt=0)
    """c of the adaptive weight 1 / (||delta||^2 + c)^p."""
    ema_decay: float = Field(0.99, ge=0, lt=1)
    """Decay of the EMA weights the student is sampled with (0: the trained weights)."""
    dataset: Dataset = "digits"
    """Training images (``distill.data``)."""

    @model_validator(mode="after")
    def _no_compile_with_jvp(self):
        if self.compile and self.objective == "jvp":
            raise ValueError(
                "compile: the jvp objective's du/dt is a forward-mode JVP, which torch.compile "
                'does not support; drop compile or use objective = "split"'
            )
        return self


class GanConfig(TrainingConfig):
    """The fields DMD2 and ADD share: the GAN term's noise levels, its feature tap, both
    players' AdamW and the real images."""

    min_timestep: float = Field(0.02, ge=0, lt=1)
    """Lower end of the noise-level range (with max_timestep below)."""
    max_timestep: float = Field(0.98, gt=0, le=1)
    """Noise levels as fractions of T: DMD2's for the distribution-matching gradient, ADD's for
    the discriminator's t_D."""
    feature_module: str | None = None
    """Submodule whose output feeds the discriminator head: DMD2's fake score's, ADD's frozen
    teacher's (default: the family's bottleneck: a UNet's ``mid_block``, a transformer's middle
    block's MLP)."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas of both players (with weight_decay below)."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay of both players; DMD2's official code keeps PyTorch's defaults."""
    dataset: Dataset = "digits"
    """Real images: the GAN term's real class (ADD: also the student's noised inputs)."""

    @model_validator(mode="after")
    def _range(self) -> GanConfig:
        if self.min_timestep >= self.max_timestep:
            raise ValueError("min_timestep must be below max_timestep")
        return self


class AdversarialConfig(GanConfig, LoraFields):
    student_steps: int = Field(1, ge=1, le=64)
    """Denoising steps of the student: 1, or a multi-step student trained with backward simulation."""
    guidance_scale: float = Field(1.0, ge=0)
    """Classifier-free guidance of the real score (the teacher), distilled into the student."""
    iterations: int = Field(1000, ge=1)
    """Critic updates; the generator is updated every ``critic_updates_per_generator`` of them."""
    learning_rate: float = Field(5e-5, gt=0)
    """Of the generator (the frontier benchmark's setting; DMD2 used 2e-6 for far longer runs)."""
    critic_updates_per_generator: int = Field(5, ge=1)
    """Fake-score and discriminator updates per generator update (DMD2's TTUR: 5)."""
    critic_learning_rate: float | None = Field(None, gt=0)
    """Learning rate of the fake score and discriminator (default: ``learning_rate``)."""
    gan_weight_generator: float = Field(3e-3, ge=0)
    """Weight of the GAN term in the generator's loss."""
    gan_weight_critic: float = Field(1e-2, ge=0)
    """Weight of the GAN term in the critic's loss."""
    backward_simulation: bool = True
    """Train on the student's own multi-step inputs (DMD2's backward simulation), not noised data."""


class AddConfig(GanConfig):
    student_steps: int = Field(4, ge=1, le=64)
    """ADD's T_student: the student is trained (and samples) on this many timesteps from T - 1."""
    guidance_scale: float = Field(1.0, ge=0)
    """Classifier-free guidance of the teacher's distillation target, baked into the student."""
    iterations: int = Field(1000, ge=1)
    """Generator updates, each followed by one discriminator update."""
    learning_rate: float = Field(1e-5, gt=0)
    """Of the student (ADD: 1e-5 with AdamW)."""
    discriminator_learning_rate: float | None = Field(None, gt=0)
    """Of the discriminator head (default: ``learning_rate``)."""
    distillation_weight: float = Field(2.5, ge=0)
    """lambda in ADD eq. 5; 0 gives the adversarial term alone."""
    adversarial_weight: float = Field(1.0, ge=0)
    """Weight of the generator's adversarial term (ADD: 1); 0 gives the distillation term alone."""
    r1_weight: float = Field(1e-5, ge=0)
    """gamma of the R1 penalty on real data (ADD: 1e-5)."""


class GuidanceConfig(TrainingConfig):
    guidance_min: float = Field(1.0, ge=0)
    """Smallest w the student learns (see guidance_step)."""
    guidance_max: float = Field(3.0, ge=0)
    """Largest w the student learns (see guidance_step)."""
    guidance_step: float = Field(0.25, gt=0)
    """The grid of w the student learns: guidance_min, guidance_min + step, ..., guidance_max."""
    guidance_scale: float = Field(1.5, ge=0)
    """The student's default w (on the grid)."""
    iterations: int = Field(2000, ge=1)
    """Optimizer steps of training."""
    dataset: Dataset = "digits"
    """Training images x ~ D (``distill.data``)."""

    @model_validator(mode="after")
    def _grid(self) -> GuidanceConfig:
        scales = self.scales()
        if self.guidance_max < self.guidance_min or len(scales) > 64:
            raise ValueError(
                "the guidance grid needs guidance_min <= guidance_max, 64 points at most"
            )
        if min(abs(w - self.guidance_scale) for w in scales) > 1e-6:
            raise ValueError(f"guidance_scale {self.guidance_scale} is not on the grid {scales}")
        return self

    def scales(self) -> list[float]:
        n = int(round((self.guidance_max - self.guidance_min) / self.guidance_step)) + 1
        return [round(self.guidance_min + i * self.guidance_step, 6) for i in range(n)]


# ---------------------------------------------------------------- the stages


def training_stage(
    name: str,
    version: int,
    config: type[TrainingConfig],
    run: str,
    description: str,
    requires: tuple[str, ...] = ("training_data",),
) -> Stage:
    """A distillation stage: a checkpoint in, its student out, trained on every process under
    ``accelerate launch`` (``Stage.data_parallel``); ``run`` is the method module's."""
    return Stage(
        name=name,
        version=version,
        config=config,
        consumes="checkpoint",
        produces="checkpoint",
        run=run,
        description=description,
        data_parallel=True,
        requires=requires,
    )


PROGRESSIVE = training_stage(
    name="progressive",
    version=2,
    config=ProgressiveConfig,
    run="distill.progressive:run",
    description="progressive distillation (Salimans & Ho 2022): halve the DDIM (flow: Euler) step "
    "count per round",
)

CONSISTENCY = training_stage(
    name="consistency",
    version=2,
    config=ConsistencyConfig,
    run="distill.consistency:run",
    description="consistency distillation (Song et al. 2023; LCM, Luo et al. 2023)",
)

SCM = training_stage(
    name="scm",
    version=1,
    config=SCMConfig,
    run="distill.scm:run",
    description="continuous-time consistency distillation (sCM; Lu & Song 2024)",
    requires=("training_data", "flow"),
)

MEANFLOW = training_stage(
    name="meanflow",
    version=1,
    config=MeanFlowConfig,
    run="distill.meanflow:run",
    description="flow-map distillation by MeanFlow (Geng et al. 2025): any step count, one student",
    requires=("training_data", "flow"),
)

ADVERSARIAL = training_stage(
    name="adversarial",
    version=2,
    config=AdversarialConfig,
    run="distill.dmd:run",
    description="DMD2 (Yin et al. 2024): distribution matching + GAN, 1-step or multi-step",
)

ADD = training_stage(
    name="add",
    version=2,  # 2: the distillation distance is ADD's squared norm (a sum), no longer a mean
    config=AddConfig,
    run="distill.add:run",
    description="ADD (Sauer et al. 2023): adversarial loss on frozen teacher features + distillation",
)

GUIDANCE = training_stage(
    name="guidance",
    version=1,
    config=GuidanceConfig,
    run="distill.guidance:run",
    description="guidance distillation (Meng et al. 2023): a w-conditioned one-pass student",
    requires=("training_data", "w_input"),
)
