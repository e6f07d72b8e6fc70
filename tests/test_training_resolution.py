"""The training resolution (``resolution``): the latent size the UNet sees, and sizes the VAE cannot encode.
"""

from __future__ import annotations

import pytest
from _training_helpers import fit, latent_sizes, pipe_fixture

from editbench.errors import EditbenchError

pipe = pipe_fixture()

@pytest.mark.parametrize("name", ["perfusion", "custom_diffusion"])
def test_resolution_override_changes_the_latent_size_the_unet_sees(pipe, name):
    factor = pipe.vae_scale_factor
    for resolution, want in ((None, pipe.unet.config.sample_size), (32, 32 // factor)):
        sizes, hook = latent_sizes(pipe)
        try:
            fit(pipe, name, resolution=resolution, augment=False)
        finally:
            hook.remove()
        assert sizes and set(sizes) == {(want, want)}


def test_resolution_not_a_multiple_of_the_vae_factor_is_a_clear_error(pipe):
    with pytest.raises(EditbenchError, match=r"resolution=33 is not a multiple of this VAE's scale factor 2"):
        fit(pipe, "lora", resolution=33)
