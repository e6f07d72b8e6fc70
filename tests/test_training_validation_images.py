"""Validation images (``validation_every``, ``validation_prompts``): written at their steps beside the checkpoint,
sampled from the trained state (compared with an image sampled from the trained artifact), training unchanged.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _method_helpers import assert_same, snapshot
from _training_helpers import fit, pipe_fixture
from PIL import Image

from editbench import methods
from editbench.errors import EditbenchError

pipe = pipe_fixture()

def test_validation_images_appear_at_their_steps_from_the_trained_state_and_leave_training_unchanged(pipe,
                                                                                                     tmp_path):
    before, attrs = snapshot(pipe), dict(vars(pipe))
    scheduler_state = dict(vars(pipe.scheduler))
    prompts = ("a photo of {}", "{} on a table")
    art = fit(pipe, "textual_inversion", steps=4, checkpoint_dir=tmp_path, validation_every=2,
              validation_prompts=prompts, validation_inference_steps=2)
    folder = tmp_path / "validation"
    assert sorted(p.name for p in folder.iterdir()) == ["step_00002", "step_00004"]
    for step in ("step_00002", "step_00004"):
        assert sorted(p.name for p in (folder / step).iterdir()) == ["00.png", "01.png", "prompts.json"]
        assert json.loads((folder / step / "prompts.json").read_text()) == {
            "00.png": "a photo of <toy-star>", "01.png": "<toy-star> on a table"}
    assert_same(before, snapshot(pipe))
    assert vars(pipe).keys() == attrs.keys()            # sampling set no attribute of the pipeline (it used a copy)
    assert all(vars(pipe)[k] is v for k, v in attrs.items() if k != "_internal_dict")   # (the config: re-made equal
    assert vars(pipe)["_internal_dict"] == attrs["_internal_dict"]                      # by any EditHandle undo)
    assert vars(pipe.scheduler).keys() == scheduler_state.keys()
    assert all(vars(pipe.scheduler)[k] is v for k, v in scheduler_state.items())    # sampled on a copy
    plain = fit(pipe, "textual_inversion", steps=4)
    assert torch.equal(art.tensors["embeddings"], plain.tensors["embeddings"])    # sampling took no randomness
    # the step-2 image is what the step-2 artifact samples (same prompt, sampler and seed)
    at2 = fit(pipe, "textual_inversion", steps=2)
    ed = methods.get("textual_inversion")()
    handle = ed.apply(pipe, at2)
    try:
        for i, prompt in enumerate(["a photo of <toy-star>", "<toy-star> on a table"]):
            want = pipe(prompt, num_inference_steps=2, guidance_scale=7.5, height=16, width=16,
                        generator=torch.Generator().manual_seed(i)).images[0]
            got = Image.open(folder / "step_00002" / f"{i:02d}.png")
            assert np.array_equal(np.asarray(got), np.asarray(want))
    finally:
        handle.undo()
    assert not np.array_equal(np.asarray(Image.open(folder / "step_00002" / "00.png")),
                              np.asarray(Image.open(folder / "step_00004" / "00.png")))   # it kept training


@pytest.mark.parametrize("name", ["perfusion", "custom_diffusion", "dreambooth", "lora"])
def test_validation_images_for_every_method(pipe, tmp_path, name):
    before = snapshot(pipe)
    art = fit(pipe, name, steps=2, checkpoint_dir=tmp_path, validation_every=1, validation_inference_steps=2)
    imgs = sorted(tmp_path.glob("validation/step_*/*.png"))
    assert [p.parent.name for p in imgs] == ["step_00001", "step_00002"]
    phrase = methods.get(name)().phrase(art)
    assert phrase in json.loads((tmp_path / "validation/step_00001/prompts.json").read_text())["00.png"]
    assert_same(before, snapshot(pipe))


def test_validation_and_logs_need_a_checkpoint_dir(pipe):
    with pytest.raises(EditbenchError, match="validation images are written beside the checkpoint"):
        fit(pipe, "textual_inversion", validation_every=1)
