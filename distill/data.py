"""Training data as plug-ins named by a training stage's ``dataset`` key, not imports.

A source returns ``(x0, conditioning)``: float32 N x C x H x W in the model's sample space
(latents, for latent models) and the conditioning of each example: int64 class labels, a dict of
named tensors (the family adapter's conditioning, batch first), or None for unconditional models.
The names:

- a name in ``accel.registry.DATASETS`` ("module:function" strings imported when a stage loads
  its data): ``digits``, the shipped demo's set (scikit-learn's digits at 16x16, with labels);
  for a text-to-image teacher, the same images at its resolution with captions (the digits:
  "a handwritten seven" and the other phrasings of the demo's ``TEMPLATES``), encoded like an
  imagefolder;
- ``imagefolder:PATH``: images with captions in the Hugging Face ``imagefolder`` layout
  (``PATH/metadata.jsonl``, one JSON object per line with ``file_name`` and ``text``), encoded
  once by the teacher's VAE and text encoders and cached under ``cache_dir``;
- ``prompts:PATH``: data-free, one prompt per line; the images are the teacher's own samples, for
  the methods that may learn from them (see each method's docstring).

Every file is checked before any training starts: a missing or unreadable image, an empty caption,
a missing column, an image of another size than the model's resolution or an empty prompt file is
one ``RecipeError`` naming the file and line.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from accel.core.errors import RecipeError
from accel.registry import DATASETS, resolve
from distill.configs import KINDS, check_dataset_name

Conditioning = torch.Tensor | dict[str, torch.Tensor] | None
TrainingData = tuple[torch.Tensor, Conditioning]


def take(cond: Conditioning, idx: torch.Tensor) -> Conditioning:
    """The conditioning of the examples ``idx``."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: v[idx] for k, v in cond.items()}
    return cond[idx]


def concat(a: Conditioning, b: Conditioning) -> Conditioning:
    """The conditioning of two batches, one after the other."""
    if a is None or b is None:
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    return torch.cat([a, b])


def to_device(data: TrainingData, device: torch.device | str) -> TrainingData:
    x, cond = data
    if isinstance(cond, dict):
        return x.to(device), {k: v.to(device) for k, v in cond.items()}
    return x.to(device), None if cond is None else cond.to(device)


def load_dataset(
    name: str,
    denoiser: Any = None,
    cache_dir: Path | None = None,
    sample_teacher: Callable[[list[str]], torch.Tensor] | None = None,
) -> TrainingData:
    """The (x0, conditioning) of the data source ``name``. Text sources need the teacher
    ``denoiser`` (its adapter encodes prompts and images); ``prompts:`` sources need
    ``sample_teacher`` (prompts -> the teacher's x0 samples), given only by methods that may
    learn from the teacher's own samples."""
    check = _checked(name)
    kind, _, path = name.partition(":")
    adapter = getattr(denoiser, "adapter", None)  # no model given: the images as they are
    pixel = adapter is None or adapter.pixel
    if kind not in KINDS:
        dataset = resolve(DATASETS[check])
        if not pixel and adapter.conditioning in ("text", "class"):
            size = adapter.default_resolution()
            channels = adapter.modules["vae"].config.in_channels
            text = adapter.conditioning == "text"
            images, conditions = dataset(size, channels, captions=text)
            return _cached(
                cache_dir,
                (check, str(adapter.root), list(size), channels, *([] if text else ["labels"])),
                lambda: _encode_images(adapter, images, conditions),
            )
        return dataset()
    latent_class = not pixel and adapter.conditioning == "class"
    if kind == "imagefolder" and latent_class:  # a class-conditional latent model (DiT)
        images, labels = read_imagefolder(Path(path), adapter.default_resolution(), "label")
        return _cached(
            cache_dir,
            ("imagefolder", str(adapter.root), labels, _digest(images)),
            lambda: _encode_images(adapter, images, labels),
        )
    if pixel or adapter.conditioning != "text":
        raise RecipeError(
            f"dataset {name!r} holds captions; it trains text-to-image models, and this teacher "
            'is not one (use dataset = "digits", or an imagefolder with a label column for a '
            "class-conditional latent model)"
        )
    if kind == "prompts":
        prompts = read_prompts(Path(path))
        if sample_teacher is None:
            raise RecipeError(
                f"dataset {name!r} is data-free (prompts only), and this method learns from real "
                "images: give an imagefolder:DIR of images with captions"
            )
        return _cached(
            cache_dir,
            ("prompts", str(adapter.root), prompts),
            lambda: _encode_prompts(adapter, prompts, sample_teacher),
        )
    folder = Path(path)
    images, captions = read_imagefolder(folder, adapter.default_resolution())
    return _cached(
        cache_dir,
        ("imagefolder", str(adapter.root), captions, _digest(images)),
        lambda: _encode_images(adapter, images, captions),
    )


def stage_data(ctx: Any, teacher: Any, name: str, seed: int, sample_steps: int | None = None):
    """A training stage's data: ``load_dataset`` for ``teacher``, cached in the store's
    ``cache/``, with the teacher's own ``sample_steps``-step samples (default
    ``TEACHER_SAMPLE_STEPS``) standing in for images at the prompts of a ``prompts:`` source."""
    from distill.samplers import TEACHER_SAMPLE_STEPS, teacher_samples

    steps = sample_steps or TEACHER_SAMPLE_STEPS
    data = load_dataset(
        name,
        teacher,
        ctx.store.root / "cache",
        lambda prompts: teacher_samples(teacher, prompts, steps, seed),
    )
    release_encoders(teacher)
    return data


def release_encoders(teacher: Any) -> None:
    """Free the text encoders' and the VAE's weights once the data is encoded: training sees
    latents and embeddings only (as diffusers' and DMD2's scripts train on cached ones). The
    guidance branch's null conditioning is encoded first; the modules stay, on the meta device,
    so their configs still answer (a latent's size) and any later use fails loudly."""
    adapter = teacher.adapter
    if adapter.pixel or not adapter.modules:
        return
    if not adapter.null_from_info:
        with torch.no_grad():
            teacher._null()
    for name, module in adapter.modules.items():
        if isinstance(module, torch.nn.Module) and (name == "vae" or name.startswith("text_")):
            module.to("meta")


def _checked(name: str) -> str:
    try:
        return check_dataset_name(name)
    except ValueError as e:
        raise RecipeError(str(e)) from None


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise RecipeError(f"prompt file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path} is not UTF-8 text ({e}); save it as UTF-8") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise RecipeError(f"{path} holds no prompts; write one prompt per line")
    return prompts


def read_imagefolder(
    folder: Path, resolution: tuple[int, int], column: str = "text"
) -> tuple[torch.Tensor, list]:
    """Images (float32 N x 3 x H x W in [-1, 1]) and their ``column`` of an imagefolder: the
    captions (``text``) of a text-to-image model's, the class ids (``label``, integers) of a
    class-conditional one's; every line of ``metadata.jsonl`` checked."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    meta = folder / "metadata.jsonl"
    if not folder.is_dir():
        raise RecipeError(f"image folder not found: {folder}")
    if not meta.is_file():
        raise RecipeError(
            f"{folder} has no metadata.jsonl; write one line per image: "
            + ('{"file_name": "0001.png", "text": "a caption"}' if column == "text"
               else '{"file_name": "0001.png", "label": 7}')
        )  # fmt: skip
    h, w = resolution
    images, captions = [], []
    try:
        lines = meta.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise RecipeError(f"{meta} is not UTF-8 text ({e}); save it as UTF-8") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{meta}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecipeError(f"{where} is not a JSON object ({e})") from None
        if not isinstance(row, dict):
            raise RecipeError(f"{where} is not a JSON object")
        for key in ("file_name", column):
            if key not in row:
                raise RecipeError(f"{where} has no {key!r} column (it has {sorted(row)})")
        value = row[column]
        if column == "text" and (not isinstance(value, str) or not value.strip()):
            raise RecipeError(f"{where}: the caption of {row['file_name']!r:.80} is empty")
        if column == "label" and (type(value) is not int or value < 0):
            raise RecipeError(
                f"{where}: the label of {row['file_name']!r:.80} must be a class id (an integer "
                f">= 0), got {value!r:.80}"
            )
        name = row["file_name"]
        if not isinstance(name, str) or not name:
            raise RecipeError(f"{where}: file_name must be a file name, got {name!r:.80}")
        file = folder / name
        try:
            outside = not file.resolve().is_relative_to(folder.resolve())
            missing = not file.is_file()
        except (OSError, ValueError) as e:  # too long a name, a NUL byte
            why = getattr(e, "strerror", None) or e  # not the OSError's text: it quotes the name
            raise RecipeError(
                f"{where}: file_name {name!r:.80} is not a usable path ({why})"
            ) from None
        if outside:
            raise RecipeError(f"{where}: {name!r:.80} is outside {folder}")
        if missing:
            raise RecipeError(f"{where}: image {name!r:.80} is missing from {folder}")
        try:
            with Image.open(file) as im:
                im.load()
                rgb = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise RecipeError(f"{where}: {file} is not a readable image ({e})") from None
        if rgb.size != (w, h):
            raise RecipeError(
                f"{where}: {file} is {rgb.size[0]}x{rgb.size[1]}; the model trains at {w}x{h}: "
                "resize the images to that size"
            )
        images.append(np.asarray(rgb, dtype=np.float32))
        captions.append(value.strip() if column == "text" else value)
    if not images:
        raise RecipeError(f"{meta} lists no images")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1
    return x.contiguous(), captions


def _digest(x: torch.Tensor) -> str:
    return hashlib.sha256(x.numpy().tobytes()).hexdigest()


def _cached(cache_dir: Path | None, key: Any, compute: Callable[[], TrainingData]) -> TrainingData:
    """``compute()``, stored once in ``cache_dir`` (safetensors) under a hash of ``key``."""
    if cache_dir is None:
        return compute()
    from safetensors.torch import load_file, save_file

    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    file = Path(cache_dir) / f"data-{digest}.safetensors"
    if file.is_file():
        t = load_file(str(file))
        return t.pop("x0"), {k.removeprefix("cond."): v for k, v in t.items()}
    x0, cond = compute()
    assert isinstance(cond, dict)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")  # concurrent runs write apart
    save_file(
        {"x0": x0.contiguous(), **{f"cond.{k}": v.contiguous() for k, v in cond.items()}}, str(tmp)
    )
    tmp.replace(file)
    return x0, cond


@torch.no_grad()
def _encode_text(adapter: Any, captions: list[str], chunk: int = 64) -> dict[str, torch.Tensor]:
    h, w = adapter.default_resolution()
    parts = [
        adapter.training_conditioning(adapter.encode(captions[i : i + chunk], height=h, width=w))
        for i in range(0, len(captions), chunk)
    ]
    return {k: torch.cat([p[k] for p in parts]).float() for k in parts[0]}


@torch.no_grad()
def _encode_images(adapter: Any, images: torch.Tensor, conditions) -> TrainingData:
    """Latents (the VAE posterior's mean, scaled as the pipeline scales them: deterministic, as
    diffusers' training scripts are when they cache latents) and their conditioning: the text
    encoders' of captions, or a class-conditional model's labels. The VAE encodes as many images
    at a time as ``DRAW_PIXELS`` allows (64 tiny ones, one at 512 px or more: SDXL's encoder holds
    several GB of activations per 1024 px image)."""
    from accel.core import memory

    chunk = max(1, min(64, memory.DRAW_PIXELS // (images.shape[-2] * images.shape[-1])))
    latents = torch.cat(
        [adapter.encode_images(images[i : i + chunk]) for i in range(0, len(images), chunk)]
    )
    if adapter.conditioning == "class":
        labels = torch.as_tensor(conditions, dtype=torch.int64)
        if len(labels) and int(labels.max()) >= adapter.num_classes:
            raise RecipeError(
                f"the training data has class {int(labels.max())}, and this {adapter.family} "
                f"model has classes 0..{adapter.num_classes - 1}"
            )
        return latents.float(), adapter.encode(labels=labels)
    return latents.float(), _encode_text(adapter, conditions)


def _encode_prompts(
    adapter: Any, prompts: list[str], sample_teacher: Callable[[list[str]], torch.Tensor]
) -> TrainingData:
    return sample_teacher(prompts).float(), _encode_text(adapter, prompts)
