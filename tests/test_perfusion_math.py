"""Perfusion's gated rank-1 layer, the math alone: ``gated_rank1`` against a float64 reference built from the
definition, steep gates, the concept-only gate, bad inputs. (What the editor does with it: ``test_perfusion.py``.)"""

from __future__ import annotations

import pytest
import torch

from editbench.errors import EditbenchError
from editbench.methods.perfusion import gated_rank1

STEEP = {"beta": 0.5, "tau": 1e-3}  # gates saturate: sigmoid(+-500)


def _problem(d=12, o=7, c=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64)
    cov = a @ a.T / (3 * d) + 0.1 * torch.eye(d, dtype=torch.float64)                   # (d, d) SPD
    w = torch.randn(o, d, generator=g, dtype=torch.float64)
    i_star = torch.randn(c, d, generator=g, dtype=torch.float64)
    o_star = torch.randn(c, o, generator=g, dtype=torch.float64)
    x = torch.randn(2, 5, d, generator=g, dtype=torch.float64)
    return cov, w, i_star, o_star, x


def _reference(x, w, cov, i_star, o_star, beta, tau):
    """h(x) row by row in float64, from the definition (explicit inverses; independent of the implementation)."""
    cinv = torch.linalg.inv(cov)
    u = i_star.T                                                                         # (d, c)
    s_of = torch.linalg.inv(u.T @ cinv @ u) @ u.T @ cinv                                 # (c, d)
    rows = []
    for row in x.reshape(-1, x.shape[-1]):
        s = s_of @ row
        h = w @ (row - u @ s)
        for c in range(len(s)):
            h = h + torch.sigmoid((s[c] - beta[c]) / tau[c]) * o_star[c]
        rows.append(h)
    return torch.stack(rows).reshape(*x.shape[:-1], w.shape[0])


@pytest.mark.parametrize("c", [1, 3])
def test_gated_rank1_matches_a_float64_reference(c):
    cov, w, i_star, o_star, x = _problem(c=c)
    beta, tau = torch.linspace(0.6, 0.8, c, dtype=torch.float64), torch.linspace(0.1, 0.2, c, dtype=torch.float64)
    ref = _reference(x, w, cov, i_star, o_star, beta, tau)
    cinv = torch.linalg.inv(cov)
    got64 = gated_rank1(x, w, cinv, i_star, o_star, beta, tau)
    torch.testing.assert_close(got64, ref, rtol=1e-10, atol=1e-10)
    got32 = gated_rank1(x.float(), w.float(), cinv.float(), i_star.float(), o_star.float(), beta.float(), tau.float())
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), ref, rtol=1e-4, atol=1e-4)
    if c == 1:  # the single-concept closed form: s(x) = x^T C^-1 i* / (i*^T C^-1 i*)
        i = i_star[0]
        s = (x @ cinv @ i) / (i @ cinv @ i)
        h = (x - s[..., None] * i) @ w.T + torch.sigmoid((s - beta[0]) / tau[0])[..., None] * o_star[0]
        torch.testing.assert_close(gated_rank1(x, w, cinv, i, o_star[0], beta[0], tau[0]), h)


def test_steep_gates_hit_every_target_and_spare_orthogonal_inputs():
    cov, w, i_star, o_star, x = _problem(c=3)
    cinv = torch.linalg.inv(cov)
    # each concept's own direction reaches exactly its own target (multi-concept exactness)
    torch.testing.assert_close(gated_rank1(i_star, w, cinv, i_star, o_star, **STEEP), o_star, rtol=0, atol=1e-9)
    # inputs C^-1-orthogonal to every i* are left alone: h(x) = W x
    u = i_star.T
    x_perp = x - (u @ torch.linalg.solve(u.T @ cinv @ u, u.T @ cinv @ x.reshape(-1, 12).T)).T.reshape(x.shape)
    assert (x_perp.reshape(-1, 12) @ cinv @ u).abs().max() < 1e-9
    torch.testing.assert_close(gated_rank1(x_perp, w, cinv, i_star, o_star, **STEEP), x_perp @ w.T)
    # the summed single-concept form is NOT exact for correlated concepts; the joint form is
    single = sum(gated_rank1(i_star[:1], w, cinv, i_star[k], o_star[k], **STEEP) - i_star[:1] @ w.T
                 for k in range(3)) + i_star[:1] @ w.T
    assert (single - o_star[:1]).abs().max() > 1e-3


def test_concept_only_gate_edits_exactly_the_flagged_tokens():
    cov, w, i_star, o_star, x = _problem(c=2)
    cinv = torch.linalg.inv(cov)
    beta, tau = torch.tensor([0.6, 0.7], dtype=torch.float64), torch.tensor([0.1, 0.2], dtype=torch.float64)
    where = torch.zeros(*x.shape[:-1], 2, dtype=torch.bool)                              # (b, n, c)
    where[0, 1, 0] = where[1, 3, 1] = where[1, 4, :] = True
    got = gated_rank1(x, w, cinv, i_star, o_star, beta, tau, where)
    # per concept: flagged tokens get that concept's term of the reference, the others none of it (exact W x)
    base = x @ w.T
    s_of = torch.linalg.inv(i_star @ cinv @ i_star.T) @ i_star @ cinv                    # (c, d)
    s = x @ s_of.T                                                                       # (b, n, c)
    term = -(s[..., :, None] * (i_star @ w.T)) + torch.sigmoid((s - beta) / tau)[..., None] * o_star  # (b, n, c, o)
    expect = base + (term * where[..., None]).sum(-2)
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-10)
    assert torch.equal(got[0, 0], base[0, 0])                                           # untouched token: bitwise
    want = _reference(x, w, cov, i_star, o_star, beta, tau)
    torch.testing.assert_close(got[1, 4], want[1, 4], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gated_rank1(x, w, cinv, i_star, o_star, beta, tau, torch.ones_like(where)),
                               _reference(x, w, cov, i_star, o_star, beta, tau), rtol=1e-10, atol=1e-10)
    with pytest.raises(EditbenchError, match="where must be"):
        gated_rank1(x, w, cinv, i_star, o_star, beta, tau, where[..., :1])


def test_gated_rank1_rejects_bad_shapes_and_dependent_concepts():
    cov, w, i_star, o_star, x = _problem(c=2)
    with pytest.raises(EditbenchError, match="shape mismatch"):
        gated_rank1(x, w, cov, i_star, o_star[:, :3], 0.7, 0.1)
    with pytest.raises(EditbenchError, match="dependent"):
        gated_rank1(x, w, cov, torch.stack([i_star[0], 2 * i_star[0]]), o_star, 0.7, 0.1)
