"""Custom Diffusion: what trains, augmentation, compression, the closed-form merge, joint training, diffusers format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _method_helpers import (
    assert_same,
    concept_for,
    editor,
    generate,
    load,
    other_shapes_pipeline,
    snapshot,
    trained,
)
from safetensors.torch import load_file

from editbench.errors import EditbenchError
from editbench.methods.custom_diffusion import (
    WEIGHT_NAME,
    CustomDiffusionEditor,
    compress,
    deltas,
    export_diffusers,
    load_diffusers,
    projections,
)
from editbench.methods.custom_diffusion.layers import (
    LARGE_PREFIXES,
    SMALL_PREFIXES,
    KVLinear,
    low_rank,
    resize_augment,
)
from editbench.testing import tiny_pipeline

NAME = "custom_diffusion"
SECOND = {"placeholder": "<new2>", "superclass": "circle", "color": (200, 30, 30)}


def test_trains_every_cross_attention_kv_and_only_the_modifier_rows():
    pipe = tiny_pipeline()
    base = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    art = editor(NAME, lr=0.05, weight_decay=0.5).fit(pipe, concept_for(NAME), steps=2, progress=False)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, base)  # AdamW did not drift any row
    d = deltas(art)
    assert set(d) == set(projections(pipe.unet)) and len(d) == 8              # 4 attn2 x (to_k, to_v)
    assert all(v.abs().max() > 0 for v in d.values())
    init = base[pipe.tokenizer.get_vocab()["ktn"]]                            # the reference's initializer
    assert not torch.equal(art.tensors["modifier_embeddings"][0], init)
    with CustomDiffusionEditor().apply(pipe, art) as handle:
        emb = pipe.text_encoder.get_input_embeddings()
        assert torch.equal(emb(torch.arange(base.shape[0])[None])[0], base)  # every other row bit-identical
        assert handle.info["token_ids"] == [base.shape[0]]


def test_start_token_is_detached():
    lin = KVLinear(torch.nn.Linear(6, 5, bias=False))
    x = torch.randn(2, 4, 6)
    lin(x)[:, 0].sum().backward()
    assert torch.count_nonzero(lin.weight.grad) == 0
    lin(x)[:, 1].sum().backward()
    assert torch.count_nonzero(lin.weight.grad) > 0


def test_resize_augmentation_follows_the_reference():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 32, 32) * 2 - 1
    small = 0
    for _ in range(200):
        out, mask, prefix = resize_augment(img, torch.ones(1, 32, 32), 2, g)
        assert out.shape == (3, 32, 32) and mask.shape == (1, 32, 32)
        if prefix in LARGE_PREFIXES:                             # enlarged + cropped: everything valid
            assert torch.all(mask > 0.99)
            continue
        small += 1
        assert prefix in SMALL_PREFIXES + ("",)
        rows, cols = torch.nonzero(out.abs().sum(0) > 0, as_tuple=True)
        side = int(rows.max() - rows.min() + 1)
        assert 32 // 3 <= side <= 32 and (prefix != "") == (side < 0.6 * 32)
        assert mask.sum() > 0
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        assert torch.all(mask[0][~inside] == 0)                  # valid region inside the pasted square
    assert 0.55 < small / 200 < 0.77                             # p = 0.66


def test_low_rank_and_compression():
    torch.manual_seed(0)
    m = torch.randn(20, 3) @ torch.diag(torch.tensor([10.0, 1.0, 0.1])) @ torch.randn(3, 16)   # rank 3
    up, down = low_rank(m, rank=3)
    assert up.shape == (20, 3) and down.shape == (3, 16) and torch.allclose(up @ down, m, atol=1e-4)
    s = torch.linalg.svdvals(m.double())
    up, down = low_rank(m, energy=0.6)
    r = up.shape[1]
    assert s[:r].sum() / s.sum() >= 0.6 and (r == 1 or s[:r - 1].sum() / s.sum() < 0.6)
    assert low_rank(m, rank=1)[0].shape == (20, 1)
    art = load(NAME, trained(NAME))
    small = compress(art, rank=2)
    assert all(v.shape[1] == 2 for k, v in small.tensors.items() if k.endswith("delta_up"))
    assert small.nbytes < art.nbytes
    pipe = tiny_pipeline()
    before = snapshot(pipe)
    with CustomDiffusionEditor().apply(pipe, small):
        assert np.isfinite(generate(pipe, "a <toy-star> star")).all()
    assert_same(before, snapshot(pipe))


def test_closed_form_merge_constraints_hold_in_float64(tmp_path):
    pipe = tiny_pipeline()
    a, b = load(NAME, trained(NAME)), load(NAME, trained(NAME, **SECOND))
    ed = editor(NAME)
    result = ed.merge(pipe, [a, b])
    # keys: "<tok> cat" (tok, cat, end) + "photo of a <tok> cat" (tok, cat, end) per concept, no duplicates
    assert result.keys.shape == (12, 32) and torch.unique(result.keys, dim=0).shape[0] == 12
    for name, w in result.weights.items():
        assert w.dtype == torch.float64
        v = result.values[name]
        assert (w @ result.keys.T - v.T).abs().max() <= 1e-10 * v.abs().max()
    # each concept's values are its own fine-tuned weights applied to its own keys
    w0 = projections(pipe.unet)
    name = next(iter(w0))
    tuned_a = w0[name].weight.double() + deltas(a)[name].double()
    assert torch.allclose(result.values[name][:6], result.keys[:6] @ tuned_a.T, rtol=0, atol=1e-12)
    merged = ed.load(ed.compose([a, b], pipe).save(tmp_path / "merged.safetensors"))
    assert merged.metadata["modifier_tokens"] == ["<toy-star>", "<new2>"]
    assert all(v.shape[1] <= 12 for k, v in merged.tensors.items() if k.endswith("delta_up"))
    before = snapshot(pipe)
    with ed.apply(pipe, merged):
        assert np.isfinite(generate(pipe, "a <toy-star> star next to a <new2> circle")).all()
    assert_same(before, snapshot(pipe))


def test_merge_refuses_bad_input():
    pipe, a = tiny_pipeline(), load(NAME, trained(NAME))
    with pytest.raises(EditbenchError, match="pipeline"):
        CustomDiffusionEditor().compose([a, a])
    with pytest.raises(EditbenchError, match="distinct"):
        CustomDiffusionEditor().compose([a, a], pipe)


def test_joint_training_of_two_concepts():
    pipe = tiny_pipeline()
    before = snapshot(pipe)
    art = editor(NAME).fit(pipe, [concept_for(NAME), concept_for(NAME, **SECOND)], steps=2, progress=False)
    assert_same(before, snapshot(pipe))
    assert art.metadata["modifier_tokens"] == ["<toy-star>", "<new2>"]
    assert art.metadata["categories"] == ["star", "circle"] and len(art.metadata["concept"]) == 2
    assert art.tensors["modifier_embeddings"].shape == (2, 32)
    with CustomDiffusionEditor().apply(pipe, art):
        assert np.isfinite(generate(pipe, "a <toy-star> star and a <new2> circle")).all()
    assert_same(before, snapshot(pipe))
    with pytest.raises(EditbenchError, match="at most"):
        editor("textual_inversion").fit(pipe, [concept_for(NAME), concept_for(NAME, **SECOND)], steps=1)


def test_diffusers_format_export_and_loader(tmp_path):
    art = load(NAME, trained(NAME))
    pipe = tiny_pipeline()
    path = export_diffusers(art, pipe, tmp_path)
    assert path.name == WEIGHT_NAME and (tmp_path / "<toy-star>.safetensors").is_file()
    state = load_file(path)
    assert len(state) == 8 and all(k.endswith(("processor.to_k_custom_diffusion.weight",
                                               "processor.to_v_custom_diffusion.weight")) for k in state)
    prompt = "a photo of a <toy-star> star"
    base_img = generate(pipe, prompt)
    with CustomDiffusionEditor().apply(pipe, art):
        ours = generate(pipe, prompt)
    before = snapshot(pipe)
    handle = load_diffusers(pipe, tmp_path)
    theirs = generate(pipe, prompt)
    assert np.abs(theirs - base_img).max() > 1e-3                  # the loaded weights really act
    assert np.allclose(theirs, ours, atol=1e-5)                    # and act as editbench's own apply
    handle.undo()
    assert_same(before, snapshot(pipe))
    assert np.array_equal(generate(pipe, prompt), base_img)
    with pytest.raises(EditbenchError):
        load_diffusers(other_shapes_pipeline(), tmp_path)
