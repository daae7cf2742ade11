"""Train the digits classifier behind FD-digits and class accuracy; writes accel/assets/classifier/.

    python -m accel.assets.make_classifier

Trained on 80% of the digits with small random shifts and Gaussian pixel noise, so that it judges
generated digits by their shape rather than by pixel-exact texture; the held-out 20% accuracy is
written to classifier/metrics.json.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from accel.demo.digits import CLASSIFIER_DIR, DigitsClassifier, digits_dataset


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    shifts = torch.randint(-1, 2, (2,), generator=g).tolist()
    x = torch.roll(x, shifts=shifts, dims=(2, 3))
    return (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def main(epochs: int = 40, seed: int = 0) -> None:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = digits_dataset()
    perm = torch.randperm(len(x), generator=g)
    n_train = int(0.8 * len(x))
    tr, te = perm[:n_train], perm[n_train:]
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for _ in range(epochs):
        model.train()
        for idx in tr[torch.randperm(n_train, generator=g)].split(64):
            loss = torch.nn.functional.cross_entropy(model(augment(x[idx], g)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x[te]).argmax(1) == y[te]).float().mean().item()
    print(f"held-out accuracy {acc:.4f}")
    CLASSIFIER_DIR.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(CLASSIFIER_DIR / "model.safetensors"),
    )
    (CLASSIFIER_DIR / "metrics.json").write_text(
        json.dumps({"held_out_accuracy": acc, "epochs": epochs, "seed": seed}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
