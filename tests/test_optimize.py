"""The onnxslim clean-up pass: fewer nodes, the same outputs with onnxruntime's optimisers off,
for the step graph and the fused sampler, and the batch axis still dynamic."""

import numpy as np
import onnx
import pytest

from accel.core.plan import SamplerPlan
from accel.demo.digits import generate
from accel.pipeline import default_store
from accel.runtime import OrtRuntime

from tiny import build, write_tiny_pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("optimize")
    store = default_store(root / "store")
    return store, store.source(write_tiny_pipeline(root / "teacher"))


@pytest.mark.parametrize(
    "fused", [False, pytest.param(True, marks=pytest.mark.slow)]
)  # fused: a long export
def test_slimmed_graph_is_smaller_and_samples_the_same(tiny, fused):
    store, source = tiny
    graph = build(store, source, "onnx", num_inference_steps=2, fused_sampler=fused)
    slim = build(store, graph, "optimize")
    assert slim.metrics["nodes_after"] < slim.metrics["nodes_before"]
    assert slim.metrics["parity"]["passed"]
    model = onnx.load(str(slim.path / "model.onnx"))
    assert all(i.type.tensor_type.shape.dim[0].dim_param for i in model.graph.input)
    plan = SamplerPlan.load(slim.path / "sampler_plan.json")
    a, _ = generate(OrtRuntime(graph.path / "model.onnx"), plan, 5, seed=1, num_classes=10)
    b, _ = generate(OrtRuntime(slim.path / "model.onnx"), plan, 5, seed=1, num_classes=10)
    np.testing.assert_allclose(b, a, atol=1e-5)
