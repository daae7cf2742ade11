import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from accel.core.errors import CheckpointError
from distill.schedule import Schedule


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_alphas_cumprod_match_diffusers(beta_schedule):
    ref = DDPMScheduler(beta_schedule=beta_schedule)
    ours = Schedule.from_config(dict(ref.config, _class_name="DDPMScheduler"))
    torch.testing.assert_close(
        ours.alphas_cumprod.float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-7
    )
    alpha, sigma = ours.alpha_sigma(torch.tensor([0, 500, 999, -1]))
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(4, dtype=torch.float64))
    assert alpha[-1] == 1 and sigma[-1] == 0


@pytest.mark.parametrize("steps", [1, 2, 4, 8, 16, 50])
def test_ddim_timesteps_match_diffusers_trailing(steps):
    ref = DDIMScheduler(timestep_spacing="trailing")
    ref.set_timesteps(steps)
    ours = Schedule.from_config(dict(ref.config, _class_name="DDIMScheduler")).ddim_timesteps(steps)
    assert [t for t, _ in ours] == ref.timesteps.tolist()
    assert ours[-1][1] < 0 or steps > 1000 // 2


def test_flow_schedule():
    s = Schedule.from_config({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.0})
    alpha, sigma = s.alpha_sigma(torch.tensor([0, 500, 1000]))
    torch.testing.assert_close(sigma, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(alpha + sigma, torch.ones(3, dtype=torch.float64))


def test_unknown_beta_schedule_is_a_clear_error():
    with pytest.raises(CheckpointError, match="beta_schedule 'sigmoid'.*squaredcos_cap_v2"):
        Schedule.from_config({"beta_schedule": "sigmoid"})
