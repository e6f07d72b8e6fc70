"""DreamBooth: diffusers folder export, storage as it is, prior preservation and its class-image cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _method_helpers import CLASS_CACHE, assert_same, concept_for, editor, generate, load, snapshot, trained

from editbench.methods.dreambooth import DreamBoothEditor, export_diffusers
from editbench.methods.prior import class_images
from editbench.testing import tiny_pipeline

NAME = "dreambooth"


def test_artifact_is_the_whole_unet_and_exports_to_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    path = trained(NAME)
    art = load(NAME, path)
    pipe = tiny_pipeline()
    n_bytes = sum(v.numel() * v.element_size() for v in pipe.unet.state_dict().values())
    assert n_bytes < art.nbytes < n_bytes + 200_000            # the full UNet, reported as it is (+ header)
    assert set(art.tensors) == {f"unet.{k}" for k in pipe.unet.state_dict()}
    export_diffusers(art, tmp_path)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "unet" / "config.json").is_file()
    prompt = "a photo of a sks star"
    with DreamBoothEditor().apply(pipe, art):
        ours = generate(pipe, prompt)
    unet = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
    theirs = StableDiffusionPipeline(**{**pipe.components, "unet": unet})
    theirs.set_progress_bar_config(disable=True)
    assert np.array_equal(generate(theirs, prompt), ours)
    assert not np.array_equal(generate(pipe, prompt), ours)


def test_text_encoder_option(tmp_path):
    art = load(NAME, trained(NAME, train_text_encoder=True))
    assert art.metadata["components"] == ["unet", "text_encoder"]
    pipe = tiny_pipeline()
    before = snapshot(pipe)
    te = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    with DreamBoothEditor().apply(pipe, art):
        assert any(not torch.equal(v, te[k]) for k, v in pipe.text_encoder.state_dict().items())
    assert_same(before, snapshot(pipe))
    export_diffusers(art, tmp_path)
    assert (tmp_path / "text_encoder" / "model.safetensors").is_file()


def test_prior_loss_is_added():
    pipe, concept = tiny_pipeline(), concept_for(NAME)
    first = {w: editor(NAME, prior_loss_weight=w).fit(pipe, concept, steps=1, progress=False)
             .metadata["training"]["loss_first"] for w in (0.0, 1.0, 2.5)}
    # same seed, same instance batch and class batch: the difference of the first losses is the prior term,
    # positive and proportional to prior_loss_weight
    prior = first[1.0] - first[0.0]
    assert prior > 1e-4
    assert first[2.5] - first[0.0] == pytest.approx(2.5 * prior, rel=1e-4)


def test_class_images_are_generated_by_the_base_model_and_cached(tmp_path):
    pipe = tiny_pipeline()
    first = class_images(pipe, "a photo of a star", 2, steps=2, cache_dir=tmp_path)
    assert first.shape == (2, 3, 16, 16) and first.min() >= -1 and first.max() <= 1
    (entry,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert sorted(p.name for p in entry.iterdir()) == ["0000.png", "0001.png", "manifest.json"]
    (entry / "0000.png").write_bytes(b"damaged")               # a damaged entry is regenerated
    again = class_images(pipe, "a photo of a star", 2, steps=2, cache_dir=tmp_path)
    assert torch.equal(again, first)
    other = class_images(pipe, "a photo of a circle", 2, steps=2, cache_dir=tmp_path)
    assert not torch.equal(other, first) and len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
    assert any(p.is_dir() for p in __import__("pathlib").Path(CLASS_CACHE).iterdir())  # used by the fits above
