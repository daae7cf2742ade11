"""Image-quality metrics of the quality gate, by the name a model's ``accel.json``
(``evaluation.metric``) and the gate configs use (``accel.registry.METRICS``). A metric is fed the
parent's and the candidate's images of each batch, drawn from the same noise and conditions, and
gives the value the gate compares with its threshold. Image RMSE is built in; FD-digits is the
digits demo's (``accel.demo.digits.FDDigits``)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from accel.core.plan import SamplerPlan


class Metric(Protocol):
    default_threshold: float

    def add(
        self, seed: int, parent: np.ndarray, candidate: np.ndarray, conditions: np.ndarray | None
    ) -> None:
        """One batch of both sides' images (ValueError: images this metric cannot read)."""

    def result(self, threshold: float) -> tuple[dict, float, str]:
        """(figures for the artifact's metrics, the value judged, the verdict in words)."""


class ImageRMSE:
    """RMS difference between the candidate's and the parent's images from the same noise
    (images in [-1, 1]); the threshold is that RMS. Reads any model's images."""

    default_threshold = 0.05

    def __init__(self, plan: SamplerPlan) -> None:
        self.sq_err, self.count = 0.0, 0

    def add(self, seed, parent, candidate, conditions) -> None:
        self.sq_err += float(((candidate - parent) ** 2).sum())
        self.count += parent.size

    def result(self, threshold: float) -> tuple[dict, float, str]:
        rms = (self.sq_err / self.count) ** 0.5
        return {}, rms, f"image RMS difference from the parent {rms:.4f} (allowed {threshold})"
