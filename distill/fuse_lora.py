"""The ``lora`` stage: a user's LoRA (diffusers' or kohya's keys) fused into a checkpoint's
weights through diffusers' ``load_lora_weights`` (``distill.lora.apply_lora``), for a teacher
before distillation or a student before export; the engines then hold the fused weights."""

from __future__ import annotations

from pathlib import Path

from distill.lora import apply_lora


def run(ctx) -> None:
    """The ``lora`` stage: the input pipeline (a LoRA student's own adapters fused first) with
    the user's LoRA fused into the components it adapts, each written whole (safetensors); the
    others linked from the input. The file's name, sha256, scale and the components changed
    are the artifact's metrics, beside its config."""
    import dataclasses
    import json

    from distill.checkpoint import link_tree, load_denoiser

    config = ctx.config
    denoiser, info = load_denoiser(ctx.input.path)
    adapter = denoiser.adapter
    changed = apply_lora(adapter, config.file, config.scale)
    if info.lora is not None:
        changed = sorted({*changed, adapter.denoiser_folder})
    root, out = Path(ctx.input.path), ctx.out
    for name in changed:
        module = adapter.backbone if name == adapter.denoiser_folder else adapter.modules[name]
        module.save_pretrained(out / name, safe_serialization=True)
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in changed):
        link_tree(folder, out / folder.name)
    index = json.loads((root / "model_index.json").read_text())
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    dataclasses.replace(info, lora=None).write(out)
    ctx.metrics["lora"] = {
        "file": Path(config.file).name,
        "sha256": config.sha256,
        "scale": config.scale,
        "components": sorted(changed),
    }
