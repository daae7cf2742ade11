import pytest
import torch
from diffusers import DDIMScheduler

from distill.denoiser import Denoiser
from distill.parameterisation import from_x0_eps, to_x0_eps
from distill.samplers import ddim_step
from distill.schedule import Schedule, _bcast

from gmm import two_class_gmm


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample", "flow"])
def test_prediction_type_round_trip(ptype):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 5, 3, 3, generator=g, dtype=torch.float64).unbind(0)
    a = torch.rand(5, 1, 1, generator=g, dtype=torch.float64) * 0.9 + 0.05
    s = (1 - a) if ptype == "flow" else (1 - a**2).sqrt()
    x = a * x0 + s * eps
    out = from_x0_eps(x0, eps, a, s, ptype)
    x0_hat, eps_hat = to_x0_eps(out, x, a, s, ptype)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_ddim_step_equals_diffusers(ptype, beta_schedule):
    ref = DDIMScheduler(
        beta_schedule=beta_schedule,
        prediction_type=ptype,
        clip_sample=False,
        timestep_spacing="trailing",
    )
    ref.set_timesteps(8)
    sched = Schedule.from_config(dict(ref.config, _class_name="DDIMScheduler"))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 8, 8, generator=g)
    for t, t_prev in sched.ddim_timesteps(8):
        out = torch.randn(x.shape, generator=g)
        expected = ref.step(out, t, x).prev_sample
        alpha, sigma = (_bcast(v, x) for v in sched.alpha_sigma(torch.tensor([t])))
        x0, eps = to_x0_eps(out, x, alpha, sigma, ptype)
        ours = ddim_step(x0, eps, sched, t_prev)
        torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
        x = expected


def test_classifier_free_guidance_mixes_x0():
    sched = Schedule.from_config({"beta_schedule": "squaredcos_cap_v2"})
    backbone = two_class_gmm(sched).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    t = torch.tensor(600)
    cond = Denoiser(backbone, sched, "v_prediction")(x, t, labels)
    uncond = Denoiser(backbone, sched, "v_prediction")(x, t, torch.full_like(labels, 2))
    guided = Denoiser(backbone, sched, "v_prediction", guidance_scale=3.0, null_label=2)(
        x, t, labels
    )
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond))


def test_an_unconditional_model_is_never_fed_labels():
    """Training data carries labels; an unconditional UNet2DModel (which diffusers refuses to
    give class labels) predicts as if none were given."""
    from distill.schedule import Schedule

    from tiny import SCHEDULER, tiny_unet

    den = Denoiser(
        tiny_unet(num_class_embeds=None), Schedule.from_config(SCHEDULER), "v_prediction"
    )
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([500, 500])
    with torch.no_grad():
        torch.testing.assert_close(den(x, t, torch.tensor([3, 4])), den(x, t, None))


def test_every_model_runs_through_its_adapter():
    """The shipped digits UNet loads with its family's adapter (no adapter-less path), a bare
    backbone gets the pixel adapter, and classifier-free guidance against accel.json's null class
    is out_u + w (out_c - out_u) of two plain backbone calls."""
    from accel.demo.digits import TEACHER_DIR
    from distill.checkpoint import load_denoiser
    from distill.models.unet2d import UNet2DAdapter

    den, info = load_denoiser(TEACHER_DIR, guidance_scale=2.0)
    assert isinstance(den.adapter, UNet2DAdapter) and den.adapter.root == TEACHER_DIR
    assert den.adapter.pixel and den.class_conditional
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    t, labels = torch.tensor(500), torch.tensor([1, 4, 7])
    with torch.no_grad():
        got = den.raw(x, t, labels)
        ts = t.expand(3)
        c = den.backbone(x, ts, class_labels=labels).sample
        u = den.backbone(x, ts, class_labels=torch.full_like(labels, info.null_class_label)).sample
    torch.testing.assert_close(got, u + 2.0 * (c - u), rtol=1e-5, atol=1e-5)

    bare = Denoiser(den.backbone, den.schedule, den.prediction_type)
    assert isinstance(bare.adapter, UNet2DAdapter) and bare.adapter.index == {}
    with pytest.raises(ValueError, match="null label"):
        Denoiser(den.backbone, den.schedule, den.prediction_type, guidance_scale=2.0)
