"""Text-to-image pipelines (tiny SD1.5 and SDXL, tests/families.py) through export, compile and
bundle: one graph and one engine per component (text encoder, denoiser, VAE decoder), the
tokenizers as ``tokenizer.json`` files, and a bundle whose torch-free runtime draws what the torch
student draws from the same prompt and latents."""

import json
import subprocess
import sys

import numpy as np
import pytest

from accel.core.plan import SamplerPlan
from export.pipeline_export import EXPORTERS

import families
from tiny import run_cli

# Measured: at most 3e-6 between the onnxruntime pipeline and torch over 2 steps and the decode
# (images in [0, 1]); 1e-4 is the fp32 parity tolerance.
TOLERANCE = 1e-4
PROMPTS = ["a red circle", "a blue square on a long table in a quiet room"]


TEXT = {  # tokenizer inputs and text-encoder outputs per family
    "sd": (["input_ids"], ["encoder_hidden_states"]),
    "sdxl": (["input_ids", "input_ids_2"], ["encoder_hidden_states", "text_embeds"]),
    "sd3": (["input_ids", "input_ids_2"], ["encoder_hidden_states", "pooled_projections"]),
    "flux": (["input_ids", "input_ids_2"], ["encoder_hidden_states", "pooled_projections"]),
    "pixart": (["input_ids"], ["encoder_hidden_states", "encoder_attention_mask"]),
    "sana": (["input_ids"], ["encoder_hidden_states", "encoder_attention_mask"]),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Per family: the model exported (2 steps, guidance 2 for the SDXL teacher; an LCM student
    of the SD teacher, w embedded), compiled for the CPU target and bundled."""
    root = tmp_path_factory.mktemp("text_pipeline")
    store = root / "store"
    mp = pytest.MonkeyPatch()

    class Streams:  # run_cli reads captured streams; a module fixture has no capsys
        def readouterr(self):
            return type("Captured", (), {"out": "", "err": ""})()

    def accel(*args):
        code, _, err = run_cli(mp, Streams(), *args, "--store", store)
        assert code == 0, err

    out = {}
    for family in TEXT:
        name = {"sd": "sd15", "pixart": "pixart_sigma"}.get(family, family)
        teacher = families.write_pipeline(name, root / family)
        model, options = teacher, ["--num-inference-steps", 2, "--guidance-scale", 2.0]
        if family == "sd":  # an LCM student: w embedded (timestep_cond), one pass per step
            (root / "p.txt").write_text("a red circle\na blue square\n")
            model, options = root / "sd-student", []
            accel("distill", "consistency", teacher, "--solver-steps", 10,
                  "--num-inference-steps", 2, "--iterations", 2, "--batch-size", 2,
                  "--guidance-scale", 2.0, "--dataset", f"prompts:{root / 'p.txt'}",
                  "--out", model)  # fmt: skip
        paths = {k: root / f"{family}-{k}" for k in ("onnx", "engine", "bundle")}
        if family == "flux":  # FluxPipeline draws 256 px here by default
            options += ["--resolution", "[32, 32]"]
        accel("export", "onnx", model, *options, "--out", paths["onnx"])
        accel("compile", paths["onnx"], "--gate", "{ samples = 4, seeds = [0] }",
              "--out", paths["engine"])  # fmt: skip
        accel("bundle", paths["engine"], "--out", paths["bundle"])
        out[family] = {"model": model, **paths}
    mp.undo()
    return out


def _sample(monkeypatch, capsys, model, out, *extra):
    args = [a for p in PROMPTS for a in ("--prompt", p)]
    code, _, err = run_cli(monkeypatch, capsys, "sample", model, *args, "--seed", 3,
                           "--out", out, *extra)  # fmt: skip
    assert code == 0, err
    return np.load(out)


@pytest.mark.parametrize("family", list(TEXT))
def test_each_component_is_a_graph_and_an_engine(family, built):
    plan = SamplerPlan.load(built[family]["bundle"] / "sampler_plan.json")
    assert plan.components == {
        "text_encoder": "text_encoder.onnx",
        "vae_decoder": "vae_decoder.onnx",
    }
    inputs = [t["input"] for t in plan.tokenizers]
    assert (inputs, plan.text_outputs) == TEXT[family]
    manifest = json.loads((built[family]["onnx"] / "manifest.json").read_text())
    components = manifest["metrics"]["components"]
    assert set(components) == {"text_encoder", "denoiser", "vae_decoder"}
    for report in components.values():  # torch vs onnxruntime, optimisations off and on
        assert report["parity"]["passed"] and report["exporter"] in EXPORTERS
        if report["exporter"] != "dynamo":  # the fallback says why dynamo failed
            assert report["failed_exporters"]["dynamo"]
    bundle = json.loads((built[family]["bundle"] / "manifest.json").read_text())
    io = bundle["info"]["components"]
    assert [i["name"] for i in io["text_encoder"]["inputs"]] == inputs
    assert io["vae_decoder"]["inputs"][0]["shape"][0] == "batch"
    # SDXL's micro-conditions and an LCM student's w embedding are stored, not recomputed
    from safetensors.numpy import load_file

    stored = load_file(str(built[family]["bundle"] / "conditioning.safetensors"))
    if family == "sdxl":
        assert stored["static.time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]]
        assert not stored["null.encoder_hidden_states"].any()  # force_zeros_for_empty_prompt
    elif family == "flux":  # shared position ids (no batch axis) and FLUX.1-dev's w, stored
        assert plan.timestep_dtype == "float32" and not plan.is_batched("img_ids")
        assert stored["static.img_ids"].shape == (64, 3)  # the 8 x 8 packed grid of 32 px
        assert stored["static.txt_ids"].shape == (512, 3)
        assert stored["static.guidance"].tolist() == [2.0]
        assert not any(k.startswith("null.") for k in stored)  # w embedded: one pass
        # the dynamic shift resolved for 64 image tokens, as FluxPipeline computes it
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = _scheduler_config(built[family]["model"])
        mu = calculate_shift(64, cfg["base_image_seq_len"], cfg["max_image_seq_len"],
                             cfg["base_shift"], cfg["max_shift"])  # fmt: skip
        assert plan.flow_shift == {"mu": pytest.approx(mu)}
        _assert_stock_timesteps(built[family]["model"], plan)
    elif family in ("pixart", "sana"):  # the empty prompt's states and mask; no static inputs
        assert set(stored) == {"null.encoder_hidden_states", "null.encoder_attention_mask"}
        assert stored["null.encoder_attention_mask"].sum() == 1  # EOS only
    elif family == "sd3":  # a flow model: float timesteps; the empty prompt's null branch
        assert plan.timestep_dtype == "float32" and plan.sampler == "flow_euler"
        assert set(stored) == {"null.encoder_hidden_states", "null.pooled_projections"}
        assert plan.flow_shift == {"shift": _scheduler_config(built[family]["model"])["shift"]}
        _assert_stock_timesteps(built[family]["model"], plan)
    else:
        assert stored["static.timestep_cond"].shape == (1, 256)
        assert not any(k.startswith("null.") for k in stored)  # w embedded: no unconditional pass


def _scheduler_config(model) -> dict:
    return json.loads((model / "scheduler" / "scheduler_config.json").read_text())


def _assert_stock_timesteps(model, plan) -> None:
    """The plan's timesteps are the stock scheduler's for the shift it records."""
    import diffusers

    cfg = _scheduler_config(model)
    sched = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
    n = len(plan.steps)
    if "mu" in plan.flow_shift:  # FluxPipeline's sigmas, shifted by mu
        sched.set_timesteps(n, sigmas=np.linspace(1.0, 1 / n, n), mu=plan.flow_shift["mu"])
    else:
        sched = sched.from_config(cfg, shift=plan.flow_shift["shift"])
        sched.set_timesteps(n)
    want = (sched.sigmas[:-1].double() * cfg["num_train_timesteps"]).tolist()
    assert [s.timestep for s in plan.steps] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("family", list(TEXT))
def test_bundle_draws_what_the_torch_model_draws(family, built, tmp_path, monkeypatch, capsys):
    extra = [] if family == "sd" else ["--steps", 2, "--guidance", 2.0]
    if family == "flux":  # the size its graphs were exported for
        extra += ["--height", 32, "--width", 32]
    ref = _sample(monkeypatch, capsys, built[family]["model"], tmp_path / "t.npz", *extra)
    for kind in ("engine", "bundle"):
        got = _sample(monkeypatch, capsys, built[family][kind], tmp_path / f"{kind}.npz")
        assert np.array_equal(got["latents"], ref["latents"])
        assert got["images"].shape == ref["images"].shape == (2, 3, 32, 32)
        assert np.abs(got["images"] - ref["images"]).max() <= TOLERANCE


def test_the_bundle_runs_without_torch(built):
    """prompt -> tokens -> text engine -> denoiser loop -> VAE engine, in a fresh interpreter that
    never imports torch (nor transformers, diffusers)."""
    code = f"""
import sys, numpy as np
from accel.runtime import Bundle
b = Bundle({str(built["sdxl"]["bundle"])!r})
noise = np.random.default_rng(0).standard_normal((1, *b.plan.sample_shape)).astype(np.float32)
noise = np.repeat(noise, 2, axis=0)
images = b.sample(noise, prompts=["a red circle", "a red circle"])
assert images.shape == (2, 3, 32, 32) and np.isfinite(images).all()
assert np.abs(images[0] - images[1]).max() == 0  # one prompt, one noise: one image
heavy = sorted(m for m in ("torch", "transformers", "diffusers") if m in sys.modules)
print("heavy:", heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "heavy: []" in out.stdout


def test_text_encodings_are_cached_per_prompt(built):
    from accel.runtime import Bundle

    bundle = Bundle(built["sd"]["bundle"])
    runtime = bundle.runtime
    calls = []
    infer = runtime.text.infer
    runtime.text.infer = lambda feeds: calls.append(len(next(iter(feeds.values())))) or infer(feeds)
    a = bundle.encode(["x", "y", "x"])
    b = bundle.encode(["y", "z"])
    assert calls == [2, 1]  # x and y once, then z only
    assert np.array_equal(a["encoder_hidden_states"][1], b["encoder_hidden_states"][0])
    assert a["timestep_cond"].shape == (3, 256)


def test_long_prompts_are_truncated_with_a_warning(built, capsys):
    from accel.runtime import Bundle

    bundle = Bundle(built["sd"]["bundle"])
    long = "a red circle " * 40
    ids = bundle.runtime.tokenize([long, ""])["input_ids"]
    assert ids.shape == (2, 77) and ids[0, 0] == ids[1, 0]  # BOS first, 77 ids each
    assert "longer than the text encoder's 77 tokens" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["tokenizer", "conditioning"])
def test_a_damaged_pipeline_bundle_is_one_line(damage, built, tmp_path, monkeypatch, capsys):
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(built["sdxl"]["bundle"], bundle)
    if damage == "tokenizer":
        (bundle / "tokenizer_2" / "tokenizer.json").unlink()
        match = "tokenizer_2/tokenizer.json"
    else:
        (bundle / "conditioning.safetensors").write_bytes(b"garbage")
        match = "conditioning.safetensors"
    code, _, err = run_cli(monkeypatch, capsys, "sample", bundle, "--prompt", "x",
                           "--out", tmp_path / "o.npz")  # fmt: skip
    assert code != 0 and "Traceback" not in err and match in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.npz").exists()


def test_quantize_picks_components(built, tmp_path, monkeypatch, capsys):
    """INT8 of the denoiser and the VAE decoder, each calibrated on what it sees while the
    pipeline samples; the text encoder is kept byte for byte."""
    from export.quantize_onnx import count_ops

    out = tmp_path / "q"
    code, _, err = run_cli(
        monkeypatch, capsys, "quantize", built["sd"]["onnx"], "--calibration-samples", 4,
        "--components", '["denoiser", "vae_decoder"]',
        "--gate", "{ samples = 4, seeds = [0], threshold = 1.0 }",
        "--out", out, "--store", tmp_path / "store",
    )  # fmt: skip
    assert code == 0, err
    src = built["sd"]["onnx"]
    assert (out / "text_encoder.onnx").read_bytes() == (src / "text_encoder.onnx").read_bytes()
    for file in ("model.onnx", "vae_decoder.onnx"):
        assert count_ops(out / file)["QuantizeLinear"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["info"]["quantized_components"] == ["denoiser", "vae_decoder"]
    code, _, err = run_cli(
        monkeypatch, capsys, "quantize", src, "--components", '["unet"]', "--out", tmp_path / "x"
    )
    assert code != 0 and "components" in err and "Traceback" not in err


def _float16_initializers(path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sum(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)


def test_fp16_converts_each_component_the_gate_allows(built, tmp_path, monkeypatch, capsys):
    """fp16 of all three graphs of the SD pipeline (its UNet came from the TorchScript exporter,
    whose node names locate the sampler arithmetic), behind an FD-digits gate on the decoded
    images."""
    src, out = built["sd"]["onnx"], tmp_path / "half"
    code, _, err = run_cli(
        monkeypatch, capsys, "export", "fp16", src,
        "--components", '["denoiser", "text_encoder", "vae_decoder"]',
        "--gate", '{ metric = "fd_digits", samples = 100, seeds = [0], threshold = 1.0 }',
        "--out", out, "--store", tmp_path / "store",
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    components = manifest["metrics"]["components"]
    assert {c: r["precision"] for c, r in components.items()} == dict.fromkeys(
        ("denoiser", "text_encoder", "vae_decoder"), "fp16"
    )
    assert components["denoiser"]["fp32_nodes_kept"] > 0  # alpha/sigma tables, x0 conversion
    for file in ("model.onnx", "text_encoder.onnx", "vae_decoder.onnx"):
        assert _float16_initializers(out / file) > 0, file
    assert manifest["info"]["component_precision"] == dict.fromkeys(
        ("denoiser", "text_encoder", "vae_decoder"), "fp16"
    )
    gate = manifest["metrics"]["quality_gate"]  # FD-digits reads the decoded RGB images
    assert gate["passed"] and gate["metric"] == "fd_digits" and "candidate" in gate


def test_fp16_keeps_a_component_the_gate_refuses_in_fp32(built, tmp_path, monkeypatch, capsys):
    """A text encoder or VAE decoder the gate refuses stays fp32 (byte for byte) and the stage
    goes on; when the gate refuses every component, the stage fails and writes nothing."""
    import export.fp16
    from accel.core.errors import StageError

    gate, calls = export.fp16.quality_gate, []

    def refuse_all_but_the_first(stage, config, parent, candidate, progress, batch):
        calls.append(stage)  # the first is the denoiser's (components are gated in order)
        if len(calls) > 1:
            raise StageError("fp16", "quality gate failed: image RMS difference too large")
        return gate(stage, config, parent, candidate, progress, batch)

    monkeypatch.setattr(export.fp16, "quality_gate", refuse_all_but_the_first)
    src, out, store = built["sd"]["onnx"], tmp_path / "half", tmp_path / "store"
    gate_option = ("--gate", "{ samples = 4, seeds = [0] }", "--store", store)
    code, _, err = run_cli(monkeypatch, capsys, "export", "fp16", src, "--components",
                           '["denoiser", "vae_decoder"]', *gate_option, "--out", out)  # fmt: skip
    assert code == 0, err
    assert (out / "vae_decoder.onnx").read_bytes() == (src / "vae_decoder.onnx").read_bytes()
    assert _float16_initializers(out / "model.onnx") > 0
    components = json.loads((out / "manifest.json").read_text())["metrics"]["components"]
    assert components["vae_decoder"]["precision"] == "fp32"
    assert "quality gate failed" in components["vae_decoder"]["refused"]
    artifacts = sorted((store / "artifacts").iterdir())
    code, _, err = run_cli(monkeypatch, capsys, "export", "fp16", src, "--components",
                           '["vae_decoder"]', *gate_option, "--out", tmp_path / "x")  # fmt: skip
    assert code != 0 and "Traceback" not in err
    assert "every component" in err.strip().splitlines()[-1]
    assert sorted((store / "artifacts").iterdir()) == artifacts and not (tmp_path / "x").exists()


def test_triton_pipeline_repository(built, tmp_path, monkeypatch, capsys):
    """Four models: text encoder, denoiser and VAE decoder engines, and the Python-backend model
    that tokenizes and runs the loop through BLS; configs parse with Triton's schema, and the BLS
    model (with a stand-in of Triton's Python backend) draws what the bundle draws."""
    import importlib.util
    import types

    from google.protobuf import json_format
    from test_bundle import FakeTensor, fake_pb_utils, parse

    from accel.runtime import Bundle

    repo = tmp_path / "repo"
    code, _, err = run_cli(monkeypatch, capsys, "deploy", "triton", built["sdxl"]["bundle"],
                           "--out", repo)  # fmt: skip
    assert code == 0, err
    name = "accel-model"
    configs = {p.parent.name: parse(p) for p in repo.glob("*/config.pbtxt")}
    assert set(configs) == {
        name,
        *(f"{name}_{r}" for r in ("text_encoder", "denoiser", "vae_decoder")),
    }
    text = configs[f"{name}_text_encoder"]
    assert [i.name for i in text.input] == ["input_ids", "input_ids_2"]
    assert [o.name for o in text.output] == ["encoder_hidden_states", "text_embeds"]
    assert text.default_model_filename == "text_encoder.onnx" and text.max_batch_size == 64
    assert configs[f"{name}_denoiser"].max_batch_size == 128  # the guided batch, doubled
    bls = configs[name]
    assert [i.name for i in bls.input][:2] == ["noise", "prompt"]
    assert bls.input[1].data_type == 13  # TYPE_STRING
    assert (repo / name / "1" / "tokenizer_2" / "tokenizer.json").is_file()

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils(repo))
    spec = importlib.util.spec_from_file_location("bls_model", repo / name / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    config = json_format.MessageToJson(bls, preserving_proto_field_name=True)
    model.initialize({"model_repository": str(repo / name), "model_version": "1",
                      "model_config": config})  # fmt: skip
    bundle = Bundle(built["sdxl"]["bundle"])
    noise = np.random.default_rng(5).standard_normal((2, *bundle.plan.sample_shape))
    noise = noise.astype(np.float32)
    prompts = np.array([p.encode() for p in PROMPTS], dtype=object)
    request = types.SimpleNamespace(
        inputs=[FakeTensor("noise", noise), FakeTensor("prompt", prompts)]
    )
    (response,) = model.execute([request])
    assert response.error is None, response.error
    np.testing.assert_allclose(
        response.output_tensors[0].as_numpy(), bundle.sample(noise, prompts=PROMPTS), atol=1e-6
    )
    no_prompt = types.SimpleNamespace(inputs=[FakeTensor("noise", noise)])
    assert "prompt" in model.execute([no_prompt])[0].error


def test_graph_passes_keep_the_pipeline(built, tmp_path, monkeypatch, capsys):
    """optimize (onnxslim) rewrites the denoiser and carries the other components, tokenizers and
    stored conditioning along; TensorRT refuses a pipeline in one line."""
    out = tmp_path / "slim"
    code, _, err = run_cli(monkeypatch, capsys, "export", "optimize", built["sd"]["onnx"],
                           "--out", out, "--store", tmp_path / "store")  # fmt: skip
    assert code == 0, err
    for name in ("text_encoder.onnx", "vae_decoder.onnx", "conditioning.safetensors",
                 "tokenizer/tokenizer.json"):  # fmt: skip
        assert (out / name).read_bytes() == (built["sd"]["onnx"] / name).read_bytes()
    code, _, err = run_cli(monkeypatch, capsys, "compile", built["sd"]["onnx"], "--backend",
                           "tensorrt", "--target", "h100-sxm", "--out", tmp_path / "trt",
                           "--store", tmp_path / "store")  # fmt: skip
    assert code != 0 and "Traceback" not in err
    assert "pipeline" in err or "GPU" in err, err


TEXT_RECIPE = """name = "tiny-text"
source = "teacher"
target = "cpu"

[[stages]]
stage = "consistency"
solver_steps = 10
num_inference_steps = 2
iterations = {iterations}
batch_size = 4
guidance_scale = 2.0
dataset = "digits"

[[stages]]
stage = "onnx"

[[stages]]
stage = "ort"
gate = {{ samples = 4, seeds = [0] }}

[[stages]]
stage = "profile"
teacher_steps = 3
quality_samples = 20
quality_seeds = [0]
warmup_iterations = 1
warmup_ms = 0
iterations = 2
breakdown_repeats = 1
"""


def test_accel_profile_breaks_the_pipeline_down(built, tmp_path, monkeypatch, capsys):
    """`accel profile` of the SDXL bundle and its torch teacher: per-stage breakdown from the text
    encoders to the VAE decode."""
    from accel.report import load_report

    out = tmp_path / "prof"
    code, _, err = run_cli(
        monkeypatch, capsys, "profile", built["sdxl"]["bundle"], built["sdxl"]["model"],
        "--steps", 2, "--target", "cpu", "--scenario", "single_stream", "--iterations", 2,
        "--warmup-iterations", 1, "--out", out,
    )  # fmt: skip
    assert code == 0, err
    report = load_report(out)
    assert len(report["breakdown"]) == 2
    for stages in report["breakdown"].values():
        names = list(stages)
        assert names[0] == "text encoding" and names[-1] == "vae decode"
        assert [n for n in names if n.startswith("step ")] == ["step 1 (t=999)", "step 2 (t=499)"]


@pytest.mark.slow
def test_a_text_recipe_profiles_the_pipeline_and_keeps_the_teachers_reference(tmp_path):
    """consistency on the captioned digits -> onnx -> ort -> profile: the profile has the
    pipeline's stages (text encoding, steps, VAE decode) and the teacher's quality is stored once
    per teacher: a second student reads it back instead of sampling the teacher again."""
    from accel.pipeline import default_store, run_recipe
    from accel.recipe import load_recipe
    from accel.report import load_report

    families.write_pipeline("sd15", tmp_path / "teacher")
    store = default_store(tmp_path / "store")
    reports = []
    for iterations in (2, 3):
        path = tmp_path / f"r{iterations}.toml"
        path.write_text(TEXT_RECIPE.format(iterations=iterations))
        messages: list[str] = []
        artifacts = run_recipe(load_recipe(path), store, progress=messages.append)
        reports.append(load_report(artifacts[-1].path))
        from_store = [m for m in messages if "from the store" in m]
        assert len(from_store) == (0 if iterations == 2 else 2), messages
    assert len(list((store.root / "cache").glob("reference-*.safetensors"))) == 2
    first, second = reports
    teacher = "teacher eager, 3 steps, cfg"
    assert first["quality"][teacher] == second["quality"][teacher]
    for stages in first["breakdown"].values():  # teacher, student and engine alike
        assert list(stages)[0] == "text encoding" and list(stages)[-1] == "vae decode"


def test_a_class_conditional_latent_pipeline_exports_without_a_text_encoder(
    tmp_path, monkeypatch, capsys
):
    """DiT: the denoiser (learned variance split off in the graph) and the VAE decoder, no text
    graph; the null class stored for guidance; the bundle draws what torch draws for a label."""
    teacher = families.write_pipeline("dit", tmp_path / "dit")
    store = tmp_path / "store"
    paths = {k: tmp_path / k for k in ("onnx", "engine", "bundle")}

    def accel(*args):
        code, _, err = run_cli(monkeypatch, capsys, *args, "--store", store)
        assert code == 0, err

    accel("export", "onnx", teacher, "--num-inference-steps", 2, "--guidance-scale", 2.0,
          "--out", paths["onnx"])  # fmt: skip
    accel("compile", paths["onnx"], "--gate", "{ samples = 4, seeds = [0] }",
          "--out", paths["engine"])  # fmt: skip
    accel("bundle", paths["engine"], "--out", paths["bundle"])
    plan = SamplerPlan.load(paths["bundle"] / "sampler_plan.json")
    assert plan.components == {"vae_decoder": "vae_decoder.onnx"} and not plan.tokenizers
    from safetensors.numpy import load_file

    stored = load_file(str(paths["bundle"] / "conditioning.safetensors"))
    assert {k: v.tolist() for k, v in stored.items()} == {"null.class_labels": [1000]}
    assert plan.null_label == 1000 and plan.num_classes == 1000

    def draw(model, *extra):
        out = tmp_path / "s.npz"
        code, _, err = run_cli(monkeypatch, capsys, "sample", model, "--label", 1, "--label", 3,
                               "--seed", 3, "--out", out, *extra)  # fmt: skip
        assert code == 0, err
        return np.load(out)

    ref = draw(teacher, "--steps", 2, "--guidance", 2.0)
    got = draw(paths["bundle"])
    assert np.array_equal(got["latents"], ref["latents"])
    assert np.abs(got["images"] - ref["images"]).max() <= TOLERANCE


def _native_fp16(model, fp32_nodes: set[str]):
    """``model`` with the numerics of onnxruntime's native fp16 kernels (CPUs with AVX512-FP16,
    GPUs), on any CPU: weights rounded to fp16 and every float activation a converted node
    computes stored in fp16 (a Cast to fp16 and back after it). Elsewhere onnxruntime upcasts an
    fp16 graph's kernels to fp32 and drops the casts between them, so the fp16 graph itself
    shows far less error there than on such a CPU."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    for t in model.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            half = numpy_helper.to_array(t).astype(np.float16).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(half, t.name))
    inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
    floats = {v.name for v in inferred if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    nodes, renamed = [], {}
    for n in model.graph.node:
        n.input[:] = [renamed.get(i, i) for i in n.input]
        nodes.append(n)
        if n.name in fp32_nodes or n.op_type.endswith(("Normalization", "Softmax")):
            continue  # what the fp16 pass keeps in fp32
        for o in n.output:
            if o in floats:
                cast = helper.make_node("Cast", [o], [o + "/h"], to=TensorProto.FLOAT16)
                nodes += [
                    cast,
                    helper.make_node("Cast", [o + "/h"], [o + "/r"], to=TensorProto.FLOAT),
                ]
                renamed[o] = o + "/r"
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return model


def test_fp16_parity_is_judged_where_the_converted_nodes_end(built, tmp_path):
    """The fp16 denoiser's parity holds on a CPU with native fp16 kernels (emulated here): the
    backbone's epsilon, where it enters the fp32 x0 conversion, is within the fp16 tolerance
    (measured: 0.0035 max abs of 0.02), while x0 = (x - sigma eps) / alpha carries that error
    times sigma / alpha (15 at t = 999), which is what failed on an AVX512-FP16 Xeon (0.041)."""
    import onnx

    from accel.runtime import OrtRuntime
    from export.fp16 import BOUNDARY, boundary, exposed, outside_backbone
    from export.parity import compare, plan_feeds

    src = built["sd"]["onnx"] / "model.onnx"
    model = onnx.load(str(src))
    keep = outside_backbone(model)
    edges = boundary(model, keep)
    assert len(edges) == 1  # the UNet's output, into the x0 conversion
    onnx.save(_native_fp16(model, set(keep)), str(tmp_path / "model.onnx"))
    plan = SamplerPlan.load(src.parent / "sampler_plan.json")
    with exposed(src, edges) as ref, exposed(tmp_path / "model.onnx", edges) as native:
        reference, half = OrtRuntime(ref, optimize=False), OrtRuntime(native, optimize=False)
        feeds = plan_feeds(plan, reference.inputs(), [1, 3])
        report = compare(reference, [half], feeds, "fp16", {BOUNDARY + "0"})
    assert report["passed"], report
    stats = next(iter(report["runtimes"].values()))["outputs"]
    assert stats["x0"]["max_abs"] > 5 * stats[BOUNDARY + "0"]["max_abs"]
