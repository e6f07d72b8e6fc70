"""Mixed precision (``mixed_precision='bf16'/'fp16'``): the autocast dtype seen by hooks, trained parameters kept
float32, fp16's loss scaling and skipped overflow steps, devices that cannot run it. Most need CUDA (``-m cuda``).
"""

from __future__ import annotations

import math

import pytest
import torch
from _method_helpers import assert_same, snapshot
from _training_helpers import METHODS, fit, pipe_fixture, recording_fixture, text_q

from editbench.errors import EditbenchError
from editbench.methods.tokens import initial_rows

pipe = pipe_fixture()
recording = recording_fixture()

def _dtype_probe(pipe):
    seen = {"unet": set(), "text": set()}
    hooks = [pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q.register_forward_hook(
                 lambda m, a, out: seen["unet"].add(out.dtype) if torch.is_grad_enabled() else None),
             text_q(pipe).register_forward_hook(
                 lambda m, a, out: seen["text"].add(out.dtype) if torch.is_grad_enabled() else None)]
    return seen, hooks


@pytest.mark.cuda
@pytest.mark.parametrize("name", METHODS)
def test_bf16_autocast_runs_the_forward_in_bf16_and_keeps_trained_parameters_float32(pipe, name, recording):
    before = snapshot(pipe)
    seen, hooks = _dtype_probe(pipe)
    try:
        art = fit(pipe, name, mixed_precision="bf16")
    finally:
        for h in hooks:
            h.remove()
    assert seen["unet"] == {torch.bfloat16} and seen["text"] == {torch.bfloat16}
    assert recording and all(p == torch.float32 and g == torch.float32
                             for step in recording for _, ps in step for p, g in ps if g is not None)
    assert math.isfinite(art.metadata["training"]["loss_last"])
    assert "fp16_skipped_steps" not in art.metadata["training"]
    assert_same(before, snapshot(pipe))


@pytest.mark.parametrize("name", METHODS)
def test_every_method_trains_on_a_bfloat16_pipeline_with_float32_trainables(name, recording):
    """A pipeline loaded in bfloat16 (frozen weights in half precision, as diffusers' training scripts keep them)
    with bf16 autocast: every method trains float32 parameters with float32 gradients, writes its artifact, and
    leaves the pipeline's weights and dtypes as they were."""
    from editbench.testing import tiny_pipeline

    half = tiny_pipeline().to(torch.bfloat16)
    before = snapshot(half)
    art = fit(half, name, mixed_precision="bf16", gradient_checkpointing=True)
    assert recording and all(p == torch.float32 and g in (torch.float32, None)
                             for step in recording for _, ps in step for p, g in ps), recording[:1]
    assert math.isfinite(art.metadata["training"]["loss_last"])
    # DreamBooth's artifact is the tuned components in the base model's dtype (docs/methods/dreambooth.md)
    assert {v.dtype for v in art.tensors.values() if v.is_floating_point()} == \
        {torch.bfloat16 if name == "dreambooth" else torch.float32}
    assert_same(before, snapshot(half))
    assert {p.dtype for p in half.unet.parameters()} == {torch.bfloat16}


def test_no_mixed_precision_runs_float32(pipe):
    seen, hooks = _dtype_probe(pipe)
    try:
        fit(pipe, "textual_inversion")
    finally:
        for h in hooks:
            h.remove()
    assert seen == {"unet": {torch.float32}, "text": {torch.float32}}


@pytest.mark.cuda
def test_fp16_scales_the_loss_and_unscales_before_the_step(pipe, monkeypatch):
    calls = []

    class Spy(torch.amp.GradScaler):
        def scale(self, outputs):
            calls.append("scale")
            return super().scale(outputs)

        def unscale_(self, optimizer):
            calls.append("unscale")
            return super().unscale_(optimizer)

        def step(self, optimizer, *a, **kw):
            calls.append("step")
            return super().step(optimizer, *a, **kw)

    monkeypatch.setattr(torch.amp, "GradScaler", Spy)
    seen, hooks = _dtype_probe(pipe)
    try:
        art = fit(pipe, "perfusion", steps=2, grad_accum=2, mixed_precision="fp16")
    finally:
        for h in hooks:
            h.remove()
    assert calls == ["scale", "scale", "unscale", "step"] * 2     # per micro-batch, then per optimizer step
    assert seen["unet"] == {torch.float16}
    assert art.metadata["training"]["fp16_skipped_steps"] == 0


@pytest.mark.cuda
def test_fp16_skips_the_steps_whose_gradients_overflow(pipe, monkeypatch):
    class Huge(torch.amp.GradScaler):
        def __init__(self, device="cuda", init_scale=2.0 ** 16, *a, **kw):
            super().__init__(device, 2.0 ** 120, *a, **kw)       # scaled fp16 gradients overflow

    monkeypatch.setattr(torch.amp, "GradScaler", Huge)
    art = fit(pipe, "textual_inversion", steps=2, mixed_precision="fp16", embedding_norm_cap=None)
    assert art.metadata["training"]["fp16_skipped_steps"] == 2
    assert torch.equal(art.tensors["embeddings"], initial_rows(pipe, ["star"]))   # no step was taken


@pytest.mark.cuda
def test_mixed_precision_the_device_cannot_run_is_a_clear_error(pipe, monkeypatch):
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    with pytest.raises(EditbenchError, match=r"mixed_precision='fp16' cannot run on cpu.*no autocast"):
        fit(pipe, "textual_inversion", mixed_precision="fp16")
    monkeypatch.undo()

    class Ignored:  # an autocast that silently does nothing (as torch does for a dtype a device lacks)
        def __init__(self, *a, **kw):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch, "autocast", Ignored)
    with pytest.raises(EditbenchError, match=r"mixed_precision='bf16'.*ran in torch.float32"):
        fit(pipe, "textual_inversion", mixed_precision="bf16")
