"""What a method plugs into the shared training loop: its config (:class:`TrainConfig`, search space
:class:`Param`), a :class:`TrainingSession` with :class:`ParamGroup` s, the per-step :class:`StepContext`, the
:class:`TrainResult`, and the prompt and loss helpers.

Shape legend: b batch, c latent channels, h/w latent height/width, n tokens, d width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from editbench.concepts import ConceptData
from editbench.errors import EditbenchError, TrainingError

if TYPE_CHECKING:
    from editbench.methods.base import Artifact

__all__ = ["OPTIMIZERS", "Param", "ParamGroup", "StepContext", "TrainConfig", "TrainResult", "TrainingSession",
           "encode_prompts", "masked_mse", "pipeline_device", "tokenize"]

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
"""The optimizers ``TrainConfig.optimizer`` names."""


@dataclass(frozen=True)
class Param:
    """One hyperparameter of a method's search space (``Config.search_space()``, read by ``editbench tune``).

    ``kind``: ``"log"`` (float, log-uniform in [low, high]: learning rates), ``"float"`` (uniform), ``"int"``
    (integers in [low, high]) or ``"categorical"`` (one of ``choices``). ``target``: where the value goes:
    ``"config"`` (a field of the method's Config), ``"settings"`` (an inference setting of ``apply()``) or
    ``"steps"`` (the training steps; name ``"steps"``). Checked up front by :func:`editbench.eval.tune.check_space`.
    """

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    target: str = "config"


@dataclass
class TrainConfig:
    """Training settings every method has; a method's ``Config`` subclasses this and adds its own fields."""

    steps: int = 400
    batch_size: int = 4
    grad_accum: int = 1
    optimizer: str = "adamw"
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    checkpoint_every: int = 50
    mask_loss: bool = True

    # fields that may change between a checkpoint and its resume (everything else must match)
    RESUMABLE_FIELDS = ("steps", "checkpoint_every")

    @classmethod
    def search_space(cls) -> list[Param]:
        """The method's hyperparameters for ``editbench tune`` (methods override; empty: not tunable)."""
        return []

    def validate(self) -> None:
        """Raise EditbenchError for an unusable value; subclasses extend (and call super)."""
        for name in ("steps", "batch_size", "grad_accum"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise EditbenchError(f"{name} must be a positive int, got {v!r}")
        if isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int) \
                or self.checkpoint_every < 0:
            raise EditbenchError(f"checkpoint_every must be an int >= 0 (0: never), got {self.checkpoint_every!r}")
        if self.optimizer not in OPTIMIZERS:
            raise EditbenchError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise EditbenchError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")


@dataclass
class ParamGroup:
    """Trainable parameters sharing one learning rate (and weight decay). Train them in float32."""

    name: str
    params: list[torch.nn.Parameter]
    lr: float
    weight_decay: float = 0.0


@dataclass
class StepContext:
    """What a session's :meth:`TrainingSession.extra_loss` can use for the current micro-batch."""

    step: int                      # 1-based optimizer step being computed
    micro: int                     # micro-batch index within the step (gradient accumulation)
    pipeline: Any
    generator: torch.Generator     # the run's seeded CPU generator: use it for any randomness
    prompts: list[str]
    indices: torch.Tensor          # (b,) image indices of this micro-batch
    latents: torch.Tensor          # (b, c, h, w) clean, scaled latents
    diffusion_loss: Callable[..., torch.Tensor]  # (latents, encoder_hidden_states, masks=None) -> scalar loss
    owners: torch.Tensor | None = None  # (b,) index of each item's concept when several are trained jointly


@dataclass
class TrainResult:
    """Outcome of :func:`train`; ``summary()`` goes into the artifact's metadata."""

    steps: int
    losses: list[float]            # mean loss of every optimizer step, 1..steps (resumed steps included)
    wall_time_s: float             # this call
    wall_time_total_s: float       # all segments of a resumed run
    peak_memory_bytes: int
    memory_kind: str               # "cuda_max_allocated" or "cpu_rss_peak_delta"
    device: str
    resumed_from: int = 0
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        k = max(1, len(self.losses) // 10)
        return {"steps": self.steps, "wall_time_s": round(self.wall_time_total_s, 3),
                "peak_memory_bytes": self.peak_memory_bytes, "memory_kind": self.memory_kind,
                "device": self.device, "resumed_from": self.resumed_from,
                "loss_first": _mean(self.losses[:k]), "loss_last": _mean(self.losses[-k:]), **self.extra}


def _mean(xs: Sequence[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


class TrainingSession:
    """A method's part of training. Override :meth:`param_groups`, :meth:`encode` and :meth:`artifact`.

    Attributes:
        phrase: what replaces ``{}`` in the concept's prompt templates (default: the placeholder).
        augments: set True if :meth:`augment` is overridden; latents are then encoded every step (no cache).
    """

    phrase: str | None = None
    augments: bool = False

    def phrase_for(self, concept: ConceptData) -> str:
        """What replaces ``{}`` in ``concept``'s templates (default: ``phrase``, else the placeholder)."""
        return self.phrase or concept.placeholder

    def param_groups(self) -> list[ParamGroup]:
        """The parameters to optimise, grouped by learning rate."""
        raise NotImplementedError

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Encoder hidden states ``(b, n, d)`` for ``prompts`` (with gradients where the method trains)."""
        raise NotImplementedError

    def augment(self, images: torch.Tensor, masks: torch.Tensor, prompts: list[str],
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Augment a batch: images ``(b, 3, H, W)`` in [-1, 1], masks ``(b, 1, H, W)``; same shapes out."""
        return images, masks, prompts

    def unet_kwargs(self, batch_size: int) -> dict:
        """Extra keyword arguments of the UNet call (e.g. SDXL's ``added_cond_kwargs``)."""
        return {}

    def extra_loss(self, ctx: StepContext) -> torch.Tensor | None:
        """An extra loss term added to the diffusion loss (e.g. prior preservation); None for none."""
        return None

    def after_step(self, step: int) -> None:
        """Called after every optimizer step (e.g. to restore embedding rows that must not change)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Non-parameter state to checkpoint (e.g. an EMA); restored by :meth:`load_state_tensors`."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if tensors:
            raise TrainingError(f"checkpoint holds session state {sorted(tensors)} this method does not use")

    def artifact(self, result: TrainResult) -> Artifact:
        """Build the method's artifact from the trained state (the Editor adds the common metadata)."""
        raise NotImplementedError


def pipeline_device(pipeline: Any) -> torch.device:
    """The device of the pipeline's UNet."""
    return next(pipeline.unet.parameters()).device


def tokenize(pipeline: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids ``(b, n)`` of ``prompts`` as the pipeline encodes them (padded to the tokenizer's max length)."""
    tok = pipeline.tokenizer
    return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids.to(pipeline_device(pipeline))


def encode_prompts(pipeline: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Encoder hidden states ``(b, n, d)`` of ``prompts``, exactly as ``StableDiffusionPipeline`` computes them."""
    return pipeline.text_encoder(tokenize(pipeline, prompts))[0]


def masked_mse(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    """MSE of ``pred`` and ``target`` ``(b, c, h, w)`` in float32, weighted per pixel by ``masks`` ``(b, 1, h, w)``."""
    err = (pred.float() - target.float()).pow(2)   # (b, c, h, w)
    if masks is None:
        return err.mean()
    w = masks.to(err).expand_as(err)               # (b, c, h, w)
    return (err * w).sum() / w.sum().clamp_min(1e-8)
