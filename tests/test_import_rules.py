"""The layering of docs/ARCHITECTURE.md, checked two ways.

Statically: every import in accel/, distill/ and export/ (those inside functions and under
``TYPE_CHECKING`` included, ``importlib.import_module("...")`` of a literal too) and every
"module:attribute" string of the registries (``STAGES``, ``DATASETS``, ``METRICS``, ``BACKENDS``,
``ADAPTERS``) is an edge from its module, and an edge the layer table forbids fails the test.

In fresh interpreters: the runtime package imports no torch, diffusers, pydantic, distill or
export (a bundle runs with numpy and its engine library), and neither do ``import accel`` and the
CLI module (so ``accel --help`` stays instant)."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("accel", "distill", "export")
REGISTRIES = {"STAGES", "DATASETS", "METRICS", "BACKENDS", "ADAPTERS"}
REF = re.compile(r"^([A-Za-z_][\w.]*):([A-Za-z_]\w*)$")
TORCH_WORLD = {"torch", "torchvision", "diffusers", "transformers", "accelerate", "peft"}

# (module prefix, first-party prefixes it may import, third-party roots it may not); the first
# matching prefix is a module's layer, and anything under `accel` not listed is the driver.
LAYERS: list[tuple[str, tuple[str, ...], set[str]]] = [
    ("accel.core", ("accel.core", "accel.registry"), TORCH_WORLD),
    ("accel.registry", ("accel.core",), TORCH_WORLD | {"pydantic"}),
    (
        "accel.runtime",
        ("accel.core", "accel.registry", "accel.runtime"),
        TORCH_WORLD | {"pydantic"},
    ),
    ("distill", ("accel.core", "accel.registry", "distill"), set()),
    ("export", ("accel.core", "accel.registry", "accel.runtime", "distill", "export"), set()),
    ("accel", ("accel", "distill", "export"), set()),
]
# The registry's strings are the plug-in seam: it names any layer (a stage, the demo's dataset
# and metric, a torch backend's runtime), and every layer may look a name up in it.
REGISTRY_NAMES_ANYTHING = ("accel.registry",)


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path) -> dict[str, Path]:
    return {
        _module_name(f, root): f
        for pkg in PACKAGES
        for f in sorted((root / pkg).rglob("*.py"))
        if "__pycache__" not in f.parts
    }


def _target(name: str, alias: str | None, modules: dict[str, Path]) -> str:
    """``from name import alias`` imports the module name.alias when there is one."""
    if alias and f"{name}.{alias}" in modules:
        return f"{name}.{alias}"
    return name


def edges(root: Path = ROOT) -> list[tuple[str, str, str]]:
    """(importer, imported, where) for every first- and third-party import and registry string."""
    modules = _modules(root)
    found = []
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Import):
                found += [(mod, a.name, where) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, *([node.module] if node.module else [])])
                found += [(mod, _target(base, a.name, modules), where) for a in node.names]
            elif (
                isinstance(node, ast.Call)
                and ast.unparse(node.func) == "importlib.import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                found.append((mod, node.args[0].value, where))
        for node in ast.walk(tree):  # a stage declaration's run="module:function"
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == "run" and isinstance(kw.value, ast.Constant):
                        if m := REF.match(str(kw.value.value)):
                            found.append((mod, m[1], f"{path.relative_to(root)}:{kw.lineno} (run)"))
        for node in tree.body:
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign) and node.value is not None
                else []
            )
            if not any(isinstance(t, ast.Name) and t.id in REGISTRIES for t in targets):
                continue
            for const in ast.walk(node.value):
                if isinstance(const, ast.Constant) and isinstance(const.value, str):
                    if m := REF.match(const.value):
                        found.append(
                            (mod, m[1], f"{path.relative_to(root)}:{const.lineno} (registry)")
                        )
    return found


def _layer(module: str) -> tuple[str, tuple[str, ...], set[str]] | None:
    for layer in LAYERS:
        if module == layer[0] or module.startswith(layer[0] + "."):
            return layer
    return None


def _under(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def method_modules(root: Path = ROOT) -> set[str]:
    """The modules of the distillation stages: where their declarations' ``run`` lives."""
    return {
        dst for _, dst, where in edges(root) if "(run)" in where and dst.startswith("distill.")
    }  # fmt: skip


def forbidden_edges(root: Path = ROOT) -> list[str]:
    methods = method_modules(root)
    first_party = set(PACKAGES)
    problems = []
    for src, dst, where in edges(root):
        layer = _layer(src)
        if layer is None:
            continue
        prefix, allowed, banned = layer
        top = dst.split(".")[0]
        if top in first_party:
            named = "(registry)" in where or "(run)" in where
            registry = "(registry)" in where and _under(src, REGISTRY_NAMES_ANYTHING)
            if not registry and not _under(dst, allowed):
                problems.append(f"{where}: {src} ({prefix}) imports {dst}")
            elif dst in methods and src.startswith("distill.") and src != dst and not named:
                problems.append(f"{where}: {src} imports the method {dst}; share it in a module")
        elif top in banned:
            problems.append(f"{where}: {src} ({prefix}) imports {dst}")
    return problems


def unresolved_registry_strings(root: Path = ROOT) -> list[str]:
    """Registry strings whose module or top-level attribute does not exist."""
    modules = _modules(root)
    bad = []
    for src, dst, where in edges(root):
        if "(registry)" not in where and "(run)" not in where:
            continue
        line = int(where.split(":")[1].split()[0])
        text = modules[src].read_text().splitlines()[line - 1]
        refs = [m for s in re.findall(r'"([^"]+)"', text) if (m := REF.match(s)) and m[1] == dst]
        attr = refs[0][2]
        if dst not in modules:
            bad.append(f"{where}: no module {dst}")
            continue
        tree = ast.parse(modules[dst].read_text())
        names = {
            t.id
            for n in tree.body
            for t in getattr(n, "targets", [getattr(n, "target", None)])
            if isinstance(t, ast.Name)
        } | {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
        if attr not in names:
            bad.append(f"{where}: {dst} defines no {attr}")
    return bad


def test_no_forbidden_edge():
    problems = forbidden_edges()
    assert not problems, "\n".join(problems)


def test_registry_strings_name_what_exists():
    assert method_modules() >= {"distill.consistency", "distill.dmd", "distill.meanflow"}
    assert not unresolved_registry_strings()


def test_a_planted_function_level_import_and_registry_string_fail(tmp_path):
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    with (tmp_path / "accel/core/plan.py").open("a") as f:
        f.write("\n\ndef _planted():\n    from accel.demo import digits\n\n    return digits\n")
    with (tmp_path / "distill/data.py").open("a") as f:
        f.write('\nDATASETS = {"x": "accel.demo.digits:digits_dataset"}\n')
    with (tmp_path / "distill/samplers.py").open("a") as f:
        f.write("\n\ndef _planted():\n    import distill.scm\n")
    with (tmp_path / "accel/runtime/loop.py").open("a") as f:
        f.write("\n\ndef _planted():\n    import torch\n")
    problems = forbidden_edges(tmp_path)
    assert len(problems) == 4, problems
    assert any("accel.core.plan (accel.core) imports accel.demo.digits" in p for p in problems)
    assert any("(registry)" in p and "distill.data" in p for p in problems)
    assert any("imports the method distill.scm" in p for p in problems)
    assert any("accel.runtime.loop (accel.runtime) imports torch" in p for p in problems)


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


def heavy_modules_of_command(*args, cwd: Path | None = None) -> tuple[int, list[str], str]:
    """Run ``accel ARGS`` in a fresh interpreter; (exit code, heavy top-level modules it
    imported, stderr)."""
    code = (
        "import atexit, json, sys\n"
        "from accel.cli import main\n"
        "heavy = ('torch', 'diffusers', 'transformers', 'distill', 'export')\n"
        "atexit.register(lambda: print('HEAVY=' + json.dumps(sorted("
        "{m.split('.')[0] for m in sys.modules} & set(heavy))), file=sys.stderr))\n"
        f"sys.argv = ['accel', *{[str(a) for a in args]!r}]\n"
        "main()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd)
    line = next(x for x in out.stderr.splitlines() if x.startswith("HEAVY="))
    return out.returncode, json.loads(line.removeprefix("HEAVY=")), out.stderr


@pytest.mark.parametrize("args", [("targets",), ("targets", "detect"), ("targets", "show", "cpu")])
def test_targets_commands_import_no_torch(args):
    code, heavy, err = heavy_modules_of_command(*args)
    assert code == 0, err
    assert heavy == [], f"accel {' '.join(args)} imports {heavy}"


@pytest.mark.parametrize("recipe", ["digits-pixel", "text-digits"])
def test_accel_plan_imports_no_torch(recipe, tmp_path):
    """Checking a recipe and computing its keys needs the stages' declarations only (their
    configs and versions), which import no torch."""
    path = ROOT / "accel" / "recipes" / f"{recipe}.toml"
    code, heavy, err = heavy_modules_of_command("plan", path, "--store", tmp_path / "store")
    assert code == 0, err
    assert not set(heavy) & TORCH_WORLD, f"accel plan imports {heavy}"
