"""Image quality on the digits demo: FD-digits and class accuracy.

FD-digits is the Fréchet distance (Heusel et al. 2017, the FID formula) between Gaussians fitted to
the penultimate-layer features of a small digits classifier shipped in ``accel/assets/classifier``
(made by ``python -m accel.assets.make_classifier``), the classifier playing Inception's role at
16x16. Class accuracy is the fraction of class-conditional samples the classifier labels as their
condition.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

ASSETS = Path(__file__).parents[1] / "assets"
CLASSIFIER_DIR = ASSETS / "classifier"
TEACHER_DIR = ASSETS / "teacher"


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a handwritten {word}",
    "the digit {num}",
    "a drawing of the number {word}",
    "number {num}",
    "{word}",
    "a {word} written by hand",
    "handwritten digit {word}",
    "an image of a {num}",
)
"""Caption phrasings of the text-to-image teacher's training data; the first is its test prompt."""


def caption(label: int, template: int = 0) -> str:
    """The prompt of ``TEMPLATES[template]`` for a digit label ("a handwritten seven")."""
    return TEMPLATES[template % len(TEMPLATES)].format(word=DIGIT_WORDS[label], num=label)


def digits_dataset(
    size: tuple[int, int] | None = None, channels: int = 1, captions: bool = False
) -> tuple[torch.Tensor, torch.Tensor | list[str]]:
    """scikit-learn's 1797 digits as float32 N x 1 x 16 x 16 in [-1, 1] and int64 labels (the
    ``digits`` row of ``accel.registry.DATASETS``).

    8x8 values 0..16 are scaled by 1/16 and upsampled bilinearly to 16x16. For a text-to-image
    teacher: resized bilinearly to ``size`` (H, W), ``channels`` copies of the gray channel, with
    ``captions`` cycling through ``TEMPLATES`` instead of labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = nn.functional.interpolate(x, size=16, mode="bilinear", align_corners=False) * 2 - 1
    y = torch.tensor(d.target, dtype=torch.int64)
    if size is not None:
        x = nn.functional.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    x = x.repeat(1, channels, 1, 1)
    if captions:
        return x, [caption(int(label), i) for i, label in enumerate(y)]
    return x, y


class DigitsClassifier(nn.Module):
    """A small CNN; ``features`` (64-d, penultimate layer) feed FD-digits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 64),
            nn.SiLU(),
        )
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@lru_cache(maxsize=1)
def load_classifier() -> DigitsClassifier:
    from distill.models import load_safetensors

    model = DigitsClassifier()
    model.load_state_dict(load_safetensors(CLASSIFIER_DIR / "model.safetensors"))
    return model.eval()


@torch.no_grad()
def features_and_predictions(images: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Classifier features (float64) and predicted labels of images in [-1, 1], N x 1 x 16 x 16
    (larger images, the text-to-image teacher's 32 x 32, are area-resized to 16; RGB images are
    averaged to gray first)."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32)).clamp(-1, 1)
    if x.shape[1:] != (1, 16, 16):
        if x.shape[1] not in (1, 3):
            raise ValueError(f"FD-digits needs gray or RGB digit images, got {tuple(x.shape[1:])}")
        x = nn.functional.interpolate(x.mean(1, keepdim=True), size=16, mode="area")
    clf = load_classifier()
    feats, preds = [], []
    for chunk in x.split(1024):
        f = clf.features(chunk)
        feats.append(f.double())
        preds.append(clf.head(f).argmax(1))
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between features a (N x d) and b."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = np.real(linalg.sqrtm(s_a @ s_b))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


@lru_cache(maxsize=1)
def _real_features() -> np.ndarray:
    x, _ = digits_dataset()
    return features_and_predictions(x)[0]


def evaluate_images(images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> dict:
    """FD-digits against all 1797 real digits, and class accuracy, of images in [-1, 1]."""
    return evaluate_features(*features_and_predictions(images), labels)


class Features:
    """The classifier's features and predictions of image batches, gathered for FD-digits and
    class accuracy without keeping the images."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, images: np.ndarray, labels) -> None:
        self.parts.append((*features_and_predictions(images), np.asarray(labels)))

    def evaluate(self) -> dict:
        return evaluate_features(*(np.concatenate([p[k] for p in self.parts]) for k in range(3)))


def evaluate_batches(batches) -> dict:
    """``evaluate_images`` of a stream of (images, labels) batches (``draw``), holding only the
    classifier's features of the images seen so far."""
    features = Features()
    for images, labels in batches:
        features.add(images, labels)
    return features.evaluate()


def evaluate_features(feats: np.ndarray, preds: np.ndarray, labels) -> dict:
    """FD-digits and class accuracy from the classifier's features and predicted labels."""
    labels = np.asarray(labels)
    return {
        "fd_digits": frechet_distance(feats, _real_features()),
        "class_accuracy": float((preds == labels).mean()),
        "n": int(len(labels)),
    }


def fd_floor(seed: int = 0) -> float:
    """FD-digits between two disjoint random halves of the real data: the best a model can show."""
    feats = _real_features()
    perm = np.random.default_rng(seed).permutation(len(feats))
    half = len(feats) // 2
    return frechet_distance(feats[perm[:half]], feats[perm[half:]])


def generate(
    runtime, plan, n: int, seed: int, num_classes: int | None, chunk: int = 64, on_step=None
):
    """n samples from a runtime and sampler plan, on the noise and labels ``accel sample`` uses:
    noise ~ numpy default_rng(seed).standard_normal, labels 0..K-1 cycled (a text model: its
    evaluation prompts cycled, the labels their indices). Images in [-1, 1], drawn in batches of
    ``chunk`` (``accel.runtime.draw``). ``on_step`` sees the graph's feeds of every step
    (``accel.runtime.sample``)."""
    from accel.runtime import draw

    stream = draw(runtime, plan, n, seed, chunk, plan.evaluation_prompts, num_classes, on_step)
    parts = list(stream)
    images = np.concatenate([p[0] for p in parts])
    if parts[0][1] is None:
        return images, None
    return images, np.concatenate([p[1] for p in parts])


DIGITS_SHAPE = [1, 16, 16]


class FDDigits:
    """The quality gate's FD-digits (``accel.registry.METRICS["fd_digits"]``): the candidate's
    FD-digits against its parent's, each the mean over the gate's seeds; the value judged is the
    relative increase (threshold: the largest allowed, 0.05 = 5%). Reads the pixel digits models'
    1 x 16 x 16 samples and pipelines' decoded images of digits (gray or RGB, resized); a text
    model's conditions are the indices of its evaluation prompts, which must be the ten digits in
    order (as the text teachers' are) for the class accuracy to mean anything."""

    default_threshold = 0.05

    def __init__(self, plan) -> None:
        if list(plan.sample_shape) != DIGITS_SHAPE and not plan.components:
            raise ValueError(
                "the quality gate's FD-digits needs 1x16x16 digit images, but this model samples "
                + "x".join(map(str, plan.sample_shape))
            )
        self.features: dict[int, dict[str, Features]] = {}

    def add(self, seed, parent, candidate, conditions) -> None:
        sides = self.features.setdefault(seed, {"parent": Features(), "candidate": Features()})
        sides["parent"].add(parent, conditions)
        sides["candidate"].add(candidate, conditions)

    def result(self, threshold: float) -> tuple[dict, float, str]:
        figures = {}
        for who in ("parent", "candidate"):
            per_seed = [sides[who].evaluate() for sides in self.features.values()]
            figures[who] = {
                key: float(np.mean([s[key] for s in per_seed]))
                for key in ("fd_digits", "class_accuracy")
            }
        before, after = figures["parent"]["fd_digits"], figures["candidate"]["fd_digits"]
        value = after / before - 1
        verdict = (
            f"FD-digits {after:.3f} against the parent's {before:.3f} "
            f"({value:+.1%}, allowed +{threshold:.1%})"
        )
        return figures, value, verdict
