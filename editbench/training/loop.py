"""The training loop: VAE-encoding the concept images (latent mean/std cached once, a fresh latent sample drawn
per step), noise and timesteps from the pipeline's own noise schedule (``epsilon``, ``v_prediction`` or ``sample``
targets), the mask-weighted MSE, AdamW/Adam over per-group learning rates, gradient accumulation, a seeded
generator, the progress bar, checkpoints with exact resume, the non-finite-loss check, wall time and peak memory;
and the optional features of :class:`~editbench.training.session.TrainConfig`: gradient checkpointing, mixed
precision, a training resolution, a learning-rate schedule, validation images, TensorBoard logs, 8-bit Adam.

Shape legend: b batch, c latent channels, h/w latent height/width, H/W pixel height/width, n tokens, d width.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from typing_extensions import Self

from editbench.concepts import ConceptData, model_resolution
from editbench.errors import EditbenchError, TrainingError
from editbench.fingerprint import update_with_tensor
from editbench.pipelines import TextConditioning, added_cond_kwargs
from editbench.training.checkpoint import CHECKPOINT_FILE, kept, load_checkpoint, save_checkpoint
from editbench.training.parallel import DataParallel, make_accelerator, use_accelerate
from editbench.training.session import (
    MIXED_PRECISION,
    OPTIMIZERS,
    ParamGroup,
    StepContext,
    TrainConfig,
    TrainingSession,
    TrainResult,
    masked_mse,
    pipeline_device,
)

__all__ = ["check_training", "encode_images", "scale_latents", "train", "training_resolution"]

VALIDATION_DIR = "validation"
LOG_DIR = "logs"

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


def encode_images(pipeline: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def scale_latents(pipeline: Any, z: torch.Tensor) -> torch.Tensor:
    cfg = pipeline.vae.config
    shift = getattr(cfg, "shift_factor", None) or 0.0
    return (z - shift) * cfg.scaling_factor


def training_resolution(pipeline: Any, config: TrainConfig) -> int:
    """Pixel size the concept images are encoded at: ``config.resolution``, else the model's own."""
    return config.resolution or model_resolution(pipeline)


def _autocast_dtype(device: torch.device, name: str) -> torch.dtype | None:
    """The autocast dtype of ``mixed_precision=name`` after checking that ``device`` runs it (EditbenchError if not:
    no autocast for the device type, the dtype silently not applied, or no fp16 loss scaler for it)."""
    dtype = MIXED_PRECISION[name]
    if dtype is None:
        return None
    try:
        available = getattr(torch.amp, "is_autocast_available", None)
        if available is not None and not available(device.type):
            raise RuntimeError(f"torch has no autocast for device type {device.type!r}")
        x = torch.ones(2, 2, device=device)
        with warnings.catch_warnings():  # an unsupported dtype only warns and disables autocast: checked below
            warnings.simplefilter("ignore")
            with torch.autocast(device.type, dtype=dtype):
                y = x @ x
        if y.dtype != dtype:
            raise RuntimeError(f"a matrix product under autocast ran in {y.dtype}, not {dtype}")
        if name == "fp16":
            torch.amp.GradScaler(device.type)
    except (RuntimeError, ValueError, TypeError, AttributeError, AssertionError) as err:
        raise EditbenchError(f"mixed_precision={name!r} cannot run on {device} with this torch "
                             f"({torch.__version__}): {err}; use mixed_precision='bf16' or 'no', or train on "
                             "another device") from None
    return dtype


def check_training(pipeline: Any, config: TrainConfig, checkpoint_dir: str | Path | None) -> None:
    """EditbenchError, before any work, for a training feature this pipeline, device or installation cannot run
    (or that needs a ``checkpoint_dir``). Called by :func:`train` and by ``Editor.fit`` before the method
    prepares (class images can take long)."""
    config.validate()
    if checkpoint_dir is None and (config.validation_every or config.log_with):
        what = "validation images" if config.validation_every else f"{config.log_with} logs"
        raise EditbenchError(f"{what} are written beside the checkpoint: give a checkpoint_dir "
                             "(editbench train --checkpoint-dir DIR)")
    if config.log_with == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise EditbenchError("log_with='tensorboard' needs the tensorboard package: pip install tensorboard") \
                from None
    if config.optimizer == "adamw8bit":
        _adamw8bit()
    _autocast_dtype(pipeline_device(pipeline), config.mixed_precision)
    factor = int(getattr(pipeline, "vae_scale_factor", 1) or 1)
    for name in ("resolution", "class_resolution"):
        size = getattr(config, name, None)
        if size is not None and size % factor:
            raise EditbenchError(f"{name}={size} is not a multiple of this VAE's scale factor {factor}; use e.g. "
                                 f"{max(factor, size - size % factor)}")
    if config.gradient_checkpointing and not getattr(pipeline.unet, "_supports_gradient_checkpointing", False):
        raise EditbenchError(f"gradient_checkpointing: this UNet ({type(pipeline.unet).__name__}) does not support "
                             "it (diffusers' enable_gradient_checkpointing); set gradient_checkpointing=False")


def _adamw8bit() -> type:
    try:
        import bitsandbytes
    except (ImportError, RuntimeError, OSError) as err:
        raise EditbenchError(f"optimizer='adamw8bit' needs bitsandbytes, which is not importable here ({err}): "
                             "pip install bitsandbytes, or use optimizer='adamw'") from None
    return bitsandbytes.optim.AdamW8bit


def _optimizer(config: TrainConfig, groups: list[ParamGroup], seed: int) -> torch.optim.Optimizer:
    spec = [{"params": g.params, "lr": g.lr, "weight_decay": g.weight_decay} for g in groups]
    betas, eps = tuple(config.adam_betas), config.adam_eps
    if config.stochastic_adamw:
        from editbench.training.bf16 import StochasticAdamW

        return StochasticAdamW(spec, betas=betas, eps=eps, decoupled=config.optimizer == "adamw", seed=seed)
    cls = _adamw8bit() if config.optimizer == "adamw8bit" else OPTIMIZERS[config.optimizer]
    return cls(spec, betas=betas, eps=eps)


def _lr_scheduler(config: TrainConfig, opt: torch.optim.Optimizer) -> Any:
    """diffusers' schedule of ``config.lr_scheduler`` over ``config.steps`` optimizer steps (None: constant)."""
    if config.lr_scheduler == "constant":
        return None
    from diffusers.optimization import get_scheduler

    cycles = 0.5 if config.lr_scheduler == "cosine" else config.lr_num_cycles  # cosine: one half-wave down to 0
    return get_scheduler(config.lr_scheduler, opt, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=config.steps, num_cycles=cycles)


def _checkpointing_layers(name: str, module: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers of a text encoder that are checkpointed one by one (transformers' GradientCheckpointingLayer
    modules, else the ``encoder.layers`` list)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers
        GradientCheckpointingLayer = ()  # noqa: N806
    layers = [m for m in module.modules() if GradientCheckpointingLayer and isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        enc = getattr(getattr(module, "text_model", module), "encoder", None)
        layers = list(getattr(enc, "layers", None) or [])
    if not layers:
        raise EditbenchError(f"gradient_checkpointing: cannot find the layers of the {name} "
                             f"({type(module).__name__}) to checkpoint; set gradient_checkpointing=False")
    return layers


def _checkpointed(forward: Callable) -> Callable:
    def run(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


class _Checkpointing:
    """Gradient checkpointing of the modules gradients flow through, while training: diffusers models (the UNet)
    through ``enable_gradient_checkpointing``; text encoders layer by layer (``torch.utils.checkpoint``, also in
    eval mode, where transformers' own switch does nothing). Every attribute touched is put back on exit."""

    _ATTRS = ("gradient_checkpointing", "_gradient_checkpointing_func")

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules = modules

    def __enter__(self) -> Self:
        self.saved: list[tuple[torch.nn.Module, str, bool, Any]] = []
        for name, module in self.modules.items():
            if hasattr(module, "enable_gradient_checkpointing"):       # diffusers ModelMixin
                for m in module.modules():
                    if hasattr(m, "gradient_checkpointing"):
                        self._save(m, *self._ATTRS)
                module.enable_gradient_checkpointing()
            else:                                                     # a text encoder
                for layer in _checkpointing_layers(name, module):
                    self._save(layer, "forward")
                    layer.forward = _checkpointed(layer.forward)
        return self

    def _save(self, m: torch.nn.Module, *attrs: str) -> None:
        for a in attrs:
            self.saved.append((m, a, a in vars(m), vars(m).get(a)))

    def __exit__(self, *exc: object) -> None:
        for m, attr, present, value in reversed(self.saved):
            if present:
                setattr(m, attr, value)
            elif attr in vars(m):
                delattr(m, attr)


def _validation_images(pipeline: Any, folder: Path, step: int, prompts: list[str], config: TrainConfig, size: int,
                       seed: int, autocast: Callable[[], Any], writer: Any) -> None:
    """One image per prompt, sampled with the pipeline as it is being trained, into ``folder/step_XXXXX/``.

    The pipeline object, its scheduler and every random generator of the run are left untouched: sampling goes
    through a shallow copy of the pipeline with its own scheduler copy and CPU generators seeded ``seed + i``."""
    from editbench.storage import atomic_target, write_json

    pipe = copy.copy(pipeline)
    vars(pipe)["scheduler"] = copy.deepcopy(pipeline.scheduler)   # sampling sets its timesteps
    pipe.set_progress_bar_config(disable=True)
    out = folder / f"step_{step:05d}"
    for i, prompt in enumerate(prompts):
        with torch.no_grad(), autocast():
            image = pipe(prompt, num_inference_steps=config.validation_inference_steps,
                         guidance_scale=config.validation_guidance_scale, height=size, width=size,
                         generator=torch.Generator().manual_seed(seed + i)).images[0]
        with atomic_target(out / f"{i:02d}.png") as tmp:
            image.save(tmp, format="PNG")
        if writer is not None:
            import numpy as np

            writer.add_image(f"validation/{i:02d}", np.asarray(image), step, dataformats="HWC")
    write_json(out / "prompts.json", {f"{i:02d}.png": p for i, p in enumerate(prompts)})


def _unet_conditioning(pipeline: Any, pooled_unet: bool, cond: torch.Tensor | TextConditioning, size: int,
                       extra: dict) -> tuple[torch.Tensor, dict]:
    """The UNet's ``encoder_hidden_states`` and keyword arguments for a session's encoding ``cond``: for a UNet with
    SDXL's added conditioning (``pooled_unet``) the pooled embeddings and time ids of the training resolution go
    into ``added_cond_kwargs`` (:func:`editbench.pipelines.added_cond_kwargs`)."""
    if isinstance(cond, TextConditioning):
        hidden, pooled = cond.hidden, cond.pooled
    else:
        hidden, pooled = cond, None
    if not pooled_unet:
        return hidden, extra
    if pooled is None:
        raise TrainingError(f"this {type(pipeline).__name__}'s UNet needs the pooled text embeddings and time ids "
                            "(SDXL); the session's encode() returned hidden states only: return "
                            "training.encode_prompts(pipeline, prompts) or an editbench.pipelines.TextConditioning")
    added = added_cond_kwargs(pipeline, pooled.to(pipeline.unet.dtype), size)
    return hidden, {**extra, "added_cond_kwargs": {**added, **extra.get("added_cond_kwargs", {})}}


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


def train(pipeline: Any, concept: ConceptData | Sequence[ConceptData], session: TrainingSession,
          config: TrainConfig, *,
          seed: int = 0, progress: bool = True, checkpoint_dir: str | Path | None = None,
          signature: dict | None = None, desc: str = "training") -> TrainResult:
    """Run ``config.steps`` optimizer steps of ``session`` on ``concept``; resume from ``checkpoint_dir`` if it
    holds one.

    Each step accumulates ``config.grad_accum`` micro-batches of ``config.batch_size`` (image, template) pairs.
    Randomness comes from one CPU ``torch.Generator`` seeded with ``seed`` whose state is checkpointed, so a
    resumed run is bitwise identical to an uninterrupted one on the same hardware. Checkpoints are written
    every ``config.checkpoint_every`` steps and at the end (``checkpoint_dir/checkpoint.safetensors``).
    ``signature`` (JSON-able) identifies the run; a checkpoint of another run is refused.

    Several concepts (joint training) pool their images; each image is prompted with its own concept's
    templates and ``session.phrase_for(concept)``, and ``StepContext.owners`` says which concept each item is.

    With several devices and a multi-process launch (:func:`use_accelerate`) every process runs this loop on
    its own device and the gradients are averaged over them (see :class:`DataParallel`); on CPU or one device
    the plain loop runs, unchanged.

    Optional features (:class:`TrainConfig`; all off by default): gradient checkpointing of the modules the
    gradients flow through (:meth:`TrainingSession.backprop_modules`), autocast of the forward passes
    (``mixed_precision``; fp16 with a loss scaler), a training ``resolution``, a learning-rate schedule (its state
    checkpointed), validation images every ``validation_every`` steps in ``checkpoint_dir/validation/
    step_XXXXX/``, TensorBoard logs in ``checkpoint_dir/logs``, 8-bit AdamW, bfloat16 master weights and the
    step fused into the backward pass (``master_weights`` / ``fused_backward``: the trained parameters updated by
    :class:`editbench.training.bf16.StochasticAdamW`, cast to bfloat16 for the run with the former).
    :func:`check_training` refuses what this pipeline, device or installation cannot run, before any work.

    Raises TrainingError on a non-finite loss (naming the step; the last checkpoint is kept).
    The pipeline's ``requires_grad`` flags, train/eval modes and gradient-checkpointing switches are restored on
    return.
    """
    check_training(pipeline, config, checkpoint_dir)
    pooled = getattr(pipeline.unet.config, "addition_embed_type", None) == "text_time"  # SDXL's added conditioning
    device = pipeline_device(pipeline)
    size = training_resolution(pipeline, config)
    amp_dtype = _autocast_dtype(device, config.mixed_precision)
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
        if not p.is_floating_point() or p.dtype not in (torch.float32, config.trainable_dtype):
            raise TrainingError(f"trainable parameters must be float32 (got {p.dtype}; or {config.trainable_dtype} "
                                "with master_weights); keep a float32 copy and cast in the forward pass")
    opt = _optimizer(config, groups, seed)
    lr_sched = _lr_scheduler(config, opt)
    scaler = torch.amp.GradScaler(device.type) if config.mixed_precision == "fp16" else None
    any_state = config.optimizer == "adamw8bit"
    par = DataParallel(make_accelerator(), device) if use_accelerate() else None
    if par is not None and config.fused_backward:
        raise EditbenchError("fused_backward steps each parameter inside the backward pass, before the gradients "
                             "of a multi-process run are averaged: train in one process or set fused_backward=False")
    stepper = opt if par is None else par.acc.prepare(opt)  # AcceleratedOptimizer around (the state of) opt
    digest = [_concept_digest(c, im, m) for c, (im, m) in zip(concepts, loaded)]
    sig_parts = dict(signature or {}, concept=digest[0] if len(digest) == 1 else digest, seed=seed,
                     groups=[(g.name, g.lr, g.weight_decay, [tuple(p.shape) for p in g.params]) for g in groups])
    sig = hashlib.sha256(json.dumps(sig_parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    gen = torch.Generator().manual_seed(int(seed) if par is None else par.seed(seed))
    ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    start, losses, wall_before = 0, [], 0.0
    if ckpt is not None and ckpt.exists():
        start, losses, wall_before = load_checkpoint(ckpt, groups=groups, optimizer=opt, generator=gen,
                                                      session=session, signature=sig, steps=config.steps,
                                                      lr_scheduler=lr_sched, grad_scaler=scaler,
                                                      any_optimizer_state=any_state)
        if par is not None and par.rank:  # the checkpoint holds process 0's generator
            gen.manual_seed(par.seed(seed, start))
    if par is not None:
        par.sync_params(params)
    from editbench.progress import progress as progress_bar

    t0, mem = time.perf_counter(), _Memory(device)
    n_img, n_tpl = len(images), math.lcm(*(len(c.templates) for c in concepts))
    phrases = [session.phrase_for(c) for c in concepts]
    unet = pipeline.unet
    T = sched.config.num_train_timesteps

    def autocast() -> Any:
        return contextlib.nullcontext() if amp_dtype is None else torch.autocast(device.type, dtype=amp_dtype)

    main = par is None or par.main
    validation = None
    if config.validation_every and main:
        validation = [p.format(*phrases) for p in config.validation_prompts] or \
            [c.templates[0].format(ph) for c, ph in zip(concepts, phrases)]
    writer = None
    if config.log_with == "tensorboard" and main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(Path(checkpoint_dir) / LOG_DIR))
    skipped = 0
    checkpointing = _Checkpointing(session.backprop_modules(pipeline)) if config.gradient_checkpointing \
        else contextlib.nullcontext()
    with _Freeze(pipeline, params), checkpointing:
        cache = None if session.augments else encode_images(pipeline, images)  # (N, c, h, w) x 2

        def diffusion_loss(latents: torch.Tensor, cond: torch.Tensor | TextConditioning,
                           m: torch.Tensor | None = None) -> torch.Tensor:
            b = latents.shape[0]
            hidden, kwargs = _unet_conditioning(pipeline, pooled, cond, size, session.unet_kwargs(b))
            noise = torch.randn(latents.shape, generator=gen).to(latents)          # (b, c, h, w)
            t = torch.randint(0, T, (b,), generator=gen).to(device)                 # (b,)
            noisy = sched.add_noise(latents, noise, t)
            target = {"epsilon": noise, "sample": latents}.get(ptype)
            if target is None:
                target = sched.get_velocity(latents, noise, t)
            pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=hidden.to(unet.dtype), **kwargs).sample
            if m is not None:
                m = F.interpolate(m.to(device, torch.float32), size=pred.shape[-2:], mode="area")  # (b, 1, h, w)
            return masked_mse(pred, target, m)

        bar = progress_bar(total=config.steps, initial=start, desc=desc, unit="step",
                           disable=not progress or (par is not None and not par.main))
        # master_weights="bf16": float32 parameters train as bfloat16 (the optimizer makes its moments at the first
        # step, in the parameter's dtype) and are float32 again afterwards, their values then bfloat16's, so
        # sessions build their artifacts as always
        recast = [p for p in params if p.dtype != config.trainable_dtype]
        fused = opt.hooks() if config.fused_backward else []   # the step inside backward(), gradients freed there
        try:
            for p in recast:
                p.data = p.data.to(config.trainable_dtype)
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
                        mean, std = encode_images(pipeline, img)
                    else:
                        mean, std = cache[0][idx], cache[1][idx]                              # (b, c, h, w)
                    z = mean + std * torch.randn(mean.shape, generator=gen).to(mean)
                    latents = scale_latents(pipeline, z)
                    with autocast():
                        cond = session.encode(prompts)                                        # (b, n, d)
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
                                            f"{kept(ckpt)}. Lower the learning rates or check the data")
                    scaled = loss / config.grad_accum if scaler is None else scaler.scale(loss / config.grad_accum)
                    if par is None:
                        scaled.backward()
                    else:
                        par.acc.backward(scaled)
                    step_loss += value / config.grad_accum
                    mem.sample()
                if par is not None:
                    step_loss = par.mean(step_loss, device)
                    if not math.isfinite(step_loss):
                        raise TrainingError(f"loss is {step_loss} at step {step} (on at least one of {par.n} "
                                            f"processes); {kept(ckpt)}. Lower the learning rates or check the data")
                    par.reduce_grads(params)
                if scaler is not None:
                    scaler.unscale_(opt)  # clip (and the optimizer) see the true gradients
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                lrs = [g["lr"] for g in opt.param_groups]  # this step's learning rates
                if fused:
                    pass  # every parameter with a gradient was updated in backward()
                elif scaler is None:
                    stepper.step()
                else:  # skips the step if a gradient overflowed (and lowers the scale)
                    before = scaler.get_scale()
                    with warnings.catch_warnings():  # a skipped first step: "scheduler.step() before optimizer"
                        warnings.simplefilter("ignore")
                        scaler.step(opt)
                    scaler.update()
                    skipped += scaler.get_scale() < before
                stepper.zero_grad(set_to_none=True)
                if lr_sched is not None:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        lr_sched.step()
                session.after_step(step)
                losses.append(step_loss)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}")
                if writer is not None:
                    writer.add_scalar("train/loss", step_loss, step)
                    for g, lr in zip(groups, lrs):
                        writer.add_scalar(f"train/lr/{g.name}", lr, step)
                    if scaler is not None:
                        writer.add_scalar("train/loss_scale", scaler.get_scale(), step)
                if ckpt is not None and (step == config.steps or
                                         (config.checkpoint_every and step % config.checkpoint_every == 0)):
                    if main:
                        save_checkpoint(ckpt, groups=groups, optimizer=opt, generator=gen, session=session,
                                         signature=sig, step=step, losses=losses,
                                         wall=wall_before + time.perf_counter() - t0, lr_scheduler=lr_sched,
                                         grad_scaler=scaler, any_optimizer_state=any_state)
                    if writer is not None:
                        writer.flush()
                    if par is not None:
                        par.acc.wait_for_everyone()
                if validation is not None and step % config.validation_every == 0:
                    _validation_images(pipeline, Path(checkpoint_dir) / VALIDATION_DIR, step, validation, config,
                                       size, seed, autocast, writer)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
            if par is not None:
                par.acc.free_memory()
            for p in recast:
                p.data = p.data.to(torch.float32)
            for h in fused:
                h.remove()
    wall = time.perf_counter() - t0
    peak, kind = mem.result()
    return TrainResult(steps=config.steps, losses=losses, wall_time_s=wall, wall_time_total_s=wall_before + wall,
                       peak_memory_bytes=peak, memory_kind=kind, device=str(device), resumed_from=start,
                       extra={**({} if par is None else {"processes": par.n}),
                              **({} if scaler is None else {"fp16_skipped_steps": skipped})})
