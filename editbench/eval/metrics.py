"""Scores of generated images: CLIP text and image alignment, DINO image alignment, multi-concept composition,
and the cost of an artifact (storage, training time, peak memory).

Conventions (see ``docs/evaluation.md``; the scales of different papers are not comparable, never mix them):

* ``"cosine"``: raw cosine similarity (CLIP-T / CLIP-I of DreamBooth and textual inversion);
* ``"hessel"``: ``2.5 * max(cos, 0)`` per item (CLIPScore, Custom Diffusion's text alignment);
* ``"torchmetrics"``: ``100 * cos`` per item, clamped at 0 only after averaging (:func:`aggregate`).

Text alignment compares an image with its prompt where the concept phrase is replaced by the superclass word
(:func:`superclass_prompt`). Image alignment of a generated image is its mean (scaled) similarity to every
reference image, so the mean over images is the mean over all generated x reference pairs.

Embeddings are unit vectors in float64; all similarities are computed in float64.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from editbench.errors import EditbenchError

__all__ = [
    "SCALES",
    "ClipScorer",
    "DinoEncoder",
    "ImageEncoder",
    "aggregate",
    "artifact_stats",
    "check_scale",
    "composition_hits",
    "composition_score",
    "composition_threshold",
    "cosine_matrix",
    "fill_prompt",
    "image_alignment",
    "load_clip",
    "load_dino",
    "pair_alignment",
    "superclass_prompt",
    "text_alignment",
    "to_scale",
]

SCALES: tuple[str, ...] = ("cosine", "hessel", "torchmetrics")
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------------ scales
def check_scale(scale: str) -> str:
    """``scale`` if it is one of :data:`SCALES`, else EditbenchError."""
    if scale not in SCALES:
        raise EditbenchError(f"unknown score scale {scale!r}; choose one of {list(SCALES)}")
    return scale


def to_scale(cos: torch.Tensor, scale: str) -> torch.Tensor:
    """Per-item scores on ``scale`` from raw cosines (any shape, float64 out)."""
    cos = torch.as_tensor(cos, dtype=torch.float64)
    scale = check_scale(scale)
    if scale == "hessel":
        return 2.5 * cos.clamp_min(0)
    if scale == "torchmetrics":
        return 100.0 * cos
    return cos


def aggregate(values: Sequence[float] | torch.Tensor, scale: str) -> float:
    """Mean of per-item scores on ``scale`` (NaNs ignored); ``"torchmetrics"`` clamps at 0 after averaging."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    v = v[~torch.isnan(v)]
    if v.numel() == 0:
        return math.nan
    m = float(v.mean())
    return max(m, 0.0) if check_scale(scale) == "torchmetrics" else m


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``(n, m)`` of the rows of ``a`` ``(n, d)`` and ``b`` ``(m, d)``, in float64."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise EditbenchError(f"cosine_matrix needs (n, d) and (m, d) embeddings, got {tuple(a.shape)} and "
                             f"{tuple(b.shape)}")
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


def superclass_prompt(template: str, superclasses: str | Sequence[str]) -> str:
    """The text-alignment prompt: ``{}`` (one concept) or ``{0}``/``{1}`` (several) replaced by superclass words."""
    words = [superclasses] if isinstance(superclasses, str) else list(superclasses)
    return fill_prompt(template, words)


def fill_prompt(template: str, phrases: Sequence[str]) -> str:
    """``template`` with ``{}`` (one phrase) or ``{0}``, ``{1}``, ... replaced; other braces are left alone."""
    if len(phrases) == 1 and "{}" in template:
        return template.replace("{}", phrases[0])
    out = template
    for i, p in enumerate(phrases):
        if f"{{{i}}}" not in template:
            raise EditbenchError(f"prompt {template!r} has no '{{{i}}}' for concept {i}; multi-concept prompts "
                                 "use {0}, {1}, ... and single-concept prompts use {}")
        out = out.replace(f"{{{i}}}", p)
    return out


# ------------------------------------------------------------------------------------------------ encoders
class ImageEncoder(Protocol):
    name: str

    def encode_images(self, images: Sequence[Any]) -> torch.Tensor: ...


def _pil(image: Any):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise EditbenchError(f"image {path} does not exist; fix the path")
        with Image.open(path) as img:
            return img.convert("RGB")
    if isinstance(image, torch.Tensor) and image.ndim == 3:  # (C, H, W) in [0, 1]
        from torchvision.transforms.functional import to_pil_image

        return to_pil_image(image.detach().float().clamp(0, 1).cpu()).convert("RGB")
    raise EditbenchError(f"expected a PIL image, an image path or a (C, H, W) tensor, got {type(image).__name__}")


def _encode(fn: Callable[[torch.Tensor], torch.Tensor], items: list[torch.Tensor], batch_size: int,
            device: Any) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            out.append(fn(torch.stack(items[i:i + batch_size]).to(device)).double().cpu())
    emb = torch.cat(out)
    return emb / emb.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass
class ClipScorer:
    """An open_clip model with its preprocess and tokenizer; encodes images and texts to float64 unit vectors."""

    model: Any
    preprocess: Callable
    tokenizer: Callable
    name: str = "custom"
    device: Any = "cpu"
    batch_size: int = 64

    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        """``(n, d)`` unit image embeddings of PIL images, paths or ``(C, H, W)`` tensors in [0, 1]."""
        if len(images) == 0:
            raise EditbenchError("encode_images got no images")
        dtype = next(self.model.parameters()).dtype
        items = [self.preprocess(_pil(x)).to(dtype) for x in images]
        return _encode(self.model.encode_image, items, self.batch_size, self.device)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``(n, d)`` unit text embeddings."""
        if len(texts) == 0:
            raise EditbenchError("encode_texts got no texts")
        tokens = list(self.tokenizer(list(texts)))
        return _encode(self.model.encode_text, tokens, self.batch_size, self.device)


def _toy_evaluator(device: Any) -> ClipScorer:
    from editbench import toyworld

    model, preprocess, tokenizer = toyworld.evaluator(device=device)
    return ClipScorer(model, preprocess, tokenizer, name="toyworld-evaluator", device=device)


def load_clip(name_or_path: str | os.PathLike | None = None, device: Any = None, *,
              arch: str | None = None) -> ClipScorer:
    """An open_clip scorer, offline.

    * ``None``: the toy world's evaluator CLIP;
    * a folder holding ``open_clip_config.json`` (with ``model_cfg``) and the weights
      (``open_clip_model.safetensors`` / ``open_clip_pytorch_model.bin``): the open_clip hub layout;
    * a weights file (``.safetensors``, ``.bin``, ``.pt``) together with ``arch``, an open_clip model name such as
      ``"ViT-B-32"``;
    * ``"hf-hub:org/repo"``: only if it is already in the local Hugging Face cache.
    """
    device = device or "cpu"
    if name_or_path is None:
        return _toy_evaluator(device)
    import open_clip

    text = str(name_or_path)
    path = Path(text).expanduser()
    if text.startswith("hf-hub:"):
        model_name, pretrained = text, None
    elif path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            raise EditbenchError(f"CLIP folder {path} has no open_clip_config.json; give the folder of an open_clip "
                                 "hub-layout checkpoint, or a weights file together with arch='ViT-B-32' (say)")
        model_name, pretrained = f"local-dir:{path}", None
    elif path.is_file():
        if not arch:
            raise EditbenchError(f"CLIP weights file {path} needs its architecture: pass arch (an open_clip model "
                                 f"name, one of e.g. {open_clip.list_models()[:4]})")
        model_name, pretrained = arch, str(path)
    else:
        raise EditbenchError(f"CLIP checkpoint {text!r} not found; give a local open_clip folder or weights file "
                             "(no downloads), or leave it empty for the toy world's evaluator")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained,
                                                                     device=device)
        tokenizer = open_clip.get_tokenizer(model_name)
    except (RuntimeError, ValueError, OSError, KeyError) as err:
        raise EditbenchError(f"could not load CLIP {text!r} ({err}); check the path and the architecture") from None
    model.eval()
    return ClipScorer(model, preprocess, tokenizer, name=path.name if not text.startswith("hf-hub:") else text,
                      device=device)


@dataclass
class DinoEncoder:
    """A DINO ViT (transformers or timm) giving CLS embeddings as float64 unit vectors."""

    model: Any
    forward: Callable[[torch.Tensor], torch.Tensor]
    transform: Callable
    name: str = "dino"
    device: Any = "cpu"
    batch_size: int = 32

    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        if len(images) == 0:
            raise EditbenchError("encode_images got no images")
        dtype = next(self.model.parameters()).dtype
        items = [self.transform(_pil(x)).to(dtype) for x in images]
        return _encode(self.forward, items, self.batch_size, self.device)


def _image_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    from torchvision import transforms as T

    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(mean, std)])


def load_dino(path: str | os.PathLike | None, device: Any = None, *,
              arch: str = "vit_small_patch16_224") -> DinoEncoder | None:
    """A DINO image encoder from local weights, or None when ``path`` is None (DINO scores are then skipped).

    * a transformers folder (``config.json`` + weights, e.g. a copy of ``facebook/dino-vits16``): ``AutoModel``,
      CLS token of the last hidden state (after the final layer norm, as DINO's own forward returns it);
    * a weights file (``.pth``/``.bin``/``.safetensors``, e.g. ``dino_deitsmall16_pretrain.pth``): timm's ``arch``
      (default ViT-S/16) with no classifier head, loaded strictly.
    """
    if path is None:
        return None
    device = device or "cpu"
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise EditbenchError(f"DINO folder {path} has no config.json; give a transformers model folder or a "
                                 "timm weights file")
        from transformers import AutoModel

        try:
            model = AutoModel.from_pretrained(str(path), local_files_only=True, add_pooling_layer=False)
        except TypeError:
            model = AutoModel.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as err:
            raise EditbenchError(f"could not load DINO weights from {path} ({err})") from None
        size = getattr(model.config, "image_size", 224)
        size = size[0] if isinstance(size, (list, tuple)) else int(size)
        model = model.to(device).eval()
        return DinoEncoder(model, lambda x: model(pixel_values=x).last_hidden_state[:, 0],
                           _image_transform(size, _IMAGENET_MEAN, _IMAGENET_STD), name=path.name, device=device)
    if not path.is_file():
        raise EditbenchError(f"DINO weights {path} not found; give a local folder or file, or leave dino empty to "
                             "skip DINO scores")
    try:
        import timm
    except ImportError:
        raise EditbenchError("loading DINO from a weights file needs timm (pip install timm), or give a "
                             "transformers model folder instead") from None
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0)
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")}, strict=True)
    except (RuntimeError, KeyError) as err:
        raise EditbenchError(f"DINO weights {path} do not fit timm's {arch!r} ({str(err)[:300]}); pass the "
                             "matching arch") from None
    cfg = model.pretrained_cfg or {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    model = model.to(device).eval()
    return DinoEncoder(model, model, _image_transform(size, cfg.get("mean", _IMAGENET_MEAN),
                                                      cfg.get("std", _IMAGENET_STD)),
                       name=f"{arch}:{path.name}", device=device)


# ------------------------------------------------------------------------------------------------ scores
def text_alignment(clip: ClipScorer, images: Sequence[Any], texts: str | Sequence[str], *,
                   scale: str = "cosine") -> torch.Tensor:
    """Per-image text alignment ``(n,)`` on ``scale``: image ``i`` against ``texts[i]`` (or one text for all).

    Pass the prompts with the concept phrase replaced by the superclass word (:func:`superclass_prompt`).
    """
    check_scale(scale)
    texts = [texts] * len(images) if isinstance(texts, str) else list(texts)
    if len(texts) != len(images):
        raise EditbenchError(f"text_alignment got {len(images)} images but {len(texts)} texts; pass one text per "
                             "image or a single text")
    unique = sorted(set(texts))
    t = clip.encode_texts(unique)                                    # (u, d)
    idx = torch.tensor([unique.index(x) for x in texts])
    cos = (clip.encode_images(images) * t[idx]).sum(1)               # (n,)
    return to_scale(cos, scale)


def pair_alignment(generated: torch.Tensor, references: torch.Tensor, *, scale: str = "cosine") -> torch.Tensor:
    """Per-generated-image mean over references of the scaled cosine: ``(n,)`` from embeddings ``(n, d)``,
    ``(m, d)``. Its mean is the mean over all generated x reference pairs."""
    return to_scale(cosine_matrix(generated, references), scale).mean(1)


def image_alignment(encoder: ImageEncoder, images: Sequence[Any], references: Sequence[Any] | torch.Tensor, *,
                    scale: str = "cosine") -> torch.Tensor:
    """Per-image image alignment ``(n,)``: mean scaled cosine to every reference (images or embeddings)."""
    check_scale(scale)
    ref = references if isinstance(references, torch.Tensor) else encoder.encode_images(references)
    return pair_alignment(encoder.encode_images(images), ref, scale=scale)


def composition_threshold(references: torch.Tensor, *, quantile: float = 0.1, margin: float = 0.05) -> float:
    """Calibrated threshold for "this image shows the concept", from its reference embeddings ``(m, d)``.

    Each reference's leave-one-out image alignment (mean raw cosine to the other ``m - 1`` references) is the
    statistic a perfect generation would get; the threshold is their ``quantile`` minus ``margin``. NaN when
    there are fewer than 2 references (the composition score is then NaN).
    """
    if not 0 <= quantile <= 1:
        raise EditbenchError(f"composition quantile must be in [0, 1], got {quantile!r}")
    m = references.shape[0]
    if m < 2:
        return math.nan
    cos = cosine_matrix(references, references)
    loo = (cos.sum(1) - cos.diagonal()) / (m - 1)                    # (m,)
    return float(torch.quantile(loo, quantile)) - float(margin)


def composition_hits(alignments: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """``(n,)`` bool: image ``i`` shows every concept, i.e. ``alignments[i, k] >= thresholds[k]`` for all ``k``.

    ``alignments`` ``(n, k)`` are raw-cosine image alignments of each image against each concept's references.
    """
    a = torch.as_tensor(alignments, dtype=torch.float64)
    thr = torch.as_tensor(list(thresholds), dtype=torch.float64)
    if a.ndim != 2 or a.shape[1] != thr.numel():
        raise EditbenchError(f"composition needs alignments (n, k) and k thresholds, got {tuple(a.shape)} and "
                             f"{thr.numel()}")
    return (a >= thr).all(1)


def composition_score(alignments: torch.Tensor, thresholds: Sequence[float]) -> float:
    """Fraction of images in which every concept's image alignment reaches its threshold (NaN if undefined)."""
    if any(math.isnan(t) for t in thresholds):
        return math.nan
    return float(composition_hits(alignments, thresholds).double().mean())


# ------------------------------------------------------------------------------------------------ cost
def artifact_stats(artifact: Any) -> dict[str, Any]:
    """Storage bytes (on disk), training wall time, peak memory and steps of an artifact (or a saved path)."""
    if isinstance(artifact, (str, os.PathLike)):
        from editbench.methods.base import Artifact

        artifact = Artifact.load(artifact)
    training = artifact.metadata.get("training") or {}
    return {"storage_bytes": int(artifact.nbytes),
            "train_time_s": training.get("wall_time_s", math.nan),
            "peak_memory_bytes": training.get("peak_memory_bytes", math.nan),
            "memory_kind": training.get("memory_kind"),
            "train_steps": training.get("steps", math.nan)}
