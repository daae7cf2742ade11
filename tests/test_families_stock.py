"""The tiny family pipelines of families.py run as stock diffusers pipelines, also after a
save_pretrained / from_pretrained round trip (offline tokenizers and components included)."""

import numpy as np
import pytest
import torch

from families import (
    FAMILIES,
    RESOLUTION,
    build_pipeline,
    latent_shape,
    load_kwargs,
    stock_kwargs,
    write_pipeline,
)


def _call(pipe, family):
    kwargs = dict(
        num_inference_steps=2, guidance_scale=2.0, output_type="np", **stock_kwargs(family)
    )
    if family == "dit":  # no prompt, no latents= argument
        return pipe(class_labels=[1], generator=torch.Generator().manual_seed(0), **kwargs).images
    latents = torch.randn(latent_shape(family), generator=torch.Generator().manual_seed(0))
    return pipe("a red circle", latents=latents, **kwargs).images


@pytest.mark.parametrize("family", FAMILIES)
def test_stock_pipeline_runs_and_reloads(family, tmp_path):
    from diffusers import DiffusionPipeline

    pipe = build_pipeline(family)
    images = _call(pipe, family)
    assert images.shape == (1, *RESOLUTION[family], 3)
    assert np.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0

    path = write_pipeline(family, tmp_path / family)
    reloaded = DiffusionPipeline.from_pretrained(path, **load_kwargs(family))
    reloaded.set_progress_bar_config(disable=True)
    assert type(reloaded) is type(pipe)
    again = _call(reloaded, family)
    np.testing.assert_allclose(again, images, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_build_is_seeded(family):
    a, b, c = (build_pipeline(family, seed=s) for s in (0, 0, 1))
    for name, module in a.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        sa, sb, sc = (p.components[name].state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), name
