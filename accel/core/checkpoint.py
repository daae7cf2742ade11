"""Reading and writing weights and diffusers directories, with errors a user can act on.

Safetensors only: nothing a user hands us is ever unpickled."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accel.core.errors import CheckpointError


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


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data
