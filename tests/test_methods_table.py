"""One table every registered method passes on the tiny pipeline: fit, save, load, apply, generate, undo,
metadata, artifacts for other base models, damaged files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _method_helpers import assert_same, concept_for, generate, load, other_shapes_pipeline, snapshot, trained

import editbench
from editbench import methods
from editbench.errors import EditbenchError
from editbench.fingerprint import LENGTH
from editbench.testing import tiny_pipeline

METHODS = methods.available()


def prompt_for(name: str) -> str:
    c = concept_for(name)
    return f"a photo of a {c.placeholder} {c.superclass}"


def test_builtins_registered():
    assert {"custom_diffusion", "dreambooth", "lora", "perfusion", "textual_inversion"} <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_fit_save_load_apply_generate_undo(name):
    pipe = tiny_pipeline()
    before, base_img = snapshot(pipe), generate(pipe, prompt_for(name))
    art = load(name, trained(name))  # trained() also checks that fit left its pipeline bitwise untouched
    editor = methods.get(name)()
    handle = editor.apply(pipe, art)
    edited = generate(pipe, prompt_for(name))
    assert np.isfinite(edited).all()
    assert not np.array_equal(edited, base_img), "applying the artifact did not change the output"
    handle.undo()
    assert_same(before, snapshot(pipe))
    assert np.array_equal(generate(pipe, prompt_for(name)), base_img)
    handle.undo()  # a second undo is a no-op


@pytest.mark.parametrize("name", METHODS)
def test_metadata(name):
    path = trained(name)
    header = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()["editbench"])
    art = load(name, path)
    assert header["method"] == art.method == name
    assert header["library_version"] == editbench.__version__
    assert header["base_fingerprint"] == methods.get(name)().fingerprint(tiny_pipeline())
    assert len(header["base_fingerprint"]) == LENGTH
    assert header["shapes"] == {k: list(v.shape) for k, v in art.tensors.items()}
    assert header["training"]["steps"] == 2 and header["training"]["wall_time_s"] > 0
    assert art.nbytes == path.stat().st_size


@pytest.mark.parametrize("name", METHODS)
def test_other_base_model_is_refused(name):
    other, art, editor = other_shapes_pipeline(), load(name, trained(name)), methods.get(name)()
    before = snapshot(other)
    with pytest.raises(EditbenchError, match="base model"):
        editor.apply(other, art)
    with pytest.raises(EditbenchError):  # shapes checked even when the fingerprint check is waived
        editor.apply(other, art, allow_fingerprint_mismatch=True)
    with pytest.raises(EditbenchError):
        editor.check_artifact(art, other)
    assert_same(before, snapshot(other))


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "missing"])
def test_damaged_artifact(name, damage, tmp_path):
    data = trained(name).read_bytes()
    path = tmp_path / "art.safetensors"
    if damage == "truncate":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "flip":  # one byte in the tensor data, after the header
        header = 8 + int.from_bytes(data[:8], "little")
        i = header + (len(data) - header) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
    elif damage == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    with pytest.raises(EditbenchError):
        methods.get(name)().load(path)
    with pytest.raises(EditbenchError):
        methods.get(name)().apply(tiny_pipeline(), path)


# learning rates of the default-run check below: 6 steps must move the tiny pipeline measurably (the toy defaults
# need tens of steps; textual inversion's norm cap keeps its row from moving in 6)
FAST_LR = {"textual_inversion": {"lr": 0.05, "embedding_norm_cap": None},
           "perfusion": {"lr_values": 0.75, "lr_embedding": 0.008}}


@pytest.mark.parametrize("name", METHODS)
def test_training_lowers_the_loss(name):
    """Default run: 6 steps at raised learning rates lower a fixed-noise denoising loss on the concept (the slow
    test below does it at the toy defaults in 60)."""
    from _method_helpers import denoising_loss, editor

    config = methods.get(name).Config()
    lrs = FAST_LR.get(name) or {k: 3 * getattr(config, k) for k in ("lr", "lr_values", "lr_embedding", "lr_modifier")
                                if isinstance(getattr(config, k, None), float)}
    pipe, concept = tiny_pipeline(), concept_for(name)
    ed = editor(name, **lrs)
    art = ed.fit(pipe, concept, steps=6, progress=False)
    phrase = ed.phrase(art)
    before = denoising_loss(pipe, concept, phrase)
    with ed.apply(pipe, art):
        after = denoising_loss(pipe, concept, phrase)
    assert after < before * (1 - 1e-4), (before, after)


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_training_lowers_the_concept_loss(name):
    """With the default (toy) learning rates, 60 steps lower a fixed-noise denoising loss on the concept."""
    from _method_helpers import denoising_loss, editor

    pipe, concept = tiny_pipeline(), concept_for(name)
    ed = editor(name, batch_size=4, num_class_images=4, class_inference_steps=10)
    art = ed.fit(pipe, concept, steps=60, progress=False)
    phrase = ed.phrase(art)
    before = denoising_loss(pipe, concept, phrase)
    with ed.apply(pipe, art):
        after = denoising_loss(pipe, concept, phrase)
    assert after < before, (before, after)


@pytest.mark.parametrize("name", METHODS)
def test_shaped_artifact_has_the_layout_of_a_trained_one(name, tmp_path):
    """``Editor.shaped_artifact`` (storage benchmarks) builds, without training, what ``fit`` would save."""
    from _method_helpers import editor

    pipe = tiny_pipeline()
    before = snapshot(pipe)
    shaped = editor(name).shaped_artifact(pipe, concept_for(name))
    assert_same(before, snapshot(pipe))
    real = load(name, trained(name))
    shapes = {k: tuple(v.shape) for k, v in shaped.tensors.items()}
    assert shapes == {k: tuple(v.shape) for k, v in real.tensors.items()}
    assert set(shaped.metadata) <= set(real.metadata) and shaped.metadata["phrase"] == real.metadata["phrase"]
    methods.get(name)().load(shaped.save(tmp_path / "shaped.safetensors"))  # passes every load-time check
