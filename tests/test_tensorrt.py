"""The native TensorRT path: its build settings and trtexec line from the target, its errors where
TensorRT cannot run, a type check of its API calls against tensorrt-stubs, and (marker `gpu`) a
real engine build where TensorRT is installed."""

import ast
import importlib.util
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from accel.core.errors import StageError
from accel.pipeline import default_store
from export.tensorrt_compile import profile_shapes, trtexec_command

from tiny import build, gpu_target, write_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_profile_shapes_and_trtexec_line_follow_the_target():
    target = gpu_target(
        builder={
            "optimization_level": 5,
            "workspace_mib": 2048,
            "hardware_compatibility": "ampere_plus",
            "version_compatible": True,
        }
    )
    shapes = profile_shapes(target, {"sample": [-1, 1, 16, 16], "timestep": [-1]})
    assert shapes["sample"] == {
        "min": [1, 1, 16, 16],
        "opt": [8, 1, 16, 16],
        "max": [32, 1, 16, 16],
    }
    assert shapes["timestep"] == {"min": [1], "opt": [8], "max": [32]}
    line = trtexec_command(target, "model.onnx", shapes, strongly_typed=False).split()
    assert line[:3] == ["trtexec", "--onnx=model.onnx", "--saveEngine=model.plan"]
    for flag in (
        "--minShapes=sample:1x1x16x16,timestep:1",
        "--optShapes=sample:8x1x16x16,timestep:8",
        "--maxShapes=sample:32x1x16x16,timestep:32",
        "--builderOptimizationLevel=5",
        "--memPoolSize=workspace:2048M",
        "--fp16",
        "--hardwareCompatibilityLevel=ampere+",
        "--versionCompatible",
    ):
        assert flag in line
    typed = trtexec_command(target, "model.onnx", shapes, strongly_typed=True).split()
    assert "--stronglyTyped" in typed and "--fp16" not in typed  # Q/DQ graphs carry their types


def test_tensorrt_stage_says_where_it_can_run(tmp_path):
    store = default_store(tmp_path / "store")
    source = store.source(write_tiny_pipeline(tmp_path / "teacher"))
    graph = build(store, source, "onnx", num_inference_steps=2)
    with pytest.raises(StageError, match="TensorRT engines run on NVIDIA GPUs only"):
        build(store, graph, "tensorrt")
    if importlib.util.find_spec("tensorrt") and hasattr(__import__("tensorrt"), "Builder"):
        pytest.skip("TensorRT is installed: the gpu tests build real engines")
    target = tmp_path / "h100.toml"
    target.write_text(
        'name = "h100"\ndescription = "t"\ndevice = "cuda"\ngpu = "GPU"\ncompute_capability = "9.0"\n'
        'backends = ["tensorrt"]\n'
        'precision = "fp16"\n[shapes]\nbatch = { min = 1, opt = 4, max = 16 }\n'
        "resolution = { min = 16, opt = 16, max = 16 }\n"
    )
    with pytest.raises(StageError, match="TensorRT is not installed here") as e:
        build(store, graph, "tensorrt", target=str(target))
    assert "trtexec --onnx=model.onnx" in str(e.value) and "--fp16" in str(e.value)
    assert not any((store.root / "tmp").iterdir())


def stub_copy(dst: Path) -> Path:
    """tensorrt-stubs' .pyi files, made parseable: they name a parameter `in` and put required
    parameters after defaulted ones, which mypy rejects as syntax errors (and, found in
    site-packages without a py.typed marker, mypy would silently type every tensorrt call Any)."""
    site = ROOT / ".venv" / "tensorrt-stubs"  # where `make venv` puts them
    if not (site / "tensorrt_bindings" / "tensorrt.pyi").is_file():
        pytest.fail(
            f"tensorrt-stubs are not in {site}: run `make venv` (or the pip line in Makefile)"
        )
    for package in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(site / package, dst / package, ignore=shutil.ignore_patterns("*.py[co]"))
    stub = dst / "tensorrt_bindings" / "tensorrt.pyi"
    lines = [
        re.sub(r"([(, ])in: ", r"\1in_: ", ln) if ln.lstrip().startswith("def ") else ln
        for ln in stub.read_text().split("\n")
    ]
    for _ in range(100):
        try:
            ast.parse("\n".join(lines))
            break
        except SyntaxError as e:
            n = (e.lineno or 1) - 1
            first_default = re.search(r"(?:\(|, )(\w+: [^,=]+ = )", lines[n])
            assert "follows default" in e.msg and first_default, (e.msg, lines[n])
            at = first_default.start(1)
            lines[n] = lines[n][:at] + "*, " + lines[n][at:]
    stub.write_text("\n".join(lines))
    return dst


@pytest.mark.slow  # a mypy run over the TensorRT path, about half a minute
def test_tensorrt_calls_type_check_against_tensorrt_stubs(tmp_path):
    stubs = stub_copy(tmp_path / "stubs")
    canary = tmp_path / "canary.py"  # proves the stubs are live: a misspelt attribute must fail
    canary.write_text(
        "import tensorrt as trt\n"
        "config = trt.Builder(trt.Logger()).create_builder_config()\n"
        "config.builder_optimisation_level = 3\n"
    )
    result = subprocess.run(
        [
            *(sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache")),
            *("export/tensorrt_compile.py", "accel/runtime/tensorrt.py", str(canary)),
        ],
        cwd=ROOT,
        env={"MYPYPATH": str(stubs), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    errors = [ln for ln in result.stdout.splitlines() if ": error:" in ln]
    assert errors and all(ln.startswith(str(canary)) for ln in errors), result.stdout
    assert "builder_optimisation_level" in errors[0]


@pytest.mark.gpu
def test_tensorrt_engine_builds_and_matches_onnxruntime(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    if not (importlib.util.find_spec("tensorrt") and hasattr(__import__("tensorrt"), "Builder")):
        pytest.skip("TensorRT is not installed")
    from accel.runtime import OrtRuntime, open_engine
    from export.onnx_export import example_inputs
    from export.parity import compare, describe_failure
    from export.torch_runtime import open_model

    store = default_store(tmp_path / "store")
    source = store.source(write_tiny_pipeline(tmp_path / "teacher"))
    graph = build(store, source, "onnx", num_inference_steps=2)
    target = tmp_path / "gpu.toml"
    target.write_text(
        'name = "gpu"\ndescription = "t"\ndevice = "cuda"\ngpu = "GPU"\ncompute_capability = "9.0"\n'
        'backends = ["tensorrt"]\n'
        "[shapes]\nbatch = { min = 1, opt = 4, max = 16 }\n"
        "resolution = { min = 16, opt = 16, max = 16 }\n"
    )
    gate = {"metric": "image_rmse", "threshold": 1e-2, "samples": 16}
    engine = build(store, graph, "tensorrt", target=str(target), gate=gate)
    assert (engine.path / "trtexec.sh").is_file() and (engine.path / "timing.cache").is_file()
    runtime, _ = open_engine(engine.path)
    eager, _ = open_model(source.path, 2)
    feeds = [example_inputs(eager.graph, b, [999, 1], seed=b) for b in (1, 4, 16)]
    reference = OrtRuntime(graph.path / "model.onnx", optimize=False)
    # TensorRT may run fp32 convolutions in TF32: the fp16 row of the tolerance table
    report = compare(reference, [runtime], feeds, "fp16")
    assert report["passed"], describe_failure(report)


def test_guided_graphs_get_a_doubled_batch_profile():
    from accel.core.plan import SamplerPlan, batch_factor

    dims = {"sample": [-1, 1, 16, 16], "timestep": [-1], "class_labels": [-1]}
    guided = SamplerPlan(steps=[], sample_shape=[1, 16, 16], guidance_scale=1.5, null_label=10)
    assert batch_factor(guided, dims) == 2
    assert batch_factor(SamplerPlan(steps=[], sample_shape=[1, 16, 16]), dims) == 1
    w_input = replace(guided, guidance_input=True)
    assert batch_factor(w_input, dims) == 1
    shapes = profile_shapes(gpu_target(), dims, batch_factor(guided, dims))
    assert shapes["sample"]["max"] == [64, 1, 16, 16] and shapes["timestep"]["opt"] == [16]
