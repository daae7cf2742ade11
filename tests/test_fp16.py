"""The fp16 pass: IO stays float32, weights become fp16, normalisations and the sampler
arithmetic stay fp32, and the graph agrees with its fp32 parent within the fp16 tolerances."""

import numpy as np
import onnx
import pytest

from accel.core.errors import StageError
from accel.core.plan import SamplerPlan
from accel.demo.digits import generate
from accel.pipeline import default_store
from accel.runtime import OrtRuntime

from tiny import build, write_tiny_pipeline

GATE = {"metric": "image_rmse", "threshold": 0.05, "samples": 8}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16")
    store = default_store(root / "store")
    return store, store.source(write_tiny_pipeline(root / "teacher"))


@pytest.mark.parametrize(
    "fused", [False, pytest.param(True, marks=pytest.mark.slow)]
)  # fused: a long export
def test_fp16_keeps_io_norms_and_sampler_math_in_fp32(tiny, fused):
    store, source = tiny
    graph = build(store, source, "onnx", num_inference_steps=2, fused_sampler=fused)
    half = build(store, graph, "fp16", gate=GATE)
    assert half.info["precision"] == "fp16" and half.metrics["parity"]["passed"]
    model = onnx.load(str(half.path / "model.onnx"))
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert model.graph.input[0].type.tensor_type.elem_type == f32
    assert model.graph.output[0].type.tensor_type.elem_type == f32
    counts = half.metrics["initializers"]
    assert counts["fp16"] > counts["fp32"] > 0
    # the graph's last node (x0 = ... or the final step update) computes in fp32, not a Cast
    producer = {o: n for n in model.graph.node for o in n.output}
    assert producer[model.graph.output[0].name].op_type != "Cast"
    norms = [n for n in model.graph.node if n.op_type == "InstanceNormalization"]
    weights = {t.name: t.data_type for t in model.graph.initializer}
    assert norms and all(weights.get(n.input[1], f32) == f32 for n in norms)
    assert {weights[n.input[1]] for n in model.graph.node if n.op_type == "Conv"} == {f16}
    plan = SamplerPlan.load(half.path / "sampler_plan.json")
    a, _ = generate(OrtRuntime(graph.path / "model.onnx"), plan, 4, seed=0, num_classes=10)
    b, _ = generate(OrtRuntime(half.path / "model.onnx"), plan, 4, seed=0, num_classes=10)
    assert np.abs(a - b).max() < 2e-2
    engine = build(store, half, "ort", gate=GATE)
    assert engine.info["precision"] == "fp16"


def test_fp16_refuses_graphs_without_module_scopes(tiny):
    store, source = tiny
    graph = build(store, source, "onnx", num_inference_steps=2)
    slim = build(store, graph, "optimize")
    if any(
        p.key for n in onnx.load(str(slim.path / "model.onnx")).graph.node for p in n.metadata_props
    ):
        pytest.skip("onnxslim kept the scopes")
    with pytest.raises(StageError, match="carries no module scopes"):
        build(store, slim, "fp16", gate=GATE)
