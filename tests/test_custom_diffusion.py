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
from editbench.text_covariance import default_captions

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
    assert torch.equal(small.tensors["modifier_embeddings"], art.tensors["modifier_embeddings"])
    full, by_energy = deltas(art), deltas(compress(art))                     # compress(): energy 0.6
    assert deltas(small).keys() == full.keys() == by_energy.keys() and len(full) == 8
    for name, delta in full.items():                                         # numpy's float64 SVD, truncated
        u, s, vh = np.linalg.svd(delta.double().numpy(), full_matrices=False)
        r = int(np.searchsorted(np.cumsum(s) / s.sum(), 0.6 - 1e-12)) + 1     # smallest rank with 60% of sum(s)
        for got, rank in ((deltas(small)[name], 2), (by_energy[name], r)):
            expect = (u[:, :rank] * s[:rank]) @ vh[:rank]
            err = np.abs(got.double().numpy() - expect).max()
            assert err <= 1e-5 * np.abs(expect).max(), (name, rank, err)
            assert np.linalg.matrix_rank(got.double().numpy(), tol=1e-6 * s[0]) == rank
    pipe = tiny_pipeline()
    before = snapshot(pipe)
    with CustomDiffusionEditor().apply(pipe, small):
        assert np.isfinite(generate(pipe, "a <toy-star> star")).all()
    assert_same(before, snapshot(pipe))


def caption_covariance(pipe, captions, ridge: float) -> torch.Tensor:
    """The merge's metric built here from its definition, in float64: the second moment of the text encoder's token
    vectors over ``captions`` (each caption alone, unpadded; start token dropped, end token kept) plus
    ``ridge * tr(C) / d * I``."""
    tok, enc = pipe.tokenizer, pipe.text_encoder
    d = enc.config.hidden_size
    total, count = torch.zeros(d, d, dtype=torch.float64), 0
    with torch.no_grad():
        for caption in captions:
            ids = tok(caption, truncation=True, max_length=77).input_ids
            h = enc(torch.tensor([ids])).last_hidden_state[0, 1:].double()            # (t - 1, d)
            total += h.T @ h
            count += len(h)
    cov = total / count
    return cov + ridge * torch.trace(cov) / d * torch.eye(d, dtype=torch.float64)


def kkt_merge(w0: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``argmin_W tr((W - W0) C (W - W0)^T) s.t. W K^T = V^T`` from its KKT system, one dense float64 solve:
    ``[[C, K^T], [K, 0]] [D^T; M] = [0; V - K W0^T]``, ``W = W0 + D``."""
    d, n, o = keys.shape[1], keys.shape[0], w0.shape[0]
    system = torch.zeros(d + n, d + n, dtype=torch.float64)
    system[:d, :d], system[:d, d:], system[d:, :d] = cov, keys.T, keys
    rhs = torch.cat([torch.zeros(d, o, dtype=torch.float64), values - keys @ w0.T])
    return w0 + torch.linalg.solve(system, rhs)[:d].T


def test_closed_form_merge_constraints_hold_in_float64(tmp_path):
    """The merge is the paper's closed form under the caption covariance (an independent KKT solve), the composed
    artifact stores exactly ``W - W0`` as ``up @ down``, and apply installs ``W0 + up @ down``."""
    pipe = tiny_pipeline()
    a, b = load(NAME, trained(NAME)), load(NAME, trained(NAME, **SECOND))
    ed = editor(NAME)
    cov = caption_covariance(pipe, default_captions()[: ed.config.merge_captions], ed.config.merge_ridge)
    result = ed.merge(pipe, [a, b], cov=cov)
    # keys: "<tok> cat" (tok, cat, end) + "photo of a <tok> cat" (tok, cat, end) per concept, no duplicates
    assert result.keys.shape == (12, 32) and torch.unique(result.keys, dim=0).shape[0] == 12
    w0 = {n: m.weight.detach().double() for n, m in projections(pipe.unet).items()}
    assert result.weights.keys() == w0.keys() and len(w0) == 8
    for name, w in result.weights.items():
        assert w.dtype == torch.float64
        v = result.values[name]
        assert (w @ result.keys.T - v.T).abs().max() <= 1e-10 * v.abs().max()
        # each concept's values are its own fine-tuned weights applied to its own keys
        for art, rows in ((a, slice(0, 6)), (b, slice(6, 12))):
            tuned = w0[name] + deltas(art)[name].double()
            torch.testing.assert_close(v[rows], result.keys[rows] @ tuned.T, rtol=0, atol=1e-12)
        # the minimiser of ||(W - W0) C_reg^T|| under the constraints, with C the caption covariance
        ref = kkt_merge(w0[name], result.keys, v, cov)
        scale = float((ref - w0[name]).abs().max())
        assert scale > 1e-3                                                   # the merge really moves W
        assert float((w - ref).abs().max()) <= 1e-7 * scale, name
    # the default metric (estimated by the editor) is the same covariance, up to float32 encoder round-off
    default = ed.merge(pipe, [a, b])
    for name, w in default.weights.items():
        ref = result.weights[name]
        assert float((w - ref).abs().max()) <= 1e-2 * float((ref - w0[name]).abs().max()), name
    merged = ed.load(ed.compose([a, b], pipe, cov=cov).save(tmp_path / "merged.safetensors"))
    assert merged.metadata["modifier_tokens"] == ["<toy-star>", "<new2>"]
    assert all(v.shape[1] <= 12 for k, v in merged.tensors.items() if k.endswith("delta_up"))
    stored = deltas(merged)
    assert stored.keys() == w0.keys()
    for name, w in result.weights.items():
        delta = w - w0[name]                                                  # float64 merged - base
        assert float((stored[name].double() - delta).abs().max()) <= 1e-5 * float(delta.abs().max()), name
    before = snapshot(pipe)
    with ed.apply(pipe, merged):
        installed = projections(pipe.unet)
        for name, w in result.weights.items():                                # W0 + up @ down, in float32
            expect = (w0[name].float() + stored[name])
            assert torch.equal(installed[name].weight.detach(), expect), name
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
    art = editor(NAME).fit(pipe, [concept_for(NAME), concept_for(NAME, **SECOND)], steps=3, progress=False)
    assert_same(before, snapshot(pipe))
    assert art.metadata["modifier_tokens"] == ["<toy-star>", "<new2>"]
    assert art.metadata["categories"] == ["star", "circle"] and len(art.metadata["concept"]) == 2
    assert art.tensors["modifier_embeddings"].shape == (2, 32)
    d = deltas(art)
    assert set(d) == set(projections(pipe.unet)) and len(d) == 8
    assert all(float(v.abs().max()) > 0 for v in d.values()), "a K/V projection was not trained"
    # both modifier rows learned: each moved away from its initializer's row in a direction other than the row
    # itself (weight decay and the norm cap only rescale a row that gets no gradient)
    base = pipe.text_encoder.get_input_embeddings().weight.detach().double()
    vocab = pipe.tokenizer.get_vocab()
    for row, word in zip(art.tensors["modifier_embeddings"].double(), ("ktn", "pll")):
        init = base[vocab[word]]
        across = row - (row @ init) / (init @ init) * init                    # the part not along the init row
        assert float(across.norm()) > 1e-4 * float(init.norm()), word
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
