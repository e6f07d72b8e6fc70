"""A personalization concept: a few images of one subject, its placeholder word and its superclass word.

``ConceptData`` checks everything it can at construction (no images, unreadable or corrupt files, mask count or
size mismatch, templates without ``{}``), and the rest once a tokenizer is known (:meth:`ConceptData.check_tokens`:
the superclass must be exactly one token; a new placeholder must not already be a word of the vocabulary).
Every problem raises :class:`~editbench.errors.ConceptDataError` naming the item and the fix.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from editbench.errors import ConceptDataError
from editbench.safety import convert_image, open_image

__all__ = ["DEFAULT_TEMPLATES", "ConceptData", "ImageLike", "model_resolution", "vocabulary_id"]

ImageLike = Union[str, os.PathLike, "PIL.Image.Image", torch.Tensor]  # noqa: F821
"""A file path, a PIL image, or a float tensor ``(C, H, W)`` in [0, 1]."""

DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a photo of the small {}",
    "a photo of the large {}",
    "a photo of a nice {}",
)
"""Training prompt templates (textual inversion's object templates); ``{}`` is replaced by the concept phrase."""

_PLACEHOLDER = re.compile(r"^\S+$")


def model_resolution(pipeline: Any) -> int:
    """Pixel size a pipeline trains and samples at: ``unet.config.sample_size * vae_scale_factor``."""
    size = pipeline.unet.config.sample_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return int(size) * int(pipeline.vae_scale_factor)


def vocabulary_id(tokenizer: Any, word: str) -> int | None:
    """The id of ``word`` as a raw vocabulary entry (``"dog</w>"``, an added token, ...), or None."""
    i = tokenizer.convert_tokens_to_ids(word)
    return None if i is None or (i == tokenizer.unk_token_id and word != tokenizer.unk_token) else int(i)


def _describe(item: Any, i: int) -> str:
    return f"{i} ({item})" if isinstance(item, (str, os.PathLike)) else f"{i} ({type(item).__name__})"


def _open(item: Any, what: str, i: int, mode: str):
    """``item`` as a loaded PIL image in ``mode``; ConceptDataError if missing, unreadable or corrupt."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(item, Image.Image):
        return convert_image(item, mode)  # 16-bit images scaled to 8 bits, not clipped (editbench.safety)
    if isinstance(item, torch.Tensor):
        t = item.detach().float().cpu()
        if t.ndim != 3 or t.shape[0] not in (1, 3) or not torch.isfinite(t).all() or t.min() < 0 or t.max() > 1:
            raise ConceptDataError(f"{what} {i}: a tensor must be (C, H, W) with C in (1, 3) and values in [0, 1], "
                                   f"got shape {tuple(t.shape)}")
        t = t.expand(3, *t.shape[1:]) if mode == "RGB" else t[:1] if t.shape[0] == 1 else t.mean(0, keepdim=True)
        arr = (t * 255).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(arr[..., 0] if mode == "L" else arr, mode)
    if not isinstance(item, (str, os.PathLike)):
        raise ConceptDataError(f"{what} {i}: expected a file path, PIL image or tensor, got {type(item).__name__}")
    path = Path(item)
    if not path.is_file():
        raise ConceptDataError(f"{what} {_describe(item, i)} does not exist or is not a file; fix the path")
    try:  # size checked before decoding (decompression bombs); every byte decoded (truncated files fail)
        return open_image(path, mode)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise ConceptDataError(f"{what} {_describe(item, i)} is unreadable or corrupt ({err}); replace the "
                               "file") from None


def _square(img, size: int):
    """Center-crop ``img`` to a square and resize it to ``size`` x ``size`` (bicubic)."""
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((size, size), Image.Resampling.BICUBIC)


def _to_tensor(img) -> torch.Tensor:
    import numpy as np

    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # (H, W) or (H, W, C)
    arr = arr[..., None] if arr.ndim == 2 else arr
    return arr.permute(2, 0, 1).float() / 255.0                     # (C, H, W) in [0, 1]


@dataclass
class ConceptData:
    """Images of one concept plus the words used to prompt it.

    Args:
        placeholder: the word that stands for the concept in prompts (e.g. ``"<teddy>"``); one
            whitespace-free string.
        superclass: the concept's category word (e.g. ``"teddy"``); must be a single token of the tokenizer.
        images: file paths, PIL images or ``(C, H, W)`` tensors in [0, 1].
        masks: optional, one per image: where the concept is (white = concept). Losses are weighted by them.
        templates: prompt templates containing ``{}`` (default: :data:`DEFAULT_TEMPLATES`).
    """

    placeholder: str
    superclass: str
    images: Sequence[ImageLike]
    masks: Sequence[ImageLike] | None = None
    templates: Sequence[str] | None = None
    _sizes: list[tuple[int, int]] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("placeholder", "superclass"):
            word = getattr(self, name)
            if not isinstance(word, str) or not _PLACEHOLDER.match(word) or "{}" in word:
                raise ConceptDataError(f"{name} must be one non-empty word without spaces or '{{}}', got {word!r}")
        if self.placeholder.lower() == self.superclass.lower():
            raise ConceptDataError(f"placeholder and superclass are the same word ({self.placeholder!r}); pick a "
                                   "new placeholder such as '<my-teddy>'")
        if isinstance(self.images, (str, os.PathLike)) or not isinstance(self.images, Sequence):
            raise ConceptDataError("images must be a list of paths, PIL images or tensors (wrap a single path in "
                                   "a list)")
        if len(self.images) == 0:
            raise ConceptDataError("images is empty; a concept needs at least one image")
        self.images = list(self.images)
        self._sizes = [_open(img, "image", i, "RGB").size for i, img in enumerate(self.images)]
        if self.masks is not None:
            if isinstance(self.masks, (str, os.PathLike)) or not isinstance(self.masks, Sequence):
                raise ConceptDataError("masks must be a list (one mask per image) or None")
            self.masks = list(self.masks)
            if len(self.masks) != len(self.images):
                raise ConceptDataError(f"got {len(self.masks)} masks for {len(self.images)} images; pass exactly "
                                       "one mask per image (or masks=None)")
            for i, mask in enumerate(self.masks):
                size = _open(mask, "mask", i, "L").size
                if size != self._sizes[i]:
                    raise ConceptDataError(f"mask {i} is {size[0]}x{size[1]} px but image {i} is "
                                           f"{self._sizes[i][0]}x{self._sizes[i][1]} px; masks must match their "
                                           "image's size")
        templates = DEFAULT_TEMPLATES if self.templates is None else self.templates
        if isinstance(templates, str) or not templates:
            raise ConceptDataError("templates must be a non-empty list of strings containing '{}'")
        for t in templates:
            if not isinstance(t, str) or t.count("{}") != 1:
                raise ConceptDataError(f"template {t!r} must contain '{{}}' exactly once (where the concept goes)")
        self.templates = tuple(templates)

    def __len__(self) -> int:
        return len(self.images)

    def check_tokens(self, tokenizer: Any, *, new_placeholder: bool = True) -> None:
        """Check the words against ``tokenizer``.

        The superclass must be exactly one token. With ``new_placeholder`` (methods that add a token) the
        placeholder must not already be a single token of the vocabulary (a real word such as ``"dog"`` or
        ``"sks"``); without it (methods that reuse a rare word) the placeholder must be a single token.
        """
        def ids(word: str) -> list[int]:
            return list(tokenizer(word, add_special_tokens=False).input_ids)

        sup = ids(self.superclass)
        if len(sup) != 1:
            raise ConceptDataError(f"superclass {self.superclass!r} is {len(sup)} tokens for this tokenizer, it must "
                                   "be exactly one (e.g. 'teddy' instead of 'teddy bear')")
        ph = ids(self.placeholder)
        in_vocab = vocabulary_id(tokenizer, self.placeholder) is not None or len(ph) == 1
        if new_placeholder and in_vocab:
            raise ConceptDataError(f"placeholder {self.placeholder!r} is already a token of the vocabulary (a real "
                                   "word); this method adds a new token: pick an unused string such as '<my-teddy>'")
        if not new_placeholder and len(ph) != 1:
            raise ConceptDataError(f"placeholder {self.placeholder!r} is {len(ph)} tokens; this method reuses an "
                                   "existing rare token: pick a single-token word such as 'sks'")

    def prompts(self, phrase: str | None = None) -> list[str]:
        """Every template filled with ``phrase`` (default: the placeholder)."""
        return [t.format(self.placeholder if phrase is None else phrase) for t in self.templates]

    def load_images(self, size: int | Any) -> torch.Tensor:
        """Images center-cropped and resized to ``size`` px (an int, or a pipeline: its
        :func:`model_resolution`): float32 ``(n, 3, size, size)`` in [-1, 1]."""
        size = size if isinstance(size, int) else model_resolution(size)
        out = [_to_tensor(_square(_open(img, "image", i, "RGB"), size)) for i, img in enumerate(self.images)]
        return torch.stack(out) * 2 - 1

    def load_masks(self, size: int | Any) -> torch.Tensor | None:
        """Masks cropped and resized like the images: float32 ``(n, 1, size, size)`` in [0, 1], or None."""
        if self.masks is None:
            return None
        size = size if isinstance(size, int) else model_resolution(size)
        return torch.stack([_to_tensor(_square(_open(m, "mask", i, "L"), size)) for i, m in enumerate(self.masks)])
