"""Model adapters, one module per diffusers family, chosen from a pipeline directory's
``model_index.json`` and its denoiser's ``_class_name`` (see ``distill.models.base``)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from accel.core.errors import CheckpointError
from distill.models.base import (
    CAPABILITIES,
    ConditioningSpec,
    ModelAdapter,
    TensorSpec,
    concat_conditioning,
)

# denoiser class -> "adapter module:adapter class"
ADAPTERS: dict[str, str] = {
    "UNet2DModel": "distill.models.unet2d:UNet2DAdapter",
    "UNet2DConditionModel": "distill.models.sd:StableDiffusionAdapter",
    "SD3Transformer2DModel": "distill.models.sd3:SD3Adapter",
    "FluxTransformer2DModel": "distill.models.flux:FluxAdapter",
    "PixArtTransformer2DModel": "distill.models.pixart:PixArtAdapter",
    "SanaTransformer2DModel": "distill.models.sana:SanaAdapter",
    "DiTTransformer2DModel": "distill.models.dit:DiTAdapter",
}
DENOISER_FOLDERS = ("unet", "transformer")

__all__ = [
    "ADAPTERS",
    "CAPABILITIES",
    "ConditioningSpec",
    "ModelAdapter",
    "TensorSpec",
    "adapter_class",
    "capabilities_of",
    "concat_conditioning",
    "denoiser_folder",
    "load_pipeline",
    "load_safetensors",
    "load_weights",
    "stock_defaults",
]


def load_safetensors(path: str | Path) -> dict[str, Any]:
    """Load a safetensors file into torch tensors; missing, corrupt or NaN/Inf weights are errors."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types for truncated/garbled headers
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); re-save it with "
            "safetensors.torch.save_file or re-download it"
        ) from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointError(
            f"{path} holds NaN or Inf weights in {shown}; the checkpoint is unusable"
        )
    return tensors


def denoiser_folder(root: Path, index: dict[str, Any]) -> str:
    """The folder of a pipeline's denoiser: the model_index.json entry ``unet`` or ``transformer``
    (the digits checkpoints predate model_index.json's use here: a ``unet/`` folder suffices)."""
    for name in DENOISER_FOLDERS:
        if name in index and (root / name).is_dir():
            return name
    for name in DENOISER_FOLDERS:
        if (root / name / "config.json").is_file():
            return name
    listed = [n for n in DENOISER_FOLDERS if n in index]
    if listed:
        raise CheckpointError(
            f"{root}: component folder {listed[0]}/ is missing (model_index.json lists it); "
            "copy the whole pipeline directory"
        )
    raise CheckpointError(
        f"{root} is not a diffusers pipeline directory: no unet/config.json or "
        "transformer/config.json (expected model_index.json and the component folders "
        "save_pretrained writes)"
    )


def adapter_class(cls_name: str, where: Path) -> type[ModelAdapter]:
    """The adapter of a denoiser class; an unsupported one is a clear error naming the others."""
    if cls_name not in ADAPTERS:
        raise CheckpointError(
            f"{where}: denoiser class {cls_name or '(none)'!r} is not supported; accel supports "
            f"{', '.join(ADAPTERS)}"
        )
    module, _, name = ADAPTERS[cls_name].partition(":")
    return getattr(importlib.import_module(module), name)


def load_weights(module, file: Path, config_path: Path) -> None:
    """``file``'s tensors into ``module``'s parameters and buffers, one tensor at a time (peak
    memory: the module plus one tensor, not plus the whole file), each cast to the module's own
    dtype; strict (missing or unexpected keys, other shapes) and NaN/Inf-checked, each failure a
    ``CheckpointError`` naming the file."""
    import torch
    from safetensors import safe_open

    state = module.state_dict(keep_vars=True)
    try:
        with safe_open(str(file), framework="pt") as f:
            keys = set(f.keys())
            missing, unexpected = sorted(state.keys() - keys), sorted(keys - state.keys())
            if missing or unexpected:
                raise CheckpointError(
                    f"{file} does not match {config_path}: missing keys {missing[:3]}, "
                    f"unexpected keys {unexpected[:3]}"
                )
            with torch.no_grad():
                for key in sorted(keys):
                    tensor, target = f.get_tensor(key), state[key]
                    if tensor.shape != target.shape:
                        raise CheckpointError(
                            f"{file} does not match {config_path}: {key} has shape "
                            f"{list(tensor.shape)}, the config builds {list(target.shape)}"
                        )
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                        raise CheckpointError(
                            f"{file} holds NaN or Inf weights in {key}; the checkpoint is unusable"
                        )
                    target.copy_(tensor)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises several types for truncated/garbled headers
        raise CheckpointError(
            f"{file} is not a readable safetensors file ({e}); re-save it with "
            "safetensors.torch.save_file or re-download it"
        ) from None


def load_pipeline(root: str | Path, load_components: bool = True, dtype=None) -> ModelAdapter:
    """A diffusers pipeline directory as its family's adapter, the denoiser loaded strictly from
    safetensors (corrupt files, mismatched shapes and NaN weights are errors) and, with
    ``load_components``, the text encoders, tokenizers and VAE sampling needs. ``dtype`` (a torch
    dtype; default float32) is the denoiser's in memory: built in it and filled tensor by tensor,
    so an fp16 checkpoint read as bf16 never holds a float32 copy."""
    import diffusers

    from accel.core.checkpoint import read_json

    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"model directory not found: {root}")
    index = read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
    folder = denoiser_folder(root, index)
    config_path = root / folder / "config.json"
    config = read_json(config_path)
    cls_name = config.get("_class_name", "")
    adapter_cls = adapter_class(cls_name, config_path)
    cls = getattr(diffusers, cls_name)
    sched_path = root / "scheduler" / "scheduler_config.json"
    if not sched_path.is_file():
        raise CheckpointError(
            f"{root} is not a diffusers pipeline directory: scheduler/scheduler_config.json is "
            "missing (expected model_index.json and the component folders save_pretrained writes)"
        )
    weights = root / folder / "diffusion_pytorch_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(
            f"{weights} not found; accel reads safetensors only (convert .bin weights with "
            "save_pretrained(safe_serialization=True); sharded weights are not supported yet)"
        )
    import torch

    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype or torch.float32)  # built in it: no float32 copy first
        backbone = cls.from_config(config)
    except Exception as e:
        raise CheckpointError(f"{config_path} does not build a {cls_name}: {e}") from None
    finally:
        torch.set_default_dtype(default)
    load_weights(backbone, weights, config_path)
    backbone.eval().requires_grad_(False)
    return adapter_cls(root, backbone, read_json(sched_path), index, load_components)


def _denoiser_config(root: Path) -> tuple[type[ModelAdapter], dict[str, Any]]:
    """The adapter class of the pipeline at ``root`` and its denoiser's config, read alone."""
    from accel.core.checkpoint import read_json

    index = read_json(root / "model_index.json") if (root / "model_index.json").is_file() else {}
    config_path = root / denoiser_folder(root, index) / "config.json"
    config = read_json(config_path)
    return adapter_class(config.get("_class_name", ""), config_path), config


def capabilities_of(root: str | Path) -> tuple[str, frozenset[str]]:
    """The family of the pipeline at ``root`` and its capabilities (``CAPABILITIES``), from its
    configs alone."""
    from accel.core.checkpoint import read_json

    root = Path(root)
    adapter, config = _denoiser_config(root)
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    scheduler = read_json(scheduler_file) if scheduler_file.is_file() else {}
    return adapter.family_of(config), adapter.capabilities_of(scheduler)


def stock_defaults(root: str | Path) -> tuple[str, int | None, float | None]:
    """The stock pipeline class named by ``model_index.json`` and the step count and guidance
    its ``__call__`` samples with by default (``pipe(prompt)``), from configs alone, no weights
    read. Guidance is classifier-free guidance's w where ``guidance_scale`` is that; a pipeline
    whose ``guidance_scale`` is an embedded input (Flux: CFG is ``true_cfg_scale``, off by
    default) gives None, so that the model's own default applies. (class name, None, None)
    when the class is not one of diffusers' or names no default."""
    import inspect

    from accel.core.checkpoint import read_json

    index_file = Path(root) / "model_index.json"
    name = read_json(index_file).get("_class_name", "") if index_file.is_file() else ""
    try:
        import diffusers

        cls = getattr(diffusers, name) if name else None
        params = inspect.signature(cls.__call__).parameters if cls is not None else {}
    except (AttributeError, ImportError, TypeError, ValueError):
        return name, None, None

    def default(key: str):
        value = params[key].default if key in params else None
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None

    steps = default("num_inference_steps")
    guidance = None if "true_cfg_scale" in params else default("guidance_scale")
    return name, (int(steps) if steps is not None else None), guidance
