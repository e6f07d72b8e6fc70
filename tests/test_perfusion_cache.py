"""Perfusion's per-step output cache: the K/V projections read the text encoding, which is the same tensor at
every denoising step, so ``GatedRank1Linear`` returns its previous output for the very same, unmodified input.
The cache must never change a result."""

from __future__ import annotations

import pytest
import torch
from test_perfusion import craft  # the Perfusion tests' artifact builder

from editbench.methods.perfusion import PerfusionEditor
from editbench.testing import tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def sample(pipe, prompt, steps=4):
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=3.0, height=16, width=16, generator=g,
                output_type="pt").images


def set_cache(handle, on: bool) -> None:
    for layer in handle.info["layers"].values():
        layer.cache_outputs = on


@pytest.mark.parametrize("lock", ["local", "global"])
def test_cached_sampling_equals_uncached_bitwise(pipe, lock):
    words = [("<thing>", "dog"), ("<other>", "cat")]
    prompt = "a <thing> and a <other> in a garden"
    with PerfusionEditor().apply(pipe, craft(pipe, words, prompt), lock=lock) as handle:
        set_cache(handle, False)
        plain = sample(pipe, prompt)
        set_cache(handle, True)
        cached = sample(pipe, prompt)
        again = sample(pipe, prompt)
        other = sample(pipe, "a photo of a <thing>")
        set_cache(handle, False)
        other_plain = sample(pipe, "a photo of a <thing>")
    assert torch.equal(cached, plain) and torch.equal(again, plain)
    assert torch.equal(other, other_plain)


def test_same_input_hits_and_changes_miss(pipe):
    (art,) = craft(pipe, [("<thing>", "dog")], "a photo of a <thing>")
    with PerfusionEditor().apply(pipe, art) as handle, torch.no_grad():
        ids = pipe.tokenizer(["a photo of a <thing>"] * 2, padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
        x = pipe.text_encoder(ids)[0]
        for layer in handle.info["layers"].values():
            first = layer(x)
            assert layer(x) is first                                     # same tensor, same state: cached
            assert torch.equal(layer(x.clone()), first)                  # another tensor: recomputed, equal
            x2 = x.clone()
            y = layer(x2)
            x2.mul_(2.0)                                                 # in-place change of the input: miss
            assert layer(x2) is not y and not torch.equal(layer(x2), y)
            set_cache(handle, False)
            assert layer(x) is not layer(x)
            set_cache(handle, True)
        layer = next(iter(handle.info["layers"].values()))
        before = layer(x)
        handle.info["bank"].set_i_star(handle.info["bank"].i_star * 1.5)  # new bank version: miss
        assert layer(x) is not before


def test_nothing_is_cached_while_training(pipe):
    (art,) = craft(pipe, [("<thing>", "dog")], "a photo of a <thing>")
    with PerfusionEditor().apply(pipe, art) as handle:
        layer = next(x for x in handle.info["layers"].values() if x.role == "value")
        x = torch.randn(2, 77, layer.in_features, requires_grad=True)
        a, b = layer(x), layer(x)
        assert a is not b and a.requires_grad
        a.sum().backward()
        assert x.grad is not None
