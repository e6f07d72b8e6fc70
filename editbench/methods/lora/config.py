"""LoRA's training config and inference settings (toy-world defaults; the reference recipe is
:meth:`LoRAConfig.reference`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from editbench.errors import EditbenchError
from editbench.methods.prior import PriorConfigMixin
from editbench.training import Param, TrainConfig

__all__ = ["LoRAConfig", "LoRASettings"]


@dataclass
class LoRAConfig(PriorConfigMixin, TrainConfig):
    """Training settings of DreamBooth-LoRA: peft LoRA adapters on the UNet attention projections, prompts
    "<identifier> <class>".

    ``rank`` / ``alpha``: the adapter's ``W + (alpha / rank) B A`` (reference r = 4, alpha = 4); ``target_modules``:
    peft's module-name suffixes; ``init_lora_weights``: peft's init ("gaussian" as diffusers' scripts: A Gaussian, B
    zero). Defaults are the toy world's (32x32 px), tuned by ``editbench tune`` on its validation concepts
    (benchmarks/tuning/toy-quick/lora/tuned.json, tests/test_tuned_defaults.py): ``steps`` of batch 4, ``lr`` and
    ``rank`` (alpha 4); AdamW weight decay 1e-2, clipping at 1.0, prior preservation off (as in diffusers'
    DreamBooth-LoRA example; switch it on with ``with_prior_preservation=True``). :meth:`reference` is diffusers'
    recipe.
    """

    steps: int = 278
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1.57e-3
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0
    rank: int = 16
    alpha: float = 4.0
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    init_lora_weights: str = "gaussian"
    dropout: float = 0.0
    with_prior_preservation: bool = False

    @classmethod
    def reference(cls, **overrides) -> LoRAConfig:
        """diffusers' ``train_dreambooth_lora.py`` README recipe (512 px): 500 steps, batch 1, lr 1e-4, rank 4,
        alpha 4, no prior preservation."""
        return cls(**{"steps": 500, "batch_size": 1, "lr": 1e-4, "rank": 4, **overrides})

    @classmethod
    def search_space(cls) -> list[Param]:
        """``editbench tune``'s space: the learning rate (log-uniform, 1e-4 to 1e-2), the adapter rank
        and the training steps."""
        return [Param("lr", "log", 1e-4, 1e-2), Param("rank", "categorical", choices=(2, 4, 8, 16)),
                Param("steps", "int", 40, 300, target="steps")]

    def validate(self) -> None:
        super().validate()
        self.validate_prior()
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise EditbenchError(f"lr must be a finite number > 0, got {self.lr!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise EditbenchError(f"rank must be a positive int, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise EditbenchError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise EditbenchError("target_modules must be a non-empty tuple of module-name suffixes")
        if not 0 <= self.dropout < 1:
            raise EditbenchError(f"dropout must be in [0, 1), got {self.dropout!r}")


@dataclass
class LoRASettings:
    """Inference settings of :meth:`LoRAEditor.apply`: every adapter's output is scaled by
    ``scale * adapter_weights[i]`` (diffusers: ``pipe.set_adapters(names, adapter_weights=...)`` with
    ``cross_attention_kwargs={"scale": scale}``). ``adapter_weights``: one number for all or one per artifact."""

    scale: float = 1.0
    adapter_weights: float | Sequence[float] | None = None

    def weights(self, n: int) -> list[float]:
        w = self.adapter_weights
        ws = [1.0] * n if w is None else [w] * n if isinstance(w, (int, float)) and not isinstance(w, bool) \
            else list(w)
        if len(ws) != n:
            raise EditbenchError(f"adapter_weights must be one number or one per artifact ({n}), got {w!r}")
        return [float(self.scale) * float(x) for x in ws]

    def validate(self, n_artifacts: int) -> None:
        try:
            ws = self.weights(n_artifacts)
        except (TypeError, ValueError):
            raise EditbenchError(f"scale and adapter_weights must be numbers, got {self.scale!r}, "
                                 f"{self.adapter_weights!r}") from None
        if not all(math.isfinite(x) for x in ws):
            raise EditbenchError(f"adapter weights must be finite, got {ws}")
