"""Custom Diffusion's closed-form multi-concept merge (paper Eq. 4-5), through
:func:`editbench.solver.closed_form_edit_many`.

For every K/V projection ``W0`` and concepts ``i`` with fine-tuned ``W_i``::

    min_W ||(W - W0) C_reg^T||_F   s.t.   W K^T = V^T,    V = [K_i W_i^T]_i

``K`` holds, for each concept, the token features of ``"<new_i> category"`` and ``"photo of a <new_i> category"``
(from the modifier token through the end token: the start token and the concept-independent ``"photo of a"``
prefix are dropped, as in the reference ``[:, 1:]`` / ``[:, 4:]`` slicing; padding dropped). Duplicate key rows
are removed keeping the first, as the reference does. ``C = C_reg^T C_reg`` is the text second moment over
:func:`editbench.text_covariance.default_captions` (start token dropped, end token kept, padding dropped).

Shape legend: n keys, d text width, o output width, t tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from editbench.errors import EditbenchError
from editbench.methods.tokens import token_position
from editbench.solver import Whitener, closed_form_edit_many
from editbench.pipelines import encode_text

__all__ = ["MergeResult", "concept_keys", "merge_projections"]

KEY_CAPTIONS = ("{}", "photo of a {}")


@dataclass
class MergeResult:
    """Merged float64 weights ``{projection name: (o, d)}``, the keys ``(n, d)`` and the values they must map to
    ``{projection name: (n, o)}`` (after duplicate removal): ``weights[p] @ keys.T == values[p].T``."""

    weights: dict[str, torch.Tensor]
    keys: torch.Tensor
    values: dict[str, torch.Tensor]


def concept_keys(pipeline: Any, token: str, category: str) -> torch.Tensor:
    """Float64 ``(t, d)`` token features of the key captions of one concept (the token must be installed); ``d`` is
    the cross-attention context width (SDXL: both encoders' penultimate states concatenated)."""
    captions = [c.format(f"{token} {category}") for c in KEY_CAPTIONS]
    tok = pipeline.tokenizer
    with torch.no_grad():
        enc = encode_text(pipeline, captions)  # as the pipeline encodes them (SDXL: both encoders concatenated)
    ids, hidden = enc.ids[0], enc.hidden.double()                        # (2, 77), (2, 77, d)
    tid, eos = tok.convert_tokens_to_ids(token), tok.eos_token_id
    start, end = token_position(ids, tid), token_position(ids, eos)      # (2,), (2,)
    if (start < 0).any() or (end < 0).any():
        raise EditbenchError(f"modifier token {token!r} is not a single token of the pipeline's tokenizer")
    return torch.cat([hidden[i, int(start[i]):int(end[i]) + 1] for i in range(len(captions))])


def merge_projections(base: dict[str, torch.Tensor], tuned: Sequence[dict[str, torch.Tensor]],
                      keys: Sequence[torch.Tensor], cov: torch.Tensor) -> MergeResult:
    """Hard-constraint merge of every projection.

    Args:
        base: ``{name: W0 (o, d)}``.
        tuned: per concept group (artifact), ``{name: W_i (o, d)}`` for the same names.
        keys: per concept group, its key rows ``(n_i, d)``.
        cov: ``(d, d)`` text second moment ``C`` (or a :class:`editbench.solver.Whitener` of it).

    ``C`` is factored once and the keys' whitened SVD computed once for all projections
    (:func:`editbench.solver.closed_form_edit_many`); each projection then costs two small matrix products.
    """
    k_all = torch.cat([k.double() for k in keys])                        # (N, d)
    owner = torch.cat([torch.full((len(k),), i) for i, k in enumerate(keys)])
    _, first = torch.unique(k_all, dim=0, return_inverse=True)
    seen: set[int] = set()
    keep = [i for i, g in enumerate(first.tolist()) if not (g in seen or seen.add(g))]  # first of each row
    k, owner = k_all[keep], owner[keep]                                  # (n, d), (n,)
    groups = [(j, (owner == j).nonzero().flatten()) for j in range(len(keys))]
    values = {}
    for name, w0 in base.items():
        v = k.new_empty(len(k), w0.shape[0])                             # (n, o) = W_i k, per owner i
        for j, rows in groups:
            v[rows] = k[rows] @ tuned[j][name].double().T
        values[name] = v
    white = cov if isinstance(cov, Whitener) else Whitener(cov)          # factor C once for every projection
    weights = closed_form_edit_many({n: w0.double() for n, w0 in base.items()}, k, values, cov=white)  # float64
    return MergeResult(weights, k, values)
