"""Gradient checkpointing (``gradient_checkpointing=True``) on the tiny pipeline: the recomputation counted by forward
hooks, the same training as without it, the pipeline's switches restored after (or left on where the user set them).
"""

from __future__ import annotations

import pytest
import torch
from _method_helpers import assert_same, snapshot
from _training_helpers import METHODS, TEXT_ENCODER_IN_GRAPH, fit, pipe_fixture, text_q

from editbench.errors import EditbenchError

pipe = pipe_fixture()

class _Counter:
    """Forward calls of a module while gradients are on (class images and validation run without them). The hook
    is a plain function, so that a deep copy of the module (DreamBooth trains one) counts here too."""

    def __init__(self, module: torch.nn.Module):
        self.n = 0

        def hook(module, args, out):
            self.n += torch.is_grad_enabled()

        self.handle = module.register_forward_hook(hook)

    def remove(self):
        self.handle.remove()


def _unet_q(pipe):
    # early in a transformer block diffusers checkpoints, on every method's gradient path (backward reaches the
    # text through its attention; checkpointing recomputes only the blocks the backward pass goes through)
    return pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q


@pytest.mark.parametrize("name", METHODS)
def test_gradient_checkpointing_recomputes_gives_the_same_training_and_is_switched_off_after(pipe, name):
    before, switches = snapshot(pipe), _switches(pipe)
    counts = {}
    for gc in (False, True):
        unet, text = _Counter(_unet_q(pipe)), _Counter(text_q(pipe))
        flags = []
        probe = pipe.unet.register_forward_pre_hook(lambda m, a: flags.append(m.is_gradient_checkpointing))
        try:
            art = fit(pipe, name, gradient_checkpointing=gc)
        finally:
            unet.remove(), text.remove(), probe.remove()
        counts[gc] = (unet.n, text.n, art)
        assert flags and set(flags) == {gc}     # (DreamBooth: on its UNet copy, which carries the hook)
    (u0, t0, a0), (u1, t1, a1) = counts[False], counts[True]
    assert u0 > 0 and u1 == 2 * u0                                  # every UNet block forward ran again in backward
    assert t1 == (2 * t0 if TEXT_ENCODER_IN_GRAPH[name] else t0)    # the text encoder: only where trained through
    assert a0.tensors.keys() == a1.tensors.keys()
    for k, v in a0.tensors.items():
        torch.testing.assert_close(a1.tensors[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert a1.metadata["training"]["loss_first"] == pytest.approx(a0.metadata["training"]["loss_first"], rel=1e-6)
    assert not pipe.unet.is_gradient_checkpointing
    assert _switches(pipe) == switches                                   # every attribute as it was
    assert_same(before, snapshot(pipe))


def _switches(pipe) -> list:
    """The checkpointing attributes of every UNet and text-encoder module (absent: a marker)."""
    return [(c, n, a, vars(m).get(a, "absent")) for c in ("unet", "text_encoder")
            for n, m in getattr(pipe, c).named_modules()
            for a in ("gradient_checkpointing", "_gradient_checkpointing_func", "forward")]


def test_gradient_checkpointing_the_user_enabled_stays_enabled(pipe):
    def func(module, *args):
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    switches = _switches(pipe)
    pipe.unet.enable_gradient_checkpointing(func)
    try:
        enabled = _switches(pipe)
        fit(pipe, "textual_inversion", gradient_checkpointing=True)
        assert _switches(pipe) == enabled and pipe.unet.is_gradient_checkpointing
    finally:
        for c, n, attr, value in switches:                 # back to the module fixture's state
            m = getattr(pipe, c).get_submodule(n)
            if value == "absent":
                vars(m).pop(attr, None)
            else:
                setattr(m, attr, value)
    assert _switches(pipe) == switches


def test_gradient_checkpointing_of_an_unsupported_unet_is_a_clear_error(pipe, monkeypatch):
    monkeypatch.setattr(type(pipe.unet), "_supports_gradient_checkpointing", False)
    with pytest.raises(EditbenchError, match="does not support it.*gradient_checkpointing=False"):
        fit(pipe, "textual_inversion", gradient_checkpointing=True)
