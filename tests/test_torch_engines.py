"""Compiled torch and CUDA-graph engines (export.torch_engines, export.torch_compile): shape
buckets, padding and chunking, the store's compile cache, refusals on the CPU; the stage end to end
on a tiny student (slow); CUDA-graph replay against eager under `gpu`."""

import numpy as np
import pytest
import torch
from torch import nn

from accel.core.errors import CheckpointError, StageError
from export.torch_engines import (
    BucketedEngine,
    CompiledEngine,
    CudaGraphEngine,
    ShapeBuckets,
    cache_counters,
    compile_cache_dir,
)

from tiny import build, write_tiny_pipeline


class RowWise(nn.Module):
    """Each output row depends on its own input row only (like a sampler), plus a label."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 6)
        self.emb = nn.Embedding(10, 6)

    def forward(self, noise, class_labels):
        return torch.tanh(self.lin(noise) + self.emb(class_labels))


def feeds(n, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "noise": rng.standard_normal((n, 6)).astype(np.float32),
        "class_labels": (np.arange(n) % 10).astype(np.int64),
    }


def eager(module, f):
    with torch.no_grad():
        return module(**{k: torch.from_numpy(v) for k, v in f.items()}).numpy()


def test_buckets_are_powers_of_two_with_the_profiles_min_opt_max():
    b = ShapeBuckets(1, 4, 64)
    assert b.sizes == [1, 2, 4, 8, 16, 32, 64]
    assert [b.bucket(n) for n in (1, 3, 5, 33, 64)] == [1, 4, 8, 64, 64]
    odd = ShapeBuckets(3, 5, 20)
    assert odd.sizes == [3, 4, 5, 8, 16, 20] and odd.bucket(17) == 20
    for n in (0, 65):
        with pytest.raises(CheckpointError, match=f"batch {n} is outside the shape profile"):
            b.bucket(n)
    with pytest.raises(CheckpointError, match="min 4 <= opt 2"):
        ShapeBuckets(4, 2, 8)


def test_bucketed_engine_pads_slices_and_chunks_to_the_same_rows_as_unpadded():
    module = RowWise().eval()
    engine = BucketedEngine(module, ["noise", "class_labels"], ShapeBuckets(1, 4, 16), output="y")
    for n in (1, 3, 5, 7, 16, 40):  # 40: chunks of 16, 16 and 8
        f = feeds(n, seed=n)
        np.testing.assert_allclose(engine.infer(f)["y"], eager(module, f), rtol=0, atol=1e-6)
    assert engine.built == [1, 4, 8, 16]  # 5 and 7 share bucket 8; 3 runs at 4


def test_engines_refuse_bad_feeds_and_cuda_graphs_without_a_gpu():
    module = RowWise().eval()
    engine = BucketedEngine(
        module, ["noise", "class_labels"], ShapeBuckets(1, 4, 16), shapes={"noise": (6,)}
    )
    with pytest.raises(CheckpointError, match="missing input 'class_labels'"):
        engine.infer({"noise": feeds(2)["noise"]})
    with pytest.raises(CheckpointError, match="different batch sizes"):
        engine.infer({"noise": feeds(2)["noise"], "class_labels": feeds(3)["class_labels"]})
    with pytest.raises(
        CheckpointError, match=r"rows of shape \[7\]; this engine was built for \[6\]"
    ):
        engine.infer(
            {"noise": np.zeros((2, 7), np.float32), "class_labels": feeds(2)["class_labels"]}
        )
    with pytest.raises(CheckpointError, match="batch 0 is outside"):
        engine.infer(feeds(0))
    with pytest.raises(CheckpointError, match="quantized engines are ONNX or TensorRT"):
        BucketedEngine(module, ["noise"], ShapeBuckets(1, 1, 1), precision="int8")
    if not torch.cuda.is_available():
        with pytest.raises(CheckpointError, match="CUDA-graph engine captures CUDA kernels"):
            CudaGraphEngine(module, ["noise", "class_labels"], ShapeBuckets(1, 1, 4))


def test_compiled_engine_matches_eager_and_a_second_build_hits_the_stores_cache(tmp_path):
    module = RowWise().eval()
    cache = compile_cache_dir(tmp_path / "store", "f" * 16)
    assert cache.name == f"{'f' * 16}-torch{torch.__version__}"
    names = ["noise", "class_labels"]
    results = []
    for _ in range(2):  # the second engine starts from nothing but the cache folder
        torch._dynamo.reset()
        before = cache_counters()
        engine = CompiledEngine(module, names, ShapeBuckets(1, 2, 4), cache=cache)
        out = engine.infer(feeds(3))["images"]
        np.testing.assert_allclose(out, eager(module, feeds(3)), rtol=1e-5, atol=1e-5)
        after = cache_counters()
        results.append({k: after[k] - before[k] for k in after})
    assert results[0]["misses"] >= 1 and results[0]["hits"] == 0
    assert results[1]["hits"] >= 1 and results[1]["misses"] == 0
    assert any(cache.rglob("*")), "the cache lives in the store's folder"


@pytest.mark.slow
def test_torch_compile_stage_builds_a_gated_engine_that_reopens_from_the_cache(tmp_path):
    from accel.pipeline import default_store
    from accel.runtime import open_engine
    from accel.runtime.loop import fused_feeds
    from export.torch_compile import TorchEngineRuntime
    from export.torch_runtime import open_model

    store = default_store(tmp_path / "store")
    source = store.source(write_tiny_pipeline(tmp_path / "teacher"))
    gate = {"metric": "image_rmse", "threshold": 1e-4, "samples": 70}
    engine = build(store, source, "torch_compile", num_inference_steps=2, gate=gate)
    info = engine.info
    assert info["backend"] == "torch_compile" and info["batch_range"] == [1, 64]
    assert info["options"]["cuda_graph"] is False  # a CPU target
    assert engine.metrics["parity"]["passed"]  # against the same sampler uncompiled
    assert engine.metrics["compile_cache"]["misses"] >= 1
    assert engine.metrics["quality_gate"]["value"] < 1e-4
    runtime, plan = open_engine(engine.path)
    assert isinstance(runtime, TorchEngineRuntime) and plan.fused
    eager_rt, eager_plan = open_model(source.path, 2)
    from accel.runtime import sample

    rng = np.random.default_rng(0)
    noise = rng.standard_normal((5, *plan.sample_shape)).astype(np.float32)
    labels = np.arange(5) % 10
    ref = sample(eager_rt, eager_plan, noise, labels, np.random.default_rng(1))
    got = runtime.infer(fused_feeds(plan, noise, labels, np.random.default_rng(1)))["images"]
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # the same build with another gate is another artifact, compiled from the store's cache
    again = build(
        store, source, "torch_compile", num_inference_steps=2, gate={**gate, "seeds": [1]}
    )
    assert again.metrics["compile_cache"]["hits"] >= 1
    assert again.metrics["compile_cache"]["misses"] == 0
    with pytest.raises(StageError, match="runs inside accel's torch process"):
        build(store, engine, "bundle")
    if not torch.cuda.is_available():
        gpu = tmp_path / "gpu.toml"
        gpu.write_text(
            'name = "gpu"\ndescription = "t"\ndevice = "cuda"\ngpu = "GPU"\n'
            'compute_capability = "9.0"\nbackends = ["torch_compile"]\n'
            "[shapes]\nbatch = { min = 1, opt = 4, max = 32 }\n"
            "resolution = { min = 16, opt = 16, max = 16 }\n"
        )
        with pytest.raises(StageError, match="CUDA target but torch sees no GPU"):
            build(store, source, "torch_compile", target=str(gpu), num_inference_steps=2)


@pytest.mark.gpu
def test_cuda_graph_engine_replays_what_eager_computes():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    module = RowWise().eval()
    ref = {n: eager(module, feeds(n, n)) for n in (1, 3, 8)}
    graphs = CudaGraphEngine(module, ["noise", "class_labels"], ShapeBuckets(1, 4, 8))
    compiled = CudaGraphEngine(
        CompiledEngine(module, ["noise", "class_labels"], ShapeBuckets(1, 4, 8), "cuda"),
        ["noise", "class_labels"],
        ShapeBuckets(1, 4, 8),
    )
    for engine in (graphs, compiled):
        for n in (1, 3, 8, 3):  # the last replays bucket 4's graph with new inputs
            got = engine.infer(feeds(n, n))["images"]
            np.testing.assert_allclose(got, ref[n], rtol=1e-4, atol=1e-5)
        assert engine.built == [1, 4, 8]


@pytest.mark.slow
def test_the_gpu_check_script_runs_its_sections_on_tiny_configs(tmp_path):
    """benchmarks/gpu_check.py's dry run on the CPU (the GPU run gets no second try): tiny
    SDXL / SD3 components and the compiled SD1.5-size pipeline produce the JSON and the table."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    skip = ["pytest_gpu", "digits", "sd15_unet", "sd_vae", "training"]
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--tiny", "--device", "cpu", "--rounds", "2",
         "--out", str(tmp_path), "--skip", *skip],
        cwd=root, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    checks = report["checks"]
    assert set(checks) == {"sdxl_unet", "sd3_medium", "sd15_pipeline"}
    assert all("error" not in c for c in checks.values()), checks
    assert checks["sd15_pipeline"]["sum_of_components_ms"] > 0
    assert "| sdxl_unet | eager |" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.parametrize(
    "family", ["sd15", "sdxl", "sd3", "flux", "pixart_sigma", "sana", "sd15-lcm"]
)
def test_the_fused_pipeline_sampler_draws_what_the_per_step_loop_draws(
    family, tmp_path, monkeypatch, capsys
):
    """Steps, guidance (the null conditioning broadcast, or w embedded in an LCM student with
    its fresh noise per step) and the VAE decode in one module, text encoding outside: the same
    images as run_pipeline on the eager runtime, per family."""
    from accel.runtime import run_pipeline
    from accel.runtime.loop import fused_feeds
    from export.fused_sampler import FusedPipelineSampler
    from export.torch_runtime import open_model

    import families
    from tiny import run_cli

    path = families.write_pipeline(family.removesuffix("-lcm"), tmp_path / family)
    steps, guidance = 2, 2.0
    if family.endswith("-lcm"):
        (tmp_path / "p.txt").write_text("a red circle\na blue square\n")
        code, _, err = run_cli(
            monkeypatch, capsys, "distill", "consistency", path, "--solver-steps", 10,
            "--num-inference-steps", 2, "--iterations", 2, "--batch-size", 2,
            "--guidance-scale", 2.0, "--dataset", f"prompts:{tmp_path / 'p.txt'}",
            "--out", tmp_path / "student", "--store", tmp_path / "store",
        )  # fmt: skip
        assert code == 0, err
        path, steps, guidance = tmp_path / "student", None, None
    runtime, plan = open_model(path, steps=steps, guidance=guidance, resolution=(32, 32))
    assert family != "sd15-lcm" or any(s.c for s in plan.steps)
    prompts = ["a red circle", "a blue square on a long table"]
    noise = np.random.default_rng(0).standard_normal((2, *plan.sample_shape)).astype(np.float32)
    ref = run_pipeline(runtime, plan, noise, prompts, rng=np.random.default_rng(1))
    null = runtime.null_conditioning()
    fused = FusedPipelineSampler(
        runtime.graph,
        plan,
        None if null is None else {k: torch.from_numpy(v) for k, v in null.items()},
    )
    feeds = fused_feeds(plan, noise, runtime.encode(prompts), np.random.default_rng(1))
    assert set(feeds) == set(fused.input_names())
    with torch.no_grad():
        out = fused(**{k: torch.from_numpy(v) for k, v in feeds.items()}).numpy()
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_a_pipelines_torch_engine_draws_what_accel_sample_draws(tmp_path, monkeypatch, capsys):
    """The tiny SD1.5 pipeline through the torch_compile stage: steps, guidance and VAE decode
    compiled as one module, prompts encoded outside (cached); `accel sample` on the engine draws
    the eager model's images from the same seed."""
    from accel.pipeline import default_store
    from accel.runtime import open_engine

    import families
    from tiny import run_cli

    store = default_store(tmp_path / "store")
    source = store.source(families.write_pipeline("sd15", tmp_path / "sd15"))
    gate = {"metric": "image_rmse", "threshold": 1e-4, "samples": 4}
    engine = build(store, source, "torch_compile", num_inference_steps=2, guidance_scale=2.0,
                   gate=gate)  # fmt: skip
    assert engine.metrics["quality_gate"]["value"] < 1e-4
    runtime, plan = open_engine(engine.path)
    assert plan.fused and plan.decode and plan.conditioning_kind == "text"
    first = runtime.encode(["a red circle", "a blue square"])
    assert set(runtime._prompts) == {"a red circle", "a blue square"}
    again = runtime.encode(["a blue square", "a red circle"])  # from the cache, reordered
    for k in first:
        np.testing.assert_array_equal(again[k][::-1], first[k])

    def sample(model, out, *extra):
        args = ["--prompt", "a red circle", "--prompt", "a blue square"]
        code, _, err = run_cli(monkeypatch, capsys, "sample", model, *args, "--seed", 3,
                               "--out", out, *extra)  # fmt: skip
        assert code == 0, err
        return np.load(out)["images"]

    eager = sample(source.path, tmp_path / "e.npz", "--steps", 2, "--guidance", 2.0)
    compiled = sample(engine.path, tmp_path / "c.npz")
    np.testing.assert_allclose(compiled, eager, atol=1e-4)
