"""A pixel-level checker of generated toy-world images against the scene they were asked for.

Built from the renderer's ground truth: every pixel is classified to its nearest palette color, the background
is the most common color on the image border, an object is the set of pixels of its asked-for colors, and its
category is the renderer's shape mask that best overlaps it (intersection over union) at its centroid and size.
``check`` returns one row of booleans per image; ``quality_gate`` aggregates them over many held-out captions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from editbench.toyworld import scenes as R

_PAL = np.array([R.PALETTE[c] for c in R.COLORS], np.float32)  # (k, 3)


def color_labels(img: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 -> (h, w) index of the nearest palette color."""
    d = ((img[:, :, None, :].astype(np.float32) - _PAL[None, None]) ** 2).sum(-1)  # (h, w, k)
    return d.argmin(-1)


def _border(lbl: np.ndarray) -> np.ndarray:
    return np.concatenate([lbl[0], lbl[-1], lbl[1:-1, 0], lbl[1:-1, -1]])


def _centroid_offsets() -> dict[tuple[str, str], tuple[float, float]]:
    """Offset of each (category, size) shape's pixel centroid from its nominal centre (normalised units)."""
    out = {}
    n = 256
    g = (np.arange(n) + 0.5) / n
    gx, gy = np.meshgrid(g, g)
    for cat in R.CATEGORIES:
        for sz, rad in R.SIZES.items():
            m = R._shape_mask(cat, (gx - 0.5) / rad, (gy - 0.5) / rad)
            out[cat, sz] = (gx[m].mean() - 0.5, gy[m].mean() - 0.5)
    return out


_OFFSETS: dict = {}


def _best_category(mask: np.ndarray) -> str:
    """The category whose shape, drawn at the mask's centroid in each size, overlaps the mask best (IoU)."""
    if not _OFFSETS:
        _OFFSETS.update(_centroid_offsets())
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
    gx, gy = np.meshgrid((np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h)
    best, best_iou = None, -1.0
    for (cat, sz), (ox, oy) in _OFFSETS.items():
        rad = R.SIZES[sz]
        tmpl = R._shape_mask(cat, (gx - (cx - ox)) / rad, (gy - (cy - oy)) / rad)
        iou = (tmpl & mask).sum() / max(1, (tmpl | mask).sum())
        if iou > best_iou:
            best, best_iou = cat, iou
    return best


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, lab, index=range(1, n + 1))
    return lab == (1 + int(np.argmax(sizes)))


def _cell(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
    for phrase, (x0, y0, x1, y1) in R.POSITIONS.items():
        if x0 <= cx < x1 and y0 <= cy < y1:
            return phrase
    return "center"


@dataclass
class Check:
    background: bool
    color: bool
    category: bool
    position: bool
    all_present: bool  # every asked-for object has at least 35% of its expected area in its color


def check(image, spec: R.SceneSpec) -> Check:
    img = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)
    size = img.shape[0]
    lbl = color_labels(img)
    bg = int(np.bincount(_border(lbl), minlength=len(R.COLORS)).argmax())
    bg_ok = R.COLORS[bg] == spec.background
    present = []
    first = spec.objects[0]
    for obj in spec.objects:
        colors = [R.COLORS.index(obj.color)] + ([R.COLORS.index(obj.pattern_color)] if obj.pattern else [])
        m = np.isin(lbl, colors) & (lbl != bg)
        expected = (R.SIZES[obj.size] * size) ** 2 * 2.0  # ~ area of a shape of that radius
        present.append(m.sum() >= 0.35 * expected)
    # the first object: its body color, category and position
    obj_mask = lbl != bg
    if len(spec.objects) > 1:  # keep only the first object's colors
        colors = [R.COLORS.index(first.color)] + ([R.COLORS.index(first.pattern_color)] if first.pattern else [])
        obj_mask &= np.isin(lbl, colors)
    if obj_mask.sum() < 4:
        return Check(bg_ok, False, False, False, all(present))
    counts = np.bincount(lbl[obj_mask], minlength=len(R.COLORS))
    order = np.argsort(counts)[::-1]
    top = [R.COLORS[i] for i in order[: 2 if first.pattern else 1]]
    # shape mask: pixels nearer to the object's dominant color(s) than to the background (keeps thin,
    # anti-aliased parts such as a small cross's arms)
    # coverage of each pixel by the object: its position on the segment from the nearest rival color
    # (background, other objects) to the nearest of the object's colors; > 0.5 means mostly covered
    px = img.astype(np.float32)
    rivals = np.stack([_PAL[bg]] + [np.array(R.PALETTE[o.color], np.float32) for o in spec.objects[1:]])
    mine = np.stack([np.array(R.PALETTE[c], np.float32) for c in top])
    a = mine[((px[:, :, None] - mine) ** 2).sum(-1).argmin(-1)]  # (h, w, 3)
    b = rivals[((px[:, :, None] - rivals) ** 2).sum(-1).argmin(-1)]
    alpha = ((px - b) * (a - b)).sum(-1) / np.maximum(((a - b) ** 2).sum(-1), 1e-6)
    shape = _largest_component(alpha > 0.5)  # stray anti-aliased pixels of other edges are dropped
    if shape.sum() < 4:
        return Check(bg_ok, first.color in top, False, False, all(present))
    return Check(
        background=bg_ok,
        color=first.color in top,
        category=_best_category(shape) == first.category,
        position=_cell(shape) == first.position,
        all_present=all(present),
    )


def heldout_specs(n: int, *, seed: int = 1234, two_object: bool = False) -> list[R.SceneSpec]:
    """``n`` fully specified scenes from the held-out (category, color, background) triples."""
    rng = random.Random(f"gate:{seed}:{two_object}")
    out = []
    while len(out) < n:
        spec = R.sample_scene(rng, split="heldout" if not two_object else "any",
                              two_object_prob=1.0 if two_object else 0.0, pattern_prob=0.0)
        out.append(R.fully_specified(spec))
    return out
