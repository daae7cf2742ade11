"""Training data as plug-ins named by a training stage's ``dataset`` key, not imports: a table of
names to "module:function" strings, imported when a stage loads its data.

A data source is a function of no arguments returning (x0, labels): float32 images or latents
N x C x H x W in the model's sample space and int64 class labels (or None for unconditional
models). ``digits`` is the shipped demo's (scikit-learn's digits at 16x16). Sources for
images with captions (an ``imagefolder`` with ``metadata.jsonl``) and for teacher samples from a
list of prompts or labels come with the text-to-image distillation stages; until then a stage
config accepts only the names in this table."""

from __future__ import annotations

import importlib

import torch

from accel.core.errors import RecipeError

DATASETS: dict[str, str] = {"digits": "accel.demo.digits:digits_dataset"}


def load_dataset(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (x0, labels) of the data source ``name``."""
    if name not in DATASETS:
        raise RecipeError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    module, fn = DATASETS[name].split(":")
    return getattr(importlib.import_module(module), fn)()
