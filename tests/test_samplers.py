"""Samplers against exact answers: a single Gaussian N(mu, s^2 I) has the linear PF-ODE endpoint
x0 = mu + s (x_T - alpha_T mu) / sqrt(alpha_T^2 s^2 + sigma_T^2)."""

import torch

from distill.denoiser import Denoiser
from distill.samplers import sample_ddim, sample_euler, sample_heun
from distill.schedule import Schedule

from gmm import GMMBackbone


def gaussian_case(prediction_type="v_prediction", config=None):
    sched = Schedule.from_config(config or {"beta_schedule": "squaredcos_cap_v2"})
    mu, s = torch.tensor([[1.5, -0.5, 0.25]], dtype=torch.float64), 0.4
    backbone = GMMBackbone(mu, [s], [0], sched, prediction_type)
    den = Denoiser(backbone, sched, prediction_type)
    x_T = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return den, sched, mu, s, x_T


def exact_endpoint(sched, mu, s, x_T, t_start):
    a, sg = (v.item() for v in sched.alpha_sigma(torch.tensor([t_start])))
    return mu + s * (x_T - a * mu) / (a**2 * s**2 + sg**2) ** 0.5


def test_euler_equals_ddim():
    den, sched, *_, x_T = gaussian_case()
    ts = sched.ddim_timesteps(10)
    torch.testing.assert_close(sample_euler(den, x_T, ts), sample_ddim(den, x_T, ts))


def pairs(start, n):
    """n steps from timestep ``start`` to clean data (-1), evenly spaced."""
    pts = torch.linspace(start, -1, n + 1).round().long().tolist()
    return list(zip(pts[:-1], pts[1:], strict=True))


def test_heun_converges_to_exact_ode_endpoint_faster_than_euler():
    # From t = 700 rather than 999: the cosine schedule's sigma/alpha spans 2e4 -> 15 over the first
    # trailing step, where a trapezoid (Heun) is no better than Euler; Karras et al. space sigmas for it.
    for prediction_type, config, start in [
        ("v_prediction", {"beta_schedule": "squaredcos_cap_v2"}, 700),
        ("flow", {"_class_name": "FlowMatchEulerDiscreteScheduler"}, 999),
    ]:
        den, sched, mu, s, x_T = gaussian_case(prediction_type, config)
        x_start = x_T * sched.alpha_sigma(torch.tensor([start]))[1].item()
        exact = exact_endpoint(sched, mu, s, x_start, start)
        err_euler = (sample_euler(den, x_start, pairs(start, 25)) - exact).abs().max()
        err_heun = (sample_heun(den, x_start, pairs(start, 25)) - exact).abs().max()
        assert err_heun < err_euler / 3, (prediction_type, err_heun, err_euler)
        fine = (sample_heun(den, x_start, pairs(start, 200)) - exact).abs().max()
        assert fine < 2e-3, (prediction_type, fine)
