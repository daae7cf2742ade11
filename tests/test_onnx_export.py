"""ONNX export and the onnxruntime engine: dynamic batch, checker, parity across runtimes."""

import numpy as np
import onnx
import pytest

from accel.runtime import OrtRuntime
from distill.graph import DenoiserGraph
from distill.schedule import Schedule
from export.onnx_export import example_inputs, onnx_from_torch
from export.parity import compare, describe_failure
from export.torch_runtime import TorchRuntime

from tiny import tiny_unet, write_tiny_pipeline


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    graph = DenoiserGraph(
        tiny_unet(), Schedule.from_config({"beta_schedule": "squaredcos_cap_v2"}), "v_prediction"
    )
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    onnx_from_torch(graph, path)
    return graph, path


def test_graph_has_dynamic_batch_and_passes_checker(exported):
    _, path = exported
    model = onnx.load(str(path), load_external_data=False)
    assert [i.name for i in model.graph.input] == ["sample", "timestep", "class_labels"]
    assert [o.name for o in model.graph.output] == ["x0"]
    for value in list(model.graph.input) + list(model.graph.output):
        assert value.type.tensor_type.shape.dim[0].dim_param
    onnx.checker.check_model(str(path))


def test_parity_torch_vs_onnxruntime_with_and_without_optimisations(exported):
    graph, path = exported
    feeds = [example_inputs(graph, b, [999, 749, 499, 249, 0], seed=b) for b in (1, 3, 5)]
    plain = OrtRuntime(path, optimize=False)
    plain.name += ":no-opt"
    report = compare(TorchRuntime(graph), [plain, OrtRuntime(path)], feeds, "fp32")
    assert report["passed"], describe_failure(report)
    stats = report["runtimes"]["onnxruntime:CPUExecutionProvider"]["outputs"]["x0"]
    assert stats["max_abs"] < 1e-4 and stats["p99_abs"] <= stats["max_abs"]


class Perturbed:
    def __init__(self, rt, delta):
        self.rt, self.delta, self.name = rt, delta, "perturbed"

    def infer(self, feeds):
        return {"x0": self.rt.infer(feeds)["x0"] + self.delta}


def test_parity_fails_above_tolerance_and_on_nan(exported):
    graph, path = exported
    ref = OrtRuntime(path)
    feeds = [example_inputs(graph, 2, [500])]
    bad = compare(ref, [Perturbed(ref, 1e-2)], feeds)
    assert not bad["passed"]
    assert "max abs err 0.01" in describe_failure(bad)
    nan = compare(ref, [Perturbed(ref, np.float32("nan"))], feeds)
    assert not nan["passed"] and "NaN/Inf" in describe_failure(nan)
    assert compare(ref, [Perturbed(ref, 1e-6)], feeds)["passed"]


def resolution_target(tmp_path, lo, hi, opt=16):
    path = tmp_path / f"res{lo}-{hi}.toml"
    path.write_text(
        f'name = "res"\ndescription = "t"\ndevice = "cpu"\nbackends = ["ort"]\n'
        f"[shapes]\nbatch = {{ min = 1, opt = 2, max = 8 }}\n"
        f"resolution = {{ min = {lo}, opt = {opt}, max = {hi} }}\n"
    )
    return str(path)


@pytest.mark.parametrize(
    "fused", [False, pytest.param(True, marks=pytest.mark.slow)]
)  # fused: a long export
def test_target_resolution_range_becomes_dynamic_height_and_width(tmp_path, fused):
    from accel.core.plan import SamplerPlan
    from accel.core.target import load_target
    from accel.pipeline import default_store
    from accel.runtime import sample
    from export.tensorrt_compile import onnx_input_dims, profile_shapes

    from tiny import build, write_tiny_pipeline

    store = default_store(tmp_path / "store")
    source = store.source(write_tiny_pipeline(tmp_path / "teacher"))
    target = resolution_target(tmp_path, 8, 32)
    graph = build(store, source, "onnx", target=target, num_inference_steps=2, fused_sampler=fused)
    assert graph.info["resolution_range"] == [8, 32]
    model = onnx.load(str(graph.path / "model.onnx"))
    first = model.graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in (first[0], first[2], first[3]))
    runtime = OrtRuntime(graph.path / "model.onnx")
    plan = SamplerPlan.load(graph.path / "sampler_plan.json")
    for r in (8, 24, 32):  # parity at min and max ran in the stage; 24 is in between
        noise = np.random.default_rng(r).standard_normal((2, 1, r, r)).astype(np.float32)
        images = sample(runtime, plan, noise, np.array([1, 2]), np.random.default_rng(0))
        assert images.shape == (2, 1, r, r) and np.isfinite(images).all()
    shapes = profile_shapes(load_target(target), onnx_input_dims(graph.path / "model.onnx"))
    first_input = model.graph.input[0].name
    assert shapes[first_input]["min"] == [1, 1, 8, 8]
    assert shapes[first_input]["max"] == [8, 1, 32, 32]


def test_a_resolution_range_the_unet_cannot_take_is_refused(tmp_path):
    from accel.core.errors import StageError
    from accel.pipeline import default_store

    from tiny import build, write_tiny_pipeline

    store = default_store(tmp_path / "store")
    source = store.source(write_tiny_pipeline(tmp_path / "teacher"))
    with pytest.raises(StageError, match="needs multiples of 2"):
        build(
            store,
            source,
            "onnx",
            target=resolution_target(tmp_path, 9, 33, 17),
            num_inference_steps=2,
        )


def test_a_teacher_takes_its_stock_pipelines_defaults_before_any_weights_load(
    tmp_path, monkeypatch, capsys
):
    """`accel export onnx TEACHER`: a checkpoint that is not a distilled student samples with its
    stock pipeline's defaults (DDPMPipeline: 1000 steps; StableDiffusionPipeline: 50 steps at
    w 7.5), read from the configs; with a pipeline class that names none, the error names the
    option. Both come before any weights load: here the weights are damaged."""
    import json

    from accel.core.errors import StageError
    from distill.models import stock_defaults
    from export.onnx_export import plan_defaults

    from tiny import run_cli

    teacher = write_tiny_pipeline(tmp_path / "teacher")
    weights = teacher / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated: loading it would fail
    said = []
    assert plan_defaults("onnx", teacher, None, None, said.append) == (1000, None)
    assert "DDPMPipeline's defaults, 1000 steps" in said[0]
    assert plan_defaults("onnx", teacher, 3, None, said.append) == (3, None)  # as given
    index = json.loads((teacher / "model_index.json").read_text())
    (teacher / "model_index.json").write_text(
        json.dumps({**index, "_class_name": "StableDiffusionPipeline"})
    )
    assert stock_defaults(teacher) == ("StableDiffusionPipeline", 50, 7.5)
    (teacher / "model_index.json").write_text(json.dumps({**index, "_class_name": "MyPipeline"}))
    with pytest.raises(StageError, match="--num-inference-steps"):
        plan_defaults("onnx", teacher, None, None, said.append)
    code, _, err = run_cli(monkeypatch, capsys, "export", "onnx", teacher,
                           "--store", tmp_path / "store")  # fmt: skip
    assert code != 0 and "Traceback" not in err
    assert "--num-inference-steps" in err and "safetensors" not in err
