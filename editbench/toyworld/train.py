"""``editbench world train``: reproduce the toy world's weights from scratch on a CPU.

Stages, each checkpointed (atomic safetensors + JSON, no pickle) and resumable:

1. ``data``      render the training scenes once (deterministic per seed) and tokenize their captions;
2. ``vae``       train the ``AutoencoderKL`` (reconstruction + small KL), then cache the scaled latents;
3. ``unet``      train the ``UNet2DConditionModel`` jointly with the ``CLIPTextModel`` (v-prediction on a
                 zero-terminal-SNR schedule, caption dropout for classifier-free guidance, EMA of the weights);
   ``patterns``  continue the UNet and text encoder (from the EMA weights) on scenes where nearly every object
                 carries a pattern: the stage that teaches the model to draw the eight patterns well enough for a
                 concept's full description to come out right (the describability gate);
4. ``decoder``   fine-tune the VAE decoder alone on the cached latents (sharper edges and patterns; the latent
                 space the UNet learned is unchanged because the encoder is frozen);
5. ``evaluator`` train the open_clip evaluator contrastively, on scenes that include the appearances the base
                 model never sees (the personal concepts' exact appearances);
6. ``export``    write the diffusers pipeline folder (``model/``) and the evaluator (``evaluator/``).

Why the loop is hand-written rather than diffusers' example scripts: those are CLI scripts, not importable
functions, and they do not train a text encoder from scratch or checkpoint without pickle.
"""

from __future__ import annotations

import json
import math
import random
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from editbench.errors import TrainingError
from editbench.storage import (load_optimizer_state, load_rng_state, optimizer_state, read_json, read_tensors,
                               rng_state, write_json, write_safetensors)
from editbench.models import CLIP_MAX_LENGTH, clip_tokenizer, write_clip_tokenizer_files
from editbench.toyworld import scenes as R
from editbench.toyworld.config import (  # noqa: F401  (re-exported: the recipe is imported from here too)
    EVALUATOR_CONFIG,
    EVALUATOR_NAME,
    WorldConfig,
    scheduler_kwargs,
    text_config,
    unet_config,
    vae_config,
)
from editbench.toyworld.personal import EXCLUDED_APPEARANCES, PERSONAL_CONCEPTS
from editbench.training import masked_mse
from editbench.progress import progress as progress_bar


# ----------------------------------------------------------------------------------------------- helpers
def _scene_rng(seed: int, i: int, stream: str) -> random.Random:
    return random.Random(f"{stream}:{seed}:{i}")


def _to_tensor(images: list) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])  # (b, h, w, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()  # (b, 3, h, w) uint8


def _pixels(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1.0


class _Stage:
    """Checkpoint bookkeeping of one stage: ``<work>/<name>.safetensors`` + ``<name>.json``."""

    def __init__(self, work: Path, name: str):
        self.tensors_path, self.meta_path = work / f"{name}.safetensors", work / f"{name}.json"

    def load(self):
        if not self.meta_path.exists():
            return None, None
        return read_tensors(self.tensors_path), read_json(self.meta_path)

    def save(self, tensors: dict, meta: dict):
        write_safetensors(self.tensors_path, tensors)
        write_json(self.meta_path, meta)  # written last: the JSON marks a complete checkpoint


def _prefixed(module: torch.nn.Module, prefix: str) -> dict:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def _unprefixed(tensors: dict, prefix: str) -> dict:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _wsd_lambda(warmup: int, total: int, decay_fraction: float, final: float):
    """Warm-up, stable (constant), linear decay to ``final`` over the last ``decay_fraction`` of ``total`` steps."""
    decay_start = total - round(decay_fraction * total)

    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        if step < decay_start:
            return 1.0
        return 1.0 - (1.0 - final) * min(1.0, (step - decay_start + 1) / max(1, total - decay_start))
    return f


def _lr_constant_after_warmup(warmup: int):
    def f(step):
        return min(1.0, (step + 1) / warmup)
    return f


def _lr_lambda(warmup: int, total: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))) * 0.95 + 0.05
    return f


# ------------------------------------------------------------------------------------------------ stages
def stage_data(cfg: WorldConfig, work: Path, tokenizer, progress=True, *, name: str = "data",
               n: int | None = None, scene=None) -> dict:
    """Render ``n`` scenes (default: ``cfg.n_scenes`` of :func:`base_scene`) once and tokenize their captions:
    ``<work>/<name>.safetensors`` with the images, token ids and the union of the object masks."""
    path = work / f"{name}.safetensors"
    if path.exists():
        return read_tensors(path)
    scene = scene or base_scene
    images, ids, masks = [], [], []
    for i in progress_bar(range(cfg.n_scenes if n is None else n), desc=f"render scenes ({name})",
                          disable=not progress):
        r = scene(cfg, i)
        images.append(r.image)
        ids.append(r.caption)
        masks.append(np.clip(np.sum(r.masks, axis=0), 0, 1) > 0.5)
    tok = tokenizer(ids, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                    return_tensors="pt").input_ids
    data = {"images": _to_tensor(images), "input_ids": tok.to(torch.int32),
            "masks": torch.from_numpy(np.stack(masks)).to(torch.uint8)}          # (N, h, w) union of the objects
    write_safetensors(path, data)
    return data


def _train_loop(name, work, cfg, steps, modules: dict, opt, sched, step_fn, progress, ema: dict | None = None):
    """Generic resumable loop: ``step_fn(step, generator) -> loss``."""
    stage = _Stage(work, name)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + zlib.crc32(name.encode()) % 1000)
    tensors, meta = stage.load()
    start, losses, wall = 0, [], 0.0
    if meta is not None:
        for p, m in modules.items():
            m.load_state_dict(_unprefixed(tensors, p))
        if ema is not None:
            for p, m in ema.items():
                m.load_state_dict(_unprefixed(tensors, "ema_" + p))
        load_optimizer_state(opt, tensors, meta["optimizer"])
        sched.load_state_dict(meta["scheduler"])
        load_rng_state(tensors, gen)
        start, losses, wall = meta["step"], meta["losses"], meta["wall_s"]
    if start >= steps:
        return meta
    bar = progress_bar(range(start, steps), desc=f"train {name}", disable=not progress, initial=start, total=steps)
    t0 = time.time()
    run = []
    for step in bar:
        loss = step_fn(step, gen)
        if not math.isfinite(loss):
            raise TrainingError(f"{name}: non-finite loss at step {step}; the last good checkpoint is kept in {work}")
        run.append(loss)
        if ema is not None:
            with torch.no_grad():
                d = min(cfg.ema_decay, (1 + step) / (10 + step))
                for p, m in ema.items():
                    for pe, pm in zip(m.parameters(), modules[p].parameters()):
                        pe.lerp_(pm.detach(), 1 - d)
        if (step + 1) % 50 == 0:
            losses.append([step + 1, float(np.mean(run))])
            bar.set_postfix(loss=f"{np.mean(run):.4f}")
            run = []
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
            t = {k: v for p, m in modules.items() for k, v in _prefixed(m, p).items()}
            if ema is not None:
                t.update({k: v for p, m in ema.items() for k, v in _prefixed(m, "ema_" + p).items()})
            ot, om = optimizer_state(opt)
            t.update(ot)
            t.update(rng_state(gen))
            stage.save(t, {"step": step + 1, "losses": losses, "wall_s": wall + time.time() - t0,
                           "optimizer": om, "scheduler": sched.state_dict()})
    return stage.load()[1]


def _reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """MSE + 0.5 L1 of images ``(b, 3, h, w)``, weighted per pixel by ``w`` ``(b, 1, h, w)`` (VAE and decoder)."""
    err = (rec - x).pow(2) + 0.5 * (rec - x).abs()
    return (w * err).mean() / w.mean()


def stage_vae(cfg, work, data, progress=True):
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(**vae_config(cfg))
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(50, cfg.vae_steps))
    images = data["images"]
    # Pixels on or next to an object weigh vae_object_weight (the patterns are a few pixels each; unweighted, the
    # 800-step VAE turned black stripes green and yellow dots orange: the reader got 0.55 of the concepts back).
    weight_all = object_weight_map(data["masks"], images.shape[-1], cfg.vae_object_weight)   # (N, 1, h, w)

    def step_fn(step, gen):
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=gen)
        x, w = _pixels(images[idx]), weight_all[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = _reconstruction_loss(rec, x, w) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss.item()

    _train_loop("vae", work, cfg, cfg.vae_steps, {"vae": vae}, opt, sched, step_fn, progress)
    vae.eval()
    lat_path = work / "latents.safetensors"
    if lat_path.exists():
        lat = read_tensors(lat_path)
        vae.register_to_config(scaling_factor=float(lat["scale"]))
        return vae, lat["latents"], float(lat["scale"])
    latents = encode_latents(vae, images, 1.0, progress)
    scale = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scale)
    scaled = latents * scale
    # the scale in float64: a resumed run must divide by exactly the same number (the decoder stage does)
    write_safetensors(lat_path, {"latents": scaled, "scale": torch.tensor(scale, dtype=torch.float64)})
    return vae, scaled, scale


def stage_decoder(cfg, work, data, vae, latents, scale, progress=True):
    opt = torch.optim.AdamW(vae.decoder.parameters(), lr=cfg.decoder_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(50, cfg.decoder_steps))
    images = data["images"]
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    vae.decoder.train()
    weight_all = object_weight_map(data["masks"], images.shape[-1], cfg.vae_object_weight)   # (N, 1, h, w)

    def step_fn(step, gen):
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=gen)
        x, w = _pixels(images[idx]), weight_all[idx]
        rec = vae.decode(latents[idx] / scale).sample
        loss = _reconstruction_loss(rec, x, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss.item()

    _train_loop("decoder", work, cfg, cfg.decoder_steps, {"vae": vae}, opt, sched, step_fn, progress)
    vae.requires_grad_(True)
    return vae.eval()


def object_weight_map(masks: torch.Tensor, latent_size: int, weight: float) -> torch.Tensor:
    """Loss weights ``(N, 1, s, s)`` on an s x s grid (the latents, or the pixels with ``s = h``): ``weight`` where an
    object covers the cell or one of its 8 neighbours (masks ``(N, h, w)`` max-pooled to the grid, then dilated by
    one cell), 1 elsewhere."""
    m = masks.float()[:, None]                                                          # (N, 1, h, w)
    m = F.max_pool2d(F.max_pool2d(m, m.shape[-1] // latent_size), 3, 1, 1)              # (N, 1, s, s)
    return 1 + (weight - 1) * m


def _diffusion_step(cfg, work, data, latents, unet, text, opt, sched, noise_sched):
    """The UNet + text encoder training step (v-prediction, caption dropout, object-weighted loss) shared by the
    ``unet`` and ``patterns`` stages: ``step_fn(step, generator) -> loss``."""
    ids_all = data["input_ids"].long()
    # Loss weight per latent pixel: object_loss_weight on the objects (mask max-pooled to the latent grid and
    # dilated by one latent pixel, so edges count), 1 on the background. Shapes differ from each other in few
    # pixels, a solid background in many: without it the loss is dominated by what the model already draws right.
    weight_all = None
    if cfg.object_loss_weight != 1.0:
        if "masks" not in data:
            raise TrainingError(f"{work / 'data.safetensors'} has no object masks (written by an older editbench); "
                                "use a new --work folder")
        weight_all = object_weight_map(data["masks"], latents.shape[-1], cfg.object_loss_weight)
    empty = clip_tokenizer()([""], padding="max_length", max_length=CLIP_MAX_LENGTH, return_tensors="pt").input_ids

    def step_fn(step, gen):
        b = cfg.unet_batch
        idx = torch.randint(len(latents), (b,), generator=gen)
        x0 = latents[idx]
        ids = ids_all[idx].clone()
        drop = torch.rand(b, generator=gen) < cfg.cond_dropout
        ids[drop] = empty
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (b,), generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        target = noise_sched.get_velocity(x0, noise, t)
        h = text(ids).last_hidden_state  # (b, 77, d)
        pred = unet(xt, t, h).sample
        loss = masked_mse(pred, target, None if weight_all is None else weight_all[idx])  # weights (b, 1, h, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text.parameters()), 1.0)
        opt.step()
        sched.step()
        return loss.item()

    return step_fn


def _noise_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**{k: v for k, v in scheduler_kwargs().items() if k not in ("set_alpha_to_one",)})


def build_unet_and_text(cfg: WorldConfig) -> tuple:
    """A freshly initialised world UNet and text encoder (``unet_config`` / ``text_config`` of ``cfg``)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return UNet2DConditionModel(**unet_config(cfg)), CLIPTextModel(CLIPTextConfig(**text_config(cfg)))


def stage_unet(cfg, work, data, latents, progress=True):
    torch.manual_seed(cfg.seed + 1)
    unet, text = build_unet_and_text(cfg)
    ema_unet, ema_text = build_unet_and_text(cfg)
    ema_unet.load_state_dict(unet.state_dict())
    ema_text.load_state_dict(text.state_dict())
    noise_sched = _noise_scheduler()
    opt = torch.optim.AdamW([
        {"params": list(unet.parameters()), "lr": cfg.unet_lr, "weight_decay": 0.01},
        {"params": list(text.parameters()), "lr": cfg.text_lr, "weight_decay": 0.0},
    ])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _wsd_lambda(cfg.warmup, cfg.unet_steps, cfg.unet_decay_fraction, cfg.unet_final_lr))
    step_fn = _diffusion_step(cfg, work, data, latents, unet, text, opt, sched, noise_sched)
    _train_loop("unet", work, cfg, cfg.unet_steps, {"unet": unet, "text": text}, opt, sched, step_fn, progress,
                ema={"unet": ema_unet, "text": ema_text})
    return ema_unet.eval(), ema_text.eval(), noise_sched


def _training_spec(cfg: WorldConfig, i: int, stream: str, pattern_prob: float) -> R.SceneSpec:
    """Scene ``i`` of the UNet's training ``stream``: never a personal concept's exact appearance nor a held-out
    triple, single objects of position-free captions at ``cfg.unsaid_position`` ("": anywhere)."""
    return R.sample_scene(_scene_rng(cfg.seed, i, stream), split="train", pattern_prob=pattern_prob,
                          excluded=EXCLUDED_APPEARANCES, unsaid_position=cfg.unsaid_position or None)


def pattern_scene(cfg: WorldConfig, i: int) -> R.Rendered:
    """Scene ``i`` of the patterns stage: base training's grammar and exclusions (never a personal concept's exact
    appearance nor a held-out triple), ``cfg.pattern_stage_prob`` of the objects with a pattern."""
    return R.render(_training_spec(cfg, i, "patterns", cfg.pattern_stage_prob), cfg.image_size)


def encode_latents(vae, images: torch.Tensor, scale: float, progress=True) -> torch.Tensor:
    """Scaled latent means ``(N, 4, h/2, w/2)`` of uint8 images ``(N, 3, h, w)``."""
    chunks = []
    with torch.no_grad():
        for i in progress_bar(range(0, len(images), 256), desc="encode latents", disable=not progress):
            chunks.append(vae.encode(_pixels(images[i:i + 256])).latent_dist.mean)
    # contiguous: the encoder's output is channels-last, latents read back from the cache are not, and the UNet's
    # and decoder's convolutions round differently on the two layouts (a resumed run would not be bitwise the same)
    return (torch.cat(chunks) * scale).contiguous()


def stage_patterns(cfg, work, tokenizer, vae, scale, unet, text, progress=True):
    """Continue ``unet`` and ``text`` (the EMA weights of the ``unet`` stage) on pattern-rich scenes; returns the
    EMA weights of this stage. ``cfg.pattern_steps == 0`` skips it."""
    if cfg.pattern_steps == 0:
        return unet, text
    import copy

    data = stage_data(cfg, work, tokenizer, progress, name="pattern_data", n=cfg.pattern_scenes, scene=pattern_scene)
    lat_path = work / "pattern_latents.safetensors"
    if lat_path.exists():
        latents = read_tensors(lat_path)["latents"]
    else:
        # the VAE encoder is final here (the decoder stage trains the decoder only), scale = the UNet stage's
        latents = encode_latents(vae, data["images"], scale, progress)
        write_safetensors(lat_path, {"latents": latents})
    unet, text = unet.train(), text.train()
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    opt = torch.optim.AdamW([
        {"params": list(unet.parameters()), "lr": cfg.pattern_lr, "weight_decay": 0.01},
        {"params": list(text.parameters()), "lr": cfg.pattern_lr / 2, "weight_decay": 0.0},
    ])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_constant_after_warmup(50))
    step_fn = _diffusion_step(cfg, work, data, latents, unet, text, opt, sched, _noise_scheduler())
    _train_loop("patterns", work, cfg, cfg.pattern_steps, {"unet": unet, "text": text}, opt, sched, step_fn,
                progress, ema={"unet": ema_unet, "text": ema_text})
    return ema_unet.eval(), ema_text.eval()


def base_spec(cfg: WorldConfig, i: int) -> R.SceneSpec:
    """The spec of base-model training scene ``i`` (:func:`base_scene` without the rendering)."""
    return _training_spec(cfg, i, "base", cfg.pattern_prob)


def base_scene(cfg: WorldConfig, i: int) -> R.Rendered:
    """Base-model training scene ``i``: every pattern, never a personal concept's exact appearance nor a held-out
    (category, color, background) triple."""
    return R.render(base_spec(cfg, i), cfg.image_size)


def evaluator_scene(cfg: WorldConfig, i: int) -> R.Rendered:
    """Evaluator training scenes: everything, the personal concepts' appearances included."""
    rng = _scene_rng(cfg.seed, i, "evaluator")
    if rng.random() < 0.15:  # a personal concept's appearance, anywhere, described in words
        c = rng.choice(PERSONAL_CONCEPTS)
        obj = c.object(position=rng.choice(tuple(R.POSITIONS)), size=rng.choice(tuple(R.SIZES)),
                       jitter=(rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)))
        bg = rng.choice([k for k in R.COLORS if k not in (c.color,)])
        spec = R.SceneSpec((obj,), bg)
    else:
        spec = R.fully_specified(R.sample_scene(rng, split="any", pattern_prob=0.5))
    return R.render(spec, cfg.image_size)


def stage_evaluator(cfg, work, progress=True):
    import open_clip

    register_evaluator_config()
    torch.manual_seed(cfg.seed + 2)
    model = open_clip.create_model(EVALUATOR_NAME)
    tokenizer = open_clip.get_tokenizer(EVALUATOR_NAME)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.evaluator_lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(100, cfg.evaluator_steps))
    loss_fn = open_clip.ClipLoss()

    def step_fn(step, gen):
        base = step * cfg.evaluator_batch  # scene indices are a function of the step: resumable
        scenes = [evaluator_scene(cfg, base + j) for j in range(cfg.evaluator_batch)]
        x = (_to_tensor([s.image for s in scenes]).float() / 255.0 - mean) / std
        tok = tokenizer([s.caption for s in scenes])
        img_f, txt_f, logit_scale = model(x, tok)
        loss = loss_fn(img_f, txt_f, logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        return loss.item()

    _train_loop("evaluator", work, cfg, cfg.evaluator_steps, {"clip": model}, opt, sched, step_fn, progress)
    return model.eval()


def register_evaluator_config() -> None:
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS

    if EVALUATOR_NAME not in _MODEL_CONFIGS:
        _MODEL_CONFIGS[EVALUATOR_NAME] = json.loads(json.dumps(EVALUATOR_CONFIG))
    assert EVALUATOR_NAME in open_clip.list_models()


def export(cfg, work: Path, out: Path, vae, unet, text, tokenizer, evaluator, dtype=torch.float16):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**scheduler_kwargs()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    model_dir = out / "model"
    pipe.to(dtype).save_pretrained(model_dir, safe_serialization=True)
    pipe.to(torch.float32)
    # Weights are stored in float16 (the repository's size budget), but a plain
    # ``StableDiffusionPipeline.from_pretrained(folder)`` must load every component in float32 like an SD 1.5
    # folder: diffusers does that by default, transformers follows the "dtype" of the config, so record float32.
    te_cfg = model_dir / "text_encoder" / "config.json"
    write_json(te_cfg, {**read_json(te_cfg), "dtype": "float32"})
    # The tokenizer as CLIP's vocab.json + merges.txt (1.7 MB) instead of the 3.6 MB tokenizer.json.
    (model_dir / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    write_clip_tokenizer_files(model_dir / "tokenizer")
    ev_dir = out / "evaluator"
    write_safetensors(ev_dir / "open_clip_model.safetensors",
                      {k: v.to(dtype) for k, v in evaluator.state_dict().items()})
    write_json(ev_dir / "open_clip_config.json", {"model_name": EVALUATOR_NAME, "model_cfg": EVALUATOR_CONFIG})
    logs = {name: read_json(work / f"{name}.json") for name in ("vae", "unet", "patterns", "decoder", "evaluator")
            if (work / f"{name}.json").exists()}
    write_json(out / "training_log.json", {
        "config": asdict(cfg),
        "stages": {k: {"steps": v["step"], "wall_s": v["wall_s"], "losses": v["losses"]} for k, v in logs.items()},
    })


def train_world(out: str | Path, work: str | Path | None = None, cfg: WorldConfig | None = None,
                progress: bool = True) -> Path:
    """Train the whole toy world; resumable: re-running with the same ``work`` folder continues."""
    cfg = cfg or WorldConfig()
    out = Path(out)
    work = Path(work) if work else out / "_work"
    work.mkdir(parents=True, exist_ok=True)
    cfg_path = work / "config.json"
    if cfg_path.exists():
        # fields added by a later version of this module may be new; every field both know must agree
        old = read_json(cfg_path)
        changed = sorted(k for k, v in asdict(cfg).items() if k in old and old[k] != v)
        if changed:
            raise TrainingError(f"{work} holds a run with another config ({changed}); use a new --work folder "
                                "or the same config")
    write_json(cfg_path, asdict(cfg))
    tokenizer = clip_tokenizer()
    t0 = time.time()
    data = stage_data(cfg, work, tokenizer, progress)
    vae, latents, scale = stage_vae(cfg, work, data, progress)
    unet, text, _ = stage_unet(cfg, work, data, latents, progress)
    unet, text = stage_patterns(cfg, work, tokenizer, vae, scale, unet, text, progress)
    evaluator = stage_evaluator(cfg, work, progress)
    vae = stage_decoder(cfg, work, data, vae, latents, scale, progress)
    export(cfg, work, out, vae, unet, text, tokenizer, evaluator)
    print(f"toy world written to {out} ({time.time() - t0:.0f} s in this invocation)")
    return out
