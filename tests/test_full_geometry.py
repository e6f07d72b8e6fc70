"""Every method at full SD 1.5 size (860 M-parameter UNet, 12-layer CLIP-L text encoder, the SD VAE; random
weights built offline by :func:`editbench.testing.random_pipeline`) on the CPU: 2 training steps at 256 px, the
artifact applied and an image generated at 256 px; the base weights unchanged afterwards (compared by fingerprint:
a copy of the pipeline would add 4.3 GB to DreamBooth's ~14 GB of optimizer state).

Marked ``slow`` (7 min 24 s and a peak of 19.2 GB resident on 2 CPU cores, 2026-12-05): ``python -m pytest -m slow
tests/test_full_geometry.py``.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from _method_helpers import concept_for

from editbench import methods
from editbench.fingerprint import pipeline_fingerprint
from editbench.testing import random_pipeline

METHODS = ("perfusion", "custom_diffusion", "textual_inversion", "dreambooth", "lora")
RESOLUTION = 256

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipe():
    return random_pipeline("sd15")


@pytest.mark.parametrize("name", METHODS)
def test_every_method_fits_applies_and_generates_at_full_sd15_size(pipe, name):
    assert sum(p.numel() for p in pipe.unet.parameters()) > 850e6                 # really SD 1.5's UNet
    before = pipeline_fingerprint(pipe, pipe.tokenizer)
    fields = {f.name for f in dataclasses.fields(methods.get(name).Config)}
    wanted = {"with_prior_preservation": False, "checkpoint_every": 0, "batch_size": 1, "resolution": RESOLUTION}
    editor = methods.get(name)(**{k: v for k, v in wanted.items() if k in fields})
    concept = concept_for(name)
    art = editor.fit(pipe, concept, steps=2, seed=0, progress=False)
    training = art.metadata["training"]
    assert training["steps"] == 2 and math.isfinite(training["loss_last"])
    assert all(torch.isfinite(v).all() for v in art.tensors.values() if v.is_floating_point())
    assert pipeline_fingerprint(pipe, pipe.tokenizer) == before                    # training left no trace
    with methods.get(name)().apply(pipe, art), torch.no_grad():
        image = pipe(f"a photo of {concept.placeholder} {concept.superclass}", height=RESOLUTION, width=RESOLUTION,
                     num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                     output_type="pt").images
    assert image.shape == (1, 3, RESOLUTION, RESOLUTION) and torch.isfinite(image).all()
    assert pipeline_fingerprint(pipe, pipe.tokenizer) == before                    # apply reverted exactly
