"""Nothing a user hands in is executed: no pickle, no torch.load without weights_only=True, no
eval/exec, no numpy pickles, in any module, example or benchmark (an AST scan of the code); paths
named by a manifest cannot leave its directory."""

import ast
import json
from pathlib import Path

import pytest

from accel.core.artifact import Artifact
from accel.core.errors import CheckpointError, inside

from record import record

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("accel", "distill", "export", "examples", "benchmarks")


def findings(source: str, name: str) -> list[str]:
    """Unsafe deserialisation or code execution in ``source``, one line each."""
    out = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            mods = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(m.split(".")[0] in ("pickle", "cPickle", "dill", "marshal", "shelve")
                   for m in mods):  # fmt: skip
                out.append(f"{where}: imports a pickle module")
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
        owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
        kw = {k.arg: k.value for k in node.keywords}
        if isinstance(func, ast.Name) and called in ("eval", "exec"):
            out.append(f"{where}: {called}()")
        if called == "load" and owner == "torch":
            safe = kw.get("weights_only")
            if not (isinstance(safe, ast.Constant) and safe.value is True):
                out.append(f"{where}: torch.load without weights_only=True")
        if called == "load" and owner in ("np", "numpy"):
            pickles = kw.get("allow_pickle")
            if isinstance(pickles, ast.Constant) and pickles.value is True:
                out.append(f"{where}: np.load(allow_pickle=True)")
        if called in ("load", "loads") and owner in ("pickle", "dill", "marshal"):
            out.append(f"{where}: {owner}.{called}")
    return out


def test_the_scan_finds_what_it_looks_for():
    bad = (
        "import pickle\nx = eval('1')\nexec('y = 2')\nimport torch\ntorch.load('m.pt')\n"
        "torch.load('m.pt', weights_only=False)\nimport numpy as np\n"
        "np.load('a.npy', allow_pickle=True)\n"
    )
    kinds = [f.split(": ", 1)[1] for f in findings(bad, "bad.py")]
    assert kinds == [
        "imports a pickle module", "eval()", "exec()", "torch.load without weights_only=True",
        "torch.load without weights_only=True", "np.load(allow_pickle=True)",
    ]  # fmt: skip
    assert findings("torch.load('m.pt', weights_only=True)\nmodel.eval()\n", "ok.py") == []


def test_no_code_executes_what_users_hand_in():
    files = [p for d in SCANNED for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 50
    found = [f for p in files for f in findings(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == []
    record("security scan", files=len(files), found=len(found))


@pytest.mark.parametrize(
    "name, ok",
    [("model.onnx", True), ("tokenizer/tokenizer.json", True), ("../x", False),
     ("a/../../x", False), ("/etc/passwd", False), ("", False), ("C:\\x", False),
     ("a\\..\\x", False), (3, False)],
)  # fmt: skip
def test_paths_inside_a_directory(name, ok):
    assert inside(name) is ok


def test_a_manifest_naming_files_outside_its_directory_is_refused(tmp_path):
    art = tmp_path / "a"
    art.mkdir()
    (tmp_path / "secret").write_text("x")
    manifest = {"key": "k", "kind": "bundle", "stage": "bundle", "files": {"../secret": "0" * 64}}
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="lists files outside its directory"):
        Artifact.load(art)
    record("manifest outside its directory", cases=1, refused=1)
