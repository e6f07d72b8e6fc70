"""Prior preservation, shared by DreamBooth, Custom Diffusion and LoRA: class images and the prior loss.

DreamBooth's recipe: generate class images with the *base* model from the class prompt ("a photo of a dog"),
then train on ``loss = instance loss + prior_loss_weight * prior loss``, the prior loss being the ordinary
diffusion loss on a batch of class images with the class prompt (one class image per instance image, as the
reference scripts concatenate them into one batch). Generation is the slow part, so the images are cached on
disk under a key made of everything that determines them (base weights, prompt, count, size, sampler settings).

Shape legend: n images, b batch, c latent channels, h/w latent size, H/W pixel size.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from editbench.concepts import ConceptData, model_resolution
from editbench.errors import EditbenchError
from editbench.fingerprint import fingerprint, module_tensors
from editbench.storage import atomic_target, cache_root
from editbench.training import StepContext, TrainingSession, encode_prompts

__all__ = ["ClassPromptSession", "PriorConfigMixin", "PriorPreservation", "class_images", "default_cache_dir",
           "make_prior", "resize_images"]

_MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    """``<cache_root>/class_images`` (:func:`editbench.storage.cache_root`)."""
    return cache_root() / "class_images"


@dataclass
class PriorConfigMixin:
    """Config fields of prior preservation (mixed into the configs of the methods that use it).

    ``class_prompt`` is a template: ``{}`` becomes the concept's superclass word. ``num_class_images`` class
    images per concept are generated at ``class_resolution`` px (None: the training resolution, i.e.
    ``TrainConfig.resolution`` or the model's own) and resized to the training resolution before encoding.
    """

    with_prior_preservation: bool = True
    prior_loss_weight: float = 1.0
    num_class_images: int = 16
    class_prompt: str = "a photo of a {}"
    class_inference_steps: int = 25
    class_guidance_scale: float = 3.0
    class_seed: int = 0
    class_cache_dir: str | None = None
    class_resolution: int | None = None

    def validate_prior(self) -> None:
        if isinstance(self.num_class_images, bool) or not isinstance(self.num_class_images, int) \
                or self.num_class_images < 1:
            raise EditbenchError(f"num_class_images must be a positive int, got {self.num_class_images!r}")
        if not self.prior_loss_weight >= 0:
            raise EditbenchError(f"prior_loss_weight must be >= 0, got {self.prior_loss_weight!r}")
        if not isinstance(self.class_prompt, str) or self.class_prompt.count("{}") != 1:
            raise EditbenchError(f"class_prompt must contain '{{}}' once (the superclass), got {self.class_prompt!r}")
        if isinstance(self.class_inference_steps, bool) or not isinstance(self.class_inference_steps, int) \
                or self.class_inference_steps < 1:
            raise EditbenchError(f"class_inference_steps must be a positive int, got {self.class_inference_steps!r}")
        r = self.class_resolution
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise EditbenchError(f"class_resolution must be a positive int (pixels) or None (the training "
                                 f"resolution), got {r!r}")


def _cache_key(pipeline: Any, prompt: str, n: int, size: int, steps: int, guidance: float, seed: int) -> str:
    tensors = {**module_tensors(pipeline.unet, "unet."), **module_tensors(pipeline.text_encoder, "text_encoder."),
               **module_tensors(pipeline.vae, "vae.")}
    spec = {"base": fingerprint(tensors, pipeline.tokenizer), "prompt": prompt, "n": n, "size": size,
            "steps": steps, "guidance": guidance, "seed": seed, "scheduler": type(pipeline.scheduler).__name__,
            "scheduler_config": {k: v for k, v in dict(pipeline.scheduler.config).items() if not k.startswith("_")}}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _read_cached(folder: Path, n: int) -> torch.Tensor | None:
    import numpy as np
    from PIL import Image

    manifest = folder / _MANIFEST
    if not manifest.is_file():
        return None
    try:
        names = json.loads(manifest.read_text())["files"]
        if len(names) != n:
            return None
        arrays = []
        for name in names:
            with Image.open(folder / name) as img:
                arrays.append(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())
    except (OSError, ValueError, KeyError):
        return None  # damaged cache entry: regenerate it
    # contiguous, like freshly generated images: a channels-last view takes other conv kernels in the VAE and
    # would make a fit with a cache hit differ (in the last bits) from the same fit with a cache miss
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # (n, 3, H, W) uint8


def class_images(pipeline: Any, prompt: str, n: int, *, steps: int = 25, guidance_scale: float = 3.0,
                 seed: int = 0, cache_dir: str | os.PathLike | None = None, batch_size: int = 8,
                 size: int | None = None) -> torch.Tensor:
    """``n`` images of ``prompt`` generated by ``pipeline`` (the base model) at ``size`` px (None: the model's
    resolution): float32 ``(n, 3, size, size)`` in [-1, 1].

    Images are quantised to 8 bits and cached as PNG files in ``cache_dir`` (default :func:`default_cache_dir`)
    under a key of the base weights, prompt, count, resolution, sampler and seed; a cached set is reused.
    (diffusers' scripts do the same with a throwaway pipeline inside the script; there is no library function.)
    """
    size = model_resolution(pipeline) if size is None else int(size)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / _cache_key(pipeline, prompt, n, size, steps, guidance_scale, seed)
    images = _read_cached(folder, n)
    if images is None:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        chunks = []
        for start in range(0, n, batch_size):
            k = min(batch_size, n - start)
            with torch.no_grad():
                out = pipeline([prompt] * k, num_inference_steps=steps, guidance_scale=guidance_scale,
                               height=size, width=size, generator=gen, output_type="pt").images  # (k, 3, H, W)
            chunks.append((out.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu())
        images = torch.cat(chunks)                                                         # (n, 3, H, W)
        _write_cache(folder, images, prompt)
    return images.float() / 127.5 - 1.0


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images ``(n, 3, H, W)`` in [-1, 1] resized to ``size`` x ``size`` as concept images are (8-bit, PIL bicubic
    after a center crop: :meth:`ConceptData.load_images`); returned as they are if already that size."""
    if images.shape[-2:] == (size, size):
        return images
    from PIL import Image

    from editbench.concepts import _square, _to_tensor

    out = [_to_tensor(_square(Image.fromarray(((img + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
                                              .permute(1, 2, 0).numpy()), size)) for img in images]
    return torch.stack(out) * 2 - 1                                          # (n, 3, size, size)


def _write_cache(folder: Path, images: torch.Tensor, prompt: str) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, img in enumerate(images):
        name = f"{i:04d}.png"
        with atomic_target(folder / name) as tmp:
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
        names.append(name)
    with atomic_target(folder / _MANIFEST) as tmp:  # written last: marks the entry complete
        tmp.write_text(json.dumps({"prompt": prompt, "files": names}))


class PriorPreservation:
    """The prior-preservation term of one or more concepts.

    Args:
        pipeline: the *unedited* base pipeline (class images are generated and VAE-encoded here, so build this
            before the method changes the pipeline).
        prompts: one class prompt per concept (e.g. ``["a photo of a dog"]``).
        config: a config with the :class:`PriorConfigMixin` fields.
    """

    def __init__(self, pipeline: Any, prompts: Sequence[str], config: PriorConfigMixin):
        from editbench.training.loop import encode_images  # the loop's own VAE encoding (posterior mean, std)

        self.prompts = list(prompts)
        self.weight = float(config.prior_loss_weight)
        self.pipeline = pipeline
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] = []  # per concept: (n, c, h, w) mean, std
        train_size = getattr(config, "resolution", None) or model_resolution(pipeline)
        size = config.class_resolution or train_size
        for p in self.prompts:
            imgs = class_images(pipeline, p, config.num_class_images, steps=config.class_inference_steps,
                                guidance_scale=config.class_guidance_scale, seed=config.class_seed,
                                cache_dir=config.class_cache_dir, size=size)
            self.stats.append(encode_images(pipeline, resize_images(imgs, train_size)))

    def loss(self, ctx: StepContext, encode: Callable[[list[str]], torch.Tensor],
             concept_of: torch.Tensor | None = None) -> torch.Tensor:
        """``weight *`` the diffusion loss on a batch of class images as large as the instance batch.

        ``concept_of`` ``(b,)`` says which concept's class set each batch item draws from (default: the first).
        """
        from editbench.training.loop import scale_latents

        b = ctx.indices.shape[0]
        owner = torch.zeros(b, dtype=torch.long) if concept_of is None else concept_of.cpu()
        means, stds, prompts = [], [], []
        for j in owner.tolist():
            mean, std = self.stats[j]
            i = int(torch.randint(0, mean.shape[0], (1,), generator=ctx.generator))
            means.append(mean[i])
            stds.append(std[i])
            prompts.append(self.prompts[j])
        mean, std = torch.stack(means), torch.stack(stds)                    # (b, c, h, w)
        z = mean + std * torch.randn(mean.shape, generator=ctx.generator).to(mean)
        latents = scale_latents(ctx.pipeline, z).to(ctx.latents)
        return self.weight * ctx.diffusion_loss(latents, encode(prompts))


def make_prior(pipeline: Any, concepts: ConceptData | Sequence[ConceptData],
               config: PriorConfigMixin) -> PriorPreservation | None:
    """The prior term of ``concepts`` (class prompt = ``config.class_prompt`` with each superclass), or None if
    ``config.with_prior_preservation`` is off. Call before the method edits the pipeline."""
    if not config.with_prior_preservation:
        return None
    concepts = [concepts] if isinstance(concepts, ConceptData) else list(concepts)
    return PriorPreservation(pipeline, [config.class_prompt.format(c.superclass) for c in concepts], config)


class ClassPromptSession(TrainingSession):
    """Session base of the methods prompted with ``"<identifier> <class>"`` (DreamBooth's "a photo of sks dog",
    LoRA, Custom Diffusion's "<new1> cat"): prompts encoded as the pipeline does, plus the optional prior term."""

    def __init__(self, pipeline: Any, prior: PriorPreservation | None):
        self.pipeline, self.prior = pipeline, prior

    def phrase_for(self, concept: ConceptData) -> str:
        return f"{concept.placeholder} {concept.superclass}"

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return encode_prompts(self.pipeline, prompts)                   # (b, n, d)

    def extra_loss(self, ctx: StepContext) -> torch.Tensor | None:
        return None if self.prior is None else self.prior.loss(ctx, self.encode, ctx.owners)
