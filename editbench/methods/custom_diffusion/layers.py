"""Custom Diffusion's pieces that are pure torch: the trainable K/V projection, the low-rank delta and the
resize augmentation with its valid-region mask.

Shape legend: b batch, n tokens, d text width, o output width, r rank, H/W pixel size, h/w latent size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LARGE_PREFIXES", "SMALL_PREFIXES", "KVLinear", "low_rank", "resize_augment"]

SMALL_PREFIXES = ("a far away ", "very small ")
LARGE_PREFIXES = ("zoomed in ", "close up ")


class KVLinear(nn.Module):
    """A cross-attention K or V projection being fine-tuned: float32 trainable copy of ``base``'s weight.

    The start token's output is detached (Custom Diffusion: the start token is in every prompt, its key/value
    must not be what the fine-tuning changes), so the weight only learns from the other tokens.

    Why not diffusers' ``CustomDiffusionAttnProcessor`` for training: it replaces the whole attention computation
    of the layer (its own baddbmm/softmax path instead of the installed processor) and would have to be set on
    every attention layer; swapping only the two linear maps keeps each layer's processor as it is and makes
    training, ``apply`` and ``undo`` plain module swaps. The diffusers processors are used for interop
    (:mod:`.interop`).
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.detach().to(torch.float32).clone())    # (o, d)
        bias = None if base.bias is None else base.bias.detach().to(torch.float32).clone()
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)  # (o,), not trained

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (b, n, d) -> (b, n, o)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(x, self.weight.to(x.dtype), bias)
        return torch.cat([y[:, :1].detach(), y[:, 1:]], dim=1) if y.ndim == 3 else y


def low_rank(delta: torch.Tensor, *, rank: int | None = None, energy: float | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD ``delta ~ up @ down``: ``up`` ``(o, r)`` (singular values folded in), ``down`` ``(r, d)``.

    ``r`` is the smallest rank whose singular values sum to at least ``energy`` of the total (the paper keeps
    0.6), capped by ``rank``; at least 1. Computed in float64, returned in ``delta``'s dtype.
    """
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)   # (o, k), (k,), (k, d)
    r = s.numel()
    if energy is not None and s.sum() > 0:
        r = int((torch.cumsum(s, 0) / s.sum() < energy - 1e-12).sum()) + 1
    if rank is not None:
        r = min(r, rank)
    r = max(1, min(r, s.numel()))
    return (u[:, :r] * s[:r]).to(delta.dtype), vh[:r].to(delta.dtype)


def _randint(lo: int, hi: int, gen: torch.Generator) -> int:
    """Uniform integer in [lo, hi] (inclusive) from ``gen``."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def resize_augment(image: torch.Tensor, mask: torch.Tensor, factor: int, gen: torch.Generator, *,
                   p_small: float = 0.66) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Custom Diffusion's augmentation of one image ``(3, S, S)`` in [-1, 1] and its mask ``(1, S, S)``.

    With probability ``p_small`` the image is shrunk to a random even size in [S/3, S] and pasted at a random
    spot of a zero canvas; the valid region is the pasted square at latent resolution (cells of ``factor`` px)
    with one cell trimmed on each side, as in the reference. Otherwise it is enlarged 1.2-1.4x and randomly
    cropped (valid region: everything). Returns the image, ``mask`` x valid region ``(1, S, S)`` and the prompt
    prefix: "a far away "/"very small " below 0.6 S, "zoomed in "/"close up " when enlarged, else "".

    Hand-written because diffusers has it only inside its example training script (not importable); this is
    the same logic on tensors, with randomness from the training loop's generator.
    """
    size = image.shape[-1]
    if float(torch.rand((), generator=gen)) < p_small:
        scale = _randint(size // 3, size, gen)
    else:
        scale = _randint(int(1.2 * size), int(1.4 * size) - 1, gen)
    scale += scale % 2  # the reference uses even sizes
    both = torch.cat([image, mask.to(image)])[None]                                        # (1, 4, S, S)
    big = F.interpolate(both, size=(scale, scale), mode="bilinear", antialias=True, align_corners=False)[0]
    if scale > size:
        top, left = _randint(0, scale - size, gen), _randint(0, scale - size, gen)
        out = big[:, top:top + size, left:left + size]
        return out[:3], out[3:], LARGE_PREFIXES[_randint(0, 1, gen)]
    top, left = _randint(0, size - scale, gen), _randint(0, size - scale, gen)
    out = torch.zeros_like(both[0])
    out[:, top:top + scale, left:left + scale] = big
    f, m = factor, size // factor
    valid = torch.zeros(1, m, m)                                                           # (1, h, w)
    valid[:, top // f + 1:(top + scale) // f - 1, left // f + 1:(left + scale) // f - 1] = 1
    if valid.sum() == 0:  # tiny canvases: keep every latent cell the square touches
        valid[:, top // f:-(-(top + scale) // f), left // f:-(-(left + scale) // f)] = 1
    valid = F.interpolate(valid[None], size=(size, size), mode="nearest")[0]               # (1, S, S)
    prefix = SMALL_PREFIXES[_randint(0, 1, gen)] if scale < 0.6 * size else ""
    return out[:3], out[3:] * valid.to(out), prefix
