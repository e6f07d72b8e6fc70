"""The embedding-norm cap shared by the methods that learn embedding rows (methods/tokens.py EmbeddingNormCap)."""

from __future__ import annotations

import math

import pytest
import torch
from _method_helpers import load, trained

from editbench import methods
from editbench.errors import EditbenchError
from editbench.methods.tokens import cap_norms_, word_norms
from editbench.testing import tiny_pipeline

# method -> (the config field of its embedding learning rate, the artifact tensor holding the learned rows)
LEARNED_ROWS = {"textual_inversion": ("lr", "embeddings"),
                "perfusion": ("lr_embedding", "embedding"),
                "custom_diffusion": ("lr_modifier", "modifier_embeddings")}


def test_cap_projects_long_rows_onto_their_limit_and_leaves_the_others_bitwise():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 16, generator=g, dtype=torch.float64)             # (k, d)
    norms = rows.norm(dim=-1)
    limits = norms * torch.tensor([0.5, 2.0, 0.9, 1.0, 0.1, 3.0], dtype=torch.float64)
    before = rows.clone()
    cap_norms_(rows, limits)
    for j in range(6):
        if norms[j] > limits[j]:
            # reference: r * l / |r|, computed independently
            want = before[j] * (limits[j] / math.sqrt(float((before[j] ** 2).sum())))
            torch.testing.assert_close(rows[j], want, rtol=1e-14, atol=1e-15)
            assert abs(float(rows[j].norm()) - float(limits[j])) < 1e-12
        else:
            assert torch.equal(rows[j], before[j])


def test_no_limits_change_nothing():
    rows = torch.randn(3, 4)
    before = rows.clone()
    assert cap_norms_(rows, None) is rows and torch.equal(rows, before)


def test_cap_keeps_the_parameter_and_its_grad_flag():
    p = torch.nn.Parameter(torch.full((2, 4), 3.0))
    out = cap_norms_(p, torch.tensor([1.0, 100.0]))
    assert out is p and p.requires_grad
    assert abs(float(p.detach()[0].norm()) - 1.0) < 1e-6 and torch.equal(p.detach()[1], torch.full((4,), 3.0))


@pytest.mark.parametrize("name", sorted(LEARNED_ROWS))
@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "2"])
def test_bad_cap_is_refused(name, bad):
    cfg = methods.get(name).Config(embedding_norm_cap=bad)
    with pytest.raises(EditbenchError, match="embedding_norm_cap"):
        cfg.validate()


@pytest.mark.parametrize("name", sorted(LEARNED_ROWS))
def test_reference_recipe_is_uncapped(name):
    assert methods.get(name).Config.reference().embedding_norm_cap is None


@pytest.mark.parametrize("name", sorted(LEARNED_ROWS))
def test_training_keeps_learned_rows_within_the_cap(name):
    """At a learning rate that blows the row up without the cap (checked, so the test can fail), every learned
    row ends at <= cap x |e(superclass)|."""
    lr_field, tensor = LEARNED_ROWS[name]
    limit = float(word_norms(tiny_pipeline(), ["star"])[0])
    free = load(name, trained(name, steps=4, **{lr_field: 0.5, "embedding_norm_cap": None})).tensors[tensor]
    assert float(free.reshape(-1, free.shape[-1]).norm(dim=-1).max()) > 1.5 * limit
    capped = load(name, trained(name, steps=4, **{lr_field: 0.5, "embedding_norm_cap": 1.5})).tensors[tensor]
    assert float(capped.reshape(-1, capped.shape[-1]).norm(dim=-1).max()) <= 1.5 * limit * (1 + 1e-6)


def test_metadata_accepts_none_only_for_optional_config_fields():
    """An artifact trained uncapped records ``embedding_norm_cap = None`` (an optional field whose default is a
    number): it loads; None in a field that is not optional (``lr``) is refused."""
    from editbench.errors import ArtifactError
    from editbench.safety import check_artifact_for

    ed = methods.get("textual_inversion")()
    art = load("textual_inversion", trained("textual_inversion", steps=2, embedding_norm_cap=None))
    assert art.metadata["config"]["embedding_norm_cap"] is None
    check_artifact_for(ed, art)
    art.metadata["config"]["lr"] = None
    with pytest.raises(ArtifactError, match="config.lr"):
        check_artifact_for(ed, art)
