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

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.linalg import LinAlgError, cho_solve, cholesky, lapack, solve_triangular, svd

from editbench.errors import ArtifactError, EditbenchError

__all__ = [
    "MAX_KEY_CONDITION",
    "MIN_RCOND",
    "PADDING_POLICY",
    "SecondMoment",
    "Whitener",
    "closed_form_edit",
    "closed_form_edit_many",
    "default_captions",
    "estimate_text_covariance",
    "rank_one_edit",
    "regularize",
]

MAX_KEY_CONDITION = 1e6
"""Largest accepted condition number of the whitened keys ``K C^-1/2`` in the hard form (so that of
``K C^-1 K^T`` is at most 1e12). Above it the edit is dominated by rounding: pass ``lam`` instead."""

MIN_RCOND = 1e-12
"""Smallest accepted reciprocal condition number (LAPACK ``pocon`` estimate) of ``C`` and ``K^T K + lam C``."""

PADDING_POLICY = "start token dropped, end token kept, padding dropped"
"""Which token vectors :func:`estimate_text_covariance` accumulates (Custom Diffusion's choice)."""

_FORMAT = "editbench.SecondMoment"
_FORMAT_VERSION = "1"
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


# --------------------------------------------------------------------------------------------------------------
# Second moment of context vectors
# --------------------------------------------------------------------------------------------------------------

def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the complete new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (POSIX); not possible everywhere
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


class SecondMoment:
    """Streaming accumulator of the uncentered second moment ``E[x x^T]`` of ``dim``-vectors, in float64.

    Memory is one ``(dim, dim)`` float64 sum whatever the number of vectors. ``metadata`` is a free-form,
    JSON-serialisable dict saved with the moment (text encoder, corpus, padding policy, ...).
    """

    def __init__(self, dim: int, *, metadata: dict | None = None, device: torch.device | str | None = None):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
            raise EditbenchError(f"dim must be a positive int, got {dim!r}")
        self.dim = int(dim)
        self.metadata: dict = dict(metadata or {})
        self._sum = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=device or "cpu")  # (d, d)
        self._count = 0

    def __repr__(self) -> str:
        return f"SecondMoment(dim={self.dim}, count={self._count}, metadata={self.metadata})"

    @property
    def count(self) -> int:
        """Number of vectors accumulated."""
        return self._count

    @property
    def device(self) -> torch.device:
        return self._sum.device

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> SecondMoment:
        """Add the vectors ``x`` of shape ``(..., dim)``; ``mask`` (bool, shape ``x.shape[:-1]``) keeps the True ones.

        Use the mask to exclude padding tokens. Accumulates in float64 on this moment's device. Returns ``self``.
        """
        if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise EditbenchError(f"update expects a tensor of shape (..., {self.dim}), got {shape}")
        flat = x.detach().reshape(-1, self.dim)  # (m, d)
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != x.shape[:-1]:
                got = (tuple(mask.shape), mask.dtype) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise EditbenchError(f"mask must be a bool tensor of shape {tuple(x.shape[:-1])} (x without its "
                                     f"last dim), got {got}; e.g. attention_mask.bool()")
            flat = flat[mask.reshape(-1).to(flat.device)]
        flat = flat.to(self._sum.device, torch.float64)
        if not torch.isfinite(flat).all():
            raise EditbenchError("update got NaN or Inf vectors; check the encoder (float16 overflow?) or mask them out")
        self._sum.addmm_(flat.T, flat)  # (d, d) += X^T X
        self._count += flat.shape[0]
        return self

    def merge(self, other: SecondMoment) -> SecondMoment:
        """Add the vectors accumulated by ``other`` (e.g. another corpus shard) to ``self``; returns ``self``.

        Refuses moments of another width, text encoder or padding policy; other metadata of ``self`` is kept.
        """
        if not isinstance(other, SecondMoment) or other.dim != self.dim:
            got = other.dim if isinstance(other, SecondMoment) else type(other).__name__
            raise EditbenchError(f"can only merge a SecondMoment of dim {self.dim}, got {got}")
        for key in ("text_encoder", "padding_policy"):
            a, b = self.metadata.get(key), other.metadata.get(key)
            if a is not None and b is not None and a != b:
                raise EditbenchError(f"cannot merge moments with different {key} ({a!r} vs {b!r}): they describe "
                                     "different vectors; estimate both with the same setup")
        self._sum += other._sum.to(self._sum.device)
        self._count += other._count
        return self

    def matrix(self, ridge: float = 0.0) -> torch.Tensor:
        """The ``(dim, dim)`` float64 second moment ``sum / count``, plus ``ridge * tr(C) / dim * I``."""
        if self._count == 0:
            raise EditbenchError("the second moment has no vectors yet; call update() with data first")
        c = (self._sum + self._sum.T) / (2 * self._count)
        return regularize(c, ridge) if ridge else c

    def whitener(self, ridge: float = 0.0) -> Whitener:
        """``Whitener(self.matrix(ridge))``: ``C`` factored once, to pass as ``cov`` to many edits."""
        return Whitener(self.matrix(ridge))

    def inverse_apply(self, x: torch.Tensor, *, ridge: float = 0.0) -> torch.Tensor:
        """``C^-1 x`` for every vector of ``x`` ``(..., dim)`` via a Cholesky solve; float64 on ``x``'s device.

        ``C = matrix(ridge)``. Each call factorises ``C`` (O(dim^3)): cache results you reuse (e.g. Perfusion's
        ``C^-1 i*``).
        """
        if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.shape[-1] != self.dim:
            raise EditbenchError(f"inverse_apply expects a tensor of shape (..., {self.dim})")
        c = _f64("C", self.matrix(ridge), 2)
        low = _cholesky(c, "the second moment C", "pass ridge (e.g. ridge=1e-4) or accumulate more vectors")
        xs = _f64("x", x.reshape(-1, self.dim), 2)                      # (m, d)
        y = cho_solve((low, True), xs.T, check_finite=False).T          # (m, d) rows C^-1 x
        return torch.from_numpy(np.ascontiguousarray(y)).reshape(x.shape).to(x.device)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the moment to ``path`` as safetensors (float64 sum + count, dim, metadata), atomically."""
        from safetensors.torch import save

        try:
            info = json.dumps(self.metadata, sort_keys=True)
        except TypeError as err:
            raise EditbenchError(f"metadata must be JSON-serialisable to be saved: {err}") from None
        header = {"format": _FORMAT, "format_version": _FORMAT_VERSION, "count": str(self._count),
                  "dim": str(self.dim), "metadata": info}
        path = Path(path)
        _atomic_write(path, save({"sum": self._sum.detach().cpu().contiguous()}, metadata=header))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str | None = None) -> SecondMoment:
        """Read a moment written by :meth:`save`. Missing, corrupt or foreign files raise :class:`ArtifactError`."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"no second-moment file at {path}; estimate one with estimate_text_covariance() "
                                "and save() it, or fix the path")
        fix = "delete it and re-create it with SecondMoment.save()"
        try:
            with safe_open(str(path), framework="pt") as fh:
                header, names = fh.metadata() or {}, set(fh.keys())
                total = fh.get_tensor("sum") if names == {"sum"} else None
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise ArtifactError(f"{path} is not a readable safetensors file ({err}); {fix}") from None
        if header.get("format") != _FORMAT or total is None:
            raise ArtifactError(f"{path} is not an editbench SecondMoment file (format {header.get('format')!r}, "
                                f"tensors {sorted(names)}); pass a file written by SecondMoment.save()")
        if header.get("format_version") != _FORMAT_VERSION:
            raise ArtifactError(f"{path} has SecondMoment format version {header.get('format_version')!r}, this "
                                f"editbench reads {_FORMAT_VERSION!r}; re-create it with this version")
        try:
            dim, count, meta = int(header["dim"]), int(header["count"]), json.loads(header["metadata"])
        except (KeyError, ValueError) as err:
            raise ArtifactError(f"{path} has a damaged header ({err!r}); {fix}") from None
        if (total.shape != (dim, dim) or total.dtype != torch.float64 or count < 0 or not isinstance(meta, dict)
                or not torch.isfinite(total).all()):
            raise ArtifactError(f"{path} is inconsistent (sum {tuple(total.shape)} {total.dtype}, dim {dim}, "
                                f"count {count}); {fix}")
        moment = cls(dim, metadata=meta, device=device)
        moment._sum.copy_(total)
        moment._count = count
        return moment


# --------------------------------------------------------------------------------------------------------------
# Text-encoder covariance and the caption corpus
# --------------------------------------------------------------------------------------------------------------

def default_captions() -> list[str]:
    """The generic caption corpus shipped with editbench (``editbench/data/captions.txt``, one per line).

    Generated from templates by ``editbench/data/make_captions.py``: objects, animals, people, colors, materials,
    scenes and styles; no concept or placeholder words.
    """
    from importlib.resources import files

    text = files("editbench").joinpath("data", "captions.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _batches(captions: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for caption in captions:
        if not isinstance(caption, str):
            raise EditbenchError(f"captions must be strings, got {type(caption).__name__}: {caption!r}")
        batch.append(caption)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def estimate_text_covariance(text_encoder: torch.nn.Module, tokenizer: Any, captions: Iterable[str], *,
                             batch_size: int = 64, progress: bool = True, keep_start_token: bool = False,
                             corpus: str | None = None) -> SecondMoment:
    """Second moment ``C`` of the token vectors a text encoder hands to cross-attention, over ``captions``.

    Each batch is tokenized (truncated to 77, padded to its longest caption), encoded under ``torch.no_grad``
    with ``text_encoder(input_ids, attention_mask=...).last_hidden_state`` on the encoder's device and dtype, and
    accumulated in float64, streaming (memory independent of the corpus size). Token policy (stored in the
    metadata as ``padding_policy``): the start token is dropped (it is the same vector in every caption of a
    causal encoder and would dominate ``C``; pass ``keep_start_token=True`` to keep it), the end token is kept
    and padding is dropped, as in Custom Diffusion. The encoder's train/eval mode is restored afterwards.

    ``corpus`` is a label stored in the metadata, with ``n_captions`` and
    ``corpus_sha256 = sha256(("\\n".join(captions) + "\\n").encode())`` (callers use it to validate caches).
    """
    if isinstance(captions, (str, bytes)):
        raise EditbenchError("captions must be an iterable of strings, not a single string; wrap it in a list")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EditbenchError(f"batch_size must be a positive int, got {batch_size!r}")
    dim = getattr(getattr(text_encoder, "config", None), "hidden_size", None)
    if not isinstance(text_encoder, torch.nn.Module) or not isinstance(dim, int):
        raise EditbenchError("text_encoder must be a transformers text model with config.hidden_size "
                             "(e.g. CLIPTextModel)")
    from tqdm.auto import tqdm

    from editbench.models import CLIP_MAX_LENGTH

    device = next(text_encoder.parameters()).device
    bos = getattr(tokenizer, "bos_token_id", None)
    policy = PADDING_POLICY if not keep_start_token else "start token kept, end token kept, padding dropped"
    moment = SecondMoment(dim, device="cpu" if device.type == "mps" else device, metadata={
        "text_encoder": f"{type(text_encoder).__name__}:{getattr(text_encoder.config, '_name_or_path', '') or '?'}"
                        f":hidden{dim}",
        "tokenizer": f"{type(tokenizer).__name__}:max_length{CLIP_MAX_LENGTH}",
        "output": "last_hidden_state",
        "padding_policy": policy,
        "corpus": corpus or "unnamed",
    })
    digest, n_captions = hashlib.sha256(), 0
    was_training = text_encoder.training
    text_encoder.eval()
    try:
        with torch.no_grad(), tqdm(total=len(captions) if hasattr(captions, "__len__") else None,
                                   disable=not progress, desc="text covariance", unit="caption") as bar:
            for batch in _batches(captions, batch_size):
                # padded to the batch's longest caption, not to 77: the kept tokens' vectors do not depend on the
                # padding (causal encoder, attention mask passed), and computing 77 positions for ~10 real tokens
                # made the estimate several times slower
                tok = tokenizer(batch, padding="longest", max_length=CLIP_MAX_LENGTH, truncation=True,
                                return_tensors="pt")
                ids, att = tok["input_ids"].to(device), tok["attention_mask"].to(device)  # (b, t)
                hidden = text_encoder(ids, attention_mask=att).last_hidden_state          # (b, t, d)
                keep = att.bool()                                                         # (b, t) no padding
                if not keep_start_token and bos is not None:
                    keep[:, 0] &= ids[:, 0] != bos
                moment.update(hidden, keep)
                digest.update("\n".join(batch).encode() + b"\n")
                n_captions += len(batch)
                bar.update(len(batch))
    finally:
        text_encoder.train(was_training)
    if n_captions == 0:
        raise EditbenchError("captions is empty; pass a caption corpus, e.g. default_captions()")
    moment.metadata.update(n_captions=n_captions, corpus_sha256=digest.hexdigest())
    return moment
