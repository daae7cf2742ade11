"""LoRA students (distill/lora.py): adapters on one frozen base, written as the teacher's pipeline
plus pytorch_lora_weights.safetensors. Each family's stock pipeline with ``load_lora_weights``
draws what ``accel sample`` draws; the adapters switch exactly (off = the teacher); export fuses
them; a user's LoRA (diffusers or kohya keys) applies through diffusers' loader."""

import json

import numpy as np
import pytest
import torch

from accel.core.model_info import ModelInfo

import families
from tiny import run_cli

# accel samples the LoRA fused into the base's weights, the stock pipeline unfused (W x + B A x):
# measured at most 2e-6 apart on the tiny pipelines; 1e-4 as the families' stock-parity tests.
TOLERANCE = 1e-4
PROMPT = "a red circle"
LORA_FAMILIES = ("sd15", "sdxl", "sd3", "flux", "sana")  # stock pipelines with load_lora_weights
FUSED_FAMILIES = ("pixart_sigma", "dit")  # no LoRA loader: the student is fused


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return families.pipelines(tmp_path_factory.mktemp("lora-teachers"))


def _json(path):
    return json.loads(path.read_text())


def _prompts(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    return f"prompts:{tmp_path / 'prompts.txt'}"


def _dataset(family, tmp_path):
    return "digits" if family == "dit" else _prompts(tmp_path)


def _distil(monkeypatch, capsys, teacher, out, tmp_path, *extra, method="consistency"):
    args = {
        "consistency": ["consistency", "--solver-steps", 10, "--num-inference-steps", 2],
        "dmd2": ["adversarial", "--student-steps", 2, "--critic-updates-per-generator", 1],
    }[method]
    return run_cli(
        monkeypatch, capsys, "distill", *args, teacher, "--iterations", 2, "--batch-size", 2,
        "--guidance-scale", 2.0, "--lora-rank", 4, "--learning-rate", 1e-2, *extra,
        "--out", out, "--store", tmp_path / "store",
    )  # fmt: skip


def _sample(monkeypatch, capsys, student, family, out, size=True):
    args = ["sample", student, "--steps", 2, "--seed", 0, "--out", out]
    if family == "dit":
        args += ["--label", 1]
    else:
        h, w = families.RESOLUTION[family]
        args += ["--prompt", PROMPT, *(["--height", h, "--width", w] if size else [])]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    return np.load(out)


def _stock(monkeypatch, family, student, ours, w=1.0):
    """The stock pipeline of the student's model_index.json, its LoRA through
    ``load_lora_weights``, drawing from accel's latents and re-noising draws."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(student, **families.load_kwargs(family))
    if (student / "pytorch_lora_weights.safetensors").is_file():
        pipe.load_lora_weights(student)
    pipe = families.prepare(pipe)
    # the LCM schedulers re-noise with fresh noise: hand them the draws accel sample made
    rng = np.random.default_rng([0, 1])

    def draws(shape, **kw):
        return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32))

    import diffusers.schedulers.scheduling_flow_match_lcm as flow_lcm
    import diffusers.schedulers.scheduling_lcm as lcm

    monkeypatch.setattr(lcm, "randn_tensor", draws)
    monkeypatch.setattr(flow_lcm, "randn_tensor", draws)
    kw = families.stock_kwargs(family)
    kw.pop("max_sequence_length", None)
    kw.pop("complex_human_instruction", None)
    return pipe(
        [PROMPT], latents=torch.from_numpy(ours["latents"]), num_inference_steps=2,
        guidance_scale=w, output_type="np", **kw,
    ).images  # fmt: skip


@pytest.mark.parametrize("family", LORA_FAMILIES)
def test_a_lora_student_loads_in_its_stock_pipeline_with_load_lora_weights(
    family, teacher, tmp_path, monkeypatch, capsys
):
    student = tmp_path / "student"
    code, _, err = _distil(
        monkeypatch, capsys, teacher(family), student, tmp_path, "--dataset",
        _dataset(family, tmp_path), "--base-dtype", "fp32",
    )  # fmt: skip
    assert code == 0, err
    info = ModelInfo.read(student)
    assert info.lora is not None and info.lora.rank == 4 and info.lora.alpha == 4.0
    # guidance baked in (sample with 1); FLUX.1-dev's own guidance input takes w
    w = 2.0 if family == "flux" else 1.0
    assert info.method == "consistency" and info.guidance_scale == w
    assert info.distilled_guidance_scale == (None if family == "flux" else 2.0)
    # the teacher's pipeline: its denoiser's weights are the teacher's own bytes (linked)
    folder = "unet" if family in ("sd15", "sdxl") else "transformer"
    weights = "diffusion_pytorch_model.safetensors"
    assert (student / folder / weights).read_bytes() == (
        teacher(family) / folder / weights
    ).read_bytes()
    manifests = (tmp_path / "store" / "artifacts").glob("*/manifest.json")
    (lora,) = [m["metrics"]["lora"] for m in map(_json, manifests) if "lora" in m["metrics"]]
    assert lora["rank"] == 4 and 0 < lora["parameters"] < lora["base_parameters"]
    assert lora["bytes"] == 4 * lora["parameters"]

    ours = _sample(monkeypatch, capsys, student, family, tmp_path / "s.npz")
    stock = _stock(monkeypatch, family, student, ours, w)
    assert np.abs(stock - ours["images"].transpose(0, 2, 3, 1)).max() <= TOLERANCE
    # and the adapters changed the model: the teacher's pipeline without them draws otherwise
    (student / "pytorch_lora_weights.safetensors").rename(tmp_path / "away.safetensors")
    bare = _stock(monkeypatch, family, student, ours, w)
    assert np.abs(bare - stock).max() > 1e-3


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_a_dmd2_lora_student_loads_in_its_stock_pipeline(
    family, teacher, tmp_path, monkeypatch, capsys
):
    """DMD2's three networks on one base: the real score (adapters off), the generator and the
    fake score (two adapters); the student is the generator's adapter."""
    student = tmp_path / "student"
    code, _, err = _distil(
        monkeypatch, capsys, teacher(family), student, tmp_path, "--dataset",
        _prompts(tmp_path), method="dmd2",
    )  # fmt: skip
    assert code == 0, err
    info = ModelInfo.read(student)
    assert info.method == "dmd2" and info.lora is not None
    ours = _sample(monkeypatch, capsys, student, family, tmp_path / "s.npz")
    stock = _stock(monkeypatch, family, student, ours)
    assert np.abs(stock - ours["images"].transpose(0, 2, 3, 1)).max() <= TOLERANCE


@pytest.mark.parametrize(("family", "method"), [("sd3", "consistency"), ("sd15", "dmd2")])
def test_gradient_checkpointing_trains_a_lora_student_as_without_it(
    family, method, teacher, tmp_path, monkeypatch, capsys
):
    """The student's blocks are recomputed under the student's adapter, though the teacher's (and
    the EMA target's or the fake score's) calls switch adapters between the forward pass and
    ``backward`` (``distill.trainer.checkpoint_block``): the same losses and adapter weights."""
    from safetensors.torch import load_file

    runs = {}
    for ckpt in (False, True):
        out = tmp_path / f"student-{ckpt}"
        extra = ["--gradient-checkpointing"] if ckpt else []
        code, _, err = _distil(
            monkeypatch, capsys, teacher(family), out, tmp_path / str(ckpt), "--dataset",
            _prompts(tmp_path), "--base-dtype", "fp32", *extra, method=method,
        )  # fmt: skip
        assert code == 0, err
        runs[ckpt] = (
            _json(out / "loss_log.json"),
            load_file(out / "pytorch_lora_weights.safetensors"),
        )
    (log, weights), (log_ck, weights_ck) = runs[False], runs[True]
    assert len(log) == len(log_ck) == 2
    for row, row_ck in zip(log, log_ck, strict=True):
        assert row.keys() == row_ck.keys()
        for k in row:
            assert row_ck[k] == pytest.approx(row[k], rel=1e-4, abs=1e-6), k
    for k in weights:
        torch.testing.assert_close(weights_ck[k], weights[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_without_a_lora_loader_the_student_is_fused_into_full_weights(
    family, teacher, tmp_path, monkeypatch, capsys
):
    """PixArt's and DiT's stock pipelines have no load_lora_weights: the adapters are merged
    into a full copy of the teacher's weights (read again in float32), a plain student."""
    student = tmp_path / "student"
    code, _, err = _distil(
        monkeypatch, capsys, teacher(family), student, tmp_path, "--dataset",
        _dataset(family, tmp_path),
    )  # fmt: skip
    assert code == 0, err
    assert ModelInfo.read(student).lora is None
    assert not (student / "pytorch_lora_weights.safetensors").exists()
    weights = student / "transformer" / "diffusion_pytorch_model.safetensors"
    theirs = teacher(family) / "transformer" / "diffusion_pytorch_model.safetensors"
    assert weights.read_bytes() != theirs.read_bytes() and weights.stat().st_nlink == 1
    from safetensors.torch import load_file

    state = load_file(weights)
    assert not any("lora" in k for k in state) and state.keys() == load_file(theirs).keys()
    assert all(v.dtype == torch.float32 for v in state.values())


def test_a_lora_student_exports_fused_and_its_bundle_draws_what_it_draws(
    teacher, tmp_path, monkeypatch, capsys
):
    def accel(*args):
        code, _, err = run_cli(monkeypatch, capsys, *args, "--store", tmp_path / "store")
        assert code == 0, err

    student = tmp_path / "student"
    code, _, err = _distil(monkeypatch, capsys, teacher("sd15"), student, tmp_path,
                           "--dataset", _prompts(tmp_path))  # fmt: skip
    assert code == 0, err
    accel("export", "onnx", student, "--out", tmp_path / "onnx")
    accel("compile", tmp_path / "onnx", "--gate", "{ samples = 4, seeds = [0] }",
          "--out", tmp_path / "engine")  # fmt: skip
    accel("bundle", tmp_path / "engine", "--out", tmp_path / "bundle")
    eager = _sample(monkeypatch, capsys, student, "sd15", tmp_path / "eager.npz")
    bundle = _sample(
        monkeypatch, capsys, tmp_path / "bundle", "sd15", tmp_path / "bundle.npz", size=False
    )
    np.testing.assert_allclose(bundle["images"], eager["images"], atol=1e-4)
    # the exported denoiser is plain layers: no LoRA initializers in the graph
    import onnx

    graphs = list((tmp_path / "onnx").rglob("*.onnx"))
    names = [
        i.name for g in graphs for i in onnx.load(g, load_external_data=False).graph.initializer
    ]
    assert graphs and not any("lora" in n for n in names)


def test_adapters_switch_exactly_and_only_the_adapters_train(teacher):
    """Off, the base is the teacher to the bit; every adapter starts at the teacher (B = 0) and
    the second starts equal to the first; only A and B are trainable, in float32 over a bf16
    base, and a step through the student moves its adapter alone."""
    from distill.checkpoint import load_denoiser
    from distill.lora import STUDENT, AdapterView, LoraShape, adapter_parameters, lora_base

    den, _ = load_denoiser(teacher("sd15"))
    adapter = den.adapter
    cond = adapter.encode([PROMPT], height=32, width=32)
    x, t = (
        torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)),
        torch.tensor([500]),
    )
    with torch.no_grad():
        before = adapter.forward(den.backbone, x, t, cond)
    base_before = {n: p.clone() for n, p in den.backbone.named_parameters()}
    student, ema = lora_base(den, LoraShape(4, 4.0, adapter.lora_targets), (STUDENT, "ema"),
                             torch.float32)  # fmt: skip
    assert isinstance(den.backbone, AdapterView) and den.backbone.name is None
    with torch.no_grad():
        assert torch.equal(adapter.forward(den.backbone, x, t, cond), before)
        assert torch.equal(adapter.forward(student, x, t, cond), before)  # B = 0
    base = student.base
    a, b = adapter_parameters(base, STUDENT), adapter_parameters(base, "ema")
    assert len(a) == len(b) > 0 and all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    trainable = [n for n, p in base.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.SGD(a, lr=1.0)
    adapter.forward(student, x, t, cond).square().mean().backward()
    opt.step()
    assert all(q.grad is None for q in b)
    with torch.no_grad():
        assert torch.equal(adapter.forward(den.backbone, x, t, cond), before)  # teacher intact
        assert torch.equal(adapter.forward(ema, x, t, cond), before)  # ema untouched
        assert not torch.equal(adapter.forward(student, x, t, cond), before)
    for n, p in base.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n.replace(".base_layer", "")]), n


def test_a_bf16_base_trains_float32_adapters(teacher):
    from distill.checkpoint import load_denoiser
    from distill.lora import STUDENT, LoraShape, adapter_parameters, lora_base

    den, _ = load_denoiser(teacher("sd15"))
    adapter = den.adapter
    cond = adapter.encode([PROMPT], height=32, width=32)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    with torch.no_grad():
        full = adapter.forward(den.backbone, x, t, cond)
    (student,) = lora_base(den, LoraShape(4, 4.0, adapter.lora_targets), (STUDENT,), torch.bfloat16)
    frozen = {p.dtype for p in student.base.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    assert {p.dtype for p in adapter_parameters(student.base, STUDENT)} == {torch.float32}
    out = adapter.forward(student, x, t, cond)
    assert out.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: the tiny UNet's output within a few percent of float32's
    assert (out - full).abs().max() <= 0.05 * full.abs().max()
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in adapter_parameters(student.base, STUDENT))  # fmt: skip


def _user_lora(pipe, folder, kohya=False, seed=0):
    """A rank-2 LoRA of the tiny SD1.5 pipeline's UNet and text encoder, random A and B, in
    diffusers' keys (``save_lora_weights``) or kohya's (lora_unet_*/lora_te_*, lora_down/lora_up,
    alpha)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    states = {}
    for name, model, targets in (
        ("unet", pipe.unet, ["to_q", "to_v", "conv1"]),
        ("text_encoder", pipe.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"]),
    ):
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=targets), model)
        state = get_peft_model_state_dict(model)
        states[name] = {k: torch.randn_like(v) * 0.1 for k, v in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    if not kohya:
        StableDiffusionPipeline.save_lora_weights(
            folder, unet_lora_layers=states["unet"],
            text_encoder_lora_layers=states["text_encoder"],
        )  # fmt: skip
        return folder / "pytorch_lora_weights.safetensors"
    out = {}
    for name, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        for key, value in states[name].items():
            module, _, kind = key.rpartition(".lora_")
            kohya_name = prefix + module.replace(".", "_")
            out[f"{kohya_name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
            out[f"{kohya_name}.alpha"] = torch.tensor(2.0)
    file = folder / "kohya.safetensors"
    save_file(out, str(file))
    return file


@pytest.mark.parametrize("kohya", [False, True], ids=["diffusers keys", "kohya keys"])
def test_a_users_lora_fuses_into_the_teacher_and_draws_what_the_stock_pipeline_draws(
    kohya, teacher, tmp_path, monkeypatch, capsys
):
    path = teacher("sd15")
    file = _user_lora(families.load_pipeline("sd15", path), tmp_path / "lora", kohya)
    fused = tmp_path / "fused"
    code, _, err = run_cli(monkeypatch, capsys, "lora", path, "--file", file, "--scale", 0.8,
                           "--out", fused, "--store", tmp_path / "store")  # fmt: skip
    assert code == 0, err
    manifest = _json(fused / "manifest.json")
    lora = manifest["metrics"]["lora"]
    assert lora["components"] == ["text_encoder", "unet"] and lora["scale"] == 0.8
    assert lora["sha256"] == manifest["config"]["sha256"] and len(lora["sha256"]) == 64
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert (fused / vae).read_bytes() == (path / vae).read_bytes()
    # the fused teacher samples as the stock pipeline with load_lora_weights at that scale
    out = tmp_path / "s.npz"
    code, _, err = run_cli(monkeypatch, capsys, "sample", fused, "--prompt", PROMPT, "--steps", 2,
                           "--guidance", 2.0, "--scheduler", "stock", "--out", out)  # fmt: skip
    assert code == 0, err
    ours = np.load(out)
    pipe = families.load_pipeline("sd15", path)
    pipe.load_lora_weights(file.parent, weight_name=file.name)
    stock = pipe(
        [PROMPT], latents=torch.from_numpy(ours["latents"]), num_inference_steps=2,
        guidance_scale=2.0, output_type="np", cross_attention_kwargs={"scale": 0.8},
        **families.stock_kwargs("sd15"),
    ).images  # fmt: skip
    assert np.abs(stock - ours["images"].transpose(0, 2, 3, 1)).max() <= TOLERANCE
    plain = families.load_pipeline("sd15", path)(
        [PROMPT], latents=torch.from_numpy(ours["latents"]), num_inference_steps=2,
        guidance_scale=2.0, output_type="np", **families.stock_kwargs("sd15"),
    ).images  # fmt: skip
    assert np.abs(plain - stock).max() > 1e-3  # the LoRA changed what it draws


def test_bad_lora_files_are_one_line(teacher, tmp_path, monkeypatch, capsys):
    path = teacher("sd15")

    def refused(file, *needles):
        store = tmp_path / "store"
        code, _, err = run_cli(monkeypatch, capsys, "lora", path, "--file", file,
                               "--out", tmp_path / "out", "--store", store)  # fmt: skip
        assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert all(n in err for n in needles), err
        assert not (tmp_path / "out").exists()

    refused(tmp_path / "missing.safetensors", "not found")
    (tmp_path / "garbled.safetensors").write_bytes(b"\x00" * 64)
    refused(tmp_path / "garbled.safetensors", "not a readable safetensors file")
    from safetensors.torch import save_file

    save_file({"nothing.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    refused(tmp_path / "other.safetensors", "other.safetensors")
    (tmp_path / "weights.bin").write_bytes(b"pickle")
    refused(tmp_path / "weights.bin", "safetensors only")
    code, _, err = run_cli(monkeypatch, capsys, "lora", teacher("dit"), "--file",
                           _user_lora(families.load_pipeline("sd15", path), tmp_path / "l"),
                           "--store", tmp_path / "store")  # fmt: skip
    assert code != 0 and "DiTPipeline has no LoRA loader" in err and "Traceback" not in err
