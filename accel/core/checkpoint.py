"""Reading a checkpoint's JSON files, with errors a user can act on (torch-free; the weights are
read by ``distill.models.load_safetensors``: safetensors only, nothing a user hands us is ever
unpickled)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from accel.core.errors import CheckpointError


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
