"""The factored paths of editbench.solver (``Whitener``, ``closed_form_edit_many``) against the unfactored one.

Every factored result must equal what ``closed_form_edit`` / ``rank_one_edit`` return with the plain ``(d, d)``
matrix, at float64 tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from editbench.errors import EditbenchError
from editbench.moments import SecondMoment
from editbench.solver import Whitener, closed_form_edit, closed_form_edit_many, rank_one_edit, regularize

TOL = {"rtol": 1e-12, "atol": 1e-12}


def layers(seed: int, n: int, d: int, widths: tuple[int, ...]):
    """Random shared keys K (n, d), per layer W0 (o_i, d) and V (n, o_i), and a full-rank anisotropic C (d, d)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d, generator=g, dtype=torch.float64)
    weights = {f"layer{i}.to_{'kv'[i % 2]}": torch.randn(o, d, generator=g, dtype=torch.float64)
               for i, o in enumerate(widths)}
    values = {name: torch.randn(n, w.shape[0], generator=g, dtype=torch.float64) for name, w in weights.items()}
    x = torch.randn(4 * d + 8, d, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, d, dtype=torch.float64)
    x = x + torch.randn(d, generator=g, dtype=torch.float64)
    return weights, keys, values, x.T @ x / len(x)


@pytest.mark.parametrize("lam", [None, 1e-2])
def test_whitener_equals_matrix_cov(lam):
    weights, keys, values, c = layers(0, 5, 24, (16, 32))
    white = Whitener(c)
    for name, w in weights.items():
        want = closed_form_edit(w, keys, values[name], cov=c, lam=lam)
        got = closed_form_edit(w, keys, values[name], cov=white, lam=lam)
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("use_cov", ["matrix", "whitener", None])
@pytest.mark.parametrize("lam", [None, 1e-3])
def test_many_equals_one_by_one(use_cov, lam):
    weights, keys, values, c = layers(1, 7, 32, (16, 16, 48, 48, 8))
    cov = {"matrix": c, "whitener": Whitener(c), None: None}[use_cov]
    got = closed_form_edit_many(weights, keys, values, cov=cov, lam=lam)
    assert list(got) == list(weights)
    for name, w in weights.items():
        want = closed_form_edit(w, keys, values[name], cov=c if use_cov else None, lam=lam)
        torch.testing.assert_close(got[name], want, **TOL)
        if lam is None:  # the hard constraint holds for every layer
            torch.testing.assert_close(got[name] @ keys.T, values[name].T, rtol=1e-9, atol=1e-9)


def test_many_accepts_sequences_and_keeps_dtype_and_device():
    weights, keys, values, c = layers(2, 4, 20, (12, 24))
    ws = [w.float() for w in weights.values()]
    got = closed_form_edit_many(ws, keys.float(), [v.float() for v in values.values()], cov=Whitener(c))
    assert isinstance(got, list) and len(got) == 2
    for g, w, v in zip(got, ws, values.values()):
        assert g.dtype == torch.float32 and g.device == w.device and g.shape == w.shape
        want = closed_form_edit(w, keys.float(), v.float(), cov=c)
        torch.testing.assert_close(g, want, rtol=0, atol=0)


def test_many_drops_duplicate_keys_like_one_by_one():
    weights, keys, values, c = layers(3, 4, 16, (8, 12))
    keys = torch.cat([keys, keys[:2]])
    values = {n: torch.cat([v, v[:2]]) for n, v in values.items()}
    got = closed_form_edit_many(weights, keys, values, cov=c)
    for name, w in weights.items():
        torch.testing.assert_close(got[name], closed_form_edit(w, keys, values[name], cov=c), **TOL)


def test_many_does_not_modify_inputs():
    weights, keys, values, c = layers(4, 3, 12, (6, 10))
    before = [t.clone() for t in (*weights.values(), keys, *values.values(), c)]
    out = closed_form_edit_many(weights, keys, values, cov=c)
    after = [*weights.values(), keys, *values.values(), c]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(o.data_ptr() != w.data_ptr() for o, w in zip(out.values(), weights.values()))


def test_rank_one_with_whitener():
    weights, keys, values, c = layers(5, 1, 20, (10,))
    (name, w), = weights.items()
    want = rank_one_edit(w, keys[0], values[name][0], cov=c)
    got = rank_one_edit(w, keys[0], values[name][0], cov=Whitener(c))
    torch.testing.assert_close(got, want, **TOL)


def test_second_moment_whitener_and_accessors():
    g = torch.Generator().manual_seed(6)
    m = SecondMoment(10).update(torch.randn(200, 10, generator=g))
    white = m.whitener(ridge=1e-3)
    assert white.dim == 10 and "10" in repr(white)
    c = m.matrix(ridge=1e-3)
    torch.testing.assert_close(white.matrix(), c, **TOL)
    low = white.factor()
    assert torch.equal(low, torch.tril(low))
    torch.testing.assert_close(low @ low.T, c, **TOL)
    torch.testing.assert_close(white.factor(), torch.linalg.cholesky(c), **TOL)
    white.factor().zero_()  # accessors hand out copies
    torch.testing.assert_close(white.matrix(), c, **TOL)


@pytest.mark.parametrize("bad, message", [
    (torch.ones(3, 4, dtype=torch.float64), "square"),
    (torch.ones(3, dtype=torch.float64), "square"),
    ("not a tensor", "square"),
    (torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64), "symmetric"),
    (torch.ones(3, 3, dtype=torch.float64), "positive definite"),
    (torch.full((2, 2), float("nan"), dtype=torch.float64), "NaN"),
])
def test_whitener_bad_input(bad, message):
    with pytest.raises(EditbenchError, match=message):
        Whitener(bad)


def test_whitener_width_mismatch():
    weights, keys, values, _ = layers(7, 2, 12, (6,))
    (name, w), = weights.items()
    white = Whitener(regularize(torch.eye(8, dtype=torch.float64), 0.0))
    with pytest.raises(EditbenchError, match="width 8"):
        closed_form_edit(w, keys, values[name], cov=white)
    with pytest.raises(EditbenchError, match="width 8"):
        closed_form_edit_many(weights, keys, values, cov=white)


def test_many_bad_input_names_the_weight():
    weights, keys, values, c = layers(8, 3, 12, (6, 9))
    with pytest.raises(EditbenchError, match="same names"):
        closed_form_edit_many(weights, keys, {"other": next(iter(values.values()))})
    with pytest.raises(EditbenchError, match="empty"):
        closed_form_edit_many({}, keys, {})
    with pytest.raises(EditbenchError, match="one per weight"):
        closed_form_edit_many(list(weights.values()), keys, list(values.values())[:1])
    with pytest.raises(EditbenchError, match="both be dicts"):
        closed_form_edit_many(next(iter(weights.values())), keys, next(iter(values.values())))
    bad = dict(values)
    name = list(weights)[1]
    bad[name] = bad[name][:, :-1]
    with pytest.raises(EditbenchError, match=f"weight '{name}'.*values have shape"):
        closed_form_edit_many(weights, keys, bad)
    contradiction_keys = torch.cat([keys, keys[:1]])
    contradiction = {n: torch.cat([v, v[:1] + 1]) for n, v in values.items()}
    with pytest.raises(EditbenchError, match="identical but ask for different values"):
        closed_form_edit_many(weights, contradiction_keys, contradiction, cov=c)
    with pytest.raises(EditbenchError, match="lam"):
        closed_form_edit_many(weights, keys, values, lam=-1.0)


def test_many_dependent_keys_need_lam():
    weights, keys, values, c = layers(9, 3, 12, (6,))
    keys = torch.cat([keys, keys[:1] + keys[1:2]])                    # 4th key = 1st + 2nd
    values = {n: torch.cat([v, v[:1]]) for n, v in values.items()}
    with pytest.raises(EditbenchError, match="linearly dependent"):
        closed_form_edit_many(weights, keys, values, cov=c)
    got = closed_form_edit_many(weights, keys, values, cov=c, lam=1e-3)
    for name, w in weights.items():
        torch.testing.assert_close(got[name], closed_form_edit(w, keys, values[name], cov=c, lam=1e-3), **TOL)
        assert np.isfinite(got[name].numpy()).all()
