"""Textual inversion: only the new rows train, multi-vector tokens, diffusers' learned_embeds round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _method_helpers import concept_for, editor, generate, load, snapshot, trained
from safetensors.torch import load_file

from editbench.errors import EditbenchError
from editbench.methods.textual_inversion import (
    DIFFUSERS_WEIGHT_NAME,
    TextualInversionEditor,
    export_diffusers,
)
from editbench.testing import tiny_pipeline

NAME = "textual_inversion"


def test_only_the_new_rows_change_under_adamw_weight_decay():
    pipe = tiny_pipeline()
    base = pipe.text_encoder.get_input_embeddings().weight.detach().clone()              # (V, d)
    art = editor(NAME, lr=0.05, weight_decay=0.5).fit(pipe, concept_for(NAME), steps=3, progress=False)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, base)           # every row, bitwise
    init = base[pipe.tokenizer.convert_tokens_to_ids("star</w>")]
    assert not torch.equal(art.tensors["embeddings"][0], init)                           # the new row moved
    with TextualInversionEditor().apply(pipe, art) as handle:
        emb = pipe.text_encoder.get_input_embeddings()
        ids = torch.arange(base.shape[0])
        assert torch.equal(emb(ids[None])[0], base)                                      # old ids: base rows
        (new_id,) = handle.info["token_ids"]
        assert torch.equal(emb(torch.tensor([[new_id]]))[0, 0], art.tensors["embeddings"][0])


def test_multi_vector_diffusers_round_trip(tmp_path):
    art = load(NAME, trained(NAME, num_vectors=2))
    assert art.metadata["tokens"] == ["<toy-star>", "<toy-star>_1"]
    path = export_diffusers(art, tmp_path)
    assert path.name == DIFFUSERS_WEIGHT_NAME
    stored = load_file(path)
    assert list(stored) == ["<toy-star>"] and stored["<toy-star>"].shape == (2, 32)
    prompt = "a photo of a <toy-star>"
    ours = tiny_pipeline()
    with TextualInversionEditor().apply(ours, art):
        expected = generate(ours, prompt)
    theirs = tiny_pipeline()
    theirs.load_textual_inversion(str(tmp_path), token="<toy-star>")
    assert np.array_equal(generate(theirs, prompt), expected)                           # same seed, same images
    assert not np.array_equal(generate(tiny_pipeline(), prompt), expected)


def test_two_artifacts_at_once_and_conflicts():
    a = load(NAME, trained(NAME))
    b = load(NAME, trained(NAME, placeholder="<toy-two>"))
    pipe = tiny_pipeline()
    before = snapshot(pipe)
    with TextualInversionEditor().apply(pipe, [a, b]) as handle:
        assert len(handle.info["token_ids"]) == 2 and len(pipe.tokenizer) == before["tokenizer"] + 2
        with pytest.raises(EditbenchError):  # the word is already taken by the first edit
            TextualInversionEditor().apply(pipe, a)
    assert len(pipe.tokenizer) == before["tokenizer"]


def test_bad_artifacts_are_refused():
    art = load(NAME, trained(NAME))
    ed = TextualInversionEditor()
    bad = type(art)(NAME, {"embeddings": art.tensors["embeddings"], "extra": torch.zeros(1)}, art.metadata)
    with pytest.raises(EditbenchError):
        ed.check_artifact(bad)
    bad = type(art)(NAME, dict(art.tensors), {**art.metadata, "tokens": ["a", "b"]})
    with pytest.raises(EditbenchError):
        ed.check_artifact(bad)
