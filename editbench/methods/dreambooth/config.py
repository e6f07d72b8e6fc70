"""DreamBooth's training config (toy-world defaults; the reference recipe is :meth:`DreamBoothConfig.reference`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from editbench.errors import EditbenchError
from editbench.methods.prior import PriorConfigMixin
from editbench.training import Param, TrainConfig

__all__ = ["DEFAULT_IDENTIFIER", "DreamBoothConfig"]

DEFAULT_IDENTIFIER = "sks"
"""The rare single-token word of the reference recipe ("a photo of sks dog"); use it as the concept's placeholder."""


@dataclass
class DreamBoothConfig(PriorConfigMixin, TrainConfig):
    """Training settings of DreamBooth: the whole UNet (and optionally the text encoder) is fine-tuned on prompts
    "<identifier> <class>" with prior preservation (``loss = instance + prior_loss_weight * prior``).

    Defaults are the toy world's (32x32 px), tuned by ``editbench tune`` on its validation concepts
    (benchmarks/tuning/toy-quick/dreambooth/tuned.json, tests/test_tuned_defaults.py): ``steps`` of batch 4 (+4 class
    images; 16 class images), ``lr`` and ``prior_loss_weight``. As in the reference: AdamW with weight decay 1e-2,
    gradient clipping at 1.0, text encoder frozen unless ``train_text_encoder`` (then at ``lr_text_encoder``, default
    ``lr``).
    """

    steps: int = 282
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2.60e-4
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0
    train_text_encoder: bool = False
    lr_text_encoder: float | None = None
    prior_loss_weight: float = 0.325

    @classmethod
    def reference(cls, **overrides) -> DreamBoothConfig:
        """diffusers' ``train_dreambooth.py`` README recipe with prior preservation (512 px): 800 steps, batch 1,
        lr 5e-6, 200 class images (50 sampling steps, guidance 7.5), prior loss weight 1.0."""
        return cls(**{"steps": 800, "batch_size": 1, "lr": 5e-6, "num_class_images": 200, "prior_loss_weight": 1.0,
                      "class_inference_steps": 50, "class_guidance_scale": 7.5, **overrides})

    @classmethod
    def search_space(cls) -> list[Param]:
        """``editbench tune``'s space: the learning rate (log-uniform, 5e-6 to 5e-4), the prior loss
        weight and the training steps."""
        return [Param("lr", "log", 5e-6, 5e-4), Param("prior_loss_weight", "float", 0.1, 1.5),
                Param("steps", "int", 40, 300, target="steps")]

    def validate(self) -> None:
        super().validate()
        self.validate_prior()
        for name in ("lr", "lr_text_encoder"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise EditbenchError(f"{name} must be a finite number > 0, got {v!r}")
