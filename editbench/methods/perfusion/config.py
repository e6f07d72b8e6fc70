"""Perfusion's training config and inference settings (defaults scaled to the toy world; paper values in
:meth:`PerfusionConfig.reference`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from editbench.errors import EditbenchError
from editbench.methods.tokens import EmbeddingNormCap
from editbench.training import Param, TrainConfig

__all__ = ["GATE_TOKENS", "LOCKS", "PerfusionConfig", "PerfusionSettings"]

LOCKS = ("local", "global")
GATE_TOKENS = ("all", "concept")


def _positive(name: str, v: float) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise EditbenchError(f"{name} must be a finite number > 0, got {v!r}")


@dataclass
class PerfusionConfig(EmbeddingNormCap, TrainConfig):
    """Training settings. Defaults are the toy world's (batch 4), tuned by ``editbench tune`` on its validation
    concepts: ``steps``, ``lr_values`` (``o*_V``), ``lr_embedding`` (the embedding row), ``beta_train`` (training gate
    bias) and ``embedding_norm_cap`` (the row kept at <= cap x the superclass word's norm) are the chosen point of
    benchmarks/tuning/toy-quick/perfusion/tuned.json, whose inference ``beta`` / ``tau`` the toy suites set
    (:class:`PerfusionSettings` keeps the paper's; tests/test_tuned_defaults.py keeps all of them equal). The paper's
    reference run is ``PerfusionConfig.reference()`` (400 steps, batch 16 = 4 x 4 accumulation, lr 0.03 / 0.006, gate
    bias 0.75, no cap). Learning rates are Adam step sizes per parameter group, so they do not depend on batch size.

    ``key_locking`` (default True, the paper's method): the key targets are locked to the superclass,
    ``o*_K = W_K i_super``, recomputed at inference and not stored. ``key_locking=False`` is the paper's ablation
    "trained keys": ``o*_K`` of every cross-attention layer becomes a learned float32 parameter (initialised from
    ``W_K i_super`` like ``o*_V``, its own parameter group with learning rate ``lr_keys``), stored in the artifact
    as ``o_k.<layer>``; such artifacts cannot be applied with ``lock="global"``. ``lr_keys`` is unused when
    ``key_locking`` is True.

    ``gate_tokens``: ``"all"`` (default, the paper) gates every token of the prompt by ``s(x)``; ``"concept"``
    edits only the positions of the concept's own token (every other token keeps ``W x``). Use it with text
    encoders that carry the concept direction into all later tokens (measured on the toy world:
    docs/methods/perfusion.md). Stored in the artifact; :class:`PerfusionSettings` uses it unless overridden."""

    steps: int = 196
    batch_size: int = 4
    grad_accum: int = 1
    lr_values: float = 0.299       # o*_V of every cross-attention layer
    lr_embedding: float = 1.71e-3  # the concept word's embedding row
    beta_train: float = 0.565      # sigmoid bias of the gate during training
    tau_train: float = 0.10        # sigmoid temperature during training
    ema_decay: float = 0.99        # of i*, the concept token's encoding
    cov_ridge: float = 1e-4        # C + cov_ridge * tr(C) / d * I
    key_locking: bool = True       # False: the "trained keys" ablation (o*_K learned and stored per layer)
    lr_keys: float = 0.299         # o*_K of every layer (= lr_values), only when key_locking is False
    gate_tokens: str = "all"       # "all" (paper) or "concept" (edit only the concept token's positions)
    embedding_norm_cap: float | None = 2.92  # learned row <= cap x |e(superclass)| (None: uncapped)

    @classmethod
    def reference(cls, **overrides) -> PerfusionConfig:
        """The paper's / reference implementation's settings: 400 steps, batch 16 as 4 x 4 accumulation."""
        return cls(**{"steps": 400, "batch_size": 4, "grad_accum": 4, "lr_values": 0.03, "lr_embedding": 0.006,
                      "lr_keys": 0.03, "beta_train": 0.75, "embedding_norm_cap": None,
                      **overrides})

    @classmethod
    def search_space(cls) -> list[Param]:
        """``editbench tune``'s space: both learning rates (log-uniform, 3e-3 to 0.3 and 6e-4 to 0.06), the training
        gate bias, the inference gate bias and temperature, the embedding-norm cap (x the superclass word's norm;
        uncapped rows end at about 2-4x) and the training steps."""
        return [Param("lr_values", "log", 3e-3, 0.3), Param("lr_embedding", "log", 6e-4, 0.06),
                Param("embedding_norm_cap", "float", 0.75, 3.0),
                Param("beta_train", "float", 0.5, 0.9), Param("beta", "float", 0.4, 0.9, target="settings"),
                Param("tau", "float", 0.05, 0.3, target="settings"),
                Param("steps", "int", 40, 300, target="steps")]

    def validate(self) -> None:
        super().validate()
        self.validate_norm_cap()
        if not isinstance(self.key_locking, bool):
            raise EditbenchError(f"key_locking must be True or False, got {self.key_locking!r}")
        if self.gate_tokens not in GATE_TOKENS:
            raise EditbenchError(f"gate_tokens must be one of {GATE_TOKENS}, got {self.gate_tokens!r}")
        for name in ("lr_values", "lr_embedding", "lr_keys", "tau_train", "cov_ridge"):
            _positive(name, getattr(self, name))
        if not (isinstance(self.beta_train, (int, float)) and math.isfinite(self.beta_train)):
            raise EditbenchError(f"beta_train must be a finite number, got {self.beta_train!r}")
        if not (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1):
            raise EditbenchError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")


@dataclass
class PerfusionSettings:
    """Inference settings of :meth:`PerfusionEditor.apply`.

    ``beta`` (gate bias; lower = stronger concept) and ``tau`` (gate temperature) are one number for every
    concept or one per artifact. ``lock``: ``"local"`` (key-lock the concept's keys to its superclass) or
    ``"global"`` (the key projections see the whole prompt with superclass words in place of the concepts).
    Artifacts trained with ``key_locking=False`` (trained keys) always use their stored ``o*_K``: ``"local"``
    locking does not touch their keys, and ``"global"`` is refused (EditbenchError) if any applied artifact has
    trained keys.
    ``gate_tokens``: None (default) uses each artifact's training value; ``"all"`` or ``"concept"`` overrides it
    for every artifact (see :class:`PerfusionConfig`).
    """

    beta: float | Sequence[float] = 0.70
    tau: float | Sequence[float] = 0.15
    lock: str = "local"
    gate_tokens: str | None = None

    def per_concept(self, name: str, n: int) -> list[float]:
        v = getattr(self, name)
        vals = [v] * n if isinstance(v, (int, float)) and not isinstance(v, bool) else list(v)
        if len(vals) != n:
            raise EditbenchError(f"{name} must be one number or one per artifact ({n}), got {v!r}")
        return [float(x) for x in vals]

    def validate(self, n_artifacts: int) -> None:
        try:
            betas, taus = self.per_concept("beta", n_artifacts), self.per_concept("tau", n_artifacts)
        except (TypeError, ValueError):
            raise EditbenchError(f"beta and tau must be numbers or lists of numbers, got {self.beta!r}, "
                                 f"{self.tau!r}") from None
        if not all(math.isfinite(b) for b in betas):
            raise EditbenchError(f"beta must be finite, got {self.beta!r}")
        for t in taus:
            _positive("tau", t)
        if self.lock not in LOCKS:
            raise EditbenchError(f"lock must be one of {LOCKS}, got {self.lock!r}")
        if self.gate_tokens is not None and self.gate_tokens not in GATE_TOKENS:
            raise EditbenchError(f"gate_tokens must be None or one of {GATE_TOKENS}, got {self.gate_tokens!r}")
