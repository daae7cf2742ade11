"""ONNX export and the onnxruntime engine: dynamic batch, checker, parity across runtimes."""

import numpy as np
import onnx
import pytest

from accel.runtime import OrtRuntime, TorchRuntime
from distill.denoiser import DenoiserGraph
from distill.schedule import Schedule
from export.onnx_export import example_inputs, onnx_from_torch
from export.parity import compare, describe_failure

from tiny import tiny_unet


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
