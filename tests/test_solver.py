"""Tests of editbench.solver against float64 references computed independently (KKT system, least squares)."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg as sla
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from editbench.errors import ArtifactError, EditbenchError
from editbench.moments import SecondMoment
from editbench.solver import closed_form_edit, rank_one_edit, regularize
from editbench.text_covariance import PADDING_POLICY, default_captions, estimate_text_covariance

ROOT = Path(__file__).resolve().parents[1]
T = torch.as_tensor


# ---------------------------------------------------------------------------------------------------------------
# Independent references (numpy / scipy, no code shared with editbench.solver)
# ---------------------------------------------------------------------------------------------------------------

def problem(seed: int, n: int, d: int, o: int):
    """Random W0 (o, d), K (n, d), V (n, o) and an anisotropic, full-rank second moment C (d, d)."""
    rng = np.random.default_rng(seed)
    w0, k, v = rng.normal(size=(o, d)), rng.normal(size=(n, d)), rng.normal(size=(n, o))
    x = rng.normal(size=(4 * d + 8, d)) * np.logspace(0, -1.5, d) + rng.normal(size=d)  # (m, d)
    return w0, k, v, x.T @ x / len(x)


def kkt_hard(w0, k, v, c):
    """min tr(D C D^T) s.t. (W0 + D) K^T = V^T, from the KKT system [[2C, -K^T], [K, 0]] [D^T; mu] = [0; R^T]."""
    n, d = k.shape
    a = np.block([[2 * c, -k.T], [k, np.zeros((n, n))]])
    rhs = np.vstack([np.zeros((d, w0.shape[0])), (v.T - w0 @ k.T).T])
    return w0 + sla.solve(a, rhs)[:d].T


def lstsq_soft(w0, k, v, c, lam):
    """min ||W K^T - V^T||^2 + lam tr((W - W0) C (W - W0)^T) as one stacked least-squares problem."""
    e, q = np.linalg.eigh(c)
    s = (q * np.sqrt(e)) @ q.T  # C^(1/2), symmetric
    a = np.vstack([k, np.sqrt(lam) * s])
    b = np.vstack([v, np.sqrt(lam) * s @ w0.T])
    return sla.lstsq(a, b)[0].T


def rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def edit(w0, k, v, c=None, lam=None):
    out = closed_form_edit(T(w0), T(k), T(v), cov=None if c is None else T(c), lam=lam)
    assert out.dtype == torch.float64
    return out.numpy()


# ---------------------------------------------------------------------------------------------------------------
# closed_form_edit / rank_one_edit: identities
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_cov", [False, True])
@pytest.mark.parametrize("n,d,o", [(1, 8, 5), (3, 8, 5), (8, 8, 3), (5, 40, 30)])
def test_hard_constraint_holds_and_matches_kkt(use_cov, n, d, o):
    w0, k, v, c = problem(n * 100 + d, n, d, o)
    c = c if use_cov else np.eye(d)
    w = edit(w0, k, v, c if use_cov else None)
    assert rel(w @ k.T, v.T) < 1e-11
    assert rel(w, kkt_hard(w0, k, v, c)) < 1e-10
    assert rel(w, w0) > 1e-3  # the edit did something


def test_hard_form_is_optimal_against_feasible_perturbations():
    w0, k, v, c = problem(1, 3, 10, 4)
    w = edit(w0, k, v, c)
    rng = np.random.default_rng(2)
    null = sla.null_space(k)  # (d, d - n): directions every key ignores
    cost = np.trace((w - w0) @ c @ (w - w0).T)
    for _ in range(20):
        w2 = w + 1e-3 * rng.normal(size=(4, null.shape[1])) @ null.T  # still satisfies W K^T = V^T
        assert rel(w2 @ k.T, v.T) < 1e-10
        assert np.trace((w2 - w0) @ c @ (w2 - w0).T) > cost


def test_cov_metric_changes_the_answer():
    w0, k, v, c = problem(3, 2, 12, 6)
    assert rel(edit(w0, k, v, c), edit(w0, k, v)) > 1e-3


@pytest.mark.parametrize("lam", [1e-3, 0.1, 1.0, 100.0])
def test_soft_form_matches_least_squares(lam):
    w0, k, v, c = problem(4, 6, 10, 7)
    assert rel(edit(w0, k, v, c, lam), lstsq_soft(w0, k, v, c, lam)) < 1e-9
    assert rel(edit(w0, k, v, None, lam), lstsq_soft(w0, k, v, np.eye(10), lam)) < 1e-9


def test_soft_form_with_more_keys_than_width():
    w0, k, v, c = problem(5, 20, 6, 4)  # overdetermined: only the soft form applies
    assert rel(edit(w0, k, v, c, 0.5), lstsq_soft(w0, k, v, c, 0.5)) < 1e-9


@pytest.mark.parametrize("use_cov", [False, True])
def test_soft_form_approaches_hard_form_as_lam_shrinks(use_cov):
    w0, k, v, c = problem(6, 4, 12, 5)
    c = c if use_cov else None
    hard = edit(w0, k, v, c)
    gaps = [rel(edit(w0, k, v, c, lam), hard) for lam in (1e-1, 1e-3, 1e-5, 1e-7, 1e-9)]
    assert all(a > 30 * b for a, b in itertools.pairwise(gaps)), gaps  # O(lam) convergence, no rounding floor
    assert gaps[-1] < 1e-9
    assert rel(edit(w0, k, v, c, 1e-30), hard) < 1e-12


def test_uce_closed_forms_agree():
    w0, k, v, c = problem(7, 5, 9, 6)
    lam = 0.3
    uce = np.linalg.solve((lam * np.eye(9) + k.T @ k).T, (lam * w0 + v.T @ k).T).T  # C = I
    assert rel(edit(w0, k, v, None, lam), uce) < 1e-12
    uce_c = np.linalg.solve((lam * c + k.T @ k).T, (lam * w0 @ c + v.T @ k).T).T  # general C
    assert rel(edit(w0, k, v, c, lam), uce_c) < 1e-10


@pytest.mark.parametrize("use_cov", [False, True])
def test_rank_one_equals_one_key_hard_form(use_cov):
    w0, k, v, c = problem(8, 1, 10, 6)
    cov = T(c) if use_cov else None
    w = rank_one_edit(T(w0), T(k[0]), T(v[0]), cov=cov).numpy()
    assert rel(w, closed_form_edit(T(w0), T(k), T(v), cov=cov).numpy()) < 1e-12
    assert rel(w @ k[0], v[0]) < 1e-12
    ck = np.linalg.solve(c if use_cov else np.eye(10), k[0])  # ROME with one key in both places
    assert rel(w, w0 + np.outer(v[0] - w0 @ k[0], ck) / (k[0] @ ck)) < 1e-12


def test_hard_edit_is_idempotent():
    w0, k, v, c = problem(9, 4, 16, 8)
    w1 = closed_form_edit(T(w0), T(k), T(v), cov=T(c))
    w2 = closed_form_edit(w1, T(k), T(v), cov=T(c))
    assert rel(w1.numpy(), w0) > 1e-2
    assert (w2 - w1).abs().max().item() < 1e-12 * w1.abs().max().item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2),
                                       (torch.float64, 1e-12)])
def test_dtype_and_device_preserved(dtype, tol):
    w0, k, v, c = problem(10, 3, 16, 8)
    weight = T(w0).to(dtype)
    out = closed_form_edit(weight, T(k).to(dtype), T(v).to(dtype), cov=T(c).float())
    assert out.dtype == dtype and out.device == weight.device and out.shape == weight.shape
    kk, vv = T(k).to(dtype).double(), T(v).to(dtype).double()
    assert rel((out.double() @ kk.T).numpy(), vv.T.numpy()) < tol
    out1 = rank_one_edit(weight, T(k[0]).to(dtype), T(v[0]).to(dtype))
    assert out1.dtype == dtype and out1.device == weight.device


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_preserved():
    w0, k, v, c = problem(11, 2, 8, 4)
    out = closed_form_edit(T(w0).cuda().half(), T(k).cuda(), T(v).cuda(), cov=T(c).cuda())
    assert out.is_cuda and out.dtype == torch.float16


def test_inputs_not_modified_and_result_not_aliased():
    w0, k, v, c = problem(12, 3, 10, 6)
    args = [T(w0).clone(), T(k).clone(), T(v).clone(), T(c).clone()]
    param = torch.nn.Parameter(args[0].clone())
    before = [a.clone() for a in args]
    out = closed_form_edit(param, args[1], args[2], cov=args[3])
    out2 = closed_form_edit(args[0], args[1], args[2], cov=args[3], lam=0.1)
    rank_one_edit(args[0], args[1][0], args[2][0], cov=args[3])
    assert all(torch.equal(a, b) for a, b in zip(args, before))
    assert torch.equal(param.detach(), before[0]) and not out.requires_grad
    out2.zero_()
    assert torch.equal(args[0], before[0])


@pytest.mark.parametrize("lam", [None, 0.2])
def test_exact_duplicates_are_dropped(lam):
    w0, k, v, c = problem(13, 3, 10, 6)
    k2, v2 = np.vstack([k, k[[1, 0]], k[[1]]]), np.vstack([v, v[[1, 0]], v[[1]]])  # rows repeated with their values
    assert rel(edit(w0, k2, v2, c, lam), edit(w0, k, v, c, lam)) < 1e-14
    k[0, 0], v[0, 0] = 0.0, 0.0
    k3, v3 = np.vstack([k, k[[0]]]), np.vstack([v, v[[0]]])
    k3[-1, 0], v3[-1, 0] = -0.0, -0.0  # -0.0 == 0.0: still a duplicate
    assert rel(edit(w0, k3, v3, c, lam), edit(w0, k, v, c, lam)) < 1e-14


def test_same_key_with_different_values_is_a_contradiction():
    w0, k, v, c = problem(14, 3, 10, 6)
    k2, v2 = np.vstack([k, k[[1]]]), np.vstack([v, v[[1]] + 1.0])
    with pytest.raises(EditbenchError, match=r"key rows \[1, 3\] are identical.*different values"):
        edit(w0, k2, v2, c)
    with pytest.raises(EditbenchError, match="different values"):
        edit(w0, k2, v2, c, lam=0.1)


# ---------------------------------------------------------------------------------------------------------------
# closed_form_edit / rank_one_edit: errors
# ---------------------------------------------------------------------------------------------------------------

def _bad_calls():
    w0, k, v, c = (T(a) for a in problem(15, 2, 6, 4))
    nan_k = k.clone()
    nan_k[0, 0] = float("nan")
    inf_c = c.clone()
    inf_c[1, 1] = float("inf")
    dep = T([[1.0, 2, 0, 1, 0, 0], [0.0, 1, 1, 0, 2, 0], [1.0, 3, 1, 1, 2, 0]])  # row 3 = row 1 + row 2
    near = torch.stack([k[0], k[0] + 1e-8 * k[1]])
    singular_c = T(np.outer(np.arange(1.0, 7), np.arange(1.0, 7)))
    asym_c = c + torch.triu(torch.ones(6, 6), 1)
    return {
        "weight 1d": (lambda: closed_form_edit(w0[0], k, v), "weight must have 2 dimension"),
        "weight not tensor": (lambda: closed_form_edit(w0.numpy(), k, v), "must be a torch.Tensor"),
        "keys width": (lambda: closed_form_edit(w0, k[:, :5], v), "keys have width 5.*expects 6"),
        "values width": (lambda: closed_form_edit(w0, k, v[:, :3]), r"values have shape \(2, 3\).*\(2, 4\)"),
        "n mismatch": (lambda: closed_form_edit(w0, k, v[:1]), r"values have shape \(1, 4\)"),
        "no keys": (lambda: closed_form_edit(w0, k[:0], v[:0]), "keys is empty"),
        "complex": (lambda: closed_form_edit(w0.cfloat(), k, v), "real floating-point"),
        "nan keys": (lambda: closed_form_edit(w0, nan_k, v), "keys contains NaN or Inf"),
        "inf cov": (lambda: closed_form_edit(w0, k, v, cov=inf_c), "cov contains NaN or Inf"),
        "inf weight": (lambda: closed_form_edit(w0 * float("inf"), k, v), "weight contains NaN or Inf"),
        "cov shape": (lambda: closed_form_edit(w0, k, v, cov=c[:5, :5]), r"cov has shape \(5, 5\).*\(6, 6\)"),
        "cov asymmetric": (lambda: closed_form_edit(w0, k, v, cov=asym_c), "not symmetric"),
        "cov singular": (lambda: closed_form_edit(w0, k, v, cov=singular_c), "cov is .*ridge"),
        "cov singular soft": (lambda: closed_form_edit(w0, k, v, cov=singular_c, lam=1.0), "cov is .*ridge"),
        "lam zero": (lambda: closed_form_edit(w0, k, v, lam=0), "lam=None"),
        "lam negative": (lambda: closed_form_edit(w0, k, v, lam=-1.0), "positive"),
        "lam nan": (lambda: closed_form_edit(w0, k, v, lam=float("nan")), "finite positive"),
        "lam str": (lambda: closed_form_edit(w0, k, v, lam="1"), "positive number"),
        "dependent": (lambda: closed_form_edit(w0, dep, T(np.ones((3, 4)))), "linearly dependent.*pass lam"),
        "zero key": (lambda: closed_form_edit(w0, 0 * k[:1], v[:1]), "linearly dependent"),
        "too many keys": (lambda: closed_form_edit(w0, T(np.eye(7, 6) + 1), T(np.ones((7, 4)))),
                          "7 keys of width 6 are linearly dependent.*pass lam"),
        "nearly dependent": (lambda: closed_form_edit(w0, near, v, cov=c), "nearly dependent.*pass lam"),
        "rome 2d key": (lambda: rank_one_edit(w0, k, v[0]), "key must have 1 dimension"),
        "rome key width": (lambda: rank_one_edit(w0, k[0, :5], v[0]), r"must be \(6,\) and \(4,\)"),
        "rome zero key": (lambda: rank_one_edit(w0, 0 * k[0], v[0]), "zero vector"),
        "rome cov": (lambda: rank_one_edit(w0, k[0], v[0], cov=singular_c), "ridge"),
        "rome nan value": (lambda: rank_one_edit(w0, k[0], v[0] * float("nan")), "value contains NaN"),
    }


BAD = _bad_calls()


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_editbench_error(case):
    call, message = BAD[case]
    with pytest.raises(EditbenchError, match=message):
        call()


def test_nearly_dependent_keys_work_with_lam():
    w0, k, v, c = problem(16, 2, 6, 4)
    near = np.vstack([k[0], k[0] + 1e-8 * k[1]])
    w = edit(w0, near, v, c, lam=1e-3)
    assert rel(w, lstsq_soft(w0, near, v, c, 1e-3)) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Property tests over shapes
# ---------------------------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None, derandomize=True)
@given(n=st.integers(1, 6), extra=st.integers(1, 10), o=st.integers(1, 9), use_cov=st.booleans(),
       seed=st.integers(0, 2**16))
def test_hard_form_property(n, extra, o, use_cov, seed):
    d = n + extra  # d > n: Gaussian keys are then well conditioned
    w0, k, v, c = problem(seed, n, d, o)
    c = c if use_cov else np.eye(d)
    w = edit(w0, k, v, c if use_cov else None)
    assert rel(w @ k.T, v.T) < 1e-9
    assert rel(w, kkt_hard(w0, k, v, c)) < 1e-8


@settings(max_examples=30, deadline=None, derandomize=True)
@given(n=st.integers(1, 12), d=st.integers(1, 10), o=st.integers(1, 9), lam=st.sampled_from([1e-2, 1.0, 10.0]),
       seed=st.integers(0, 2**16))
def test_soft_form_property(n, d, o, lam, seed):
    w0, k, v, c = problem(seed, n, d, o)
    assert rel(edit(w0, k, v, c, lam), lstsq_soft(w0, k, v, c, lam)) < 1e-8


# ---------------------------------------------------------------------------------------------------------------
# SecondMoment
# ---------------------------------------------------------------------------------------------------------------

def vectors(seed: int, shape: tuple[int, ...], dim: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dim, generator=g) * torch.linspace(2, 0.1, dim) + 0.5


def test_second_moment_matches_reference():
    x = vectors(0, (4, 7))  # (b, t, d)
    m = SecondMoment(6).update(x[:2]).update(x[2:])
    ref = x.reshape(-1, 6).double().numpy()
    assert m.count == 28
    assert m.matrix().dtype == torch.float64 and m.matrix().shape == (6, 6)
    assert rel(m.matrix().numpy(), ref.T @ ref / 28) < 1e-14
    assert torch.equal(m.matrix(), m.matrix().T)


def test_second_moment_mask_excludes_rows():
    x = vectors(1, (3, 5))
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 1, 0]], dtype=torch.bool)
    x_bad = x.clone()
    x_bad[~mask] = float("nan")  # masked-out rows may hold anything
    m = SecondMoment(6).update(x_bad, mask)
    ref = x[mask].double().numpy()
    assert m.count == int(mask.sum()) == 9
    assert rel(m.matrix().numpy(), ref.T @ ref / 9) < 1e-14


def test_second_moment_low_precision_inputs_accumulate_in_float64():
    x = vectors(2, (50,)).to(torch.bfloat16)
    m = SecondMoment(6).update(x)
    ref = x.double().numpy()
    assert rel(m.matrix().numpy(), ref.T @ ref / 50) < 1e-14


def test_merge_equals_joint_update():
    x = vectors(3, (40,))
    a = SecondMoment(6, metadata={"corpus": "a"}).update(x[:13])
    b = SecondMoment(6, metadata={"corpus": "b"}).update(x[13:])
    joint = SecondMoment(6).update(x)
    assert a.merge(b) is a
    assert a.count == joint.count == 40
    assert rel(a.matrix().numpy(), joint.matrix().numpy()) < 1e-14
    assert a.metadata == {"corpus": "a"}


def test_ridge_and_regularize():
    m = SecondMoment(6).update(vectors(4, (30,)))
    c = m.matrix()
    eps = 1e-2
    expected = c.numpy() + eps * np.trace(c.numpy()) / 6 * np.eye(6)
    assert rel(m.matrix(ridge=eps).numpy(), expected) < 1e-15
    assert rel(regularize(c, eps).numpy(), expected) < 1e-15
    assert torch.equal(m.matrix(ridge=0.0), c)


def test_inverse_apply_matches_solve():
    m = SecondMoment(6).update(vectors(5, (30,)))
    x = vectors(6, (3,)).double()
    y = m.inverse_apply(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    assert rel(y.numpy(), np.linalg.solve(m.matrix().numpy(), x.numpy().T).T) < 1e-12
    y1 = m.inverse_apply(x[0].float(), ridge=0.1)
    assert rel(y1.numpy(), np.linalg.solve(m.matrix(ridge=0.1).numpy(), x[0].numpy())) < 1e-6


def test_inverse_apply_singular_needs_ridge():
    m = SecondMoment(6).update(vectors(7, (3,)))  # 3 vectors in 6 dims: rank 3
    with pytest.raises(EditbenchError, match="pass ridge"):
        m.inverse_apply(vectors(8, (1,)))
    assert torch.isfinite(m.inverse_apply(vectors(8, (1,)), ridge=1e-3)).all()


def test_save_load_round_trip_is_exact(tmp_path):
    meta = {"text_encoder": "tiny", "corpus": "unit", "padding_policy": PADDING_POLICY, "n": [1, 2]}
    m = SecondMoment(6, metadata=meta).update(vectors(9, (17,)))
    path = m.save(tmp_path / "sub" / "cov.safetensors")
    m.update(vectors(10, (3,))).save(path)  # overwrite in place
    back = SecondMoment.load(path)
    assert back.dim == 6 and back.count == 20 and back.metadata == meta
    assert torch.equal(back._sum, m._sum) and torch.equal(back.matrix(), m.matrix())
    assert sorted(p.name for p in path.parent.iterdir()) == ["cov.safetensors"]  # no temp file left behind


def test_save_rejects_non_json_metadata(tmp_path):
    with pytest.raises(EditbenchError, match="JSON"):
        SecondMoment(2, metadata={"x": object()}).update(torch.ones(1, 2)).save(tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


def _corrupt_files(tmp_path) -> dict[str, Path]:
    from safetensors.torch import save_file

    good = SecondMoment(4).update(vectors(11, (9,), dim=4)).save(tmp_path / "good.safetensors")
    data = good.read_bytes()
    files = {}
    for name, payload in {"truncated": data[:-17], "garbage": os.urandom(300), "empty": b"",
                          "bad header": data[:8] + b"{" * 30 + data[38:]}.items():
        files[name] = tmp_path / f"{name}.safetensors"
        files[name].write_bytes(payload)
    files["foreign"] = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(4, 4)}, files["foreign"])
    bad_meta = {"format": "editbench.SecondMoment", "format_version": "1", "count": "3", "dim": "5",
                "metadata": "{}"}
    files["wrong dim"] = tmp_path / "dim.safetensors"
    save_file({"sum": torch.zeros(4, 4, dtype=torch.float64)}, files["wrong dim"], metadata=bad_meta)
    files["wrong version"] = tmp_path / "version.safetensors"
    save_file({"sum": torch.zeros(4, 4, dtype=torch.float64)}, files["wrong version"],
              metadata={**bad_meta, "dim": "4", "format_version": "9"})
    files["missing"] = tmp_path / "nope.safetensors"
    files["directory"] = tmp_path
    return files


@pytest.mark.parametrize("case", ["truncated", "garbage", "empty", "bad header", "foreign", "wrong dim",
                                  "wrong version", "missing", "directory"])
def test_load_bad_file_raises(tmp_path, case):
    path = _corrupt_files(tmp_path)[case]
    with pytest.raises(ArtifactError, match=str(path.name)) as info:
        SecondMoment.load(path)
    assert isinstance(info.value, EditbenchError)


@pytest.mark.parametrize("call,message", [
    (lambda m: m.update(torch.ones(3, 5)), r"shape \(\.\.\., 6\)"),
    (lambda m: m.update([1.0] * 6), r"shape \(\.\.\., 6\)"),
    (lambda m: m.update(torch.ones(3, 6), torch.ones(3)), "bool tensor"),
    (lambda m: m.update(torch.ones(3, 6), torch.ones(2, dtype=torch.bool)), r"shape \(3,\)"),
    (lambda m: m.update(torch.full((3, 6), float("inf"))), "NaN or Inf"),
    (lambda m: m.matrix(), "no vectors"),
    (lambda m: m.merge(SecondMoment(5)), "dim 6"),
    (lambda m: m.merge(SecondMoment(6, metadata={"text_encoder": "b"})), "different text_encoder"),
    (lambda m: regularize(torch.eye(6), -1.0), "ridge"),
])
def test_second_moment_bad_input(call, message):
    m = SecondMoment(6, metadata={"text_encoder": "a"})
    with pytest.raises(EditbenchError, match=message):
        call(m)
    assert m.count == 0  # failed updates leave the moment untouched


@pytest.mark.parametrize("dim", [0, -3, 2.5, True])
def test_second_moment_bad_dim(dim):
    with pytest.raises(EditbenchError, match="positive int"):
        SecondMoment(dim)


# ---------------------------------------------------------------------------------------------------------------
# Text covariance and the caption corpus
# ---------------------------------------------------------------------------------------------------------------

CAPTIONS = ["a photo of a dog", "a red car parked on a quiet street at night", "cat"]


@pytest.fixture(scope="module")
def clip_parts():
    from editbench.models import clip_tokenizer
    from editbench.testing import tiny_text_encoder

    return tiny_text_encoder(), clip_tokenizer()


def reference_covariance(encoder, tokenizer, captions, keep_start=False):
    """Each caption encoded alone, unpadded and without attention mask; start token dropped by slicing."""
    rows = []
    with torch.no_grad():
        for caption in captions:
            ids = torch.tensor([tokenizer(caption)["input_ids"]])  # (1, t) with start and end tokens
            hidden = encoder(ids).last_hidden_state[0].double()
            rows.append(hidden if keep_start else hidden[1:])
    x = torch.cat(rows).numpy()
    return x.T @ x / len(x), len(x)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_text_covariance_matches_hand_computed_reference(clip_parts, dtype, tol):
    encoder, tokenizer = copy.deepcopy(clip_parts[0]).to(dtype), clip_parts[1]
    ref, count = reference_covariance(encoder, tokenizer, CAPTIONS)
    m = estimate_text_covariance(encoder, tokenizer, CAPTIONS, batch_size=2, progress=False, corpus="three")
    assert count == 6 + 11 + 2  # words + end token per caption, start dropped
    assert m.count == count and m.dim == 32
    assert rel(m.matrix().numpy(), ref) < tol
    assert m.metadata["padding_policy"] == PADDING_POLICY and m.metadata["corpus"] == "three"
    assert m.metadata["n_captions"] == 3
    assert m.metadata["corpus_sha256"] == hashlib.sha256(("\n".join(CAPTIONS) + "\n").encode()).hexdigest()
    assert "CLIPTextModel" in m.metadata["text_encoder"]


def test_text_covariance_keep_start_token_and_streaming(clip_parts):
    encoder, tokenizer = clip_parts
    encoder.train()
    ref, count = reference_covariance(encoder, tokenizer, CAPTIONS, keep_start=True)
    m = estimate_text_covariance(encoder, tokenizer, iter(CAPTIONS), batch_size=1, progress=False,
                                 keep_start_token=True)
    assert encoder.training  # mode restored
    assert m.count == count == 22
    assert rel(m.matrix().numpy(), ref) < 1e-5
    assert m.metadata["padding_policy"].startswith("start token kept")


@pytest.mark.parametrize("captions,kwargs,message", [
    ([], {}, "captions is empty"),
    ("a dog", {}, "not a single string"),
    (["a dog", 3], {}, "must be strings"),
    (["a dog"], {"batch_size": 0}, "batch_size"),
])
def test_text_covariance_bad_input(clip_parts, captions, kwargs, message):
    with pytest.raises(EditbenchError, match=message):
        estimate_text_covariance(*clip_parts, captions, progress=False, **kwargs)


def test_text_covariance_rejects_non_text_model(clip_parts):
    with pytest.raises(EditbenchError, match="hidden_size"):
        estimate_text_covariance(torch.nn.Linear(2, 2), clip_parts[1], ["a"], progress=False)


def test_default_captions_are_the_generated_corpus():
    captions = default_captions()
    assert 2000 <= len(captions) <= 10000
    assert len(set(captions)) == len(captions) and all(c and c == c.strip() for c in captions)
    spec = importlib.util.spec_from_file_location("make_captions", ROOT / "editbench/data/make_captions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert captions == module.generate()  # captions.txt is in sync with its generator
    assert module.generate(50, seed=1) != module.generate(50, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# The worked example of docs/solver.md
# ---------------------------------------------------------------------------------------------------------------

def test_non_diffusers_example_core():
    spec = importlib.util.spec_from_file_location("solver_example", ROOT / "examples/solver_non_diffusers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    r = module.run(n_sentences=600, n_eval=256)
    assert r["sites"] == 2 and r["tokens_in_C"] > 64
    assert r["constraint_residual"] < 1e-5
    assert r["swap_gap_after"] < 1e-5
    assert r["swap_gap_before"] > 1e-2
    assert r["unrelated_output_change_C"] < r["unrelated_output_change_identity"]
    assert r["unrelated_key_change_C"] < r["unrelated_key_change_identity"]
