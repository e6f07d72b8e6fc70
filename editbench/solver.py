"""Closed-form editing of linear projections: one formula for ROME, MEMIT, TIME/UCE and the Custom Diffusion merge.

A projection ``W`` (out x in) maps a context vector ``e`` (in) to ``W e``. An edit asks that keys ``K`` (n x in,
one key per row) map to values ``V`` (n x out) while the projection moves as little as possible on typical
inputs, measured by their uncentered second moment ``C = E[e e^T]`` (in x in):

* hard constraint (ROME for n = 1, Custom Diffusion merge):
  ``W = W0 + (V^T - W0 K^T) (K C^-1 K^T)^-1 K C^-1``
* soft constraint (MEMIT, TIME/UCE with ``C = I``):
  ``W = W0 + (V^T - W0 K^T) K (K^T K + lam C)^-1``

Everything is computed in float64 and handed back in the dtype and on the device of the weight. No inverse is
ever formed: with ``C = L L^T`` (Cholesky) and the thin SVD ``L^-1 K^T = U S V^T`` of the whitened keys, both
forms are ``W0 + R V diag(f(S)) U^T L^-1`` (``R = V^T - W0 K^T``), with ``f(s) = 1/s`` (hard) or
``s / (s^2 + lam)`` (soft), applied through triangular solves. This never squares the keys' condition number
(as forming ``K C^-1 K^T`` or ``K^T K`` would), so the soft form stays accurate as ``lam -> 0`` and converges to
the hard form. See ``docs/solver.md`` for the numerics and a worked example on a model that is not Stable Diffusion.

Shape legend used in comments: n keys, d input width (text width), o output width, b batch, t tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy.linalg import LinAlgError, cho_solve, cholesky, lapack, solve_triangular, svd

from editbench.errors import EditbenchError

__all__ = [
    "MAX_KEY_CONDITION",
    "MIN_RCOND",
    "Whitener",
    "closed_form_edit",
    "closed_form_edit_many",
    "rank_one_edit",
    "regularize",
]

MAX_KEY_CONDITION = 1e6
"""Largest accepted condition number of the whitened keys ``K C^-1/2`` in the hard form (so that of
``K C^-1 K^T`` is at most 1e12). Above it the edit is dominated by rounding: pass ``lam`` instead."""

MIN_RCOND = 1e-12
"""Smallest accepted reciprocal condition number (LAPACK ``pocon`` estimate) of ``C`` and ``K^T K + lam C``."""

_EPS = np.finfo(np.float64).eps


# --------------------------------------------------------------------------------------------------------------
# Input checking and conversion
# --------------------------------------------------------------------------------------------------------------

def _f64(name: str, x: Any, ndim: int) -> np.ndarray:
    """``x`` as a float64 numpy array on the CPU after checking type, rank and finiteness (no copy if possible)."""
    if not isinstance(x, torch.Tensor):
        raise EditbenchError(f"{name} must be a torch.Tensor, got {type(x).__name__}; convert it with "
                             f"torch.as_tensor({name})")
    if x.is_complex() or x.dtype == torch.bool:
        raise EditbenchError(f"{name} has dtype {x.dtype}; pass a real floating-point tensor")
    if x.ndim != ndim:
        raise EditbenchError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")
    if x.is_meta:
        raise EditbenchError(f"{name} is on the meta device and has no values; load real weights first")
    arr = x.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(arr).all():
        raise EditbenchError(f"{name} contains NaN or Inf; check the tensor upstream (overflow in float16? "
                             "a diverged training run?) before editing")
    return arr


def _check_lam(lam: float | None) -> float | None:
    if lam is None:
        return None
    if isinstance(lam, bool) or not isinstance(lam, (int, float, np.floating, np.integer, torch.Tensor)):
        raise EditbenchError(f"lam must be a positive number or None, got {type(lam).__name__}")
    lam = float(lam)
    if not np.isfinite(lam) or lam < 0:
        raise EditbenchError(f"lam must be a finite positive number, got {lam}; pass lam=None for the hard "
                             "constraint")
    if lam == 0:
        raise EditbenchError("lam=0 is the hard constraint: pass lam=None instead (or a small positive lam)")
    return lam


def _cholesky(a: np.ndarray, what: str, fix: str) -> np.ndarray:
    """Lower Cholesky factor of the symmetric matrix ``a``; EditbenchError if not (numerically) positive definite."""
    try:
        low = cholesky(a, lower=True, check_finite=False)
    except LinAlgError:
        raise EditbenchError(f"{what} is not positive definite; {fix}") from None
    rcond, _ = lapack.dpocon(low, np.abs(a).sum(axis=0).max(), uplo="L")
    if not rcond >= MIN_RCOND:
        raise EditbenchError(f"{what} is ill-conditioned (reciprocal condition number {rcond:.1e} < "
                             f"{MIN_RCOND:.0e}); {fix}")
    return low


def _cov(cov: torch.Tensor | None, d: int) -> np.ndarray | None:
    """Checked float64 copy of the covariance (symmetrised), or None for the identity."""
    if cov is None:
        return None
    c = _f64("cov", cov, 2)
    if c.shape != (d, d):
        raise EditbenchError(f"cov has shape {c.shape} but the weight's input width is {d}: pass the ({d}, {d}) "
                             "second moment of the vectors this weight consumes")
    scale = np.abs(c).max()
    if np.abs(c - c.T).max() > 1e-5 * scale:
        raise EditbenchError("cov is not symmetric; pass a second moment E[x x^T] (SecondMoment.matrix())")
    return (c + c.T) / 2


_COV_FIX = ("add a ridge: SecondMoment.matrix(ridge=1e-4), or estimate it from more token vectors than its "
            "width")


class Whitener:
    """A second moment ``C`` checked and factored once (``C = L L^T``, Cholesky, float64) for many edits.

    Pass it as ``cov`` to :func:`closed_form_edit`, :func:`closed_form_edit_many` or :func:`rank_one_edit`
    instead of the ``(d, d)`` matrix: the result is the same (the same float64 operations on the same factor),
    but the O(d^3) factorisation and the symmetry / positive-definiteness checks run once instead of once per
    call. Editing every K and V projection of a model (Custom Diffusion's merge: 32 projections on SD 1.x, one
    ``C``) then pays for one factorisation. Build it from a matrix (``Whitener(moment.matrix(ridge=1e-4))``) or
    with :meth:`SecondMoment.whitener`. Raises :class:`EditbenchError` as ``cov`` would (not square, not
    symmetric, not finite, not safely positive definite).
    """

    def __init__(self, cov: torch.Tensor):
        if not isinstance(cov, torch.Tensor) or cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
            got = tuple(cov.shape) if isinstance(cov, torch.Tensor) else type(cov).__name__
            raise EditbenchError(f"Whitener needs a square (d, d) torch.Tensor second moment, got {got}")
        c = _cov(cov, cov.shape[0])
        self.dim: int = c.shape[0]
        self._c = c
        self._low = _cholesky(c, "cov", _COV_FIX)

    def __repr__(self) -> str:
        return f"Whitener(dim={self.dim})"

    def matrix(self) -> torch.Tensor:
        """The (symmetrised) float64 ``(d, d)`` second moment ``C`` it factors."""
        return torch.from_numpy(self._c.copy())

    def factor(self) -> torch.Tensor:
        """The float64 lower-triangular Cholesky factor ``L`` ``(d, d)``, ``C = L L^T``."""
        return torch.from_numpy(self._low.copy())


def _factor(cov: torch.Tensor | Whitener | None, d: int, fix: str = _COV_FIX) -> np.ndarray | None:
    """Lower Cholesky factor of ``cov`` (checked), reused as is from a :class:`Whitener`; None for the identity."""
    if cov is None:
        return None
    if isinstance(cov, Whitener):
        if cov.dim != d:
            raise EditbenchError(f"cov is a Whitener of width {cov.dim} but the weight's input width is {d}: pass "
                                 f"the ({d}, {d}) second moment of the vectors this weight consumes")
        return cov._low
    return _cholesky(_cov(cov, d), "cov", fix)


def _check_edit_shapes(w0: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
    (o, d), (n, dk), (nv, ov) = w0.shape, k.shape, v.shape
    if n == 0:
        raise EditbenchError("keys is empty; pass at least one (key, value) pair")
    if dk != d:
        raise EditbenchError(f"keys have width {dk} but the weight (out, in) = ({o}, {d}) expects {d}; pass keys "
                             "as (n, in) rows of the vectors the projection consumes")
    if (nv, ov) != (n, o):
        raise EditbenchError(f"values have shape ({nv}, {ov}) but must be (n, out) = ({n}, {o}): one target "
                             "output row per key")


def _drop_duplicates(k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove rows repeated in both key and value (first kept); a key repeated with another value is an error."""
    kz, vz = k + 0.0, v + 0.0  # -0.0 -> 0.0, so that equal bytes <=> equal values
    first: dict[bytes, int] = {}
    keep = []
    for i, row in enumerate(kz):
        j = first.setdefault(row.tobytes(), i)
        if j == i:
            keep.append(i)
        elif not np.array_equal(vz[j], vz[i]):
            raise EditbenchError(f"key rows {[j, i]} are identical but ask for different values: one key cannot "
                                 "map to two outputs; drop all but one of them or average their values")
    return (k, v) if len(keep) == len(k) else (k[keep], v[keep])


def _like(w: np.ndarray, ref: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(w).to(device=ref.device, dtype=ref.dtype)


# --------------------------------------------------------------------------------------------------------------
# The closed forms
# --------------------------------------------------------------------------------------------------------------

def _whitened_svd(k: np.ndarray, low: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thin SVD ``U S V^T`` of the whitened keys ``L^-1 K^T`` (``C = L L^T``): (d, r), (r,), (r, n), r = min(n, d)."""
    kw = k.T if low is None else solve_triangular(low, k.T, lower=True, check_finite=False)  # (d, n)
    return svd(kw, full_matrices=False, check_finite=False)


def _gain(low: np.ndarray | None, u: np.ndarray, f: np.ndarray) -> np.ndarray:
    """``L^-T U diag(f)`` (d, r): the part of the update that depends on the keys and ``C`` only."""
    p = u if low is None else solve_triangular(low, u, lower=True, trans="T", check_finite=False)  # (d, r) L^-T U
    return p * f


def _filtered_delta(r: np.ndarray, gain: np.ndarray, vt: np.ndarray) -> np.ndarray:
    """``R V diag(f) U^T L^-1`` (o, d) for residual ``R`` (o, n), given ``gain = L^-T U diag(f)`` (d, r).

    Computed as ``(R V) gain^T`` so that the result is C-contiguous like ``W0``: adding a transposed (o, d) view
    to ``W0`` was 5x slower than the products themselves at SD sizes."""
    return (r @ vt.T) @ gain.T


def _hard_filter(s: np.ndarray, n: int, d: int) -> np.ndarray:
    """``1 / s``: with ``K C^-1 K^T = V S^2 V^T`` the hard form is ``R V S^-1 U^T L^-1``. Checks the keys first."""
    if n > d:
        raise EditbenchError(f"{n} keys of width {d} are linearly dependent (at most {d} independent hard "
                             "constraints exist); pass lam for a least-squares (MEMIT/UCE) edit or use fewer keys")
    tol = s[0] * max(n, d) * _EPS
    if s[-1] <= tol:
        raise EditbenchError(f"the {n} keys are linearly dependent (rank {int((s > tol).sum())} in the cov "
                             "metric), so the hard constraint has no unique solution; drop redundant keys or pass "
                             "lam for a least-squares (MEMIT/UCE) edit")
    if s[0] / s[-1] > MAX_KEY_CONDITION:
        raise EditbenchError(f"the keys are nearly dependent (condition number {s[0] / s[-1]:.1e} > "
                             f"{MAX_KEY_CONDITION:.0e}) and the exact edit would be dominated by rounding; pass "
                             "lam (e.g. lam=1e-3) for a regularised least-squares edit or drop near-duplicate keys")
    return 1.0 / s


def _soft_filter(s: np.ndarray, lam: float) -> np.ndarray:
    """``s / (s^2 + lam)``: ``K (K^T K + lam C)^-1 = V diag(s / (s^2 + lam)) U^T L^-1`` (bounded by 1/(2 sqrt lam))."""
    return s / (s * s + lam)


def closed_form_edit(weight: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, *,
                     cov: torch.Tensor | Whitener | None = None, lam: float | None = None) -> torch.Tensor:
    """Edited copy of ``weight`` that maps ``keys`` to ``values`` with the smallest change in the ``cov`` metric.

    Args:
        weight: ``(out, in)`` projection ``W0`` (e.g. ``attn2.to_k.weight``); not modified.
        keys: ``(n, in)`` input vectors, one per row.
        values: ``(n, out)`` target outputs, one per row.
        cov: ``(in, in)`` second moment ``C`` of typical inputs (``SecondMoment.matrix(ridge=...)``), a
            :class:`Whitener` of it (factored once, for many calls with the same ``C``), or None for the identity
            (plain Frobenius distance, as TIME/UCE).
        lam: None for the hard constraint ``W K^T = V^T`` (ROME / Custom Diffusion merge):
            ``W = W0 + (V^T - W0 K^T) (K C^-1 K^T)^-1 K C^-1``; a positive number for the soft, least-squares
            form (MEMIT / UCE) minimising ``||W K^T - V^T||^2 + lam tr((W - W0) C (W - W0)^T)``:
            ``W = W0 + (V^T - W0 K^T) K (K^T K + lam C)^-1``.

    Returns:
        The new ``(out, in)`` weight, in ``weight``'s dtype and on its device (computed in float64).

    Rows repeated in both key and value are dropped first. Raises :class:`EditbenchError` on shape mismatch,
    non-finite input, a key repeated with different values, linearly dependent or nearly dependent keys in the
    hard form (condition number of ``K C^-1/2`` above :data:`MAX_KEY_CONDITION`; pass ``lam``), and a ``cov``
    that is not safely positive definite (add a ridge). Computed via a Cholesky factor of ``cov`` and an SVD of
    the whitened keys (module docstring), in float64.
    """
    w0 = _f64("weight", weight, 2)  # (o, d)
    k = _f64("keys", keys, 2)       # (n, d)
    v = _f64("values", values, 2)   # (n, o)
    _check_edit_shapes(w0, k, v)
    lam = _check_lam(lam)
    low = _factor(cov, w0.shape[1])  # (d, d) lower Cholesky factor of C, or None
    k, v = _drop_duplicates(k, v)
    r = v.T - w0 @ k.T              # (o, n) what the base weight gets wrong
    u, s, vt = _whitened_svd(k, low)
    f = _hard_filter(s, *k.shape) if lam is None else _soft_filter(s, lam)
    return _like(w0 + _filtered_delta(r, _gain(low, u, f), vt), weight)


def closed_form_edit_many(weights: Mapping[str, torch.Tensor] | Sequence[torch.Tensor], keys: torch.Tensor,
                          values: Mapping[str, torch.Tensor] | Sequence[torch.Tensor], *,
                          cov: torch.Tensor | Whitener | None = None,
                          lam: float | None = None) -> dict[str, torch.Tensor] | list[torch.Tensor]:
    """:func:`closed_form_edit` of several weights that read the same inputs, with one set of ``keys``.

    Equal (to float64 rounding; in practice bitwise) to ``closed_form_edit(weights[i], keys, values[i], cov=cov,
    lam=lam)`` for every ``i``, but ``C`` is factored once and the whitened keys' SVD, which depends only on
    ``keys`` and ``C``, is computed once: each weight then costs two small matrix products. This is the
    Custom Diffusion merge (every K and V projection, the same concept keys) and any multi-layer ROME/MEMIT/UCE
    edit with shared keys.

    Args:
        weights: ``{name: (out_i, in)}`` or a sequence of ``(out_i, in)`` weights; not modified.
        keys: ``(n, in)``, shared by every weight.
        values: ``{name: (n, out_i)}`` with the same names (or a sequence of the same length).
        cov, lam: as in :func:`closed_form_edit` (``cov`` may be a :class:`Whitener`).

    Returns:
        The edited weights, a dict with ``weights``' names (in its order) or a list, each in its weight's dtype
        and device. Raises :class:`EditbenchError` as :func:`closed_form_edit` does, naming the weight at fault.
    """
    if isinstance(weights, Mapping):
        if not isinstance(values, Mapping) or set(values) != set(weights):
            missing = sorted(set(weights) - set(values)) if isinstance(values, Mapping) else "all"
            raise EditbenchError(f"values must be a dict with the same names as weights; missing or extra: "
                                 f"{missing if missing else sorted(set(values) - set(weights))}")
        names = list(weights)
        w_list, v_list = [weights[n] for n in names], [values[n] for n in names]
    else:
        if isinstance(weights, torch.Tensor) or isinstance(values, (torch.Tensor, Mapping)):
            raise EditbenchError("weights and values must both be dicts {name: tensor} or both sequences of "
                                 "tensors; for one weight use closed_form_edit")
        w_list, v_list = list(weights), list(values)
        names = [str(i) for i in range(len(w_list))]
        if len(v_list) != len(w_list):
            raise EditbenchError(f"got {len(w_list)} weights but {len(v_list)} value tensors; pass one per weight")
    if not w_list:
        raise EditbenchError("weights is empty; pass at least one weight to edit")
    k0 = _f64("keys", keys, 2)      # (n, d)
    problems = []                   # (w0 (o, d), v (n, o)) per weight, duplicates dropped
    k = k0
    for name, weight, value in zip(names, w_list, v_list):
        try:
            w0 = _f64("weight", weight, 2)
            v = _f64("values", value, 2)
            _check_edit_shapes(w0, k0, v)
            k, v = _drop_duplicates(k0, v)
        except EditbenchError as err:
            raise EditbenchError(f"weight {name!r}: {err}") from None
        problems.append((w0, v))
    lam = _check_lam(lam)
    low = _factor(cov, k.shape[1])
    u, s, vt = _whitened_svd(k, low)                 # shared by every weight
    f = _hard_filter(s, *k.shape) if lam is None else _soft_filter(s, lam)
    gain = _gain(low, u, f)                          # (d, r)
    out = [_like(w0 + _filtered_delta(v.T - w0 @ k.T, gain, vt), weight)
           for (w0, v), weight in zip(problems, w_list)]
    return dict(zip(names, out)) if isinstance(weights, Mapping) else out


def rank_one_edit(weight: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                  cov: torch.Tensor | Whitener | None = None) -> torch.Tensor:
    """ROME's rank-one edit ``W0 + (v - W0 k) (C^-1 k)^T / (k^T C^-1 k)`` with one key in both places.

    ``weight`` is ``(out, in)``, ``key`` ``(in,)``, ``value`` ``(out,)``, ``cov`` ``(in, in)``, a
    :class:`Whitener` or None for the identity. Equal to ``closed_form_edit(weight, key[None], value[None],
    cov=cov)``. Returns a new weight in ``weight``'s dtype and device; raises :class:`EditbenchError` on bad input.
    """
    w0 = _f64("weight", weight, 2)  # (o, d)
    k = _f64("key", key, 1)         # (d,)
    v = _f64("value", value, 1)     # (o,)
    o, d = w0.shape
    if k.shape != (d,) or v.shape != (o,):
        raise EditbenchError(f"key {k.shape} and value {v.shape} must be ({d},) and ({o},) for a weight of shape "
                             f"({o}, {d}); for several keys use closed_form_edit")
    if not np.any(k):
        raise EditbenchError("key is the zero vector, which no linear map can send to a nonzero value; pass the "
                             "input vector of the concept you edit")
    low = _factor(cov, d, "add a ridge: SecondMoment.matrix(ridge=1e-4)")
    ck = k if low is None else cho_solve((low, True), k)  # (d,) = C^-1 k
    return _like(w0 + np.outer(v - w0 @ k, ck) / (k @ ck), weight)


def regularize(cov: torch.Tensor, eps: float) -> torch.Tensor:
    """``cov + eps * tr(cov) / d * I``: a ridge scaled to the average eigenvalue, so ``eps`` is unit-free."""
    if not isinstance(cov, torch.Tensor) or cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise EditbenchError("cov must be a square (d, d) torch.Tensor")
    eps = float(eps)
    if not np.isfinite(eps) or eps < 0:
        raise EditbenchError(f"ridge must be a finite number >= 0, got {eps}")
    d = cov.shape[0]
    return cov + (eps * torch.trace(cov) / d) * torch.eye(d, dtype=cov.dtype, device=cov.device)
