"""Custom Diffusion's training config (toy-world defaults; the paper's recipe is
:meth:`CustomDiffusionConfig.reference`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from editbench.errors import EditbenchError
from editbench.methods.prior import AUTO, PriorConfigMixin
from editbench.methods.tokens import EmbeddingNormCap
from editbench.training import Param, TrainConfig

__all__ = ["CustomDiffusionConfig"]


@dataclass
class CustomDiffusionConfig(EmbeddingNormCap, PriorConfigMixin, TrainConfig):
    """Training settings of Custom Diffusion: the K/V projections of every cross-attention layer + one modifier
    token per concept (``"<new1> cat"``), resize augmentation with a masked loss, prior preservation.

    Defaults are the toy world's (32x32 px), tuned by ``editbench tune`` on its validation concepts
    (benchmarks/tuning/toy-quick/custom_diffusion/tuned.json, tests/test_tuned_defaults.py): ``steps`` of batch 4 (+4
    class images; 16 class images), ``lr`` (K/V and modifier rows), ``prior_loss_weight``, and ``embedding_norm_cap``
    (modifier rows kept at <= cap x the superclass word's norm). Everything else is the reference's: AdamW with weight
    decay 1e-2 and gradient clipping at 1.0, augmentation p = 0.66, modifier tokens initialised from rare tokens, and
    *real* class images with their own captions (``class_data_dir="auto"``: the toy world's retrieval of the category,
    :mod:`editbench.toyworld.retrieval`; on a model that is not toy-sized, or for a category the toy world lacks,
    generated images unless ``class_data_dir`` names a folder; :mod:`editbench.methods.prior`).

    ``svd_rank`` / ``svd_energy`` store each K/V delta as a truncated SVD (rank, or the smallest rank keeping
    that fraction of the singular-value sum; the paper's compression uses 0.6). ``merge_ridge`` is the ridge
    ``eps`` of ``C + eps tr(C)/d I`` in :meth:`CustomDiffusionEditor.compose`, whose ``C`` comes from the first
    ``merge_captions`` captions of :func:`editbench.text_covariance.default_captions` (1000 captions, ~9k token vectors:
    over 10 d for SD 1.x's d = 768; the reference uses 200).
    """

    steps: int = 173
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 5.05e-4
    lr_modifier: float | None = None            # None: same as lr (the reference trains both with one lr)
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0
    initializers: tuple[str, ...] = ("ktn", "pll", "ucd")  # concept j starts from initializers[j % len]
    augment: bool = True
    hflip: bool = False
    svd_rank: int | None = None
    svd_energy: float | None = None
    merge_ridge: float = 1e-6
    merge_captions: int | None = 1000          # first N of default_captions() for C (None: all 3,000)
    prior_loss_weight: float = 1.09
    embedding_norm_cap: float | None = 1.4
    class_data_dir: str | None = AUTO           # real class images (the toy world's retrieval); None: generated

    # class_data_dir is not a "later field" here: its default changed from generated to real images, so a
    # checkpoint written with generated class images must not resume with real ones
    LATER_FIELDS = tuple(f for f in TrainConfig.LATER_FIELDS if f != "class_data_dir")

    @classmethod
    def reference(cls, **overrides) -> CustomDiffusionConfig:
        """The paper's recipe (512 px): 250 steps (500 for two concepts), batch 8, lr 8e-5 (= 1e-5 x batch),
        200 real regularization images with their own captions, prior loss weight 1.0.

        The paper retrieves the images from LAION; pass them as ``class_data_dir=FOLDER`` (diffusers' retrieve.py
        output; ``{}`` in the path becomes the category). Without it, ``"auto"`` takes the toy world's retrieval on
        the toy world and generates the images elsewhere (50 sampling steps, guidance 6: the paper's "w/ Gen"
        ablation); the artifact's ``prior`` metadata says which."""
        return cls(**{"steps": 250, "batch_size": 8, "lr": 8e-5, "num_class_images": 200, "prior_loss_weight": 1.0,
                      "embedding_norm_cap": None, "class_data_dir": AUTO,
                      "class_inference_steps": 50, "class_guidance_scale": 6.0, **overrides})

    @classmethod
    def search_space(cls) -> list[Param]:
        """``editbench tune``'s space: the learning rate (log-uniform, 4e-5 to 4e-3), the prior loss
        weight, the embedding-norm cap of the modifier rows (x the superclass word's norm) and the training steps."""
        return [Param("lr", "log", 4e-5, 4e-3), Param("prior_loss_weight", "float", 0.1, 1.5),
                Param("embedding_norm_cap", "float", 0.75, 3.0),
                Param("steps", "int", 40, 300, target="steps")]

    def validate(self) -> None:
        super().validate()
        self.validate_norm_cap()
        self.validate_prior()
        for name in ("lr", "lr_modifier"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise EditbenchError(f"{name} must be a finite number > 0, got {v!r}")
        if isinstance(self.initializers, str) or not self.initializers:
            raise EditbenchError("initializers must be a non-empty tuple of single-token words")
        if self.svd_rank is not None and (isinstance(self.svd_rank, bool) or not isinstance(self.svd_rank, int)
                                          or self.svd_rank < 1):
            raise EditbenchError(f"svd_rank must be a positive int or None, got {self.svd_rank!r}")
        if self.svd_energy is not None and not 0 < self.svd_energy <= 1:
            raise EditbenchError(f"svd_energy must be in (0, 1] or None, got {self.svd_energy!r}")
        if self.merge_captions is not None and (isinstance(self.merge_captions, bool)
                                                or not isinstance(self.merge_captions, int) or self.merge_captions < 1):
            raise EditbenchError(f"merge_captions must be a positive int or None, got {self.merge_captions!r}")
        if not self.merge_ridge >= 0:
            raise EditbenchError(f"merge_ridge must be >= 0, got {self.merge_ridge!r}")
