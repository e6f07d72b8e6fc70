"""Textual inversion's training config (toy-world defaults; the reference recipe is
:meth:`TextualInversionConfig.reference`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from editbench.errors import EditbenchError
from editbench.methods.tokens import EmbeddingNormCap
from editbench.training import Param, TrainConfig

__all__ = ["TextualInversionConfig"]


@dataclass
class TextualInversionConfig(EmbeddingNormCap, TrainConfig):
    """Training settings of textual inversion: only the placeholder's embedding row(s) are learned.

    Defaults are the toy world's (32x32 px), tuned by ``editbench tune`` on its validation concepts
    (benchmarks/tuning/toy-quick/textual_inversion/tuned.json, tests/test_tuned_defaults.py): ``steps`` of batch 4,
    ``lr``, and ``embedding_norm_cap`` (the learned row kept at <= cap x the superclass word's norm;
    docs/methods/textual_inversion.md). The
    reference's ``scale_lr`` rule (5e-4 x batch x accumulation = 2e-3) made the row grow to ~2x a word's norm on
    the toy text encoder; :meth:`reference` keeps it (and no cap). ``num_vectors`` > 1 learns several vectors,
    stored as tokens ``<p>``, ``<p>_1``, ... (diffusers' multi-vector convention; the pipeline expands ``<p>`` in
    prompts). ``initializer`` is the
    single-token word the vectors start from (None: the concept's superclass word).
    """

    steps: int = 40
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1.36e-3
    weight_decay: float = 1e-2          # AdamW decay of the learned rows only (the reference decays them too)
    num_vectors: int = 1
    initializer: str | None = None
    embedding_norm_cap: float | None = 2.37

    @classmethod
    def reference(cls, **overrides) -> TextualInversionConfig:
        """diffusers' ``textual_inversion.py`` README recipe at 512 px: 3000 steps, batch 1 x 4 accumulation,
        lr 5e-4 scaled by the batch (2e-3), AdamW weight decay 1e-2, one vector."""
        return cls(**{"steps": 3000, "batch_size": 1, "grad_accum": 4, "lr": 2e-3, "embedding_norm_cap": None,
                      **overrides})

    @classmethod
    def search_space(cls) -> list[Param]:
        """``editbench tune``'s space: the learning rate (log-uniform, 2e-4 to 2e-2), the embedding-norm
        cap (x the superclass word's norm; uncapped rows end at about 2-4x) and the training steps."""
        return [Param("lr", "log", 2e-4, 2e-2), Param("embedding_norm_cap", "float", 0.75, 3.0),
                Param("steps", "int", 40, 300, target="steps")]

    def validate(self) -> None:
        super().validate()
        self.validate_norm_cap()
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise EditbenchError(f"lr must be a finite number > 0, got {self.lr!r}")
        if isinstance(self.num_vectors, bool) or not isinstance(self.num_vectors, int) or self.num_vectors < 1:
            raise EditbenchError(f"num_vectors must be a positive int, got {self.num_vectors!r}")
        if self.initializer is not None and (not isinstance(self.initializer, str) or not self.initializer.strip()):
            raise EditbenchError(f"initializer must be a word or None, got {self.initializer!r}")
