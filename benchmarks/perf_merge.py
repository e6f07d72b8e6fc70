"""Custom Diffusion's closed-form merge at full geometry: the factored solver (``merge_projections``) against the
unfactored code it replaced (kept here as the "before", timed side by side), and the difference of their weights."""

from __future__ import annotations

import gc

import torch
from perf_common import TEXT_WIDTH, interleaved, median, ratio


def merge_problem(n_concepts: int, geometry: str = "sd15", rows_per_concept: int = 6, seed: int = 0):
    """Custom Diffusion's merge inputs at full geometry: ``base`` ``{projection: W0}`` (every cross-attention K
    and V: 32 on SD 1.5), per concept tuned weights (float64, as ``CustomDiffusionEditor.merge`` builds them),
    per concept ``rows_per_concept`` keys (``"<new> cat"`` and ``"photo of a <new> cat"`` give 6 on SD 1.5) and the
    cached text second moment ``C`` (ridged, float64)."""
    from diffusers import UNet2DConditionModel

    from editbench.moments import SecondMoment
    from editbench.sites import find_cross_attention_sites
    from editbench.testing import unet_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(geometry, full=True))
    shapes = {}
    for s in find_cross_attention_sites(unet):
        shapes[s.key_name] = tuple(s.key.weight.shape)
        shapes[s.value_name] = tuple(s.value.weight.shape)
    d = TEXT_WIDTH[geometry]
    g = torch.Generator().manual_seed(seed)
    base = {n: 0.02 * torch.randn(shape, generator=g) for n, shape in shapes.items()}
    tuned = [{n: w.double() + 1e-3 * torch.randn(w.shape, generator=g, dtype=torch.float64) for n, w in base.items()}
             for _ in range(n_concepts)]
    keys = [torch.randn(rows_per_concept, d, generator=g, dtype=torch.float64) for _ in range(n_concepts)]
    moment = SecondMoment(d).update(torch.randn(12 * d, d, generator=g) + 0.3 * torch.randn(d, generator=g))
    return base, tuned, keys, moment.matrix(ridge=1e-6)


def _closed_form_edit_before(weight, keys, values, *, cov):
    """``editbench.solver.closed_form_edit`` (hard form) as it was before the fixes: checks and factors ``cov``
    on every call and adds the update to ``W0`` as a transposed view. Same helpers, same float64 algorithm."""
    from scipy.linalg import solve_triangular

    from editbench import solver as S

    w0, k, v = S._f64("weight", weight, 2), S._f64("keys", keys, 2), S._f64("values", values, 2)
    S._check_edit_shapes(w0, k, v)
    low = S._cholesky(S._cov(cov, w0.shape[1]), "cov", "add a ridge")
    k, v = S._drop_duplicates(k, v)
    r = v.T - w0 @ k.T
    u, s, vt = S._whitened_svd(k, low)
    f = S._hard_filter(s, *k.shape)
    p = solve_triangular(low, u, lower=True, trans="T", check_finite=False)
    return S._like(w0 + ((p * f) @ (vt @ r.T)).T, weight)


def merge_unfactored(base, tuned, keys, cov):
    """``merge_projections`` as it was before the fixes (the solver call per projection re-factors ``C`` and adds a
    transposed update; values built row by row): the "before", kept for side-by-side timing."""
    from editbench.methods.custom_diffusion.merge import MergeResult

    closed_form_edit = _closed_form_edit_before

    k_all = torch.cat([k.double() for k in keys])
    owner = torch.cat([torch.full((len(k),), i) for i, k in enumerate(keys)])
    _, first = torch.unique(k_all, dim=0, return_inverse=True)
    seen: set[int] = set()
    keep = [i for i, g in enumerate(first.tolist()) if not (g in seen or seen.add(g))]
    k, owner = k_all[keep], owner[keep]
    weights, values = {}, {}
    for name, w0 in base.items():
        v = torch.stack([tuned[int(j)][name].double() @ k[r] for r, j in enumerate(owner)])
        weights[name] = closed_form_edit(w0.double(), k, v, cov=cov)
        values[name] = v
    return MergeResult(weights, k, values)


def measure_merge(counts: tuple[int, ...] = (2, 10), rounds: int = 5, geometry: str = "sd15") -> dict:
    """Time of Custom Diffusion's ``merge_projections`` (factored solver) against the unfactored code, for 2 and
    10 concepts at full ``geometry``, interleaved; plus the largest difference between their weights."""
    from editbench.methods.custom_diffusion.merge import merge_projections

    out = {"geometry": geometry, "rounds": rounds, "cases": {}}
    for n in counts:
        problem = merge_problem(n, geometry)
        times = interleaved({"factored": lambda p=problem: merge_projections(*p),
                             "unfactored": lambda p=problem: merge_unfactored(*p)}, rounds=rounds, warmup=1)
        new, old = merge_projections(*problem), merge_unfactored(*problem)
        diff = max(float((new.weights[k] - old.weights[k]).abs().max()) for k in new.weights)
        resid = max(float((new.weights[k] @ new.keys.T - new.values[k].T).abs().max()) for k in new.weights)
        out["cases"][n] = {"projections": len(problem[0]), "keys": int(new.keys.shape[0]),
                           "factored_s": median(times["factored"]), "unfactored_s": median(times["unfactored"]),
                           "factored/unfactored": ratio(times, "factored", "unfactored"),
                           "max_abs_weight_diff": diff, "max_constraint_residual": resid}
        del problem
        gc.collect()
    return out
