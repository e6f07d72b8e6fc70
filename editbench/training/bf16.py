"""bfloat16 master weights: Adam / AdamW for bfloat16 parameters with stochastically rounded updates.

``TrainConfig.master_weights = "bf16"`` keeps the trained parameters, their gradients and the optimizer moments in
bfloat16 (half the memory of float32 master weights: what lets DreamBooth's full UNet fine-tune fit where float32
copies do not; kohya-ss sd-scripts calls it ``--full_bf16``). Rounding an update to nearest would drop every update
smaller than half a bfloat16 step (at least 2**-9 of the weight: most of a DreamBooth update at lr 5e-6), so each
new value is rounded up or down at random with the probabilities that make it exact in expectation (Gupta et al.
2015, "Deep Learning with Limited Numerical Precision"; Zamirai et al. 2020, "Revisiting BFloat16 Training").

Written here rather than taken from torchao (``torchao.optim._AdamW(bf16_stochastic_round=True)`` does the same
update) because torchao compiles one kernel per parameter shape (measured on the 2-core CPU: 62 s for the first step
of 7 shapes, minutes for a UNet's) and draws the rounding noise from the global generator, so a resumed run would not
repeat an uninterrupted one. Here the noise of parameter k at step t comes from a generator seeded with a hash of
(seed, t, k): the same on every process of a data-parallel run and after a resume.

``TrainConfig.fused_backward`` runs the same update inside the backward pass (:meth:`StochasticAdamW.hooks`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["StochasticAdamW", "stochastic_round_bf16"]

_LOW16 = 0xFFFF
_HIGH16 = -0x10000  # 0xFFFF0000 as an int32


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (float32) rounded to bfloat16 without bias: to the neighbour away from zero with probability (the low 16
    bits of ``x``) / 2**16, else toward zero, so that ``E[result] = x``. Values bfloat16 holds exactly are
    unchanged; infinities stay infinite, NaN stays NaN, and a finite value never rounds to infinity."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_bf16 rounds float32 tensors, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, _LOW16 + 1, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    # adding the noise to the bit pattern carries into bit 16 (one bfloat16 step away from zero, for either sign:
    # the magnitude sits in the low 31 bits) exactly when noise + low16 >= 2**16; truncating then drops the rest
    out = ((bits + noise) & _HIGH16).view(torch.float32).to(torch.bfloat16)
    # a NaN's payload may carry into the exponent (NaN -> inf or 0); a finite value within a step of bfloat16's
    # largest may carry to inf: both keep round-to-nearest's result (NaN stays NaN, the finite value finite)
    keep = torch.isnan(x) | (torch.isinf(out) & torch.isfinite(x))
    return torch.where(keep, x.to(torch.bfloat16), out)


class StochasticAdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (``decoupled=False``: Adam with L2, as ``torch.optim.Adam``) for bfloat16
    parameters. The update is torch's AdamW computed in float32; the new parameter and the two moments are written
    back to bfloat16 with :func:`stochastic_round_bf16`. Float32 parameters get the same update written exactly.

    ``seed``: the rounding noise of the k-th parameter (in group order) at its step t comes from a generator seeded
    with a hash of (``seed``, t, k), so runs, resumes and data-parallel processes round identically. State per
    parameter: ``step`` (float32 scalar, on the CPU), ``exp_avg``, ``exp_avg_sq`` (the parameter's shape and dtype).
    Each update makes float32 copies of one parameter at a time (the parameter, its gradient, the two moments).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, decoupled: bool = True, seed: int = 0):
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW hyperparameters lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.decoupled, self.seed = decoupled, int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device, step: int, index: int) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        key = hashlib.blake2b(f"{self.seed}/{step}/{index}".encode(), digest_size=8).digest()
        return gen.manual_seed(int.from_bytes(key, "little") >> 1)

    @staticmethod
    def _store(target: torch.Tensor, value: torch.Tensor, gen: torch.Generator) -> None:
        target.copy_(stochastic_round_bf16(value, gen) if target.dtype == torch.bfloat16 else value)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, p, index in self._indexed():
            if p.grad is not None:
                self._update(group, p, index)
        return loss

    def _indexed(self) -> Iterable[tuple[dict, torch.Tensor, int]]:
        """(group, parameter, k): k the parameter's position over all groups, which seeds its rounding noise."""
        k = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield group, p, k
                k += 1

    def hooks(self) -> list[Any]:
        """Fuse the step into the backward pass: each parameter is updated as soon as its gradient is complete and
        the gradient is freed then (``TrainConfig.fused_backward``; no model-sized gradient memory). Returns the
        hook handles (``.remove()`` them afterwards). The update is the one :meth:`step` makes, bitwise."""
        def hook_for(group: dict, index: int) -> Any:
            def hook(param: torch.Tensor) -> None:
                with torch.no_grad():
                    self._update(group, param, index)
                param.grad = None
            return hook

        return [p.register_post_accumulate_grad_hook(hook_for(group, index)) for group, p, index in self._indexed()]

    def _update(self, group: dict, p: torch.Tensor, index: int) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if state["step"].device.type != "cpu":  # a resume puts it beside the parameter: no device sync
            state["step"] = state["step"].cpu()
        state["step"] += 1
        t = int(state["step"])
        w = p.float()                                                   # float32 working copies
        g = p.grad.float()
        if wd and self.decoupled:
            w.mul_(1 - lr * wd)
        elif wd:
            g = g.add(w, alpha=wd)
        m = state["exp_avg"].float().lerp_(g, 1 - beta1)
        v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
        w.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
        gen = self._generator(p.device, t, index)
        self._store(state["exp_avg"], m, gen)
        self._store(state["exp_avg_sq"], v, gen)
        self._store(p, w, gen)
