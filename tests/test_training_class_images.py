"""The class-image controls of the prior-preserving methods (``num_class_images``, ``class_resolution``): validated,
generated at ``class_resolution`` and cached by it, encoded at the training size. (Real class images from
``class_data_dir``: tests/test_prior.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _method_helpers import concept_for, editor
from _training_helpers import latent_sizes, pipe_fixture
from PIL import Image

from editbench.errors import EditbenchError
from editbench.methods.dreambooth.config import DreamBoothConfig
from editbench.methods.prior import make_prior

pipe = pipe_fixture()

def test_class_image_controls_are_validated():
    for bad in ({"class_resolution": 0}, {"class_resolution": 1.5}, {"num_class_images": 0}):
        with pytest.raises(EditbenchError, match=next(iter(bad))):
            DreamBoothConfig(**bad).validate()
    DreamBoothConfig(class_resolution=24, num_class_images=3).validate()


def test_class_images_are_generated_at_class_resolution_cached_by_it_and_encoded_at_the_training_size(pipe, tmp_path):
    concept = concept_for("dreambooth")
    kw = {"num_class_images": 3, "class_inference_steps": 2, "class_cache_dir": str(tmp_path)}
    folders: dict[int, Path] = {}                   # generation size -> cache entry
    for class_resolution, resolution in ((None, None), (24, None), (None, 32), (24, 32)):
        prior = make_prior(pipe, concept, DreamBoothConfig(**kw, class_resolution=class_resolution,
                                                           resolution=resolution))
        train_px = resolution or 16
        made_px = class_resolution or train_px
        assert prior.stats[0][0].shape == (3, 4, train_px // 2, train_px // 2)       # latents at training size
        new = set(tmp_path.iterdir()) - set(folders.values())
        if made_px in folders:
            assert not new                                                           # a cache hit
        else:
            assert len(new) == 1                                                     # a cache entry of its own
            folders[made_px] = new.pop()
        pngs = sorted(folders[made_px].glob("*.png"))
        assert len(pngs) == 3 and {Image.open(p).size for p in pngs} == {(made_px, made_px)}
    assert sorted(folders) == [16, 24, 32]


def test_training_with_class_resolution_sees_instance_and_class_latents_at_the_training_size(pipe, tmp_path):
    sizes, hook = latent_sizes(pipe)
    try:
        editor("dreambooth", class_resolution=24, resolution=32, class_cache_dir=str(tmp_path)).fit(
            pipe, concept_for("dreambooth"), steps=1, progress=False)
    finally:
        hook.remove()
    assert sizes == [(16, 16), (16, 16)]                             # instance loss, then prior loss
    assert {Image.open(p).size for p in tmp_path.rglob("*.png")} == {(24, 24)}
