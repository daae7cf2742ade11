"""Compilers on a tiny model: AOTInductor on CPU (dynamic batch, gate, engine runtime), the
onnxruntime execution-provider options a target implies, and the GPU paths under `gpu`."""

import subprocess

import numpy as np
import pytest

from accel.core.errors import StageError
from accel.pipeline import default_store
from accel.runtime import open_engine
from export.onnx_export import example_inputs
from export.ort_compile import provider_options
from export.parity import compare, describe_failure
from export.torch_runtime import AotiRuntime, TorchRuntime, open_model

from tiny import build, gpu_target, write_tiny_pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    store = default_store(root / "store")
    return store, store.source(write_tiny_pipeline(root / "teacher"))


@pytest.mark.slow
def test_aotinductor_engine_matches_eager_across_its_batch_range(tiny):
    store, source = tiny
    engine = build(
        store,
        source,
        "aoti",
        num_inference_steps=3,
        gate={"metric": "image_rmse", "threshold": 1e-4, "samples": 70},
    )
    assert engine.info["backend"] == "aoti" and engine.target["name"] == "cpu"
    assert engine.metrics["parity"]["passed"]  # per step, against eager torch
    assert engine.info["batch_range"][0] == 1 and engine.info["batch_range"][1] in (63, 64)
    assert engine.metrics["quality_gate"]["value"] < 1e-4  # 70 samples: two calls of <= 64
    runtime, plan = open_engine(engine.path)
    assert isinstance(runtime, AotiRuntime) and len(plan.steps) == 3
    eager, _ = open_model(source.path, 3)
    feeds = [example_inputs(eager.graph, b, [999, 500, 1], seed=b) for b in (1, 5, 100)]
    report = compare(eager, [runtime], feeds, "fp32")
    assert report["passed"], describe_failure(report)


def test_ort_provider_follows_the_target():
    from accel.core.target import load_target

    assert load_target("cpu").provider == "CPUExecutionProvider"
    assert gpu_target().provider == "TensorrtExecutionProvider"
    assert gpu_target(providers=[]).provider == "CUDAExecutionProvider"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("onnxruntime", "backend 'onnxruntime' is now 'ort'"),
        ("onnxruntime-cuda", r"'ort' with providers = \[.CUDAExecutionProvider.\]"),
        ("torch", "backend 'torch' is now 'torch_compile'"),
        ("openvino", "unknown backend 'openvino'; the backends are ort, tensorrt, aoti"),
    ],
)
def test_a_target_names_backends_by_their_one_name(name, reason):
    with pytest.raises(ValueError, match=reason):
        gpu_target(backends=[name])


def test_tensorrt_ep_options_carry_the_targets_profile_precision_and_cache():
    inputs = {
        "sample": (["batch", 1, 16, 16], "tensor(float)"),
        "timestep": (["batch"], "tensor(int64)"),
        "class_labels": (["batch"], "tensor(int64)"),
    }
    opts = provider_options(gpu_target(), "TensorrtExecutionProvider", "cache-x", inputs)
    assert opts["trt_profile_min_shapes"] == "sample:1x1x16x16,timestep:1,class_labels:1"
    assert opts["trt_profile_opt_shapes"] == "sample:8x1x16x16,timestep:8,class_labels:8"
    assert opts["trt_profile_max_shapes"] == "sample:32x1x16x16,timestep:32,class_labels:32"
    assert opts["trt_fp16_enable"] == "true" and opts["trt_engine_cache_path"] == "cache-x"
    fp32 = provider_options(gpu_target(precision="fp32"), "TensorrtExecutionProvider", "c", inputs)
    assert fp32["trt_fp16_enable"] == "false"
    assert provider_options(gpu_target(), "CPUExecutionProvider", "c", inputs) == {}


def test_cuda_graph_options_per_provider_and_their_refusals(tiny, tmp_path):
    from accel.runtime import OrtRuntime
    from export.tensorrt_compile import trtexec_timing_command

    inputs = {"noise": (["batch", 1, 16, 16], "tensor(float)")}
    trt = provider_options(gpu_target(), "TensorrtExecutionProvider", "c", inputs, cuda_graph=True)
    assert trt["trt_cuda_graph_enable"] == "true"
    cuda = provider_options(gpu_target(), "CUDAExecutionProvider", "c", inputs, cuda_graph=True)
    assert cuda["enable_cuda_graph"] == "1"
    assert "enable_cuda_graph" not in provider_options(
        gpu_target(), "CUDAExecutionProvider", "c", inputs
    )
    with pytest.raises(StageError, match="cuda_graph needs a GPU provider"):
        provider_options(gpu_target(), "CPUExecutionProvider", "c", inputs, cuda_graph=True)
    store, source = tiny
    graph = build(store, source, "onnx", num_inference_steps=2)
    with pytest.raises(StageError, match="cuda_graph needs a GPU provider"):
        build(store, graph, "ort", cuda_graph=True)
    with pytest.raises(Exception, match="CUDA graphs need a GPU provider"):
        OrtRuntime(graph.path / "model.onnx", options={"enable_cuda_graph": "1"})
    shapes = {"noise": {"min": [1, 1, 16, 16], "opt": [8, 1, 16, 16], "max": [32, 1, 16, 16]}}
    assert trtexec_timing_command(shapes, True) == (
        "trtexec --loadEngine=model.plan --shapes=noise:8x1x16x16 --useSpinWait --useCudaGraph"
    )


def test_compile_refuses_a_provider_this_onnxruntime_lacks(tiny):
    store, source = tiny
    graph = build(store, source, "onnx", num_inference_steps=2)
    with pytest.raises(StageError, match="not available in this onnxruntime build"):
        build(store, graph, "ort", provider="TensorrtExecutionProvider")


@pytest.mark.gpu
def test_aotinductor_on_cuda_matches_eager(tmp_path):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from export.aoti_compile import cuda_probe_failure

    why = cuda_probe_failure()  # torch 2.11 on the lent H100 crashed loading any CUDA package
    if why:
        pytest.skip(why)
    store = default_store(tmp_path / "store")
    source = store.source(write_tiny_pipeline(tmp_path / "teacher"))
    target = tmp_path / "gpu.toml"
    target.write_text(
        'name = "gpu"\ndescription = "t"\ndevice = "cuda"\ngpu = "GPU"\ncompute_capability = "9.0"\n'
        'backends = ["aoti"]\n'
        "[shapes]\nbatch = { min = 1, opt = 4, max = 32 }\n"
        "resolution = { min = 16, opt = 16, max = 16 }\n"
    )
    engine = build(
        store,
        source,
        "aoti",
        target=str(target),
        num_inference_steps=2,
        gate={"metric": "image_rmse", "threshold": 1e-3, "samples": 16},
    )
    runtime, _ = open_engine(engine.path)
    eager, _ = open_model(source.path, 2)
    feeds = [example_inputs(eager.graph, 4, [999, 1])]
    report = compare(eager, [runtime], feeds, "fp32")
    assert report["passed"], describe_failure(report)


@pytest.mark.gpu
def test_onnxruntime_cuda_engine_runs_on_the_gpu(tiny):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with CUDA is not installed")
    store, source = tiny
    graph = build(store, source, "onnx", num_inference_steps=2)
    engine = build(store, graph, "ort", provider="CUDAExecutionProvider")
    runtime, plan = open_engine(engine.path)
    assert runtime.session.get_providers()[0] == "CUDAExecutionProvider"
    eager = TorchRuntime(open_model(source.path, 2)[0].graph)
    feeds = [example_inputs(eager.graph, 4, [999, 1])]
    assert compare(eager, [runtime], feeds, "fp32")["passed"]
    assert np.isfinite(runtime.infer(feeds[0])["x0"]).all()


def test_the_cuda_aoti_probe_reports_a_crash_with_its_torch_version(monkeypatch):

    import torch

    from export.aoti_compile import cuda_probe_failure

    def crashed(*a, **k):
        return subprocess.CompletedProcess(a, -11, "", "Segmentation fault\n")

    monkeypatch.setattr(subprocess, "run", crashed)
    why = cuda_probe_failure()
    assert why is not None and f"torch {torch.__version__} cannot load" in why
    assert "signal 11: Segmentation fault" in why
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0))
    assert cuda_probe_failure() is None
