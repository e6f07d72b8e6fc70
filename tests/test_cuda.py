"""Every method on a CUDA device: training (float32, bf16 autocast + gradient checkpointing, fp16 with loss
scaling), applying and sampling on the device, a half-precision pipeline, and an artifact trained on the device
applied on the CPU. Marked ``cuda``: ``python -m pytest -m cuda`` runs these (and the other CUDA / fp16 / bf16
tests); ``benchmarks/gpu.py`` runs that and records the result.

They skip without CUDA. ``EDITBENCH_TEST_DEVICE=cpu`` runs the same checks on the CPU (how they are kept working
on machines without a GPU; the half-precision pipeline is then bfloat16, which the CPU runs).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from _method_helpers import assert_same, concept_for, editor, snapshot

from editbench import methods
from editbench.testing import tiny_pipeline

DEVICE = torch.device(os.environ.get("EDITBENCH_TEST_DEVICE") or "cuda")
METHODS = ("perfusion", "custom_diffusion", "textual_inversion", "dreambooth", "lora")
NO_PRIOR = {"with_prior_preservation": False, "checkpoint_every": 0, "batch_size": 1}

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline().to(DEVICE)


def _fit(pipe, name: str, steps: int = 2, **kw):
    return editor(name, **NO_PRIOR, **kw).fit(pipe, concept_for(name), steps=steps, seed=0, progress=False)


def _image(pipe, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return pipe(prompt, num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images


def _trained_finite(art) -> None:
    assert all(torch.isfinite(v).all() for v in art.tensors.values() if v.is_floating_point())
    assert math.isfinite(art.metadata["training"]["loss_last"])


@pytest.mark.parametrize("name", METHODS)
def test_trains_applies_and_samples_on_the_device(pipe, name):
    before = snapshot(pipe)
    art = _fit(pipe, name)
    _trained_finite(art)
    training = art.metadata["training"]
    assert training["device"].startswith(DEVICE.type)
    assert training["memory_kind"] == ("cuda_max_allocated" if DEVICE.type == "cuda" else "cpu_rss_peak_delta")
    assert training["peak_memory_bytes"] > 0 if DEVICE.type == "cuda" else training["peak_memory_bytes"] >= 0
    assert_same(before, snapshot(pipe))
    prompt = f"a {concept_for(name).placeholder} star"
    with methods.get(name)().apply(pipe, art):
        image = _image(pipe, prompt)
    assert image.device.type == DEVICE.type or image.device.type == "cpu"
    assert torch.isfinite(image).all()
    assert_same(before, snapshot(pipe))


@pytest.mark.parametrize("name", METHODS)
def test_bf16_with_gradient_checkpointing_trains_on_the_device(pipe, name):
    before = snapshot(pipe)
    art = _fit(pipe, name, mixed_precision="bf16", gradient_checkpointing=True)
    _trained_finite(art)
    assert all(v.dtype == torch.float32 for v in art.tensors.values() if v.is_floating_point())
    assert_same(before, snapshot(pipe))


@pytest.mark.parametrize("name", ("perfusion", "textual_inversion"))
def test_fp16_with_loss_scaling_trains_on_the_device(pipe, name):
    art = _fit(pipe, name, steps=3, mixed_precision="fp16")
    _trained_finite(art)
    assert 0 <= art.metadata["training"]["fp16_skipped_steps"] <= 3


@pytest.mark.parametrize("name", ("perfusion", "lora", "textual_inversion", "custom_diffusion"))
def test_a_half_precision_pipeline_samples_with_an_artifact_trained_in_float32(pipe, name):
    art = _fit(pipe, name)
    half = tiny_pipeline().to(DEVICE, torch.float16 if DEVICE.type == "cuda" else torch.bfloat16)
    before = snapshot(half)
    with methods.get(name)().apply(half, art, allow_fingerprint_mismatch=True):  # same weights, other dtype
        image = _image(half, f"a {concept_for(name).placeholder} star")
    assert torch.isfinite(image.float()).all()
    assert_same(before, snapshot(half))


@pytest.mark.parametrize("name", METHODS)
def test_an_artifact_trained_on_the_device_applies_on_the_cpu(pipe, name, tmp_path):
    art = _fit(pipe, name)
    path = art.save(tmp_path / f"{name}.safetensors")
    cpu = tiny_pipeline()
    base = _image(cpu, f"a {concept_for(name).placeholder} star")
    with methods.get(name)().apply(cpu, path):
        edited = _image(cpu, f"a {concept_for(name).placeholder} star")
    assert torch.isfinite(edited).all() and not torch.equal(edited, base)
