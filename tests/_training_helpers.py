"""Shared pieces of the tests of ``TrainConfig``'s optional training features (``tests/test_training_*.py``: gradient
checkpointing, mixed precision, resolution, class images, learning-rate schedules, validation images, TensorBoard,
8-bit Adam, the ``editbench train`` flags): fast fits on the tiny pipeline, an optimizer recording every step, an
interruption after a chosen checkpoint.

Every feature is off by default; the defaults train bitwise as before (the method and resume tests elsewhere hold
them to that). The feature tests check each one does what it says: the recomputation counted, the autocast dtype
seen by a hook, the learning rate read from the optimizer at every step against its closed form, the latent size
seen by the UNet, the validation images against an image sampled from the trained artifact.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _method_helpers import concept_for, editor

from editbench import methods
from editbench.testing import tiny_pipeline
from editbench.training import loop

METHODS = ("textual_inversion", "perfusion", "custom_diffusion", "dreambooth", "lora")
TEXT_ENCODER_IN_GRAPH = {"textual_inversion": True, "perfusion": True, "custom_diffusion": True,
                         "dreambooth": True, "lora": False}   # dreambooth here with train_text_encoder=True
NO_PRIOR = {"with_prior_preservation": False}


def pipe_fixture():
    """A module-scoped ``pipe`` fixture: the tiny pipeline, made once per test module (``pipe = pipe_fixture()``)."""

    @pytest.fixture(scope="module")
    def pipe():
        return tiny_pipeline()

    return pipe


def fast_kw(name: str, **kw) -> dict:
    """Fast settings: no class images, and for DreamBooth the text encoder trained too (so it is in the graph)."""
    out = dict(kw)
    if name == "dreambooth":
        out.setdefault("train_text_encoder", True)
    fields = {f.name for f in dataclasses.fields(methods.get(name).Config)}
    out.update({k: v for k, v in NO_PRIOR.items() if k in fields and k not in out})
    return out


def fit(pipe, name: str, steps: int = 2, checkpoint_dir=None, seed: int = 0, **kw):
    """``steps`` steps of method ``name`` on the toy concept with :func:`fast_kw` settings and ``kw``."""
    return editor(name, **fast_kw(name, **kw)).fit(pipe, concept_for(name), steps=steps, seed=seed, progress=False,
                                                   checkpoint_dir=checkpoint_dir)


def text_q(pipe):
    # the first projection of a layer the text encoder checkpoints (a recomputation stops early, once it has what
    # the backward pass needs: a hook on a module it leaves unfinished would not fire)
    enc = pipe.text_encoder
    enc = getattr(enc, "text_model", enc)                           # transformers < 5 nests the model
    return enc.encoder.layers[0].self_attn.q_proj


def latent_sizes(pipe):
    """The latent sizes the UNet sees while gradients are on (a list filled by the returned hook)."""
    sizes = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, args: sizes.append(tuple(args[0].shape[-2:])) if torch.is_grad_enabled() else None)
    return sizes, hook


class Recording(torch.optim.AdamW):
    """AdamW that records, at every step, each group's lr and the dtypes of its parameters and gradients."""

    log: list = []

    def step(self, closure=None):
        type(self).log.append([(g["lr"], [(p.dtype, None if p.grad is None else p.grad.dtype) for p in g["params"]])
                               for g in self.param_groups])
        return super().step(closure)


def recording_fixture():
    """A ``recording`` fixture (``recording = recording_fixture()``): training's "adamw" is :class:`Recording`;
    returns its log (one entry per optimizer step)."""

    @pytest.fixture
    def recording(monkeypatch):
        monkeypatch.setattr(Recording, "log", [])
        monkeypatch.setitem(loop.OPTIMIZERS, "adamw", Recording)
        return Recording.log

    return recording


class Stop(Exception):
    pass


real_save = loop.save_checkpoint


def interrupt_after(monkeypatch, at: int):
    """Make the run stop right after writing its checkpoint of step ``at`` (an interruption)."""
    real = loop.save_checkpoint

    def save(path, **kw):
        real(path, **kw)
        if kw["step"] == at:
            raise Stop

    monkeypatch.setattr(loop, "save_checkpoint", save)
