"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a student trained
as low-rank adapters W + (alpha / r) B A on one frozen base, as LCM-LoRA (Luo et al. 2023,
"LCM-LoRA: A Universal Stable-Diffusion Acceleration Module") and DMD2's SDXL LoRA students ship.

One base holds every network a method needs: the teacher is the base with its adapters off, the
student one adapter ("student"), and a method's other trained or averaged networks further
adapters on the same base (consistency's EMA target "ema", DMD2's fake score "critic"), so a
1 B-parameter UNet is held once instead of three times. The base stays frozen, in half
precision where the device computes in it (``base_dtype``), and only the adapters' A and B train,
in float32. ``AdapterView`` is one network of the base: a module that runs it with one adapter
active (or none), so methods, samplers and denoisers see a backbone as before.

The adapters are peft's (``inject_adapter_in_model``, ``get_peft_model_state_dict``); A is
peft's default (Kaiming-uniform) initialisation and B zero, so every adapter starts at the
teacher. A student is written as its teacher's pipeline plus ``pytorch_lora_weights.safetensors``
in diffusers' format (``PipelineClass.save_lora_weights``, with its peft config as metadata), and
loads in the family's stock pipeline with ``pipe.load_lora_weights(folder)``. Where the family's
stock pipeline has no LoRA loader (PixArt, DiT), the adapter is fused into a full copy of the
teacher's weights instead. ``apply_lora`` is the way back in: a LoRA file (a student's, or a
user's in diffusers' or kohya's keys) through the stock pipeline's ``load_lora_weights``, fused
into the model's weights, as the exporters trace it.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from accel.core.errors import CheckpointError, StageError

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name load_lora_weights looks for
STUDENT = "student"


def lora_layers(base: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in base.modules() if isinstance(m, BaseTunerLayer)]


def training_device() -> torch.device:
    """The device a training stage's ``Trainer`` takes (Accelerate's default)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def teacher_dtype(config) -> torch.dtype | None:
    """The dtype a stage with ``LoraFields`` loads its teacher's denoiser in: a LoRA student's
    base dtype (loaded straight into it), else None (float32: full weights train in it)."""
    return base_dtype(config.base_dtype, training_device()) if config.lora_rank else None


def base_dtype(choice: str, device: torch.device) -> torch.dtype:
    """The frozen base's dtype: ``choice`` ("fp32", "bf16", "fp16") or, for "auto", the half
    precision the device computes in: bf16 on a GPU that has it (fp16 on older GPUs), bf16 on a
    CPU with AVX512-BF16 or AMX-BF16, float32 on other CPUs (emulated bf16 is slower than fp32)."""
    if choice != "auto":
        if choice == "fp16" and device.type != "cuda":
            raise StageError("lora", "base_dtype = 'fp16' needs a CUDA GPU; use 'bf16' or 'fp32'")
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    from accel.core.hardware import cpu_info

    flags = set(cpu_info()["flags"])
    return torch.bfloat16 if flags & {"avx512_bf16", "amx_bf16"} else torch.float32


@dataclass(frozen=True)
class LoraShape:
    """The adapters' rank r, scale numerator alpha and the layers they adapt (module-name
    suffixes, peft's ``target_modules``)."""

    rank: int
    alpha: float
    targets: tuple[str, ...]

    def config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=list(self.targets))


def add_adapters(base: nn.Module, shape: LoraShape, names: tuple[str, ...]) -> None:
    """Adapters ``names`` on ``base`` (frozen), each starting where the first one does (so the
    EMA target starts at the student), their parameters float32 and trainable, the first
    active."""
    from peft import inject_adapter_in_model

    base.requires_grad_(False)
    for name in names:
        try:
            inject_adapter_in_model(shape.config(), base, adapter_name=name)
        except ValueError as e:
            raise StageError(
                "lora", f"no layer of the {type(base).__name__} is a LoRA target: {e}"
            ) from None
    first = adapter_parameters(base, names[0])
    for name in names[1:]:
        with torch.no_grad():
            for p, q in zip(adapter_parameters(base, name), first, strict=True):
                p.copy_(q)
    for name in names:
        for p in adapter_parameters(base, name):
            p.data = p.data.float()
            p.requires_grad_(True)
    _activate(base, names[0])


def adapter_parameters(base: nn.Module, name: str) -> list[nn.Parameter]:
    """The A and B matrices of adapter ``name``, in module order."""
    return [p for n, p in base.named_parameters() if n.endswith(f".{name}.weight") and "lora_" in n]


def _activate(base: nn.Module, name: str | None) -> None:
    """Adapter ``name`` active (None: all off), without peft's ``set_adapter`` changing which
    parameters are trainable (it marks the active adapter's only)."""
    flags = [(p, p.requires_grad) for p in base.parameters()]
    for layer in lora_layers(base):
        if name is None:
            layer.enable_adapters(False)
        else:
            layer.enable_adapters(True)
            layer.set_adapter(name)
    for p, flag in flags:
        p.requires_grad_(flag)


def _active(base: nn.Module) -> str | None:
    layers = lora_layers(base)
    if not layers:
        return None
    return None if layers[0].disable_adapters else layers[0].active_adapters[0]


@contextmanager
def active(base: nn.Module, name: str | None) -> Iterator[None]:
    """Calls of ``base`` inside run with adapter ``name`` (None: the base alone)."""
    old = _active(base)
    _activate(base, name)
    try:
        yield
    finally:
        _activate(base, old)


class AdapterView(nn.Module):
    """One network of a LoRA base: ``base`` called with adapter ``name`` active (None: the
    teacher; or a base without adapters, a denoiser loaded in half precision), under autocast
    to the base's dtype where that is half precision, its output ``sample`` back in float32.
    Its other attributes (``config``, ...) are the base's, so adapters and denoisers read it
    as a backbone."""

    def __init__(self, base: nn.Module, name: str | None, shape: LoraShape | None = None):
        super().__init__()
        self.base = base
        self.name = name
        self.shape = shape

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # the base's own attributes (config, attn_processors, ...)
            return getattr(self._modules["base"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        dtype = next(p for p in self.base.parameters() if not p.requires_grad).dtype
        with active(self.base, self.name):
            if dtype == torch.float32:
                return self.base(*args, **kwargs)
            device = next(self.base.parameters()).device.type
            with torch.autocast(device, dtype=dtype):
                out = self.base(*args, **kwargs)
        if hasattr(out, "sample"):
            out.sample = out.sample.float()
        return out

    def state(self) -> dict[str, torch.Tensor]:
        """This adapter's weights in peft's keys (``...lora_A.weight``), float32 on the CPU."""
        from peft.utils import get_peft_model_state_dict

        assert self.name is not None
        state = get_peft_model_state_dict(self.base, adapter_name=self.name)
        return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


class Parameters(nn.Module):
    """An adapter's parameters as a module (the trainer's EMA pairs and checkpoints take
    modules); the parameters stay the base's."""

    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        self.params = nn.ParameterList(params)


def lora_base(teacher, shape: LoraShape, names: tuple[str, ...], dtype: torch.dtype):
    """The teacher's backbone as the shared base of adapters ``names`` (the first the student's),
    cast to ``dtype``, and the teacher's own backbone replaced by the base with its adapters off;
    returns one ``AdapterView`` per name."""
    base = teacher.backbone
    if isinstance(base, AdapterView):  # loaded in half precision (``load_denoiser``)
        if lora_layers(base.base):
            raise StageError("lora", "the teacher already carries adapters")
        base = base.base
    if next(base.parameters()).dtype != dtype:
        base.to(dtype)
    add_adapters(base, shape, names)
    teacher.backbone = AdapterView(base, None)
    return [AdapterView(base, name, shape) for name in names]


def lora_networks(teacher, config, trainer, others: tuple[str, ...]):
    """A LoRA stage's networks on the teacher's backbone (``config``: its ``LoraFields``): the
    student's ``AdapterView`` first, then one per name in ``others``, then the student's
    parameters and the others' as ``Parameters`` (for the optimizers and EMA pairs)."""
    if trainer.accelerator.num_processes > 1:
        raise StageError(
            trainer.stage,
            "a LoRA student (lora_rank) trains on one process here; run it without "
            "accelerate launch, or set lora_rank = 0 to train every weight data-parallel",
        )
    shape = LoraShape(
        config.lora_rank, config.lora_alpha or float(config.lora_rank), teacher.adapter.lora_targets
    )
    dtype = base_dtype(config.base_dtype, trainer.device)
    views = lora_base(teacher, shape, (STUDENT, *others), dtype)
    params = [Parameters(adapter_parameters(views[0].base, v.name)) for v in views]
    return (*views, *params)


def lora_size(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Parameters and bytes of a LoRA state dict (float32 as written)."""
    params = sum(v.numel() for v in state.values())
    return {
        "parameters": params,
        "bytes": sum(v.numel() * v.element_size() for v in state.values()),
    }


# ---------------------------------------------------------------- files in diffusers' format


def _pipeline_class(name: str | None):
    import diffusers

    cls = getattr(diffusers, name, None) if name else None
    return cls if cls is not None and hasattr(cls, "load_lora_weights") else None


def save_lora(out: Path, view: AdapterView, adapter: Any, pipeline: str | None) -> bool:
    """Write ``view``'s adapter into ``out`` as ``pytorch_lora_weights.safetensors`` through the
    stock pipeline class's ``save_lora_weights`` (its key prefix and the peft config as
    metadata); False, writing nothing, when the class has no LoRA loader."""
    cls = _pipeline_class(pipeline)
    if cls is None:
        return False
    assert view.shape is not None
    prefix = adapter.denoiser_folder  # "unet" or "transformer": the pipeline's keyword
    metadata = view.shape.config().to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    cls.save_lora_weights(
        str(out),
        **{f"{prefix}_lora_layers": view.state(), f"{prefix}_lora_adapter_metadata": metadata},
        weight_name=LORA_FILE,
        safe_serialization=True,
    )
    return True


def fused_copy(view: AdapterView, root: Path) -> nn.Module:
    """The teacher's denoiser read again from ``root`` in its own precision, with ``view``'s
    adapter merged into its weights: a full student for families without a LoRA loader."""
    from peft import set_peft_model_state_dict

    from distill.models import load_pipeline

    assert view.shape is not None and view.name is not None
    fresh = load_pipeline(root, load_components=False).backbone
    add_adapters(fresh, view.shape, (STUDENT,))
    set_peft_model_state_dict(fresh, view.state(), adapter_name=STUDENT)
    return fuse(fresh)


def fuse(model: nn.Module) -> nn.Module:
    """Merge the active adapter of every LoRA layer into its base layer and put the base layer
    back in its place (peft's merge, then the layers unwrapped)."""
    layers = {id(m) for m in lora_layers(model)}
    for name, module in list(model.named_modules()):
        if id(module) in layers:
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model.requires_grad_(False)


def stock_pipeline(adapter: Any):
    """The family's stock pipeline object around ``adapter``'s own modules (no copies): the
    denoiser, its loaded components (None for the rest) and a scheduler of its config."""
    import diffusers

    name = adapter.index.get("_class_name")
    cls = _pipeline_class(name)
    if cls is None:
        raise CheckpointError(
            f"{adapter.root}: {name or 'this pipeline'} has no LoRA loader in diffusers "
            "(load_lora_weights), so accel cannot apply a LoRA to it; fuse it into the weights "
            "with the tool that made it"
        )
    sched = getattr(diffusers, adapter.scheduler_config["_class_name"])
    given = {
        **adapter.modules,
        adapter.denoiser_folder: adapter.backbone,
        "scheduler": sched.from_config(adapter.scheduler_config),
    }
    params = inspect.signature(cls.__init__).parameters
    kwargs = {
        n: given.get(n)
        for n, p in params.items()
        if n != "self"
        and p.default is inspect.Parameter.empty
        and p.kind == p.POSITIONAL_OR_KEYWORD
    }
    return cls(**kwargs)


def apply_lora(adapter: Any, file: str | Path, scale: float = 1.0) -> list[str]:
    """Apply the LoRA in ``file`` (safetensors; diffusers' keys or kohya's, as
    ``load_lora_weights`` reads them) to ``adapter``'s denoiser and loaded text encoders, fused
    into their weights at ``scale`` and the adapters removed: the model then computes what the
    stock pipeline with ``load_lora_weights`` and ``fuse_lora`` computes, and exports as plain
    layers. Returns the names of the components it changed (the denoiser's folder, text
    encoders)."""
    file = Path(file)
    if not file.is_file() or file.suffix != ".safetensors":
        raise CheckpointError(
            f"LoRA file {file} not found or not a .safetensors file (accel reads LoRAs in "
            "safetensors only)"
        )
    from distill.models import load_safetensors

    load_safetensors(file)  # a corrupt file or NaN weights: one line, before diffusers reads it
    pipe = stock_pipeline(adapter)
    try:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name="user")
    except (ValueError, KeyError, RuntimeError) as e:
        msg = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{file} does not load as a LoRA of {adapter.root}: {msg}") from None
    changed = [
        name
        for name, module in pipe.components.items()
        if isinstance(module, nn.Module) and lora_layers(module)
    ]
    if not changed:
        raise CheckpointError(f"{file} holds no LoRA weights for any layer of {adapter.root}")
    pipe.fuse_lora(components=changed, lora_scale=scale, adapter_names=["user"])
    pipe.unload_lora_weights()
    return changed
