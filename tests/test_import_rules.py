"""The layering DESIGN.md states, checked in fresh interpreters: the runtime package imports no
torch, diffusers, pydantic, distill or export (a bundle runs with numpy and its engine library),
and neither do `import accel` and the CLI module (so `accel --help` stays instant)."""

import json
import subprocess
import sys

import pytest

FORBIDDEN = ("torch", "diffusers", "transformers", "pydantic", "distill", "export")
RUNTIME_MODULES = [
    "accel.runtime",
    "accel.runtime.loop",
    "accel.runtime.ort",
    "accel.runtime.tensorrt",
    "accel.runtime.cudart",
    "accel.runtime.backends",
    "accel.runtime.bundle",
    "accel.runtime.engine",
    "accel.core.plan",
    "accel.core.sections",
    "accel.core.hardware",
]


def _imported_after(module: str) -> list[str]:
    code = (
        f"import json, sys; import {module}; "
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("module", [*RUNTIME_MODULES, "accel", "accel.cli"])
def test_module_imports_nothing_heavy(module):
    loaded = set(_imported_after(module))
    assert not loaded & set(FORBIDDEN), f"{module} imports {sorted(loaded & set(FORBIDDEN))}"


def test_the_check_sees_a_heavy_import():
    assert {"torch", "distill"} <= set(_imported_after("distill.denoiser"))
