"""Prior preservation, shared by DreamBooth, Custom Diffusion and LoRA: class images and the prior loss.

DreamBooth's recipe: generate class images with the *base* model from the class prompt ("a photo of a dog"),
then train on ``loss = instance loss + prior_loss_weight * prior loss``, the prior loss being the ordinary
diffusion loss on a batch of class images with the class prompt (one class image per instance image, as the
reference scripts concatenate them into one batch). Generation is the slow part, so the images are cached on
disk under a key made of everything that determines them (base weights, prompt, count, size, sampler settings).

Custom Diffusion's recipe regularizes with *real* images instead, each with its own caption (diffusers'
``--class_data_dir`` with ``--real_prior``). ``class_data_dir`` selects the source (:func:`class_data_folder`):
None generates; a folder is read by :func:`parse_class_folder` / :func:`load_class_folder`, either in the layout
of diffusers' retrieval output (``caption.txt`` + ``images.txt`` + ``images/``, paired by line) or as plain image
files prompted with the class prompt; ``"toyworld"`` is the toy world's retrieval
(:mod:`editbench.toyworld.retrieval`, rendered once into the cache folder); ``"auto"`` is the toy world's retrieval
where it applies and generated images elsewhere (``"none"``, as ``--set class_data_dir=none`` gives it: None). Each
class image is trained with its own caption. A training resumed from a checkpoint checks that the real class images
are still the ones it started with (:meth:`PriorPreservation.check_state_tensors`).

Shape legend: n images, b batch, c latent channels, h/w latent size, H/W pixel size.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from editbench.concepts import ConceptData, model_resolution
from editbench.errors import ClassDataError, EditbenchError, TrainingError
from editbench.fingerprint import fingerprint, module_tensors
from editbench.storage import atomic_target, cache_root
from editbench.training import StepContext, TrainingSession, encode_prompts

__all__ = ["AUTO", "IMAGE_SUFFIXES", "NONE", "TOYWORLD", "ClassFolder", "ClassPromptSession", "ClassSource",
           "PriorConfigMixin", "PriorPreservation", "class_data_folder", "class_images", "default_cache_dir",
           "class_data_key", "class_folder_path", "load_class_folder", "make_prior", "parse_class_folder",
           "resize_images"]

_MANIFEST = "manifest.json"
_FINGERPRINT_KEY = "prior/class_data_fingerprint/"  # + concept index: a checkpoint's session state
TOYWORLD, AUTO, NONE = "toyworld", "auto", "none"
"""``class_data_dir`` values naming a source instead of a folder (:func:`class_data_folder`); ``"none"`` (any case)
is read as None (generated class images)."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
"""The image files a plain class-image folder is read for."""
_TOY_MAX_RESOLUTION = 64  # the toy world's scenes are 32 px: "toyworld" refuses models working at a larger size


def default_cache_dir() -> Path:
    """``<cache_root>/class_images`` (:func:`editbench.storage.cache_root`)."""
    return cache_root() / "class_images"


@dataclass
class PriorConfigMixin:
    """Config fields of prior preservation (mixed into the configs of the methods that use it).

    ``class_prompt`` is a template: ``{}`` becomes the concept's superclass word. ``num_class_images`` class
    images per concept are generated at ``class_resolution`` px (None: the training resolution, i.e.
    ``TrainConfig.resolution`` or the model's own) and resized to the training resolution before encoding.

    ``class_data_dir`` takes real class images instead (:func:`class_data_folder`): a folder (``{}`` in the path
    becomes the superclass, for one folder per category) in diffusers' retrieval layout (each image with its own
    caption) or of plain images (all prompted with the class prompt), of which the first ``num_class_images`` are
    used; ``"toyworld"``: the toy world's retrieval of the category; ``"auto"``: ``"toyworld"`` where it applies
    (a toy-world category on a model of at most 64 px), generated images elsewhere; None (or ``"none"``, any case,
    read as None: what ``--set class_data_dir=none`` and a suite YAML ``none`` give; a folder of that name is
    ``"./none"``): generated images.
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
    class_data_dir: str | None = None

    def __post_init__(self) -> None:
        # "none" means no folder (generated class images): what ``--set class_data_dir=none`` and a suite YAML
        # ``class_data_dir: none`` give (YAML reads only null / ~ as None); a folder named "none" is "./none"
        d = self.class_data_dir
        if isinstance(d, str) and d.strip().lower() == NONE:
            self.class_data_dir = None

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
        d = self.class_data_dir
        if d is not None and (not isinstance(d, str) or not d.strip() or "\n" in d or "\x00" in d
                              or d.count("{}") > 1):
            raise EditbenchError(f"class_data_dir must be None (generate class images), {TOYWORLD!r}, {AUTO!r} or a "
                                 f"folder path ('{{}}' at most once: the superclass), got {d!r}")


def _cache_key(pipeline: Any, prompt: str, n: int, size: int, steps: int, guidance: float, seed: int) -> str:
    tensors = {**module_tensors(pipeline.unet, "unet."), **module_tensors(pipeline.text_encoder, "text_encoder."),
               **module_tensors(pipeline.vae, "vae.")}
    if getattr(pipeline, "text_encoder_2", None) is not None:  # SDXL: the second encoder shapes the images too
        tensors.update(module_tensors(pipeline.text_encoder_2, "text_encoder_2."))
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


# ------------------------------------------------------------------------------------ real class images
@dataclass(frozen=True)
class ClassFolder:
    """A parsed folder of real class images: ``images[i]`` is trained with ``captions[i]``.

    ``layout``: ``"retrieval"`` (diffusers' retrieval output: ``caption.txt`` + ``images.txt`` + ``images/``) or
    ``"plain"`` (the image files in the folder, all with the class prompt)."""

    folder: Path
    layout: str
    images: tuple[Path, ...]
    captions: tuple[str, ...]


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ClassDataError(f"{path} is not UTF-8 text ({err}); write one entry per line in UTF-8") from None
    except OSError as err:
        raise ClassDataError(f"{path} cannot be read ({err.strerror or err})") from None
    lines = [x.strip() for x in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    for k, line in enumerate(lines, 1):
        if not line:
            raise ClassDataError(f"{path} line {k} is empty; every line is one image's entry (they pair by line)")
    return lines


def _listed_image(folder: Path, line: str, k: int, listing: Path) -> Path:
    """Where line ``k`` of ``images.txt`` points: relative to the folder, as written (diffusers' ``retrieve.py``
    writes paths that start with the folder as it was given then), or ``images/<file name>`` of the folder."""
    p = Path(line)
    candidates = [p] if p.is_absolute() else [folder / p, p]
    candidates.append(folder / "images" / p.name)
    for c in candidates:
        if c.is_file():
            return c
    raise ClassDataError(f"{listing} line {k} lists image {line!r}, which does not exist (looked for "
                         f"{', '.join(str(c) for c in dict.fromkeys(candidates))}); fix the line or add the image")


def parse_class_folder(folder: str | os.PathLike, prompt: str) -> ClassFolder:
    """The images of a class-image folder and their captions (nothing decoded yet).

    With ``caption.txt`` and ``images.txt`` (diffusers' retrieval layout) the two files pair by line: line ``i``
    of ``images.txt`` is an image path and line ``i`` of ``caption.txt`` its caption. Otherwise the folder's image
    files (:data:`IMAGE_SUFFIXES`, by name) are the class images, each captioned ``prompt``. ClassDataError (naming
    the file) if the folder is missing or empty, only one of the two lists exists, their line counts differ, a
    line is empty or a listed image is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ClassDataError(f"class_data_dir {folder} does not exist or is not a folder; give a folder of class "
                             "images (caption.txt + images.txt + images/, or plain image files)")
    captions, listing = folder / "caption.txt", folder / "images.txt"
    if captions.exists() or listing.exists():
        missing = listing if captions.exists() else captions
        if not missing.is_file():
            present = captions if missing == listing else listing
            raise ClassDataError(f"{missing} is missing: a class-image folder with {present.name} needs both "
                                 "caption.txt and images.txt (one line per image, paired by line)")
        caps, lines = _lines(captions), _lines(listing)
        if len(caps) != len(lines):
            raise ClassDataError(f"{captions} has {len(caps)} captions but {listing} lists {len(lines)} images; "
                                 "they pair by line (line i of each is one image): give both one line per image")
        if not lines:
            raise ClassDataError(f"{listing} lists no images; class_data_dir {folder} is empty")
        images = tuple(_listed_image(folder, line, k, listing) for k, line in enumerate(lines, 1))
        return ClassFolder(folder, "retrieval", images, tuple(caps))
    images = tuple(sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
    if not images:
        hint = " (an images/ folder needs caption.txt and images.txt beside it)" if (folder / "images").is_dir() else ""
        raise ClassDataError(f"class_data_dir {folder} holds no images ({'/'.join(IMAGE_SUFFIXES)}) and no "
                             f"caption.txt + images.txt{hint}; add the class images")
    return ClassFolder(folder, "plain", images, (prompt,) * len(images))


def load_class_folder(data: ClassFolder, size: int, n: int | None = None) -> tuple[torch.Tensor, list[str], str]:
    """The first ``n`` (None: all) images of ``data`` center-cropped and resized to ``size`` px as concept images
    are: ``(images (k, 3, size, size) float32 in [-1, 1], captions (k,), fingerprint)``.

    The fingerprint (16 hex digits) hashes the layout and every used caption and image file's bytes: it changes
    when the folder's content does, not when it moves. ClassDataError naming the file for an unreadable or corrupt
    image."""
    from PIL import Image, UnidentifiedImageError

    from editbench.concepts import _square, _to_tensor
    from editbench.safety import open_image

    k = len(data.images) if n is None else min(n, len(data.images))
    h = hashlib.sha256(f"class-data:{data.layout}".encode())
    out = []
    for path, caption in zip(data.images[:k], data.captions[:k]):
        try:
            raw = path.read_bytes()
            img = open_image(io.BytesIO(raw), "RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError
                ) as err:
            raise ClassDataError(f"class image {path} is unreadable or corrupt ({err}); replace or remove it") from None
        h.update(json.dumps([caption, hashlib.sha256(raw).hexdigest()]).encode())
        out.append(_to_tensor(_square(img, size)))
    return torch.stack(out) * 2 - 1, list(data.captions[:k]), h.hexdigest()[:16]


@dataclass(frozen=True)
class ClassSource:
    """Where one concept's class images come from: ``kind`` ``"generated"`` (``folder`` None), ``"folder"`` or
    ``"toyworld"`` (``folder``: the cached retrieval of ``category``)."""

    kind: str
    folder: Path | None = None
    category: str | None = None


def class_folder_path(class_data_dir: str, superclass: str) -> Path:
    """The folder a ``class_data_dir`` that is neither ``"toyworld"`` nor ``"auto"`` names for ``superclass``:
    ``{}`` replaced by the superclass, ``~`` expanded."""
    return Path(os.path.expanduser(class_data_dir.replace("{}", superclass)))


def class_data_key(class_data_dir: str | None, superclass: str) -> str | None:
    """What a ``class_data_dir`` folder holds for ``superclass``, for cache keys (suite cells, artifacts): the
    fingerprint of its files' contents (names relative to the folder), so that other images under the same path give
    new cells and artifacts and the same images under another path share them; the absolute path if it is not a
    folder (yet); None for generated images and the toy world's retrieval, which follow from the config and model."""
    from editbench.fingerprint import files_fingerprint

    if class_data_dir is None or class_data_dir in (TOYWORLD, AUTO) or class_data_dir.lower() == NONE:
        return None
    folder = class_folder_path(class_data_dir, superclass)
    if not folder.is_dir():
        return str(folder.resolve())
    return files_fingerprint(sorted(f for f in folder.rglob("*") if f.is_file()), root=folder)


def class_data_folder(config: PriorConfigMixin, superclass: str, pipeline: Any) -> ClassSource:
    """The source of one concept's class images under ``config.class_data_dir``: generated, a folder (``{}`` in
    the path replaced by ``superclass``), or the toy world's retrieval of ``superclass`` (written on first use to
    ``class_cache_dir`` / :func:`default_cache_dir` under a key of the category, count, seed and world).
    ``"auto"`` is ``"toyworld"`` if ``superclass`` is a toy-world category and the model works at <= 64 px, else
    generated. ClassDataError if ``"toyworld"`` does not apply."""
    d = config.class_data_dir
    if d is None:
        return ClassSource("generated")
    if d not in (TOYWORLD, AUTO):
        return ClassSource("folder", class_folder_path(d, superclass))
    from editbench.toyworld.scenes import CATEGORIES

    res = model_resolution(pipeline)
    why = (f"the toy world has no category {superclass!r} (it has {', '.join(CATEGORIES)})"
           if superclass not in CATEGORIES else
           f"this model works at {res} px and the toy world's scenes are 32 px" if res > _TOY_MAX_RESOLUTION else None)
    if why is None:
        return ClassSource(TOYWORLD, _toyworld_folder(superclass, config), superclass)
    if d == AUTO:
        return ClassSource("generated")
    raise ClassDataError(f"class_data_dir={TOYWORLD!r} is the toy world's retrieval, but {why}; pass a folder of "
                         "real class images (e.g. diffusers' retrieve.py output: caption.txt, images.txt, images/) "
                         "or class_data_dir=None to generate them")


def _toyworld_folder(category: str, config: PriorConfigMixin, refresh: bool = False) -> Path:
    from editbench.toyworld.retrieval import CAPTIONS, retrieval_key, write_retrieval

    root = Path(config.class_cache_dir) if config.class_cache_dir is not None else default_cache_dir()
    n, seed = config.num_class_images, config.class_seed
    folder = root / f"toyworld-{category}-{retrieval_key(category, n, seed)}"
    if refresh and folder.exists():
        shutil.rmtree(folder)
    if not (folder / CAPTIONS).is_file():  # written whole or not at all (write_retrieval renames a finished folder)
        if folder.exists():
            shutil.rmtree(folder)  # not one of ours, or damaged: write it again
        write_retrieval(folder, category, n, seed=seed)
    return folder


class PriorPreservation:
    """The prior-preservation term of one or more concepts.

    Args:
        pipeline: the *unedited* base pipeline (class images are generated and VAE-encoded here, so build this
            before the method changes the pipeline).
        prompts: one class prompt per concept (e.g. ``["a photo of a dog"]``).
        config: a config with the :class:`PriorConfigMixin` fields.
        sources: per concept, the :class:`ClassSource` of :func:`class_data_folder` (default: generated images).

    ``captions[j][i]`` is the prompt class image ``i`` of concept ``j`` is trained with (its own caption for a
    retrieval folder, the class prompt otherwise); ``sources`` holds what :meth:`metadata` records.
    """

    def __init__(self, pipeline: Any, prompts: Sequence[str], config: PriorConfigMixin,
                 sources: Sequence[ClassSource] | None = None):
        from editbench.training.loop import encode_images  # the loop's own VAE encoding (posterior mean, std)

        self.prompts = list(prompts)
        self.weight = float(config.prior_loss_weight)
        self.pipeline = pipeline
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] = []  # per concept: (n, c, h, w) mean, std
        self.captions: list[list[str]] = []
        self.sources: list[dict] = []
        train_size = getattr(config, "resolution", None) or model_resolution(pipeline)
        size = config.class_resolution or train_size
        for j, p in enumerate(self.prompts):
            source = sources[j] if sources is not None else ClassSource("generated")
            if source.folder is None:
                imgs = class_images(pipeline, p, config.num_class_images, steps=config.class_inference_steps,
                                    guidance_scale=config.class_guidance_scale, seed=config.class_seed,
                                    cache_dir=config.class_cache_dir, size=size)
                imgs, caps = resize_images(imgs, train_size), [p] * imgs.shape[0]
                info = {"source": "generated", "images": len(caps), "prompt": p}
            else:
                imgs, caps, info = self._real(source, p, config, train_size)
            self.stats.append(encode_images(pipeline, imgs))
            self.captions.append(caps)
            self.sources.append(info)

    @staticmethod
    def _real(source: ClassSource, prompt: str, config: PriorConfigMixin, size: int
              ) -> tuple[torch.Tensor, list[str], dict]:
        try:
            data = parse_class_folder(source.folder, prompt)
            imgs, caps, fp = load_class_folder(data, size, config.num_class_images)
        except ClassDataError:
            if source.kind != TOYWORLD:
                raise
            # the cached retrieval was damaged from outside (editbench writes it whole): write it again
            data = parse_class_folder(_toyworld_folder(source.category, config, refresh=True), prompt)
            imgs, caps, fp = load_class_folder(data, size, config.num_class_images)
        info = {"source": source.kind, "layout": data.layout, "images": len(caps), "fingerprint": fp}
        if source.kind == TOYWORLD:
            info["category"] = source.category
        if source.kind == "folder":
            info["path"] = str(source.folder)
        return imgs, caps, info

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What a training checkpoint records of the class images: per concept with real ones (a folder or the toy
        world's retrieval), the fingerprint of the used captions and image bytes (16 hex digits as uint8)."""
        return {f"{_FINGERPRINT_KEY}{j}": torch.tensor(list(s["fingerprint"].encode("ascii")), dtype=torch.uint8)
                for j, s in enumerate(self.sources) if "fingerprint" in s}

    def check_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Check the fingerprints a checkpoint recorded (:meth:`state_tensors`, popped from ``tensors``) against the
        class images of this run: ClassDataError naming the folder and both fingerprints if a folder's content
        changed since the training started (the checkpoint is left as it is: restore the folder, or delete the
        checkpoint to start over). A checkpoint without them (written before they were recorded) is not checked."""
        for key in sorted(k for k in tensors if k.startswith(_FINGERPRINT_KEY)):
            t = tensors.pop(key)
            j = key[len(_FINGERPRINT_KEY):]
            try:
                saved = bytes(t.tolist()).decode("ascii") if t.dtype == torch.uint8 and t.dim() == 1 else None
            except UnicodeDecodeError:
                saved = None
            if not j.isdigit() or saved is None or len(saved) != 16 \
                    or any(c not in "0123456789abcdef" for c in saved):
                raise TrainingError(f"the checkpoint's class-image fingerprint {key!r} is damaged; delete the "
                                    "checkpoint to start over")
            source = self.sources[int(j)] if int(j) < len(self.sources) else {}
            now = source.get("fingerprint")
            if now == saved:
                continue
            where = (f"class_data_dir {source['path']}" if "path" in source else
                     f"the toy world's retrieval of {source['category']!r}" if "category" in source else
                     f"the class images of concept {j} ({source.get('source', 'none')})")
            raise ClassDataError(
                f"{where} changed since this training started: its class images had fingerprint {saved} when the "
                f"checkpoint was written and have {now if now is not None else 'none (generated images)'} now; the "
                "checkpoint is kept as it was: restore the folder's content to resume, or delete the checkpoint (or "
                "use another checkpoint_dir) to start over with the new images")

    def metadata(self) -> dict | list[dict]:
        """What the artifact records about the class images: per concept ``source`` (generated / folder /
        toyworld), ``images`` (count) and, for real images, ``layout`` and the folder's ``fingerprint``."""
        return self.sources[0] if len(self.sources) == 1 else list(self.sources)

    def loss(self, ctx: StepContext, encode: Callable[[list[str]], torch.Tensor],
             concept_of: torch.Tensor | None = None) -> torch.Tensor:
        """``weight *`` the diffusion loss on a batch of class images as large as the instance batch, each image
        prompted with its own caption.

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
            prompts.append(self.captions[j][i])
        mean, std = torch.stack(means), torch.stack(stds)                    # (b, c, h, w)
        z = mean + std * torch.randn(mean.shape, generator=ctx.generator).to(mean)
        latents = scale_latents(ctx.pipeline, z).to(ctx.latents)
        return self.weight * ctx.diffusion_loss(latents, encode(prompts))


def make_prior(pipeline: Any, concepts: ConceptData | Sequence[ConceptData],
               config: PriorConfigMixin) -> PriorPreservation | None:
    """The prior term of ``concepts`` (class prompt = ``config.class_prompt`` with each superclass; class images
    from ``config.class_data_dir``, :func:`class_data_folder`), or None if ``config.with_prior_preservation`` is
    off. Call before the method edits the pipeline."""
    if not config.with_prior_preservation:
        return None
    concepts = [concepts] if isinstance(concepts, ConceptData) else list(concepts)
    sources = [class_data_folder(config, c.superclass, pipeline) for c in concepts]
    return PriorPreservation(pipeline, [config.class_prompt.format(c.superclass) for c in concepts], config, sources)


class ClassPromptSession(TrainingSession):
    """Session base of the methods prompted with ``"<identifier> <class>"`` (DreamBooth's "a photo of sks dog",
    LoRA, Custom Diffusion's "<new1> cat"): prompts encoded as the pipeline does, plus the optional prior term
    (recorded in the artifact's metadata as ``prior``)."""

    def __init__(self, pipeline: Any, prior: PriorPreservation | None):
        self.pipeline, self.prior = pipeline, prior

    def phrase_for(self, concept: ConceptData) -> str:
        return f"{concept.placeholder} {concept.superclass}"

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return encode_prompts(self.pipeline, prompts)                   # (b, n, d)

    def extra_loss(self, ctx: StepContext) -> torch.Tensor | None:
        return None if self.prior is None else self.prior.loss(ctx, self.encode, ctx.owners)

    def artifact_metadata(self) -> dict:
        return {} if self.prior is None else {"prior": self.prior.metadata()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = super().state_tensors()
        if self.prior is not None:
            out.update(self.prior.state_tensors())
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        rest = dict(tensors)
        if self.prior is not None:
            self.prior.check_state_tensors(rest)  # a changed class-image folder: ClassDataError
        super().load_state_tensors(rest)
