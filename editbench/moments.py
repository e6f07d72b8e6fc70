"""The uncentered second moment ``C = E[x x^T]`` of context vectors, streamed in float64, saved and loaded.

Encoder-agnostic: feed it any ``(..., d)`` vectors (a text encoder's token states, an audio or protein model's
embeddings). :mod:`editbench.text_covariance` fills one from a CLIP-style text encoder; :mod:`editbench.solver`
takes its :meth:`SecondMoment.matrix` or :meth:`SecondMoment.whitener` as ``cov``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from scipy.linalg import cho_solve

from editbench.errors import ArtifactError, EditbenchError
from editbench.solver import Whitener, _cholesky, _f64, regularize
from editbench.storage import write_bytes

__all__ = ["SecondMoment"]

_FORMAT = "editbench.SecondMoment"
_FORMAT_VERSION = "1"


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
            raise EditbenchError("update got NaN or Inf vectors; check the encoder (float16 overflow?) or mask them "
                                 "out")
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
        write_bytes(path, save({"sum": self._sum.detach().cpu().contiguous()}, metadata=header))
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
