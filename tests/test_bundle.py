"""Bundles, the torch-free bundle runtime and the Triton model repository, on a tiny model."""

import importlib.util
import json
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from accel.core.errors import CheckpointError, TargetMismatch
from accel.pipeline import default_store
from accel.runtime import Bundle, OrtRuntime, bundle_mismatch, sample
from export.parity import TOLERANCES
from export.torch_runtime import open_model

from tiny import build, run_cli, write_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
GATE = {"metric": "image_rmse", "threshold": 1e-3, "samples": 8}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    store = default_store(root / "store")
    source = store.source(write_tiny_pipeline(root / "teacher"))
    out = {}
    for fused in (False, True):
        graph = build(store, source, "onnx", num_inference_steps=2, guidance_scale=1.5,
                      fused_sampler=fused)  # fmt: skip
        engine = build(store, graph, "ort", gate=GATE)
        out[fused] = build(store, engine, "bundle", name="digits")
    return store, source, out


def test_bundle_manifest_card_and_files(bundles):
    _, _, b = bundles
    info = b[False].info
    assert info["format"] == "accel.deploy.bundle/2" and info["backend"] == "ort"
    assert info["target"]["name"] == "cpu" and info["target"]["fingerprint"]
    assert info["target"]["cpu_flags"] == ["avx2", "fma"]
    assert set(info["libraries"]) >= {"onnxruntime", "numpy"}
    assert [s["name"] for s in info["inputs"]] == ["sample", "timestep", "class_labels"]
    assert info["inputs"][0]["dtype"] == "float32" and info["inputs"][0]["shape"][1:] == [1, 16, 16]
    assert info["outputs"][0]["name"] == "x0"
    assert [p["stage"] for p in info["provenance"]] == ["ort", "onnx", "source"]
    assert info["quality"]["metric"] == "image_rmse" and info["precision"] == "fp32"
    files = set(b[False].files)
    assert {"model.onnx", "sampler_plan.json", "README.md"} <= files
    assert all(len(h) == 64 for h in b[False].files.values())  # sha256 of every file
    card = (b[False].path / "README.md").read_text()
    assert (
        card.startswith("---\nlibrary_name: accel\n") and "from accel.runtime import Bundle" in card
    )
    assert b[True].info["fused"] and [s["name"] for s in b[True].info["outputs"]] == ["images"]


@pytest.mark.parametrize("fused", [False, True])
def test_bundle_samples_match_the_torch_student(bundles, fused):
    _, source, b = bundles
    bundle = Bundle(b[fused].path)
    eager, plan = open_model(source.path, steps=2, guidance=1.5)
    noise = np.random.default_rng(0).standard_normal((5, 1, 16, 16)).astype(np.float32)
    labels = np.arange(5, dtype=np.int64)
    got = bundle.sample(noise, labels, seed=0)
    ref = sample(eager, plan, noise, labels, np.random.default_rng(0))
    tol = TOLERANCES["fp32"]
    assert np.allclose(got, ref, atol=tol["atol"], rtol=tol["rtol"]), np.abs(got - ref).max()


def test_a_tampered_bundle_fails_before_any_engine_opens(bundles, tmp_path, monkeypatch):
    import shutil

    _, _, b = bundles
    copy = tmp_path / "bundle"
    shutil.copytree(b[False].path, copy)
    with open(copy / "model.onnx", "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    opened = []
    monkeypatch.setattr(OrtRuntime, "__init__", lambda self, *a, **k: opened.append(a))
    with pytest.raises(CheckpointError, match=r"integrity check: file model.onnx .* modified"):
        Bundle(copy)
    assert not opened
    monkeypatch.undo()
    Bundle(b[False].path).sample(np.zeros((1, 1, 16, 16), np.float32), np.zeros(1))  # still fine


def test_a_bundle_for_another_cpu_fails_before_any_engine_opens(tmp_path, monkeypatch, capsys):
    text = (ROOT / "profiles" / "cpu.toml").read_text()
    target = tmp_path / "arm.toml"
    target.write_text(
        text.replace('name = "cpu"', 'name = "arm-sve"').replace(
            'cpu_flags = ["avx2", "fma"]', 'cpu_flags = ["sve2"]'
        )
    )
    store = default_store(tmp_path / "store")
    source = store.source(write_tiny_pipeline(tmp_path / "teacher"))
    graph = build(store, source, "onnx", target=str(target), num_inference_steps=2)
    engine = build(store, graph, "ort", target=str(target), gate={"metric": "off"})
    bundle = build(store, engine, "bundle", target=str(target))
    opened = []
    monkeypatch.setattr(OrtRuntime, "__init__", lambda self, *a, **k: opened.append(a))
    with pytest.raises(TargetMismatch, match=r"target arm-sve, whose CPU has sve2; this CPU does"):
        Bundle(bundle.path)
    assert not opened
    code, _, err = run_cli(monkeypatch, capsys, "sample", bundle.path, "-n", 2, "--out",
                           tmp_path / "s.npz")  # fmt: skip
    assert code != 0 and "cannot run here" in err and "Traceback" not in err
    assert not (tmp_path / "s.npz").exists()


def test_library_and_gpu_checks_name_the_fix():
    info = {
        "backend": "ort",
        "target": {"name": "cpu", "device": "cpu", "cpu_flags": []},
        "libraries": {"onnxruntime": "1.32.0"},
    }
    assert bundle_mismatch(info, {"onnxruntime": "1.32.1"}) is None
    assert bundle_mismatch(info, {"onnxruntime": "1.33.0"}) is None
    assert "install onnxruntime>=1.32" in bundle_mismatch(info, {"onnxruntime": "1.19.2"})
    assert "needs onnxruntime" in bundle_mismatch(info, {"onnxruntime": None})
    trt = dict(info, backend="tensorrt", libraries={"tensorrt": "10.13.0"})
    trt["target"] = {"name": "h100-sxm", "device": "cuda", "gpu": "H100 80GB HBM3",
                     "compute_capability": "9.0"}  # fmt: skip
    from accel.core.hardware import gpu_info

    if not gpu_info():
        assert "NVML sees no GPU here" in bundle_mismatch(trt, {"tensorrt": "10.13.0"})


def test_four_threads_share_one_bundle(bundles):
    _, _, b = bundles
    bundle = Bundle(b[False].path)
    rng = np.random.default_rng(1)
    requests = [
        (rng.standard_normal((3, 1, 16, 16)).astype(np.float32), np.arange(3) + i, i)
        for i in range(8)
    ]
    one_by_one = [bundle.sample(n, lab, seed) for n, lab, seed in requests]
    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(lambda r: bundle.sample(*r), requests))
    for a, c in zip(one_by_one, concurrent, strict=True):
        np.testing.assert_array_equal(a, c)


def test_importing_the_runtime_leaves_torch_and_diffusers_out():
    code = (
        "import sys, accel.runtime; "
        "bad = [m for m in ('torch', 'diffusers') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("command", ["sample", "inspect", "deploy"])
def test_bundle_commands_import_no_torch(bundles, tmp_path, command):
    from test_import_rules import heavy_modules_of_command

    path = bundles[2][True].path
    args = {
        "sample": ("sample", path, "-n", 3, "--out", tmp_path / "s.png"),
        "inspect": ("inspect", path),
        "deploy": ("deploy", "triton", path, "--out", tmp_path / "repo"),
    }[command]
    code, heavy, err = heavy_modules_of_command(*args)
    assert code == 0, err
    assert heavy == [], f"accel {command} BUNDLE imports {heavy}"


def test_accel_sample_runs_a_bundle(bundles, tmp_path, monkeypatch, capsys):
    _, _, b = bundles
    code, out, err = run_cli(monkeypatch, capsys, "sample", b[True].path, "-n", 6, "--out",
                             tmp_path / "s.npz")  # fmt: skip
    assert code == 0, err
    assert np.load(tmp_path / "s.npz")["images"].shape == (6, 1, 16, 16)


# ---------------------------------------------------------------- Triton


def model_config_pb2():
    """Triton's model-config protobuf schema, as tritonclient ships it (Makefile installs it in
    .venv/tritonclient, apart from site-packages: its grpc extra pins an older protobuf)."""
    spec = importlib.util.find_spec("tritonclient")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    roots.append(Path(sys.prefix) / "tritonclient" / "tritonclient")
    for root in roots:
        path = root / "grpc" / "model_config_pb2.py"
        if path.is_file():
            module_spec = importlib.util.spec_from_file_location("triton_model_config", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            return module
    pytest.fail("tritonclient's model_config_pb2.py is missing: run `make venv`")


def parse(path: Path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_pb2().ModelConfig())


def test_triton_repository_configs_parse_with_tritons_schema(
    bundles, tmp_path, monkeypatch, capsys
):
    _, _, b = bundles
    repo = tmp_path / "repo"
    code, out, err = run_cli(monkeypatch, capsys, "deploy", "triton", b[False].path, "--out", repo,
                             "--instances", 2)  # fmt: skip
    assert code == 0, err
    bls, engine = (
        parse(repo / "digits" / "config.pbtxt"),
        parse(repo / "digits_denoiser" / "config.pbtxt"),
    )
    assert engine.backend == "onnxruntime" and engine.max_batch_size == 128  # 64, doubled by CFG
    assert list(engine.dynamic_batching.preferred_batch_size) == [8]
    assert engine.instance_group[0].count == 2 and engine.instance_group[0].kind == 2  # KIND_CPU
    assert [i.name for i in engine.input] == ["sample", "timestep", "class_labels"]
    assert list(engine.input[1].reshape.shape) == [] and list(engine.input[0].dims) == [1, 16, 16]
    assert (
        bls.backend == "python"
        and bls.parameters["denoiser_model"].string_value == "digits_denoiser"
    )
    assert (repo / "digits" / "1" / "model.py").is_file()
    assert (repo / "digits_denoiser" / "1" / "model.onnx").is_file()
    fused = tmp_path / "fused"
    run_cli(monkeypatch, capsys, "deploy", "triton", b[True].path, "--out", fused)
    (cfg,) = [parse(p) for p in fused.glob("*/config.pbtxt")]
    assert [o.name for o in cfg.output] == ["images"] and cfg.max_batch_size == 64


def test_tensorrt_bundle_config_names_the_plan_per_compute_capability(bundles, tmp_path):
    from accel.deploy.triton import _engine_config

    info = dict(bundles[2][False].info, backend="tensorrt")
    info["target"] = dict(info["target"], device="cuda", compute_capability="9.0")
    path = tmp_path / "config.pbtxt"
    path.write_text(_engine_config("digits_denoiser", info, 2, 1, 100))
    cfg = parse(path)
    assert cfg.platform == "tensorrt_plan" and dict(cfg.cc_model_filenames) == {"9.0": "model.plan"}
    assert cfg.instance_group[0].kind == 1  # KIND_GPU


class FakeTensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


def fake_pb_utils(repo: Path):
    """A stand-in for Triton's triton_python_backend_utils: BLS calls run the repository's own
    denoiser graph in onnxruntime, after checking each input against the model's config.pbtxt
    the way Triton does (batch axis, then dims; then the config's reshape)."""
    session = {}

    class InferenceRequest:
        def __init__(self, model_name, requested_output_names, inputs, preferred_memory=None):
            self.model_name, self.outputs, self.inputs = model_name, requested_output_names, inputs
            assert preferred_memory == ("cpu", 0)  # as_numpy() needs the output in host memory

        def exec(self):
            if self.model_name not in session:
                config = parse(repo / self.model_name / "config.pbtxt")
                file = config.default_model_filename or "model.onnx"
                ort = OrtRuntime(repo / self.model_name / "1" / file)
                session[self.model_name] = (config, ort)
            config, ort = session[self.model_name]
            feeds = {}
            for t in self.inputs:
                spec = next(i for i in config.input if i.name == t.name())
                array = t.as_numpy()
                assert list(array.shape[1:]) == list(spec.dims), (t.name(), array.shape)
                assert len(array) <= config.max_batch_size
                if spec.HasField("reshape"):
                    array = array.reshape(len(array), *spec.reshape.shape)
                feeds[t.name()] = array
            out = ort.infer(feeds)
            return types.SimpleNamespace(
                has_error=lambda: False, tensors=[FakeTensor(k, out[k]) for k in self.outputs]
            )

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error = output_tensors, error

    def by_name(holder, name):
        tensors = holder.inputs if hasattr(holder, "inputs") else holder.tensors
        return next((t for t in tensors if t.name() == name), None)

    return types.SimpleNamespace(
        PreferredMemory=lambda kind, device: (kind, device),
        TRITONSERVER_MEMORY_CPU="cpu",
        Tensor=FakeTensor,
        InferenceRequest=InferenceRequest,
        InferenceResponse=InferenceResponse,
        TritonError=str,
        TritonModelException=RuntimeError,
        get_input_tensor_by_name=by_name,
        get_output_tensor_by_name=by_name,
    )


def test_python_backend_loop_matches_the_runtime_loop(bundles, tmp_path, monkeypatch):
    from accel.deploy.triton import triton_repository

    _, _, b = bundles
    repo = tmp_path / "repo"
    repo.mkdir()
    triton_repository(b[False].path, repo)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils(repo))
    spec = importlib.util.spec_from_file_location("bls_model", repo / "digits" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    from google.protobuf import json_format

    # what Triton passes: the generated config as JSON, the model's folder and version
    config = json_format.MessageToJson(
        parse(repo / "digits" / "config.pbtxt"), preserving_proto_field_name=True
    )
    model.initialize({"model_repository": str(repo / "digits"), "model_version": "1",
                      "model_config": config})  # fmt: skip
    model.denoiser.max_batch = 4  # so that the 4-image request below also runs in chunks
    rng = np.random.default_rng(3)
    requests = [
        types.SimpleNamespace(
            inputs=[
                FakeTensor("noise", rng.standard_normal((n, 1, 16, 16)).astype(np.float32)),
                FakeTensor("class_labels", np.arange(n, dtype=np.int64)),
            ]
        )  # fmt: skip
        for n in (1, 6)
    ]
    responses = model.execute(requests)
    bundle = Bundle(b[False].path)
    for request, response in zip(requests, responses, strict=True):
        assert response.error is None
        noise, labels = (t.as_numpy() for t in request.inputs)
        np.testing.assert_allclose(response.output_tensors[0].as_numpy(),
                                   bundle.sample(noise, labels, seed=0), atol=1e-6)  # fmt: skip
    bad = model.execute([types.SimpleNamespace(inputs=[FakeTensor("noise", np.zeros((1, 2, 3)))])])
    assert bad[0].error  # a malformed request gets an error response, not a crash


def test_the_embedding_example_writes_images(bundles, tmp_path):
    _, _, b = bundles
    out = tmp_path / "images.npz"
    subprocess.run(
        [sys.executable, str(ROOT / "examples" / "serve_bundle.py"), str(b[False].path),
         "-n", "4", "--out", str(out)],
        check=True, capture_output=True,
    )  # fmt: skip
    assert np.load(out)["images"].shape == (4, 1, 16, 16)


def test_tensorrt_bundles_need_cuda_python_not_torch():
    import importlib.util

    from accel.runtime import cudart

    if importlib.util.find_spec("cuda") is None:
        with pytest.raises(CheckpointError, match="pip install cuda-python"):
            cudart.cudart()
    code = (
        "import sys, accel.runtime.tensorrt; "
        "assert 'torch' not in sys.modules, 'the TensorRT runtime path imports torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_deploy_never_replaces_a_foreign_directory(bundles, tmp_path, monkeypatch, capsys):
    _, _, b = bundles
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "other_model").mkdir()
    code, _, err = run_cli(monkeypatch, capsys, "deploy", "triton", b[True].path, "--out", mine)
    assert code != 0 and "did not write" in err and (mine / "other_model").is_dir()
    code, _, err = run_cli(monkeypatch, capsys, "deploy", "triton", b[True].path, "--out",
                           b[True].path.parent)  # fmt: skip
    assert code != 0 and "cannot hold the bundle" in err
    repo = tmp_path / "repo"
    for _ in range(2):  # a repository it wrote is replaced
        code, _, err = run_cli(monkeypatch, capsys, "deploy", "triton", b[True].path, "--out", repo)
        assert code == 0, err


def test_bundle_refuses_an_engine_of_another_target(bundles):
    from accel.core.errors import StageError

    store, _, b = bundles
    engine = store.get(b[False].parent)
    with pytest.raises(StageError, match="was built for target 'cpu'.*pass --target cpu"):
        build(store, engine, "bundle", target="cpu-avx512")


def test_unlisted_or_unhashed_files_fail_the_integrity_check(bundles, tmp_path):
    import shutil

    _, _, b = bundles
    copy = tmp_path / "bundle"
    shutil.copytree(b[False].path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["files"]["model.onnx"]  # an engine whose hash was dropped is not trusted
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"files without a sha256 .*model.onnx"):
        Bundle(copy)


def test_gpu_checks_with_a_stand_in_nvml(monkeypatch):
    import accel.runtime.bundle as hw

    info = {
        "backend": "tensorrt",
        "target": {"name": "a100-80gb", "device": "cuda", "gpu": "A100-SXM4-80GB",
                   "compute_capability": "8.0", "hardware_compatibility": "none"},
        "libraries": {"tensorrt": "10.13.0"},
    }  # fmt: skip
    have = {"tensorrt": "10.13.0"}
    monkeypatch.setattr(hw.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(hw, "jetson_model", lambda: None)

    def machine(cc):
        monkeypatch.setattr(
            hw, "gpu_info", lambda: [{"name": "NVIDIA X", "compute_capability": cc}]
        )

    machine("8.0")
    assert bundle_mismatch(info, have) is None
    machine("8.9")
    assert "built for compute capability 8.0" in bundle_mismatch(info, have)
    machine(None)  # NVML could not read it: the engine's runtime will tell
    assert bundle_mismatch(info, have) is None
    machine("8.9")
    ampere_plus = dict(info, target=dict(info["target"], hardware_compatibility="ampere_plus"))
    assert bundle_mismatch(ampere_plus, have) is None
    machine("7.5")
    assert bundle_mismatch(ampere_plus, have) is not None
    machine("8.0")
    assert "tensorrt==10.13.0" in bundle_mismatch(info, {"tensorrt": "10.14.0"})
    versioned = dict(info, target=dict(info["target"], version_compatible=True))
    assert bundle_mismatch(versioned, {"tensorrt": "10.14.0"}) is None
    assert bundle_mismatch(versioned, {"tensorrt": "11.0.0"}) is not None  # another major
    monkeypatch.setattr(hw, "gpu_info", lambda: None)
    assert "NVML sees no GPU" in bundle_mismatch(info, have)


@pytest.mark.slow
def test_aotinductor_bundle_runs(bundles):
    store, source, _ = bundles
    engine = build(store, source, "aoti", num_inference_steps=2, guidance_scale=1.5,
                   gate={"metric": "off"})  # fmt: skip
    bundle = Bundle(build(store, engine, "bundle").path)
    assert [s["name"] for s in bundle.info["inputs"]] == ["sample", "timestep", "class_labels"]
    noise = np.random.default_rng(0).standard_normal((3, 1, 16, 16)).astype(np.float32)
    eager, plan = open_model(source.path, steps=2, guidance=1.5)
    ref = sample(eager, plan, noise, np.arange(3), np.random.default_rng(0))
    got = bundle.sample(noise, np.arange(3))
    assert np.allclose(got, ref, atol=1e-4, rtol=1e-4), np.abs(got - ref).max()
