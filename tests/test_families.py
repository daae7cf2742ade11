"""Every diffusers family through accel's inference path, on tiny pipelines built from configs
(tests/families.py): `accel sample` draws what the stock diffusers pipeline draws from the same
latents, `accel profile` reports text encoding, denoising steps and the VAE decode separately, and
bad input (unsupported classes, missing components, mismatched tokenizers, prompts to
class-conditional models, stages that do not take a family yet) is one clear line."""

import json
import shutil

import numpy as np
import pytest
import torch

import families
from tiny import run_cli

# Measured: at most 1e-6 between accel's sampler (x_next = a x + b x0 in float32 numpy) and the
# stock schedulers' steps; 1e-4 leaves room for BLAS differences between machines.
TOLERANCE = 1e-4
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return families.pipelines(tmp_path_factory.mktemp("families"))


def _sample(monkeypatch, capsys, path, family, out, *extra, steps=2):
    args = ["sample", path, "--steps", steps, "--guidance", 2.0, "--out", out, *extra]
    if family == "dit":
        args += ["--label", 1]
    else:
        h, w = families.RESOLUTION[family]
        args += ["--prompt", PROMPT, "--height", h, "--width", w]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 0, err
    return np.load(out)


def _stock(family, path, latents, prompts, steps=2):
    pipe = families.load_pipeline(family, path)
    kw = families.stock_kwargs(family)
    # accel runs the stock pipelines' own defaults (T5 / Gemma lengths, Sana's instruction)
    kw.pop("max_sequence_length", None)
    kw.pop("complex_human_instruction", None)
    common = dict(num_inference_steps=steps, guidance_scale=2.0, output_type="np")
    if family == "dit":  # DiTPipeline takes no latents=: hand it ours where it draws noise
        import diffusers.pipelines.dit.pipeline_dit as dit

        original = dit.randn_tensor
        dit.randn_tensor = lambda *a, **k: torch.from_numpy(latents)
        try:
            return pipe(class_labels=[1] * len(latents), **common).images
        finally:
            dit.randn_tensor = original
    return pipe(prompts, latents=torch.from_numpy(latents), **common, **kw).images


@pytest.mark.parametrize("family", families.FAMILIES)
def test_accel_sample_matches_the_stock_pipeline(
    family, pipeline_dir, tmp_path, monkeypatch, capsys
):
    path = pipeline_dir(family)
    out = _sample(monkeypatch, capsys, path, family, tmp_path / "s.npz")
    latents = out["latents"]
    assert latents.shape == families.latent_shape(family)  # the stock latents= layout
    h, w = families.RESOLUTION[family]
    assert out["images"].shape == (1, 3, h, w) and out["images"].dtype == np.float32
    if family == "dit":
        assert out["labels"].tolist() == [1]
    else:
        assert out["prompts"].tolist() == [PROMPT]
    stock = _stock(family, path, latents, [PROMPT])
    ours = out["images"].transpose(0, 2, 3, 1)
    assert np.abs(stock - ours).max() <= TOLERANCE


# The schedulers the real checkpoints ship (families.py's tiny pipelines stand in with DDIM where
# accel's plans sample with it): SD1.5 PNDM (PLMS, skip_prk_steps), SDXL Euler (leading spacing),
# PixArt-Sigma DPM-Solver++ 2M; SD3, Flux and Sana keep FlowMatch Euler, DiT DDIM.
REAL_SCHEDULERS = {
    "sd15": (
        "PNDMScheduler",
        {"skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False},
    ),
    "sdxl": ("EulerDiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 1}),
    "pixart_sigma": ("DPMSolverMultistepScheduler", {}),
}


@pytest.mark.parametrize("family", families.FAMILIES)
def test_a_teacher_sampled_with_its_stock_scheduler_matches_its_stock_pipeline(
    family, tmp_path, monkeypatch, capsys
):
    """``accel sample --scheduler stock`` (a teacher's default) runs the pipeline's own scheduler
    (the real checkpoint's: PNDM, Euler, DPM-Solver, FlowMatch Euler) and draws what the stock
    pipeline draws from the same latents, 3 steps (PLMS and DPM-Solver use their history)."""
    import diffusers

    pipe = families.build_pipeline(family)
    if family in REAL_SCHEDULERS:
        name, overrides = REAL_SCHEDULERS[family]
        pipe.scheduler = getattr(diffusers, name).from_config(pipe.scheduler.config, **overrides)
    path = tmp_path / family
    pipe.save_pretrained(path, safe_serialization=True)
    if family != "dit":
        from accel.core.model_info import Evaluation, ModelInfo

        ModelInfo(evaluation=Evaluation(prompts=families.EVALUATION_PROMPTS)).write(path)
    out = _sample(monkeypatch, capsys, path, family, tmp_path / "s.npz", "--scheduler", "stock",
                  steps=3)  # fmt: skip
    stock = _stock(family, path, out["latents"], [PROMPT], steps=3)
    ours = out["images"].transpose(0, 2, 3, 1)
    assert np.abs(stock - ours).max() <= TOLERANCE
    # the default (auto) for a teacher is its stock scheduler, and says so
    auto = _sample(monkeypatch, capsys, path, family, tmp_path / "a.npz", steps=3)
    assert np.array_equal(auto["images"], out["images"])
    assert str(auto["scheduler"]).endswith("3 steps (the stock pipeline's loop)")
    if family in REAL_SCHEDULERS:  # and accel's own DDIM plan draws something else
        plan = _sample(monkeypatch, capsys, path, family, tmp_path / "p.npz", "--scheduler",
                       "plan", steps=3)  # fmt: skip
        assert np.abs(plan["images"] - out["images"]).max() > 10 * TOLERANCE
        assert str(plan["scheduler"]).startswith("accel's ")


def test_prompts_batch_and_cycle(pipeline_dir, tmp_path, monkeypatch, capsys):
    """Two prompts over three images, one batch: image i has prompt i mod 2, as the stock pipeline
    does with the same prompts and latents."""
    path = pipeline_dir("sdxl")
    out_file = tmp_path / "s.npz"
    code, _, err = run_cli(
        monkeypatch, capsys, "sample", path, "--prompt", "red", "--prompt", "a blue square",
        "-n", 3, "--steps", 2, "--guidance", 3.0, "--out", out_file,
    )  # fmt: skip
    assert code == 0, err
    out = np.load(out_file)
    assert out["prompts"].tolist() == ["red", "a blue square", "red"]
    pipe = families.load_pipeline("sdxl", path)
    stock = pipe(
        out["prompts"].tolist(), latents=torch.from_numpy(out["latents"]), num_inference_steps=2,
        guidance_scale=3.0, output_type="np", height=32, width=32,
    ).images  # fmt: skip
    assert np.abs(stock - out["images"].transpose(0, 2, 3, 1)).max() <= TOLERANCE


def test_a_prompt_over_the_token_limit_is_truncated_with_a_warning(
    pipeline_dir, tmp_path, monkeypatch, capsys
):
    """As the stock pipelines do: the first 77 CLIP tokens are read, and the user is told."""
    path = pipeline_dir("sd15")
    capsys.readouterr()
    long = " ".join(["a red circle"] * 40)
    out_file = tmp_path / "s.npz"
    code, _, err = run_cli(
        monkeypatch, capsys, "sample", path, "--prompt", long, "--steps", 2,
        "--guidance", 2.0, "--out", out_file,
    )  # fmt: skip
    assert code == 0, err
    assert "warning: the prompt 'a red circle a red circle" in err and "reads the first 77" in err
    out = np.load(out_file)
    stock = _stock("sd15", path, out["latents"], [long])
    assert np.abs(stock - out["images"].transpose(0, 2, 3, 1)).max() <= TOLERANCE


def test_png_grid(pipeline_dir, tmp_path, monkeypatch, capsys):
    from PIL import Image

    out = tmp_path / "grid.png"
    code, _, err = run_cli(
        monkeypatch, capsys, "sample", pipeline_dir("sd3"), "--prompt", PROMPT, "-n", 2,
        "--steps", 1, "--height", 32, "--width", 64, "--out", out,
    )  # fmt: skip
    assert code == 0, err
    assert Image.open(out).size == (2 * 65, 33)


@pytest.mark.parametrize("family", families.FAMILIES)
def test_profile_reports_each_stage(family, pipeline_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "profile"
    size = [] if family == "dit" else ["--height", 32, "--width", 32]
    code, _, err = run_cli(
        monkeypatch, capsys, "profile", pipeline_dir(family), "--target", "cpu",
        "--warmup-iterations", 0, "--warmup-ms", 0, "--iterations", 1, "--steps", 3,
        *size, "--out", out,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    (sections,) = report["breakdown"].values()
    first = "conditioning" if family == "dit" else "text encoding"
    assert first in sections and "vae decode" in sections
    steps = [k for k in sections if k.startswith("step ")]
    assert len(steps) == 3
    names = list(sections)
    assert names.index(first) < names.index(steps[0]) and names.index("vae decode") > names.index(
        steps[-1]
    )


def _one_line_error(code, err, *needles):
    assert code != 0
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _copy(pipeline_dir, family, tmp_path):
    return shutil.copytree(pipeline_dir(family), tmp_path / family)


def test_unsupported_denoiser_class(pipeline_dir, tmp_path, monkeypatch, capsys):
    path = _copy(pipeline_dir, "sd15", tmp_path)
    config = json.loads((path / "unet/config.json").read_text())
    (path / "unet/config.json").write_text(json.dumps(dict(config, _class_name="UNetMotionModel")))
    code, _, err = run_cli(
        monkeypatch, capsys, "sample", path, "--prompt", "x", "--out", tmp_path / "o.npz"
    )
    _one_line_error(code, err, "'UNetMotionModel' is not supported", "UNet2DConditionModel", "Flux")
    assert not (tmp_path / "o.npz").exists()


def test_missing_component_folder(pipeline_dir, tmp_path, monkeypatch, capsys):
    path = _copy(pipeline_dir, "flux", tmp_path)
    shutil.rmtree(path / "text_encoder_2")
    code, _, err = run_cli(
        monkeypatch, capsys, "sample", path, "--prompt", "x", "--out", tmp_path / "o.npz"
    )
    _one_line_error(code, err, "text_encoder_2/ is missing")


@pytest.mark.parametrize(  # steps given: a teacher's export otherwise says its stock defaults
    "command", [["export", "onnx", "--num-inference-steps", "2"], ["distill", "consistency"]]
)
def test_a_pipeline_without_its_vae_is_one_line(
    command, pipeline_dir, tmp_path, monkeypatch, capsys
):
    path = _copy(pipeline_dir, "sd15", tmp_path)
    shutil.rmtree(path / "vae")
    capsys.readouterr()  # building the pipeline may print save_pretrained's progress
    store, out = tmp_path / "store", tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, *command, path, "--store", store, "--out", out)
    _one_line_error(code, err, "vae/ is missing")
    assert not out.exists()
    assert not store.exists() or not [p for p in store.rglob("*") if p.is_file()]


def test_tokenizer_that_does_not_match_its_text_encoder(
    pipeline_dir, tmp_path, monkeypatch, capsys
):
    from transformers import AutoTokenizer

    path = _copy(pipeline_dir, "sd15", tmp_path)
    tok = AutoTokenizer.from_pretrained(path / "tokenizer")
    tok.add_tokens([f"<extra{i}>" for i in range(600)])
    tok.save_pretrained(path / "tokenizer")
    code, _, err = run_cli(
        monkeypatch, capsys, "sample", path, "--prompt", "x", "--out", tmp_path / "o.npz"
    )
    _one_line_error(code, err, "tokenizer/ has 1114 tokens", "text_encoder/ embeds only 514")


def test_prompt_to_a_class_conditional_model(pipeline_dir, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(
        monkeypatch, capsys, "sample", pipeline_dir("dit"), "--prompt", "a cat",
        "--out", tmp_path / "o.npz",
    )  # fmt: skip
    _one_line_error(code, err, "class-conditional", "--label")
    code, _, err = run_cli(
        monkeypatch, capsys, "sample", pipeline_dir("sd15"), "-n", 1, "--out", tmp_path / "o.npz"
    )
    _one_line_error(code, err, "text-to-image model: give --prompt")
    assert not (tmp_path / "o.npz").exists()


@pytest.mark.parametrize(
    ("command", "family"),
    [
        # progressive, consistency, adversarial and guidance take sd and sdxl (test_text_distill),
        # sd3 and flux (test_flow_distill; guidance refuses sd3: no w input), dit (test_dit)
        (["distill", "guidance"], "dit"),  # needs a w input
        (["distill", "scm"], "sdxl"),  # needs a flow teacher
        (["compile", "--backend", "torch_compile"], "dit"),  # needs a fused sampler
        (["compile", "--backend", "aoti"], "sdxl"),
        (["quantize"], "sdxl"),
    ],
)
def test_stages_refuse_families_they_do_not_take_yet(
    command, family, pipeline_dir, tmp_path, monkeypatch, capsys
):
    store, out = tmp_path / "store", tmp_path / "out"
    path = pipeline_dir(family)
    capsys.readouterr()  # building the pipeline may print save_pretrained's progress
    code, _, err = run_cli(monkeypatch, capsys, *command, path, "--store", store, "--out", out)
    _one_line_error(code, err, f"{family} models are not supported by this stage yet")
    assert not out.exists()
    assert not store.exists() or not [p for p in store.rglob("*") if p.is_file()]


@pytest.mark.parametrize("family", ["sdxl", "sd3", "dit"])
def test_denoiser_guidance_is_the_mix_of_two_graph_calls(family, pipeline_dir):
    """The torch Denoiser's classifier-free guidance (one doubled batch, null conditioning from
    the adapter) equals x0_u + w (x0_c - x0_u) from two calls of the graph."""
    from distill.checkpoint import load_denoiser
    from distill.graph import DenoiserGraph

    den, _ = load_denoiser(pipeline_dir(family), guidance_scale=3.0)
    adapter = den.adapter
    h, w = adapter.default_resolution()
    with torch.no_grad():
        if family == "dit":
            cond = adapter.encode(labels=torch.tensor([1, 2]))
        else:
            cond = adapter.encode(["a red circle", "blue"], height=h, width=w)
        null = adapter.null_conditioning(h, w)
        x = torch.randn(2, *adapter.latent_shape(h, w), generator=torch.Generator().manual_seed(0))
        t = den.schedule.num_train_timesteps * 0.6
        t = torch.full((2,), t if den.schedule.kind == "flow" else int(t))
        guided = den(x, t, cond)
        graph = DenoiserGraph.of(den)
        c = graph(x, t, **cond)
        u = graph(x, t, **{k: v.expand(2, *v.shape[1:]) for k, v in null.items()})
    torch.testing.assert_close(guided, u + 3.0 * (c - u), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sd35", [False, True], ids=["sd3", "sd3.5 (qk rms_norm, dual attention)"])
def test_sd3_folds_the_zero_t5_block_into_one_token_exactly(sd35):
    """Without T5, the eager SD3 forward gives the transformer one of the 256 identical zero
    tokens with log 256 on its key: the same output as the stock forward over all of them (and
    the same gradients), the stock processors back afterwards; a context whose tail is not zero
    in every row, and a graph being exported, take the stock forward."""
    from diffusers import SD3Transformer2DModel

    from distill.models.sd3 import SD3Adapter, repeated_tail

    torch.manual_seed(0)
    extra = {"qk_norm": "rms_norm", "dual_attention_layers": (0,)} if sd35 else {}
    backbone = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
        caption_projection_dim=16, pooled_projection_dim=24, pos_embed_max_size=8, **extra,
    )  # fmt: skip
    stock = dict(backbone.attn_processors)
    adapter = object.__new__(SD3Adapter)
    x = torch.randn(3, 4, 8, 8, requires_grad=True)
    t = torch.tensor([10.0, 500.0, 990.0])
    context = torch.cat([torch.randn(3, 7, 32), torch.zeros(3, 256, 32)], 1)
    cond = {"encoder_hidden_states": context, "pooled_projections": torch.randn(3, 24)}
    assert repeated_tail(backbone, context) == 256

    def stock_forward(context):
        return backbone(hidden_states=x, timestep=t, encoder_hidden_states=context,
                        pooled_projections=cond["pooled_projections"]).sample  # fmt: skip

    ref = stock_forward(context)
    (grad_ref,) = torch.autograd.grad(ref.square().sum(), x)
    out = adapter.forward(backbone, x, t, cond)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert backbone.attn_processors == stock
    # measured 1e-6 (float reordering); any error in the fold is O(1)
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max()
    assert (grad - grad_ref).abs().max() < 1e-5 * grad_ref.abs().max()

    t5 = context.clone()
    t5[1, -1] = 1.0  # one row's last token is not zero: no fold, or only its zero run
    assert repeated_tail(backbone, t5) == 0
    t5[1, -1], t5[1, 100] = 0.0, 1.0
    assert repeated_tail(backbone, t5) == context.shape[1] - 101
    torch.testing.assert_close(
        adapter.forward(backbone, x, t, {**cond, "encoder_hidden_states": t5}),
        stock_forward(t5), rtol=1e-5, atol=1e-5 * float(ref.abs().max()),
    )  # fmt: skip

    class Wrapped(torch.nn.Module):
        def forward(self, x, t, context, pooled):
            cond = {"encoder_hidden_states": context, "pooled_projections": pooled}
            return adapter.forward(backbone, x, t, cond)

    exported = torch.export.export(Wrapped(), (x.detach(), t, context, cond["pooled_projections"]))
    ops = [n for n in exported.graph.nodes if n.op == "call_function"]
    assert not any("nonzero" in str(n.target) for n in ops)  # the stock graph, no data checks


def test_a_stochastic_stock_scheduler_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """The digits teacher ships DDPMScheduler, which draws its own noise in every step."""
    from accel.demo.digits import TEACHER_DIR

    code, _, err = run_cli(monkeypatch, capsys, "sample", TEACHER_DIR, "--scheduler", "stock",
                           "-n", 1, "--out", tmp_path / "x.npz")  # fmt: skip
    assert code != 0 and "draws noise inside each step" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "x.npz").exists()
