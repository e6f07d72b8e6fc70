"""What a method plugs into the shared training loop: its config (:class:`TrainConfig`, search space
:class:`Param`), a :class:`TrainingSession` with :class:`ParamGroup` s, the per-step :class:`StepContext`, the
:class:`TrainResult`, and the prompt and loss helpers.

Shape legend: b batch, c latent channels, h/w latent height/width, n tokens, d width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from editbench.concepts import ConceptData
from editbench.errors import EditbenchError, TrainingError
from editbench.pipelines import TextConditioning, encode_text

if TYPE_CHECKING:
    from editbench.methods.base import Artifact

__all__ = ["LR_SCHEDULERS", "MASTER_WEIGHTS", "MIXED_PRECISION", "OPTIMIZERS", "Param", "ParamGroup", "StepContext",
           "TrainConfig", "TrainResult", "TrainingSession", "encode_prompts", "masked_mse", "pipeline_device",
           "tokenize"]

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "adamw8bit": None}
"""The optimizers ``TrainConfig.optimizer`` names (``adamw8bit``: ``bitsandbytes.optim.AdamW8bit``, imported when
training starts; bitsandbytes is an optional dependency)."""

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts")
"""``TrainConfig.lr_scheduler`` names: schedules of ``diffusers.optimization.get_scheduler``. ``cosine`` decays to
0 in one half-wave; ``cosine_with_restarts`` does ``lr_num_cycles`` such half-waves with hard restarts."""

MASTER_WEIGHTS = {"float32": torch.float32, "bf16": torch.bfloat16}
"""``TrainConfig.master_weights`` -> the dtype of the trained parameters, their gradients and optimizer moments."""

MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``TrainConfig.mixed_precision`` -> the autocast dtype of the forward passes (None: no autocast)."""

VALIDATION_TEXT = 1000
"""Longest validation prompt accepted (characters)."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
    """Training settings every method has; a method's ``Config`` subclasses this and adds its own fields.

    Memory and schedule features (all off by default; the defaults train exactly as before they existed):

    * ``gradient_checkpointing``: recompute activations in the backward pass instead of keeping them: the UNet
      (diffusers' ``enable_gradient_checkpointing``) and every text encoder the gradients flow through
      (:meth:`TrainingSession.backprop_modules`); restored afterwards.
    * ``mixed_precision``: ``"no"``, ``"bf16"`` or ``"fp16"``: the forward passes (prompt encoding, UNet, extra
      losses) run under ``torch.autocast`` on the pipeline's device; trained parameters stay float32 (unless
      ``master_weights="bf16"``); ``"fp16"``
      scales the loss (``torch.amp.GradScaler``) and skips steps whose gradients overflow.
    * ``resolution``: pixel size the concept images are resized to before VAE encoding (None: the model's own,
      :func:`editbench.concepts.model_resolution`).
    * ``lr_scheduler`` / ``lr_warmup_steps`` / ``lr_num_cycles``: the learning-rate schedule of every parameter
      group (:data:`LR_SCHEDULERS`, ``diffusers.optimization.get_scheduler``): optimizer step k uses
      ``lr x schedule(k - 1)``, as diffusers' training scripts do (so with warm-up the first step has lr 0).
    * ``validation_every`` / ``validation_prompts`` / ``validation_inference_steps`` / ``validation_guidance_scale``:
      every N steps, one image per prompt (``{}``: the concept's phrase) sampled with the pipeline as it is being
      trained, written to ``checkpoint_dir/validation/step_XXXXX/``.
    * ``log_with``: None or ``"tensorboard"`` (loss, learning rates, validation images in ``checkpoint_dir/logs``).
    * ``optimizer``: ``"adamw"``, ``"adam"`` or ``"adamw8bit"`` (bitsandbytes).
    * ``master_weights``: ``"float32"`` (trained parameters, their gradients and the optimizer moments in float32)
      or ``"bf16"`` (all three in bfloat16: half the memory; each update stochastically rounded,
      :class:`editbench.training.bf16.StochasticAdamW`; needs ``mixed_precision="bf16"`` and ``"adamw"`` /
      ``"adam"``). The loop casts the trained parameters to :attr:`trainable_dtype`.
    * ``fused_backward``: the optimizer step runs inside the backward pass, one parameter as soon as its gradient
      is complete, and frees that gradient (no model-sized gradient memory; kohya-ss sd-scripts'
      ``--fused_backward_pass``). The update is :class:`editbench.training.bf16.StochasticAdamW`'s (torch's AdamW /
      Adam in float32, exact for float32 parameters); needs ``grad_accum=1``, no ``max_grad_norm``, not fp16, one
      process.
    """

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
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    resolution: int | None = None
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    validation_every: int = 0
    validation_prompts: tuple[str, ...] = ()
    validation_inference_steps: int = 25
    validation_guidance_scale: float = 7.5
    log_with: str | None = None
    master_weights: str = "float32"
    fused_backward: bool = False

    # fields that may change between a checkpoint and its resume (everything else must match)
    RESUMABLE_FIELDS = ("steps", "checkpoint_every", "gradient_checkpointing", "validation_every",
                        "validation_prompts", "validation_inference_steps", "validation_guidance_scale", "log_with")
    # fields added after checkpoints existed: left out of a run's signature while at their defaults, so that a
    # checkpoint written before them still resumes (a method's own later fields may be listed by its Config)
    LATER_FIELDS = ("mixed_precision", "resolution", "lr_scheduler", "lr_warmup_steps", "lr_num_cycles",
                    "class_resolution", "class_data_dir", "master_weights", "fused_backward")

    def run_signature(self) -> dict:
        """The config entries (JSON types) a training checkpoint must match to be resumed: every field but
        :attr:`RESUMABLE_FIELDS`, :attr:`LATER_FIELDS` at their defaults left out, and ``steps`` kept where the
        learning-rate schedule depends on it."""
        import dataclasses
        import json

        cfg = json.loads(json.dumps(dataclasses.asdict(self)))  # JSON types (tuples -> lists), as after load
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        out = {k: v for k, v in cfg.items() if k not in self.RESUMABLE_FIELDS
               and not (k in self.LATER_FIELDS and k in defaults and getattr(self, k) == defaults[k])}
        if self.lr_scheduler in ("linear", "cosine", "cosine_with_restarts"):
            out["steps"] = self.steps  # the schedule is a function of the total: a resume cannot change it
        return out

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
        self.validate_features()

    def validate_features(self) -> None:
        """The checks of the memory / schedule / validation / logging fields (values only: whether the device,
        the pipeline and the installed packages can run them is checked when training starts)."""
        if not isinstance(self.gradient_checkpointing, bool):
            raise EditbenchError(f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise EditbenchError(f"mixed_precision must be one of {list(MIXED_PRECISION)}, got "
                                 f"{self.mixed_precision!r}")
        if self.resolution is not None and (not _is_int(self.resolution) or self.resolution < 1):
            raise EditbenchError(f"resolution must be a positive int (pixels) or None (the model's own), got "
                                 f"{self.resolution!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise EditbenchError(f"lr_scheduler must be one of {list(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        for name in ("lr_warmup_steps", "validation_every"):
            v = getattr(self, name)
            if not _is_int(v) or v < 0:
                raise EditbenchError(f"{name} must be an int >= 0, got {v!r}")
        if self.lr_warmup_steps and self.lr_scheduler == "constant":
            raise EditbenchError(f"lr_warmup_steps={self.lr_warmup_steps} needs a schedule with a warm-up; "
                                 "lr_scheduler='constant' has none: use 'constant_with_warmup'")
        if not _is_int(self.lr_num_cycles) or self.lr_num_cycles < 1:
            raise EditbenchError(f"lr_num_cycles must be a positive int, got {self.lr_num_cycles!r}")
        prompts = self.validation_prompts
        if isinstance(prompts, str) or not isinstance(prompts, (tuple, list)) or not all(
                isinstance(p, str) and p.strip() and len(p) <= VALIDATION_TEXT for p in prompts):
            raise EditbenchError("validation_prompts must be a list of non-empty prompts (at most "
                                 f"{VALIDATION_TEXT} characters; '{{}}' stands for the concept), got {prompts!r}")
        for p in prompts:
            try:
                p.format(*["x"] * 16)
            except (IndexError, KeyError, ValueError):
                raise EditbenchError(f"validation prompt {p!r}: only '{{}}' (or '{{0}}', '{{1}}', ...: the "
                                     "concepts' phrases) may stand in braces") from None
        if not _is_int(self.validation_inference_steps) or self.validation_inference_steps < 1:
            raise EditbenchError(f"validation_inference_steps must be a positive int, got "
                                 f"{self.validation_inference_steps!r}")
        g = self.validation_guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise EditbenchError(f"validation_guidance_scale must be a finite number >= 0, got {g!r}")
        if self.log_with not in (None, "tensorboard"):
            raise EditbenchError(f"log_with must be None or 'tensorboard', got {self.log_with!r}")
        if self.master_weights not in MASTER_WEIGHTS:
            raise EditbenchError(f"master_weights must be one of {list(MASTER_WEIGHTS)}, got {self.master_weights!r}")
        if self.master_weights == "bf16" and self.mixed_precision != "bf16":
            raise EditbenchError("master_weights='bf16' trains bfloat16 parameters inside bfloat16 autocast: set "
                                 f"mixed_precision='bf16' (got {self.mixed_precision!r})")
        if not isinstance(self.fused_backward, bool):
            raise EditbenchError(f"fused_backward must be true or false, got {self.fused_backward!r}")
        if self.fused_backward:
            why = {"grad_accum > 1 (the gradient must be complete after one backward pass)": self.grad_accum != 1,
                   "max_grad_norm (clipping needs every gradient at once)": self.max_grad_norm is not None,
                   "mixed_precision='fp16' (the loss scaler unscales every gradient at once)":
                       self.mixed_precision == "fp16"}
            bad = [k for k, v in why.items() if v]
            if bad:
                raise EditbenchError(f"fused_backward steps each parameter inside the backward pass; it cannot run "
                                     f"with {', '.join(bad)}")
        if self.stochastic_adamw and self.optimizer not in ("adamw", "adam"):
            raise EditbenchError(f"master_weights='bf16' and fused_backward update with editbench's Adam / AdamW "
                                 f"(stochastically rounded for bfloat16); optimizer={self.optimizer!r} has no such "
                                 "update: use 'adamw' or 'adam'")

    @property
    def stochastic_adamw(self) -> bool:
        """Whether the loop's optimizer is :class:`editbench.training.bf16.StochasticAdamW` (bfloat16 master
        weights, or the step fused into the backward pass) rather than :data:`OPTIMIZERS`'."""
        return self.master_weights == "bf16" or self.fused_backward

    @property
    def trainable_dtype(self) -> torch.dtype:
        """The dtype the trained parameters are kept in (:attr:`master_weights`)."""
        return MASTER_WEIGHTS[self.master_weights]


@dataclass
class ParamGroup:
    """Trainable parameters sharing one learning rate (and weight decay). Make them float32 (the loop casts them
    to bfloat16 for ``master_weights="bf16"``)."""

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

    def encode(self, prompts: list[str]) -> torch.Tensor | TextConditioning:
        """Encoder hidden states ``(b, n, d)`` for ``prompts`` (with gradients where the method trains); for SDXL a
        :class:`~editbench.pipelines.TextConditioning` with the pooled embeddings too (:func:`encode_prompts`)."""
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

    def artifact_metadata(self) -> dict:
        """Metadata entries the session adds to the trained artifact beside :meth:`artifact`'s own (which win on a
        clash), e.g. where prior preservation's class images came from (``prior``). Default: none."""
        return {}

    def backprop_modules(self, pipeline: Any) -> dict[str, torch.nn.Module]:
        """The pipeline components the gradients flow through (``config.gradient_checkpointing`` checkpoints them).

        Default: the UNet, plus every text encoder (``text_encoder``, ``text_encoder_2``) that holds a trained
        parameter or whose input embedding carries trained rows (:class:`editbench.methods.tokens.
        ExtendedEmbedding`: textual inversion, Perfusion, Custom Diffusion's modifier tokens). Override if a
        method backpropagates through a text encoder in another way.
        """
        from editbench.methods.tokens import ExtendedEmbedding

        trained = {id(p) for g in self.param_groups() for p in g.params}
        out = {"unet": pipeline.unet}
        for name in ("text_encoder", "text_encoder_2"):
            enc = getattr(pipeline, name, None)
            if not isinstance(enc, torch.nn.Module):
                continue
            hit = any(id(p) in trained for p in enc.parameters())
            emb = enc.get_input_embeddings() if hasattr(enc, "get_input_embeddings") else None
            while not hit and isinstance(emb, ExtendedEmbedding):
                hit, emb = id(emb.rows) in trained, emb.base
            if hit:
                out[name] = enc
        return out

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


def encode_prompts(pipeline: Any, prompts: Sequence[str]) -> torch.Tensor | TextConditioning:
    """What the pipeline conditions its UNet on for ``prompts``, exactly as the pipeline computes it: encoder hidden
    states ``(b, n, d)`` (``StableDiffusionPipeline``), or for a UNet with SDXL's added conditioning a
    :class:`~editbench.pipelines.TextConditioning` (both encoders' concatenated penultimate hidden states and the
    pooled embeddings; :func:`editbench.pipelines.encode_text`), which the training loop also accepts."""
    enc = encode_text(pipeline, prompts)
    return enc if enc.pooled is not None else enc.hidden


def masked_mse(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    """MSE of ``pred`` and ``target`` ``(b, c, h, w)`` in float32, weighted per pixel by ``masks`` ``(b, 1, h, w)``."""
    err = (pred.float() - target.float()).pow(2)   # (b, c, h, w)
    if masks is None:
        return err.mean()
    w = masks.to(err).expand_as(err)               # (b, c, h, w)
    return (err * w).sum() / w.sum().clamp_min(1e-8)
