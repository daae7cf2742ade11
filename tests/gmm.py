"""An exact teacher: a class-conditional isotropic Gaussian mixture, whose denoiser is closed-form.

For data x0 ~ sum_k pi_k N(mu_k, s_k^2 I) and x_t = alpha x0 + sigma eps, the posterior mean is
E[x0 | x_t] = sum_k r_k(x_t) (mu_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) (x_t - alpha mu_k)),
r_k the responsibilities under N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I). Class c keeps only its
own components; the null label keeps them all.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from distill.parameterisation import from_x0_eps
from distill.schedule import Schedule, _bcast


class GMMBackbone(nn.Module):
    """Called like a diffusers UNet: ``backbone(x, t, class_labels=y).sample``."""

    def __init__(
        self,
        means,
        stds,
        classes,
        schedule: Schedule,
        prediction_type="v_prediction",
        null_label=None,
    ):
        super().__init__()
        self.means = torch.as_tensor(means, dtype=torch.float64)  # K x d
        self.stds = torch.as_tensor(stds, dtype=torch.float64)  # K
        self.classes = torch.as_tensor(classes)  # K
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.null_label = null_label

    def posterior_mean(self, x, t, labels):
        shape = x.shape
        xf = x.reshape(len(x), -1).double()
        alpha, sigma = (v.double().reshape(-1, 1) for v in self.schedule.alpha_sigma(t))
        var = alpha**2 * self.stds**2 + sigma**2  # N x K
        d = xf.shape[1]
        diff2 = ((xf[:, None, :] - alpha[:, :, None] * self.means[None]) ** 2).sum(-1)
        logp = -0.5 * diff2 / var - 0.5 * d * var.log()
        if labels is not None:
            allowed = (self.classes[None, :] == labels[:, None]) | (
                labels[:, None] == self.null_label
            )
            logp = logp.masked_fill(~allowed, float("-inf"))
        r = logp.softmax(-1)
        gain = alpha * self.stds**2 / var  # N x K
        comp = self.means[None] + gain[:, :, None] * (
            xf[:, None, :] - alpha[:, :, None] * self.means[None]
        )
        return (r[:, :, None] * comp).sum(1).reshape(shape).to(x.dtype)

    def forward(self, x, t, class_labels=None):
        t = torch.as_tensor(t).expand(len(x))
        x0 = self.posterior_mean(x, t, class_labels)
        alpha, sigma = (_bcast(v, x) for v in self.schedule.alpha_sigma(t))
        eps = (x - alpha * x0) / sigma
        return SimpleNamespace(sample=from_x0_eps(x0, eps, alpha, sigma, self.prediction_type))


def two_class_gmm(schedule: Schedule, prediction_type="v_prediction", d=4):
    g = torch.Generator().manual_seed(0)
    means = torch.randn(4, d, generator=g, dtype=torch.float64)
    return GMMBackbone(
        means, [0.3, 0.2, 0.4, 0.25], [0, 0, 1, 1], schedule, prediction_type, null_label=2
    )


class Residual(nn.Module):
    """The GMM teacher plus a small learnable correction: a student initialised at the teacher."""

    def __init__(self, base, hidden=64):
        super().__init__()
        self.base = base
        self.net = nn.Sequential(
            nn.Linear(4 + 2 + 3, hidden), nn.SiLU(), nn.Linear(hidden, 4)
        ).double()
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x, t, class_labels=None):
        t = torch.as_tensor(t).expand(len(x)).double()
        feats = torch.cat(
            [
                x,
                torch.stack([t / 1000, (t / 1000) ** 2], 1),
                nn.functional.one_hot(class_labels, 3).double(),
            ],
            1,
        )
        return SimpleNamespace(sample=self.base(x, t.long(), class_labels).sample + self.net(feats))


class TimeResidual(nn.Module):
    """A GMM teacher plus a two-layer correction with alpha(t)/sigma(t) features and Fourier
    features of t: enough capacity for a critic (DMD2's fake score) to track a student's
    distribution at every noise level, which ``Residual`` lacks."""

    def __init__(self, base, hidden=256, labels=3, time_scale=1.0):
        super().__init__()
        self.base = base
        self.labels = labels  # ids label + 3 j: a w-conditioned (guidance-distilled) table
        self.net = nn.Sequential(
            nn.Linear(4 * 3 + 2 * 8 + labels, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 4),
        ).double()
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        freqs = time_scale * torch.pi * 2.0 ** torch.arange(8, dtype=torch.float64)
        self.register_buffer("freqs", freqs)

    def forward(self, x, t, class_labels=None):
        t = torch.as_tensor(t, device=x.device).expand(len(x))
        a, s = (v.reshape(-1, 1) for v in self.base.schedule.alpha_sigma(t))
        angle = (t.double() / 1000)[:, None] * self.freqs
        feats = torch.cat(
            [
                x,
                x * a,
                x * s,
                angle.sin(),
                angle.cos(),
                nn.functional.one_hot(class_labels, self.labels).double(),
            ],
            1,
        )
        base = self.base(x, t, class_labels % 3).sample
        return SimpleNamespace(sample=base + self.net(feats))


class PerfectProgressiveStudent(nn.Module):
    """A student that outputs exactly its progressive regression target on its own grid
    (``distill.progressive.student_grid``), in ``prediction_type``."""

    def __init__(self, teacher, student_steps: int, prediction_type: str):
        from distill.progressive import student_grid

        super().__init__()
        self.teacher, self.rows = teacher, student_grid(teacher, student_steps)
        self.prediction_type = prediction_type

    def forward(self, x, t, class_labels=None):
        from distill.progressive import progressive_target

        t = torch.as_tensor(t).expand(len(x))
        row = self.rows[(self.rows[:, 0] - t[0]).abs().argmin()]
        # flow: float32 timesteps (the stock scheduler's) are within 1e-4 of the grid's
        assert abs(float(row[0] - t[0])) < 1e-3, "sampled off the student's grid"
        t_mid, t_end = (row[i].expand(len(x)) for i in (1, 2))
        x0 = progressive_target(self.teacher, x, t, t_mid, t_end, class_labels)
        alpha, sigma = (_bcast(v, x) for v in self.teacher.schedule.alpha_sigma(t))
        eps = (x - alpha * x0) / sigma
        return SimpleNamespace(sample=from_x0_eps(x0, eps, alpha, sigma, self.prediction_type))


def mixture(gmm: GMMBackbone, n: int, g: torch.Generator):
    """n samples of the mixture and their class labels."""
    comp = torch.randint(0, 4, (n,), generator=g)
    x = gmm.means[comp] + gmm.stds[comp, None] * torch.randn(n, 4, generator=g, dtype=torch.float64)
    return x, gmm.classes[comp]


def sliced_wasserstein(a, b, projections=64, seed=0):
    """Mean over random directions of the 1-D W1 distance between the projected samples."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], projections, generator=g, dtype=a.dtype)
    dirs = dirs / dirs.norm(dim=0)
    pa, pb = (a @ dirs).sort(0).values, (b @ dirs).sort(0).values
    return (pa - pb).abs().mean().item()


def one_step_score(model, x_T, labels, data, gmm: GMMBackbone, t) -> tuple[float, list[float]]:
    """A 1-step student's samples from x_T at timestep t against the mixture: the mean over the
    two classes of the sliced W1 distance to the class's data, and the share of each class's
    samples nearest to each of its components."""
    from distill.consistency import sample_consistency

    x = sample_consistency(model, x_T, [t], labels)
    n = len(x_T)
    sw = []
    for c in (0, 1):
        ref = data[0][data[1] == c][: n // 2]
        sw.append(sliced_wasserstein(x[labels == c][: len(ref)], ref))
    nearest = torch.cdist(x, gmm.means).argmin(1)
    shares = [(nearest[labels == gmm.classes[k]] == k).double().mean().item() for k in range(4)]
    return sum(sw) / 2, shares


def ode_endpoints(teacher, x_T, labels, steps=400):
    """The flow teacher's exact ODE endpoints from noise x_T at s = 1: classical RK4 in s down to
    s = 1e-4, then its x0 there (measured: 2e-18 from 800 steps on the two-class mixture)."""
    T = teacher.schedule.num_train_timesteps
    grid = torch.linspace(1, 1e-4, steps + 1, dtype=torch.float64)

    def v(z, s):
        x0, eps = teacher.predict(z, torch.full((len(z),), float(s) * T), labels)
        return eps - x0

    x = x_T
    for a, b in zip(grid[:-1], grid[1:], strict=True):
        h = b - a
        k1 = v(x, a)
        k2 = v(x + h / 2 * k1, a + h / 2)
        k3 = v(x + h / 2 * k2, a + h / 2)
        k4 = v(x + h * k3, b)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return teacher.predict(x, torch.full((len(x),), float(grid[-1]) * T), labels)[0]
