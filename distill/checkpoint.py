"""Denoisers in and out of diffusers pipeline directories: ``load_denoiser`` (a checkpoint with its
``accel.json``, as the denoiser its student kind samples with), ``load_teacher`` (one a
distillation stage may learn from) and ``save_pipeline`` (a student the stock pipeline loads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from accel.core.errors import CheckpointError
from accel.core.model_info import LoraSpec, ModelInfo
from distill.denoiser import Denoiser


def _half() -> tuple:
    import torch

    return (torch.float16, torch.bfloat16)


def load_denoiser(
    model_dir: str | Path,
    guidance_scale: float | None = None,
    load_components: bool = True,
    dtype=None,
) -> tuple[Denoiser, ModelInfo]:
    """Load a diffusers pipeline directory (``model_index.json``, the denoiser's folder,
    ``scheduler/`` and, for latent text-to-image families, the text encoders, tokenizers and VAE)
    as a Denoiser through its family's adapter (``distill.models``), reading weights through
    safetensors only (corrupt files and NaN weights are errors).

    ``accel.json`` beside ``model_index.json`` (``accel.core.model_info.ModelInfo``) may name
    ``null_class_label`` (for guidance), ``num_inference_steps`` and ``guidance_scale`` (a
    student's defaults); it is returned. The scheduler's config is the denoiser's
    ``scheduler_config``. A LoRA student (accel.json's ``lora``) loads as its teacher's denoiser
    with the adapters fused in (``distill.lora.apply_lora``). ``dtype``: the denoiser's in memory
    (``load_pipeline``; default float32)."""
    from distill.models import load_pipeline

    root = Path(model_dir)
    adapter = load_pipeline(root, load_components=load_components, dtype=dtype)
    info = ModelInfo.read(root)
    if info.lora is not None:  # a LoRA student: its adapters fused into the teacher's weights
        from distill.lora import apply_lora

        apply_lora(adapter, root / info.lora.weight_name)
    sched_cfg = adapter.scheduler_config
    w = guidance_scale if guidance_scale is not None else info.guidance_scale
    backbone = adapter.backbone
    if dtype in _half():
        from distill.lora import AdapterView

        backbone = AdapterView(backbone, None)  # float32 in and out, autocast inside
    args = (backbone, adapter.schedule, adapter.prediction_type)
    kwargs: dict[str, Any]
    if not adapter.null_from_info:  # guidance against the adapter's null conditioning
        default = getattr(adapter, "default_guidance", 1.0) if adapter.guidance_in_model else 1.0
        w = float(default if w is None else w)
        if adapter.guidance_in_model:
            adapter.guidance_scale = w
        kwargs = {"guidance_scale": w, "adapter": adapter}
    else:  # guidance against accel.json's null class, or w in the label table's rows
        w = 1.0 if w is None else float(w)
        null = info.null_class_label
        embedding = info.guidance_embedding  # a guidance-distilled model: w is an input
        if w != 1.0 and null is None and embedding is None:
            raise CheckpointError(
                f"guidance scale {w} needs an unconditional class; {root} has no accel.json with "
                "null_class_label (students with guidance baked in sample with guidance 1)"
            )
        kwargs = {"guidance_scale": w, "null_label": null, "adapter": adapter}
        if embedding is not None:
            kwargs.update(guidance_scales=embedding.scales, num_labels=embedding.num_labels)
    from distill.students import kind_of

    kind = kind_of(info, adapter.schedule.kind == "flow")
    denoiser = kind.denoiser(args, kwargs, info, sched_cfg, root / adapter.denoiser_folder)
    denoiser.scheduler_config = sched_cfg
    return denoiser, info


def load_teacher(
    path: str | Path,
    stage: str,
    guidance_scale: float,
    students: tuple[str, ...] = (),
    flow: bool = False,
    dtype=None,
) -> tuple[Denoiser, ModelInfo]:
    """A teacher for a step-distillation stage: a discrete-time model (or a flow-matching one where
    the stage has its flow form, ``flow``) that is not itself a distilled student (distillation
    needs the teacher's own ODE), unless it is a student of one of the ``students`` methods (a
    progressive student is a deterministic DDIM sampler of the ODE)."""
    from accel.core.errors import StageError

    teacher, info = load_denoiser(path, guidance_scale=guidance_scale, dtype=dtype)
    if teacher.schedule.kind != "discrete" and not flow:
        raise StageError(
            stage,
            f"flow-matching teachers are not supported by {stage} yet (its students step a "
            "discrete VP schedule); progressive distillation takes them",
        )
    if info.is_student and info.method not in students:
        raise StageError(
            stage,
            f"the input is already a distilled {info.method or ''} student; distil from "
            "the teacher, which holds the ODE the student learns",
        )
    return teacher, info


def guidance_info(
    teacher_info: ModelInfo, guidance_scale: float, w_input: bool = False
) -> dict[str, Any]:
    """accel.json guidance fields of a step-distilled student: guidance baked in at
    ``guidance_scale`` (sample with 1), or, from a guidance-distilled teacher (or one whose
    backbone takes w, ``w_input``: FLUX.1-dev), the same w input."""
    if w_input:
        return {"guidance_scale": guidance_scale}
    embedding = teacher_info.guidance_embedding
    if embedding is None:
        if guidance_scale == 1.0:  # a student of a student: the guidance its teacher baked in
            guidance_scale = teacher_info.distilled_guidance_scale or 1.0
        return {"guidance_scale": 1.0, "distilled_guidance_scale": guidance_scale}
    return {"guidance_scale": guidance_scale, "guidance_embedding": embedding}


def save_pipeline(
    out_dir: str | Path,
    backbone: nn.Module,
    scheduler_config: dict[str, Any],
    info: ModelInfo,
    teacher: Denoiser | None = None,
) -> None:
    """Write a diffusers pipeline directory that stock diffusers loads: model_index.json, the
    backbone (safetensors), the scheduler named in scheduler_config["_class_name"], and accel.json.

    A student is its teacher's whole pipeline (``ModelAdapter.student_index``: for a latent family,
    the teacher's model_index.json with the new scheduler class), its other components (text
    encoders, tokenizers, VAE) hard-linked from the teacher's directory (store artifacts are never
    modified, so the bytes are stored once; copied where links are impossible).

    A LoRA student (``backbone`` a ``distill.lora.AdapterView``) is the teacher's denoiser,
    linked too, plus ``pytorch_lora_weights.safetensors`` in diffusers' format, named in
    accel.json's ``lora``; where the stock pipeline has no LoRA loader, the adapters are fused
    into a full copy of the teacher's weights."""
    import dataclasses

    import diffusers

    from distill.lora import LORA_FILE, AdapterView, fused_copy, save_lora

    out = Path(out_dir)
    if teacher is not None:
        adapter = teacher.adapter
    else:
        from distill.models.unet2d import UNet2DAdapter

        adapter = UNet2DAdapter.bare(backbone)
    folder = adapter.denoiser_folder
    sched_name = scheduler_config["_class_name"]
    index = adapter.student_index(getattr(backbone, "base", backbone), sched_name)
    linked = [folder] if isinstance(backbone, AdapterView) else []
    if not isinstance(backbone, AdapterView):
        backbone.save_pretrained(out / folder, safe_serialization=True)
    elif save_lora(out, backbone, adapter, index.get("_class_name")):
        assert backbone.shape is not None
        lora = LoraSpec(LORA_FILE, backbone.shape.rank, backbone.shape.alpha)
        info = dataclasses.replace(info, lora=lora)
    else:  # no LoRA loader in the stock pipeline: a full student
        linked = []
        fused_copy(backbone, adapter.root).save_pretrained(out / folder, safe_serialization=True)
    getattr(diffusers, sched_name).from_config(scheduler_config).save_pretrained(out / "scheduler")
    for name, entry in index.items():
        if name == "scheduler" or not isinstance(entry, list) or entry[0] is None:
            continue
        if (name != folder or linked) and (adapter.root / name).is_dir():
            link_tree(adapter.root / name, out / name)
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    info.write(out)


def link_tree(src: Path, dst: Path) -> None:
    """``dst`` a copy of the folder ``src`` whose files are hard links to its files."""
    import os
    import shutil

    for file in sorted(src.rglob("*")):
        target = dst / file.relative_to(src)
        if file.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(file, target)
        except OSError:
            shutil.copy2(file, target)
