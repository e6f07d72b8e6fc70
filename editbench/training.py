"""The one training loop every personalization method shares.

The loop owns everything generic: VAE-encoding the concept images (latent mean/std cached once, a fresh latent
sample drawn per step), sampling noise and timesteps from the pipeline's own noise schedule (``epsilon``,
``v_prediction`` or ``sample`` targets), the mask-weighted MSE, AdamW/Adam over per-group learning rates,
gradient accumulation, a seeded generator, the progress bar, checkpoints with exact resume, the non-finite-loss
check, wall time and peak memory. A method supplies a :class:`TrainingSession`: its parameter groups, how prompts
become encoder hidden states, and optional hooks (augmentation, extra loss, after-step fix-ups, extra state to
checkpoint, the artifact builder).

With more than one CUDA device and a multi-process launch (``accelerate launch`` / ``torchrun``), or
``EDITBENCH_ACCELERATE=1``, the same loop runs data-parallel through ``accelerate`` (see :func:`use_accelerate`);
otherwise (CPU, one device) it is the plain single-process loop.

Shape legend: b batch, c latent channels, h/w latent height/width, H/W pixel height/width, n tokens, d width.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from typing_extensions import Self

from editbench.concepts import ConceptData, model_resolution
from editbench.errors import EditbenchError, TrainingError
from editbench.fingerprint import update_with_tensor
from editbench.storage import read_safetensors, tensor_checksum, write_safetensors

if TYPE_CHECKING:
    from editbench.methods.base import Artifact

__all__ = ["ACCELERATE_ENV", "CHECKPOINT_FILE", "Param", "ParamGroup", "StepContext", "TrainConfig", "TrainResult",
           "TrainingSession", "encode_prompts", "masked_mse", "tokenize", "train", "use_accelerate"]

ACCELERATE_ENV = "EDITBENCH_ACCELERATE"
"""Environment flag: ``auto`` (default), ``1``/``on`` or ``0``/``off``; see :func:`use_accelerate`."""
CHECKPOINT_FILE = "checkpoint.safetensors"
_CKPT_FORMAT = "editbench-checkpoint/1"
_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


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
        if self.optimizer not in _OPTIMIZERS:
            raise EditbenchError(f"optimizer must be one of {sorted(_OPTIMIZERS)}, got {self.optimizer!r}")
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


def tokenize(pipeline: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids ``(b, n)`` of ``prompts`` as the pipeline encodes them (padded to the tokenizer's max length)."""
    tok = pipeline.tokenizer
    return tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids.to(_device(pipeline))


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


# ----------------------------------------------------------------------------------------------------------------
# pieces of the loop
# ----------------------------------------------------------------------------------------------------------------

def _device(pipeline: Any) -> torch.device:
    return next(pipeline.unet.parameters()).device


def _modules(pipeline: Any) -> list[torch.nn.Module]:
    return [m for m in pipeline.components.values() if isinstance(m, torch.nn.Module)]


class _Freeze:
    """Freeze every pipeline weight and switch modules to eval; unfreeze the trained ones; restore on exit."""

    def __init__(self, pipeline: Any, trained: list[torch.nn.Parameter]):
        self.modules, self.trained = _modules(pipeline), trained

    def __enter__(self) -> Self:
        self.flags = [(p, p.requires_grad) for m in self.modules for p in m.parameters()]
        self.modes = [(sub, sub.training) for m in self.modules for sub in m.modules()]
        for m in self.modules:
            m.eval().requires_grad_(False)
        for p in self.trained:
            p.requires_grad_(True)
        return self

    def __exit__(self, *exc: object) -> None:
        for p, flag in self.flags:
            p.requires_grad_(flag)
        for m, mode in self.modes:
            m.training = mode


def _encode_images(pipeline: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior ``(mean, std)``, each ``(b, c, h, w)`` float32, for images ``(b, 3, H, W)`` in [-1, 1]."""
    vae = pipeline.vae
    ref = next(vae.parameters())
    means, stds = [], []
    with torch.no_grad():
        for chunk in images.split(8):
            dist = vae.encode(chunk.to(ref)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def _scale_latents(pipeline: Any, z: torch.Tensor) -> torch.Tensor:
    cfg = pipeline.vae.config
    shift = getattr(cfg, "shift_factor", None) or 0.0
    return (z - shift) * cfg.scaling_factor


def _noise_schedule(pipeline: Any):
    """A DDPM scheduler with the pipeline scheduler's training schedule (betas, prediction type, SNR rescale)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipeline.scheduler.config)


def _concept_digest(concept: ConceptData, images: torch.Tensor, masks: torch.Tensor | None) -> str:
    h = hashlib.sha256(json.dumps([concept.placeholder, concept.superclass, list(concept.templates)]).encode())
    update_with_tensor(h, "images", images)
    if masks is not None:
        update_with_tensor(h, "masks", masks)
    return h.hexdigest()[:16]


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _Memory:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.device, self.base, self.peak = device, (0 if self.cuda else _rss()), 0

    def sample(self) -> None:
        if not self.cuda:
            self.peak = max(self.peak, _rss() - self.base)

    def result(self) -> tuple[int, str]:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated(self.device)), "cuda_max_allocated"
        self.sample()
        return int(self.peak), "cpu_rss_peak_delta"


# ----------------------------------------------------------------------------------------------------------------
# several devices: data parallelism through accelerate
# ----------------------------------------------------------------------------------------------------------------

_ON, _OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        return 1


def use_accelerate() -> bool:
    """Whether :func:`train` runs data-parallel through ``accelerate`` instead of the plain loop.

    True only with more than one CUDA device visible (``torch.cuda.device_count() > 1``) AND either a
    multi-process launch (``accelerate launch`` / ``torchrun`` set ``WORLD_SIZE`` > 1) or
    ``EDITBENCH_ACCELERATE=1``; ``EDITBENCH_ACCELERATE=0`` always keeps the plain loop. On CPU or one device it is
    False whatever the flag: the plain loop, bitwise as before (resume included)."""
    flag = os.environ.get(ACCELERATE_ENV, "auto").strip().lower() or "auto"
    if flag not in _ON + _OFF + ("auto",):
        raise EditbenchError(f"{ACCELERATE_ENV} must be auto, 1/on or 0/off, got {flag!r}")
    if flag in _OFF or torch.cuda.device_count() < 2:
        return False
    return flag in _ON or _world_size() > 1


def _make_accelerator() -> Any:
    from accelerate import Accelerator

    # the trained parameters are float32 by contract and the forward runs in the pipeline's dtype: no autocast or
    # loss scaling (an fp16 `accelerate config` would otherwise scale the loss behind the clipping's back)
    return Accelerator(mixed_precision="no")


def _index(d: torch.device) -> tuple[str, int | None]:
    """``(type, index)`` with a bare ``cuda`` read as the current CUDA device."""
    return d.type, (torch.cuda.current_device() if d.type == "cuda" and d.index is None else d.index)


class _DataParallel:
    """The loop's data-parallel mode. Every process of the launch runs :func:`train` on its own device with its
    own generator (process 0 keeps ``seed``; the others derive theirs), so each draws its own micro-batches, noise
    and timesteps: the effective batch is ``batch_size x grad_accum x processes``. The trained parameters are
    spread over several modules (token rows, swapped-in layers, LoRA), so instead of wrapping one module in DDP
    their gradients are averaged over the processes once per optimizer step, after the ``grad_accum``
    micro-batches (what DDP does with ``no_sync`` during accumulation). The optimizer is ``accelerator.prepare``d,
    the backward pass is ``accelerator.backward``, the step loss is averaged over processes (a non-finite loss on
    any process stops all of them at the same step), only the main process writes checkpoints. A resumed run
    continues from the checkpoint (process 0's generator state; the others re-derive theirs): not bitwise equal to
    an uninterrupted multi-process run."""

    def __init__(self, accelerator: Any, device: torch.device):
        kind = getattr(accelerator, "distributed_type", "NO")
        kind = str(getattr(kind, "value", kind))
        if kind not in ("NO", "MULTI_GPU"):
            raise TrainingError(f"training runs plain data parallelism (accelerate MULTI_GPU), not {kind}; launch "
                                "with `accelerate launch --multi_gpu` (no DeepSpeed/FSDP config)")
        if _index(torch.device(accelerator.device)) != _index(device):
            raise TrainingError(f"under a multi-process launch each process trains on its own device: this one is "
                                f"{accelerator.device} but the pipeline is on {device}; move the pipeline to "
                                "f'cuda:{LOCAL_RANK}' (accelerator.device) before fit")
        self.acc = accelerator
        self.n, self.rank = int(accelerator.num_processes), int(accelerator.process_index)
        self.main = bool(accelerator.is_main_process)

    def seed(self, seed: int, step: int = 0) -> int:
        """Generator seed of this process (process 0 at step 0: ``seed`` itself)."""
        if self.rank == 0 and step == 0:
            return int(seed)
        digest = hashlib.sha256(f"editbench-rank|{seed}|{self.rank}|{step}".encode()).digest()
        return int.from_bytes(digest[:7], "big")

    def sync_params(self, params: list[torch.nn.Parameter]) -> None:
        """Start every process from process 0's parameters."""
        dist = torch.distributed
        if self.n > 1 and dist.is_available() and dist.is_initialized():  # the Accelerator set the group up
            with torch.no_grad():
                for p in params:
                    dist.broadcast(p.data, src=0)

    def mean(self, value: float, device: torch.device) -> float:
        return float(self.acc.reduce(torch.tensor([value], dtype=torch.float64, device=device), reduction="mean"))

    def reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average the accumulated gradients over the processes; a parameter no process has a gradient for keeps
        ``grad = None`` (the optimizer skips it, as in the plain loop)."""
        have = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
        have = self.acc.reduce(have, reduction="sum")
        # one all-reduce per (device, dtype) bucket instead of one per parameter (what DDP's buckets do)
        buckets: dict[tuple, list[torch.nn.Parameter]] = {}
        for p, h in zip(params, have.tolist()):
            if h:
                buckets.setdefault((p.device, p.dtype), []).append(p)
        for group in buckets.values():
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
            flat = self.acc.reduce(flat, reduction="mean")
            for p, g in zip(group, flat.split([p.numel() for p in group])):
                p.grad = g.view_as(p).clone()


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: one safetensors file, JSON state in its header; written atomically
# ----------------------------------------------------------------------------------------------------------------

def _save_checkpoint(path: Path, *, groups: list[ParamGroup], optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, session: TrainingSession, signature: str, step: int,
                     losses: list[float], wall: float) -> None:
    tensors: dict[str, torch.Tensor] = {"rng": generator.get_state()}
    for g in groups:
        for i, p in enumerate(g.params):
            tensors[f"param/{g.name}/{i}"] = p.detach()
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    raise TrainingError(f"optimizer state {key!r} is not a tensor; cannot checkpoint it")
                tensors[f"optim/{g.name}/{i}/{key}"] = value
    for key, value in session.state_tensors().items():
        tensors[f"session/{key}"] = value
    info = {"format": _CKPT_FORMAT, "signature": signature, "step": step, "losses": losses, "wall_time_s": wall,
            "checksum": _tensor_checksum(tensors)}
    write_safetensors(path, tensors, {"editbench_checkpoint": json.dumps(info)})


def _tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    return tensor_checksum(tensors, b"editbench-checkpoint-checksum|")


def _kept(ckpt: Path | None) -> str:
    return f"the last checkpoint ({ckpt}) is kept" if ckpt is not None and ckpt.exists() else "no checkpoint was written"


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _load_checkpoint(path: Path, *, groups: list[ParamGroup], optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, session: TrainingSession, signature: str,
                     steps: int) -> tuple[int, list[float], float]:
    from editbench.safety import parse_metadata

    tensors, header = read_safetensors(path, "checkpoint")
    try:
        info = parse_metadata(header["editbench_checkpoint"], path)  # bounded, finite JSON object (or ArtifactError)
        ok = info["format"] == _CKPT_FORMAT
    except (KeyError, ValueError, TypeError):
        ok = False
    if not ok:
        raise TrainingError(f"{path} is not an editbench training checkpoint; delete it or pick another "
                            "checkpoint_dir")
    if info.get("signature") != signature:
        raise TrainingError(f"the checkpoint in {path.parent} belongs to another run (different method, config, "
                            "seed, base model or concept); delete it or use another checkpoint_dir")
    step, losses, wall = info.get("step"), info.get("losses"), info.get("wall_time_s")
    if (isinstance(step, bool) or not isinstance(step, int) or step < 0 or not isinstance(losses, list)
            or len(losses) != step or not all(_finite_number(x) for x in losses) or not _finite_number(wall)
            or ("checksum" in info and info["checksum"] != _tensor_checksum(tensors))):
        raise TrainingError(f"the checkpoint {path} is damaged (its step, losses or tensors do not check out); delete "
                            "it to start over")
    if step > steps:
        raise TrainingError(f"the checkpoint in {path.parent} is at step {step}, beyond steps={steps}; raise steps "
                            "or delete the checkpoint")
    with torch.no_grad():
        for g in groups:
            for i, p in enumerate(g.params):
                saved = tensors.pop(f"param/{g.name}/{i}", None)
                if saved is None or saved.shape != p.shape:
                    raise TrainingError(f"checkpoint {path} does not match parameter {g.name}[{i}] {tuple(p.shape)}")
                p.copy_(saved)
                state = {k.rsplit("/", 1)[1]: tensors.pop(k).to(p.device)
                         for k in [k for k in tensors if k.startswith(f"optim/{g.name}/{i}/")]}
                bad = [k for k, v in state.items() if not v.is_floating_point() or v.shape not in (p.shape, ())
                       or not bool(torch.isfinite(v).all())]
                if bad or not bool(torch.isfinite(saved).all()):
                    raise TrainingError(f"checkpoint {path} holds unusable optimizer state {bad} (or non-finite "
                                        f"values) for parameter {g.name}[{i}]; delete it to start over")
                if state:
                    optimizer.state[p] = state
    rng = tensors.pop("rng", None)
    if rng is None or rng.dtype != torch.uint8 or rng.shape != generator.get_state().shape:
        raise TrainingError(f"checkpoint {path} has no usable random-generator state; delete it to start over")
    generator.set_state(rng)
    session.load_state_tensors({k[len("session/"):]: v for k, v in tensors.items() if k.startswith("session/")})
    return step, [float(x) for x in info["losses"]], float(info["wall_time_s"])


# ----------------------------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------------------------

def train(pipeline: Any, concept: ConceptData | Sequence[ConceptData], session: TrainingSession,
          config: TrainConfig, *,
          seed: int = 0, progress: bool = True, checkpoint_dir: str | Path | None = None,
          signature: dict | None = None, desc: str = "training") -> TrainResult:
    """Run ``config.steps`` optimizer steps of ``session`` on ``concept``; resume from ``checkpoint_dir`` if it holds one.

    Each step accumulates ``config.grad_accum`` micro-batches of ``config.batch_size`` (image, template) pairs.
    Randomness comes from one CPU ``torch.Generator`` seeded with ``seed`` whose state is checkpointed, so a
    resumed run is bitwise identical to an uninterrupted one on the same hardware. Checkpoints are written
    every ``config.checkpoint_every`` steps and at the end (``checkpoint_dir/checkpoint.safetensors``).
    ``signature`` (JSON-able) identifies the run; a checkpoint of another run is refused.

    Several concepts (joint training) pool their images; each image is prompted with its own concept's
    templates and ``session.phrase_for(concept)``, and ``StepContext.owners`` says which concept each item is.

    With several devices and a multi-process launch (:func:`use_accelerate`) every process runs this loop on
    its own device and the gradients are averaged over them (see :class:`_DataParallel`); on CPU or one device
    the plain loop runs, unchanged.

    Raises TrainingError on a non-finite loss (naming the step; the last checkpoint is kept).
    The pipeline's ``requires_grad`` flags and train/eval modes are restored on return.
    """
    config.validate()
    device = _device(pipeline)
    size = model_resolution(pipeline)
    concepts = [concept] if isinstance(concept, ConceptData) else list(concept)
    loaded = [(c.load_images(size), c.load_masks(size)) for c in concepts]
    images = torch.cat([im for im, _ in loaded])                           # (N, 3, H, W)
    masks = None if all(m is None for _, m in loaded) else torch.cat(     # (N, 1, H, W) | None
        [torch.ones_like(im[:, :1]) if m is None else m for im, m in loaded])
    owner = torch.cat([torch.full((len(c),), j) for j, c in enumerate(concepts)])  # (N,) concept of each image
    if not config.mask_loss:
        masks = None
    sched = _noise_schedule(pipeline)
    ptype = sched.config.prediction_type
    if ptype not in ("epsilon", "v_prediction", "sample"):
        raise TrainingError(f"unsupported prediction_type {ptype!r}")
    groups = session.param_groups()
    params = [p for g in groups for p in g.params]
    if not params:
        raise TrainingError("the method returned no trainable parameters")
    if len({id(p) for p in params}) != len(params):
        raise TrainingError("a parameter appears in two parameter groups")
    for p in params:
        if not p.is_floating_point() or p.dtype != torch.float32:
            raise TrainingError(f"trainable parameters must be float32 (got {p.dtype}); keep a float32 copy and "
                                "cast in the forward pass")
    opt = _OPTIMIZERS[config.optimizer](
        [{"params": g.params, "lr": g.lr, "weight_decay": g.weight_decay} for g in groups],
        betas=tuple(config.adam_betas), eps=config.adam_eps)
    par = _DataParallel(_make_accelerator(), device) if use_accelerate() else None
    stepper = opt if par is None else par.acc.prepare(opt)  # AcceleratedOptimizer around (the state of) opt
    digest = [_concept_digest(c, im, m) for c, (im, m) in zip(concepts, loaded)]
    sig_parts = dict(signature or {}, concept=digest[0] if len(digest) == 1 else digest, seed=seed,
                     groups=[(g.name, g.lr, g.weight_decay, [tuple(p.shape) for p in g.params]) for g in groups])
    sig = hashlib.sha256(json.dumps(sig_parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    gen = torch.Generator().manual_seed(int(seed) if par is None else par.seed(seed))
    ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    start, losses, wall_before = 0, [], 0.0
    if ckpt is not None and ckpt.exists():
        start, losses, wall_before = _load_checkpoint(ckpt, groups=groups, optimizer=opt, generator=gen,
                                                      session=session, signature=sig, steps=config.steps)
        if par is not None and par.rank:  # the checkpoint holds process 0's generator
            gen.manual_seed(par.seed(seed, start))
    if par is not None:
        par.sync_params(params)
    from tqdm.auto import tqdm

    t0, mem = time.perf_counter(), _Memory(device)
    n_img, n_tpl = len(images), math.lcm(*(len(c.templates) for c in concepts))
    phrases = [session.phrase_for(c) for c in concepts]
    unet = pipeline.unet
    T = sched.config.num_train_timesteps
    with _Freeze(pipeline, params):
        cache = None if session.augments else _encode_images(pipeline, images)  # (N, c, h, w) x 2

        def diffusion_loss(latents: torch.Tensor, cond: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
            b = latents.shape[0]
            noise = torch.randn(latents.shape, generator=gen).to(latents)          # (b, c, h, w)
            t = torch.randint(0, T, (b,), generator=gen).to(device)                 # (b,)
            noisy = sched.add_noise(latents, noise, t)
            target = {"epsilon": noise, "sample": latents}.get(ptype)
            if target is None:
                target = sched.get_velocity(latents, noise, t)
            pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=cond.to(unet.dtype),
                        **session.unet_kwargs(b)).sample
            if m is not None:
                m = F.interpolate(m.to(device, torch.float32), size=pred.shape[-2:], mode="area")  # (b, 1, h, w)
            return masked_mse(pred, target, m)

        bar = tqdm(total=config.steps, initial=start, disable=not progress or (par is not None and not par.main),
                   desc=desc, unit="step")
        try:
            for step in range(start + 1, config.steps + 1):
                step_loss = 0.0
                for micro in range(config.grad_accum):
                    idx = torch.randint(0, n_img, (config.batch_size,), generator=gen)       # (b,)
                    tpl = torch.randint(0, n_tpl, (config.batch_size,), generator=gen)       # (b,)
                    own = owner[idx]                                                          # (b,)
                    prompts = [concepts[o].templates[j % len(concepts[o].templates)].format(phrases[o])
                               for o, j in zip(own.tolist(), tpl.tolist())]
                    m = None if masks is None else masks[idx]                                 # (b, 1, H, W)
                    if cache is None:  # augmenting session: encode this batch's augmented images
                        img = images[idx]
                        img, m, prompts = session.augment(img, torch.ones_like(img[:, :1]) if m is None else m,
                                                          prompts, gen)
                        m = m if config.mask_loss else None
                        mean, std = _encode_images(pipeline, img)
                    else:
                        mean, std = cache[0][idx], cache[1][idx]                              # (b, c, h, w)
                    z = mean + std * torch.randn(mean.shape, generator=gen).to(mean)
                    latents = _scale_latents(pipeline, z)
                    cond = session.encode(prompts)                                            # (b, n, d)
                    loss = diffusion_loss(latents, cond, m)
                    extra = session.extra_loss(StepContext(step, micro, pipeline, gen, prompts, idx, latents,
                                                           diffusion_loss, owners=own))
                    if extra is not None:
                        loss = loss + extra
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        if par is not None:  # the other processes wait in the step's reduce: stop there, together
                            step_loss = math.nan
                            continue
                        raise TrainingError(f"loss is {value} at step {step} (micro-batch {micro}); "
                                            f"{_kept(ckpt)}. Lower the learning rates or check the data")
                    if par is None:
                        (loss / config.grad_accum).backward()
                    else:
                        par.acc.backward(loss / config.grad_accum)
                    step_loss += value / config.grad_accum
                    mem.sample()
                if par is not None:
                    step_loss = par.mean(step_loss, device)
                    if not math.isfinite(step_loss):
                        raise TrainingError(f"loss is {step_loss} at step {step} (on at least one of {par.n} "
                                            f"processes); {_kept(ckpt)}. Lower the learning rates or check the data")
                    par.reduce_grads(params)
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                stepper.step()
                stepper.zero_grad(set_to_none=True)
                session.after_step(step)
                losses.append(step_loss)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}")
                if ckpt is not None and (step == config.steps or
                                         (config.checkpoint_every and step % config.checkpoint_every == 0)):
                    if par is None or par.main:
                        _save_checkpoint(ckpt, groups=groups, optimizer=opt, generator=gen, session=session,
                                         signature=sig, step=step, losses=losses,
                                         wall=wall_before + time.perf_counter() - t0)
                    if par is not None:
                        par.acc.wait_for_everyone()
        finally:
            bar.close()
            if par is not None:
                par.acc.free_memory()
    wall = time.perf_counter() - t0
    peak, kind = mem.result()
    return TrainResult(steps=config.steps, losses=losses, wall_time_s=wall, wall_time_total_s=wall_before + wall,
                       peak_memory_bytes=peak, memory_kind=kind, device=str(device), resumed_from=start,
                       extra={} if par is None else {"processes": par.n})
