"""Perfusion on SDXL, the math in float64: ``i*``, ``C`` and the gate live on the concatenated encoding
``x = [h_1 ; h_2]`` the K/V projections read (docs/methods/perfusion.md, "SDXL"). References are built from
diffusers' own ``StableDiffusionXLPipeline.encode_prompt`` and the definitions, with explicit inverses."""

from __future__ import annotations

import pytest
import torch
from _method_helpers import small_corpus_fixture
from PIL import Image
from test_perfusion import capture

from editbench.concepts import DEFAULT_TEMPLATES, ConceptData
from editbench.methods.base import Artifact, EditHandle
from editbench.methods.perfusion import PerfusionConfig, PerfusionEditor
from editbench.methods.perfusion.editor import text_covariance
from editbench.methods.tokens import add_tokens, single_token_id, token_position
from editbench.sites import find_cross_attention_sites
from editbench.testing import SDXL_TEXT_WIDTHS, tiny_sdxl_pipeline

PROMPT, SUPER_PROMPT = "a photo of a <thing> on the grass", "a photo of a dog on the grass"
ENCODERS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))


small_corpus = small_corpus_fixture(60)  # Perfusion's covariance over 60 captions, cached per module


@pytest.fixture(scope="module")
def pipe64():
    pipe = tiny_sdxl_pipeline().to(torch.float64)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_embeds(pipe, prompts) -> torch.Tensor:
    """``(b, 77, d_1 + d_2)``: diffusers' own SDXL prompt encoding (the K/V layers' input)."""
    with torch.no_grad():
        return pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False)[0]


def test_covariance_is_the_second_moment_of_the_concatenated_encoding(pipe64, small_corpus):
    """``C = E[x x^T]`` over the caption tokens (start token dropped, end token kept, padding dropped) of diffusers'
    concatenated encoding: the diagonal blocks are each encoder's own moment of its penultimate states, the
    off-diagonal block their cross moment."""
    moment = text_covariance(pipe64)
    c = moment.matrix()
    d1, d2 = SDXL_TEXT_WIDTHS
    assert c.shape == (d1 + d2, d1 + d2) and moment.metadata["output"] == "hidden_states[-2]"
    x = diffusers_embeds(pipe64, small_corpus)                                        # (N, 77, d)
    ids = pipe64.tokenizer(small_corpus, padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt").input_ids
    eos = token_position(ids, pipe64.tokenizer.eos_token_id)                         # (N,)
    tokens = torch.cat([x[i, 1:int(eos[i]) + 1] for i in range(len(small_corpus))])  # (T, d)
    ref = tokens.T @ tokens / len(tokens)
    assert moment.count == len(tokens)
    torch.testing.assert_close(c, ref, rtol=1e-10, atol=1e-12)
    assert float(c[:d1, d1:].abs().max()) > 1e-3 * float(c.abs().max())                # the encoders correlate


def crafted(pipe, seed: int = 0) -> Artifact:
    """A Perfusion artifact whose i* is the concept token's concatenated encoding in PROMPT, with random o*_V and
    concept rows near the superclass rows of each encoder."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    with EditHandle(pipe, "probe") as h:
        for e, (tok, enc) in enumerate(ENCODERS):
            w = getattr(pipe, enc).get_input_embeddings().weight
            r = w[single_token_id(getattr(pipe, tok), "dog")].detach().clone()[None]
            r += 0.5 * w.std() * torch.randn(r.shape, generator=g, dtype=r.dtype)
            rows.append(r)
            add_tokens(h, pipe, ["<thing>"], r, encoder=e)
        x = diffusers_embeds(pipe, [PROMPT])[0]                                       # (77, d)
        pos = int(token_position(pipe.tokenizer([PROMPT], return_tensors="pt").input_ids,
                                 pipe.tokenizer.convert_tokens_to_ids("<thing>"))[0])
    sites = find_cross_attention_sites(pipe.unet)
    return Artifact("perfusion", {"embedding": rows[0][0], "embedding_2": rows[1][0], "i_star": x[pos].clone(),
                                  **{f"o_v.{s.name}": torch.randn(s.value_features, generator=g, dtype=x.dtype)
                                     for s in sites}},
                    {"concept": {"placeholder": "<thing>", "superclass": "dog"},
                     "base_fingerprint": PerfusionEditor().fingerprint(pipe),
                     "config": {"cov_ridge": PerfusionConfig.cov_ridge}})


def reference(x, w, c, i_star, o_star, beta, tau):
    """``h(x) = W (x - s(x) i*) + sigmoid((s(x) - beta) / tau) o*`` with ``s(x) = x^T C^-1 i* / (i*^T C^-1 i*)``,
    row by row in float64 with an explicit inverse; ``o_star`` ``(o,)`` or one per row ``(rows, o)``."""
    cinv = torch.linalg.inv(c)
    flat = x.reshape(-1, x.shape[-1])
    o = o_star.expand(len(flat), -1) if o_star.ndim == 1 else o_star
    out = []
    for row, target in zip(flat, o):
        s = (row @ cinv @ i_star) / (i_star @ cinv @ i_star)
        out.append(w @ (row - s * i_star) + torch.sigmoid((s - beta) / tau) * target)
    return torch.stack(out).reshape(*x.shape[:-1], w.shape[0])


@pytest.mark.parametrize("lock", ["local", "global"])
def test_every_layer_is_the_closed_form_on_the_concatenated_encoding(pipe64, lock):
    """In an ordinary StableDiffusionXLPipeline call (CFG batch: zeros for the empty negative prompt, then the
    prompt), every K/V layer's input is diffusers' concatenated encoding and its output is the float64 closed form:
    values with the learned o*_V, keys locked to W_K i_super of the same prompt with the superclass word (local;
    the unmatched zero row: the template-average fallback) or to the superclass prompt's keys (global)."""
    art = crafted(pipe64)
    beta, tau = 0.7, 0.15
    c = text_covariance(pipe64).matrix(PerfusionConfig.cov_ridge)
    x_super = diffusers_embeds(pipe64, [SUPER_PROMPT])[0]                                # (77, d)
    i_ref = torch.stack([diffusers_embeds(pipe64, [t.format("dog")])[0][
        int(token_position(pipe64.tokenizer([t.format("dog")], return_tensors="pt").input_ids,
                           single_token_id(pipe64.tokenizer, "dog"))[0])] for t in DEFAULT_TEMPLATES]).mean(0)
    handle = PerfusionEditor().apply(pipe64, art, beta=beta, tau=tau, lock=lock)
    seen = capture(handle)                     # (input, output) of every Perfusion layer's first call
    try:
        with torch.no_grad():
            pipe64(PROMPT, num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                   output_type="pt")
            x_prompt = diffusers_embeds(pipe64, [PROMPT])[0]                             # tokens installed
    finally:
        handle.undo()
    pos = 5
    assert len(seen) == 16
    i_star = art.tensors["i_star"]
    for name, layer in handle.info["layers"].items():
        x, out = seen[name]
        assert x.shape == (2, 77, 64) and x.dtype == torch.float64
        assert torch.equal(x[0], torch.zeros_like(x[0])) and torch.equal(x[1], x_prompt)
        w = layer.weight.double()
        if layer.role == "value":
            o = art.tensors[f"o_v.{name.removesuffix('.to_v')}"]
            ref = reference(x, w, c, i_star, o, beta, tau)
        elif lock == "local":
            ref = torch.stack([reference(x[0], w, c, i_star, w @ i_ref, beta, tau),
                               reference(x[1], w, c, i_star, x_super[pos] @ w.T, beta, tau)])
        else:
            ref = torch.stack([reference(x[0], w, c, i_star, w @ i_ref, beta, tau), x_super @ w.T])
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, msg=name)
        if layer.role == "key":  # at the concept token (s = 1) the key is the superclass key, whatever the lock
            s = (x[1, pos] @ torch.linalg.solve(c, i_star)) / (i_star @ torch.linalg.solve(c, i_star))
            torch.testing.assert_close(s, torch.tensor(1.0, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_training_tracks_the_concatenated_encoding(tmp_path):
    """i* after one step is the concept token's concatenated encoding of the training prompt: the EMA starts at
    the first batch mean, and with one template and both concept rows initialised from the superclass rows that is
    diffusers' encoding of the superclass prompt at that position. Each encoder learns its own row; the base
    rows of both encoders are untouched."""
    pipe = tiny_sdxl_pipeline()
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray((torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(i)) * 255).byte().numpy()
                        ).save(paths[-1])
    concept = ConceptData("<thing>", "dog", paths, templates=["a photo of a {}"])
    base = [getattr(pipe, e).get_input_embeddings().weight.detach().clone() for _, e in ENCODERS]
    art = PerfusionEditor(batch_size=2).fit(pipe, concept, steps=1, progress=False)
    assert {k: tuple(v.shape) for k, v in art.tensors.items() if not k.startswith("o_v.")} == {
        "embedding": (24,), "embedding_2": (40,), "i_star": (64,)}
    expect = diffusers_embeds(pipe, ["a photo of a dog"])[0, 5]                       # (64,)
    torch.testing.assert_close(art.tensors["i_star"], expect.float(), rtol=1e-5, atol=1e-6)
    for (tok, enc), b, key in zip(ENCODERS, base, ("embedding", "embedding_2")):
        assert torch.equal(getattr(pipe, enc).get_input_embeddings().weight, b)
        assert not torch.equal(art.tensors[key], b[single_token_id(getattr(pipe, tok), "dog")])  # it trained
