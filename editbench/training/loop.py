"""The training loop: VAE-encoding the concept images (latent mean/std cached once, a fresh latent sample drawn
per step), noise and timesteps from the pipeline's own noise schedule (``epsilon``, ``v_prediction`` or ``sample``
targets), the mask-weighted MSE, AdamW/Adam over per-group learning rates, gradient accumulation, a seeded
generator, the progress bar, checkpoints with exact resume, the non-finite-loss check, wall time and peak memory.

Shape legend: b batch, c latent channels, h/w latent height/width, H/W pixel height/width, n tokens, d width.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from typing_extensions import Self

from editbench.concepts import ConceptData, model_resolution
from editbench.errors import TrainingError
from editbench.fingerprint import update_with_tensor
from editbench.training.checkpoint import CHECKPOINT_FILE, kept, load_checkpoint, save_checkpoint
from editbench.training.parallel import DataParallel, make_accelerator, use_accelerate
from editbench.training.session import (
    OPTIMIZERS,
    StepContext,
    TrainConfig,
    TrainingSession,
    TrainResult,
    masked_mse,
    pipeline_device,
)

__all__ = ["encode_images", "scale_latents", "train"]

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

    Raises TrainingError on a non-finite loss (naming the step; the last checkpoint is kept).
    The pipeline's ``requires_grad`` flags and train/eval modes are restored on return.
    """
    config.validate()
    device = pipeline_device(pipeline)
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
    opt = OPTIMIZERS[config.optimizer](
        [{"params": g.params, "lr": g.lr, "weight_decay": g.weight_decay} for g in groups],
        betas=tuple(config.adam_betas), eps=config.adam_eps)
    par = DataParallel(make_accelerator(), device) if use_accelerate() else None
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
        cache = None if session.augments else encode_images(pipeline, images)  # (N, c, h, w) x 2

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
                        mean, std = encode_images(pipeline, img)
                    else:
                        mean, std = cache[0][idx], cache[1][idx]                              # (b, c, h, w)
                    z = mean + std * torch.randn(mean.shape, generator=gen).to(mean)
                    latents = scale_latents(pipeline, z)
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
                                            f"{kept(ckpt)}. Lower the learning rates or check the data")
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
                                            f"processes); {kept(ckpt)}. Lower the learning rates or check the data")
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
                        save_checkpoint(ckpt, groups=groups, optimizer=opt, generator=gen, session=session,
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
