"""LoRA: the adapter weights, diffusers' pytorch_lora_weights round trip, several adapters with weights, scale."""

from __future__ import annotations

import numpy as np
import pytest
from _method_helpers import assert_same, generate, load, snapshot, trained

from editbench.errors import EditbenchError
from editbench.methods.lora import DIFFUSERS_WEIGHT_NAME, LoRAEditor, export_diffusers
from editbench.testing import tiny_pipeline

NAME = "lora"
PROMPT = "a photo of a sks star"


def test_adapter_weights():
    art = load(NAME, trained(NAME, rank=3))
    assert art.metadata["lora"]["r"] == 3 and art.metadata["lora"]["lora_alpha"] == LoRAEditor.Config().alpha
    assert len(art.tensors) == 4 * 8 * 2  # (q, k, v, out) x 8 attention modules x (A, B)
    for k, v in art.tensors.items():
        assert (v.shape[0] if k.endswith("lora_A.weight") else v.shape[1]) == 3


def test_diffusers_round_trip_with_alpha_not_rank(tmp_path):
    art = load(NAME, trained(NAME, alpha=8.0))
    path = export_diffusers(art, tmp_path)
    assert path.name == DIFFUSERS_WEIGHT_NAME
    ours = tiny_pipeline()
    with LoRAEditor().apply(ours, art):
        expected = generate(ours, PROMPT)
    theirs = tiny_pipeline()
    theirs.load_lora_weights(str(tmp_path), adapter_name="concept")
    assert np.allclose(generate(theirs, PROMPT), expected, atol=1e-6)
    assert not np.allclose(generate(tiny_pipeline(), PROMPT), expected, atol=1e-4)


def test_several_adapters_with_weights_and_scale(tmp_path):
    a, b = load(NAME, trained(NAME)), load(NAME, trained(NAME, seed=1))
    export_diffusers(a, tmp_path / "a")
    export_diffusers(b, tmp_path / "b")
    pipe = tiny_pipeline()
    before, base_img = snapshot(pipe), generate(pipe, PROMPT)
    with LoRAEditor().apply(pipe, [a, b], adapter_weights=[0.7, 0.4], scale=0.5) as handle:
        ours = generate(pipe, PROMPT)
        assert len(handle.info["adapters"]) == 2
    assert_same(before, snapshot(pipe))
    theirs = tiny_pipeline()
    theirs.load_lora_weights(str(tmp_path / "a"), adapter_name="a")
    theirs.load_lora_weights(str(tmp_path / "b"), adapter_name="b")
    theirs.set_adapters(["a", "b"], adapter_weights=[0.7, 0.4])
    assert np.allclose(generate(theirs, PROMPT, cross_attention_kwargs={"scale": 0.5}), ours, atol=1e-6)
    with LoRAEditor().apply(pipe, [a, b], scale=0.0):           # scale 0 adds exact zeros
        assert np.array_equal(generate(pipe, PROMPT), base_img)
    with pytest.raises(EditbenchError):
        LoRAEditor().apply(pipe, [a, b], adapter_weights=[1.0])


def test_undo_keeps_an_adapter_the_user_loaded(tmp_path):
    a, b = load(NAME, trained(NAME)), load(NAME, trained(NAME, seed=1))
    export_diffusers(b, tmp_path)
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(tmp_path), adapter_name="user")
    user_img = generate(pipe, PROMPT)
    with LoRAEditor().apply(pipe, a, allow_fingerprint_mismatch=True):  # the user's adapter changes the base
        assert not np.array_equal(generate(pipe, PROMPT), user_img)
    assert list(pipe.unet.peft_config) == ["user"]
    assert np.array_equal(generate(pipe, PROMPT), user_img)


def test_applied_layer_computes_w_x_plus_alpha_over_r_b_a_x():
    """The adapted layer, from the definition in float64: ``W x + b + (lora_alpha / r) * B A x`` (lora_alpha 8 and
    r 2 differ, so a scale of 1 or of alpha would show), with random A and B in a real artifact's layout."""
    import torch

    from editbench.methods.base import Artifact, _checksum

    real = load(NAME, trained(NAME, alpha=8.0, rank=2))
    g = torch.Generator().manual_seed(0)
    tensors = {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in real.tensors.items()}
    art = Artifact(NAME, tensors, {**real.metadata, "checksum": _checksum(tensors)})
    alpha, r = art.metadata["lora"]["lora_alpha"], art.metadata["lora"]["r"]
    assert (alpha, r) == (8.0, 2)
    pipe = tiny_pipeline()
    names = sorted(k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight"))
    base = {n: pipe.unet.get_submodule(n) for n in names}
    weights = {n: (m.weight.detach().double(), None if m.bias is None else m.bias.detach().double())
               for n, m in base.items()}
    before = snapshot(pipe)
    with LoRAEditor().apply(pipe, art):
        for n in names:
            w, b = weights[n]
            x = torch.randn(3, w.shape[1], generator=g)
            a_, b_ = tensors[f"{n}.lora_A.weight"].double(), tensors[f"{n}.lora_B.weight"].double()
            expect = x.double() @ (w + alpha / r * b_ @ a_).T + (0 if b is None else b)
            with torch.no_grad():
                got = pipe.unet.get_submodule(n)(x).double()
            assert float((got - expect).abs().max()) <= 1e-5 * float(expect.abs().max()), n
    assert_same(before, snapshot(pipe))

