"""A pixel-level reader of toy-world images, built from the renderer's ground truth (analysis by synthesis).

``parse(image)`` finds the background and every object, and for each object its category, body color, pattern,
pattern color, size and position:

1. every pixel is labelled with its nearest palette color; the background is the most common label on the border;
2. objects are the connected components of non-background pixels (fragments under ``min_area`` are dropped);
3. shape: the renderer's (category, size) silhouettes are drawn with its own 4x supersampling at a searched
   centre and compared with the component's soft coverage (how far each pixel is from the background color
   towards the nearest object color); the best fit gives category, size and centre, the centre gives the
   position cell;
4. surface: with that silhouette fixed, every pattern (and none) is drawn over every ordered pair of palette
   colors, periodic patterns at a few phases; the pair and pattern with the smallest RGB error win.

Why by hand: no library reads this renderer's scenes; the renderer's own mask functions are reused, so the
reader and the ground truth cannot drift apart. ``check(image, spec)`` is the quality gate's per-image check,
``match`` pairs asked-for objects with detected ones.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from editbench.toyworld import scenes as R

_PAL = np.array([R.PALETTE[c] for c in R.COLORS], np.float32)  # (k, 3)
_SS = R._SS  # the renderer's supersampling
# phase offsets (in radius units) tried for the periodic patterns, quarter periods for stripes, half cells for
# grids: a generated stripe need not sit exactly where the renderer puts it relative to the centre
_W = R.PATTERN_PERIOD
_PHASES = {"stripes": [(0.0, k * _W["stripes"] / 2) for k in range(4)],
           "diagonal": [(k * _W["diagonal"] / 2, 0.0) for k in range(4)],
           "dots": [(du, dv) for du in (0.0, _W["dots"] / 2) for dv in (0.0, _W["dots"] / 2)],
           "checker": [(du, dv) for du in (0.0, _W["checker"] / 2) for dv in (0.0, _W["checker"] / 2)]}
_NO_PATTERN_PENALTY = 0.02  # a pattern must explain the pixels better than a plain body by this share of the error


@dataclass
class Detected:
    """One object found in an image (coordinates normalised to [0, 1], x right, y down)."""

    category: str
    color: str
    pattern: str | None
    pattern_color: str | None
    size: str
    position: str
    center: tuple[float, float]
    area: int  # pixels of its connected component
    shape_fit: float  # soft IoU of the fitted silhouette with the component (1 = exact)

    @property
    def appearance(self) -> tuple:
        return (self.category, self.color, self.pattern, self.pattern_color)


@dataclass
class Parsed:
    background: str
    objects: list[Detected] = field(default_factory=list)


def color_labels(img: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 -> (h, w) index of the nearest palette color."""
    d = ((img[:, :, None, :].astype(np.float32) - _PAL[None, None]) ** 2).sum(-1)  # (h, w, k)
    return d.argmin(-1)


def _border(lbl: np.ndarray) -> np.ndarray:
    return np.concatenate([lbl[0], lbl[-1], lbl[1:-1, 0], lbl[1:-1, -1]])


def _coverage(img: np.ndarray, bg: int) -> np.ndarray:
    """(h, w) in [0, 1]: each pixel's position on the segment from the background color to the nearest other
    palette color (an anti-aliased edge pixel half-covered by the object reads 0.5)."""
    px = img.astype(np.float32)
    others = np.delete(_PAL, bg, axis=0)                                      # (k-1, 3)
    near = others[((px[:, :, None] - others) ** 2).sum(-1).argmin(-1)]       # (h, w, 3)
    b = _PAL[bg]
    t = ((px - b) * (near - b)).sum(-1) / np.maximum(((near - b) ** 2).sum(-1), 1e-6)
    return np.clip(t, 0.0, 1.0)


def _grid(size: int, y0: int, y1: int, x0: int, x1: int) -> tuple[np.ndarray, np.ndarray]:
    """Supersample coordinates of the pixel window [y0, y1) x [x0, x1), aligned with the renderer's grid."""
    n = size * _SS
    xs = (np.arange(x0 * _SS, x1 * _SS) + 0.5) / n
    ys = (np.arange(y0 * _SS, y1 * _SS) + 0.5) / n
    return np.meshgrid(xs, ys)


def _pool(m: np.ndarray) -> np.ndarray:
    h, w = m.shape[0] // _SS, m.shape[1] // _SS
    return m.reshape(h, _SS, w, _SS).mean(axis=(1, 3))


def _window(cx: float, cy: float, rad: float, size: int) -> tuple[int, int, int, int]:
    r = rad * size + 3
    return (max(0, int(np.floor(cy * size - r))), min(size, int(np.ceil(cy * size + r))),
            max(0, int(np.floor(cx * size - r))), min(size, int(np.ceil(cx * size + r))))


def _centroid_offsets() -> dict[tuple[str, str], tuple[float, float]]:
    """Offset of each (category, size) silhouette's area centroid from its nominal centre (normalised units)."""
    n = 256
    g = (np.arange(n) + 0.5) / n
    gx, gy = np.meshgrid(g, g)
    out = {}
    for cat in R.CATEGORIES:
        for sz, rad in R.SIZES.items():
            m = R._shape_mask(cat, (gx - 0.5) / rad, (gy - 0.5) / rad)
            out[cat, sz] = (gx[m].mean() - 0.5, gy[m].mean() - 0.5)
    return out


_OFFSETS: dict = {}


def _fit_shape(cov: np.ndarray, comp: np.ndarray) -> tuple[str, str, float, float, float]:
    """Best (category, size, cx, cy, soft IoU) for the component ``comp`` (bool (h, w)) of coverage ``cov``."""
    if not _OFFSETS:
        _OFFSETS.update(_centroid_offsets())
    size = cov.shape[0]
    target = np.where(ndimage.binary_dilation(comp, iterations=1), cov, 0.0)   # this object's coverage only
    wsum = target.sum()
    ys, xs = np.mgrid[0:size, 0:size]
    mx, my = ((xs + 0.5) * target).sum() / wsum / size, ((ys + 0.5) * target).sum() / wsum / size
    step = 0.5 / size

    def iou(cat, rad, px, py, gx, gy, t):
        m = _pool(R._shape_mask(cat, (gx - px) / rad, (gy - py) / rad).astype(np.float32))
        return float(np.minimum(m, t).sum() / max(np.maximum(m, t).sum(), 1e-6))

    # every silhouette at the centroid, then a coarse-to-fine search of the centre (3x3 at half a pixel, then at a
    # quarter pixel) for the three best
    coarse = []
    for (cat, sz), (ox, oy) in _OFFSETS.items():
        rad = R.SIZES[sz]
        cx, cy = mx - ox, my - oy
        win = _window(cx, cy, rad, size)
        gx, gy = _grid(size, *win)
        t = target[win[0]:win[1], win[2]:win[3]]
        coarse.append((iou(cat, rad, cx, cy, gx, gy, t), cat, sz, cx, cy, gx, gy, t))
    best = ("circle", "medium", mx, my, -1.0)
    for score, cat, sz, cx, cy, gx, gy, t in sorted(coarse, key=lambda c: -c[0])[:3]:
        rad = R.SIZES[sz]
        for s in (step, step / 2):
            ox, oy = cx, cy
            for px, py in [(ox + i * s, oy + j * s) for i in (-1, 0, 1) for j in (-1, 0, 1) if i or j]:
                sc = iou(cat, rad, px, py, gx, gy, t)
                if sc > score:
                    score, cx, cy = sc, px, py
        if score > best[4]:
            best = (cat, sz, cx, cy, score)
    return best


def _fit_surface(img: np.ndarray, bg: int, comp: np.ndarray, cat: str, sz: str, cx: float, cy: float,
                 others: np.ndarray) -> tuple[str, str | None, str | None]:
    """Body color, pattern and pattern color of the fitted silhouette (``others``: pixels of other objects)."""
    size = img.shape[0]
    rad = R.SIZES[sz]
    y0, y1, x0, x1 = _window(cx, cy, rad, size)
    gx, gy = _grid(size, y0, y1, x0, x1)
    u, v = (gx - cx) / rad, (gy - cy) / rad
    body = R._shape_mask(cat, u, v)
    bmap = _pool(body.astype(np.float32))                                      # (h', w') body coverage
    keep = ~others[y0:y1, x0:x1] & ((bmap > 0) | ndimage.binary_dilation(comp, iterations=1)[y0:y1, x0:x1])
    obs = img[y0:y1, x0:x1].astype(np.float32)[keep]                           # (p, 3)
    bgc = _PAL[bg]
    cols = [i for i in range(len(R.COLORS)) if i != bg]
    pairs = [(a, b) for a in cols for b in cols if a != b]
    ca = _PAL[[a for a, _ in pairs]][:, None, :]                               # (q, 1, 3)
    cb = _PAL[[b for _, b in pairs]][:, None, :]
    pmaps = [(pattern, _pool((body & R._pattern_mask(pattern, u + du, v + dv, body)).astype(np.float32)))
             for pattern in R.PATTERNS for du, dv in _PHASES.get(pattern, [(0.0, 0.0)])]
    bcov = bmap[keep][None, :, None]                                           # (1, p, 1)
    # no pattern: body color c -> prediction bg*(1-B) + c*B. (Templates blurred like generated images were tried
    # and read blurred renders worse: a blurred pair of wrong colors fits too; sharp templates read them at 0.96+.)
    pred = bgc * (1 - bcov) + _PAL[cols][:, None, :] * bcov                    # (k, p, 3)
    err = ((pred - obs[None]) ** 2).sum((1, 2))
    i = int(err.argmin())
    best_err, best = float(err[i]) * (1 - _NO_PATTERN_PENALTY), (R.COLORS[cols[i]], None, None)
    for pattern, pmap in pmaps:
        pcov = pmap[keep][None, :, None]                                       # (1, p, 1)
        pred = bgc * (1 - bcov) + ca * (bcov - pcov) + cb * pcov               # (q, p, 3)
        err = ((pred - obs[None]) ** 2).sum((1, 2))
        j = int(err.argmin())
        if err[j] < best_err:
            a, b = pairs[j]
            best_err, best = float(err[j]), (R.COLORS[a], pattern, R.COLORS[b])
    return best


def _cell(cx: float, cy: float) -> str:
    for phrase, (x0, y0, x1, y1) in R.POSITIONS.items():
        if x0 <= cx < x1 and y0 <= cy < y1:
            return phrase
    return "center"


def parse(image, *, min_area: int | None = None) -> Parsed:
    """Read an image of the toy world: background color and every object's attributes (see the module doc)."""
    img = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)
    size = img.shape[0]
    if min_area is None:  # a third of the smallest silhouette (a small star, ~30 px at 32 px)
        min_area = max(4, int(0.3 * 1.05 * (R.SIZES["small"] * size) ** 2))
    lbl = color_labels(img)
    bg = int(np.bincount(_border(lbl), minlength=len(R.COLORS)).argmax())
    cov = _coverage(img, bg)
    fg = cov > 0.5
    lab, n = ndimage.label(fg, structure=np.ones((3, 3)))
    comps = [lab == i for i in range(1, n + 1)]
    comps = [c for c in comps if c.sum() >= min_area]
    out = Parsed(R.COLORS[bg])
    for k, comp in enumerate(comps):
        others = np.zeros_like(comp)
        for j, c in enumerate(comps):
            if j != k:
                others |= ndimage.binary_dilation(c, iterations=1)
        others &= ~comp
        cat, sz, cx, cy, fit = _fit_shape(cov, comp)
        color, pattern, pcolor = _fit_surface(img, bg, comp, cat, sz, cx, cy, others)
        out.objects.append(Detected(cat, color, pattern, pcolor, sz, _cell(cx, cy), (float(cx), float(cy)),
                                    int(comp.sum()), fit))
    return out


# ------------------------------------------------------------------------------------------------- matching
IDENTITY = ("category", "color", "pattern", "pattern_color")
# Patterns that cover about half of the body: shifted by half a period with the two colors swapped they give the
# same picture (a white heart with black diagonal stripes is a black heart with white ones; a two-tone object is
# its mirror image), so which color is the "body" is not in the pixels and the pair is compared unordered.
SWAPPABLE = frozenset({"stripes", "diagonal", "checker", "two-tone"})


def identity_hits(asked, found) -> list[bool]:
    """Per identity attribute (category, color, pattern, pattern color): does ``found`` show what ``asked`` has?
    For the :data:`SWAPPABLE` patterns the two colors count as right when they are the asked pair in either order."""
    if found is None:
        return [False] * len(IDENTITY)
    hits = [getattr(asked, k) == getattr(found, k) for k in IDENTITY]
    if asked.pattern in SWAPPABLE and found.pattern == asked.pattern and not all(hits[1:]):
        if (found.color, found.pattern_color) == (asked.pattern_color, asked.color):
            hits[1] = hits[3] = True
    return hits


def match(asked: list, found: list[Detected]) -> list[int | None]:
    """For each asked-for object (anything with the identity attributes and a ``position``, None where not
    asked) the index of the detected object standing for it, or None: a minimum-cost assignment on the number of
    wrong identity attributes plus the distance to the asked position's cell."""
    if not asked or not found:
        return [None] * len(asked)
    cost = np.zeros((len(asked), len(found)))
    for i, a in enumerate(asked):
        for j, d in enumerate(found):
            cost[i, j] = len(IDENTITY) - sum(identity_hits(a, d))
            if getattr(a, "position", None) is not None:
                x0, y0, x1, y1 = R.POSITIONS[a.position]
                cost[i, j] += np.hypot(d.center[0] - (x0 + x1) / 2, d.center[1] - (y0 + y1) / 2)
    rows, cols = linear_sum_assignment(cost)
    out: list[int | None] = [None] * len(asked)
    for r, c in zip(rows, cols):
        out[r] = int(c)
    return out


# --------------------------------------------------------------------------------------------- quality gate
@dataclass
class Check:
    background: bool
    color: bool
    category: bool
    position: bool
    all_present: bool  # every asked-for object was found with its body color
    count: bool = True  # exactly as many objects as asked


def check(image, spec: R.SceneSpec) -> Check:
    """The quality gate's check of one image against the scene it was asked for (the first object's color,
    category and position; every object's presence; the object count)."""
    p = parse(image)
    idx = match(list(spec.objects), p.objects)
    present = [i is not None and p.objects[i].color == o.color for o, i in zip(spec.objects, idx)]
    first = p.objects[idx[0]] if idx[0] is not None else None
    return Check(
        background=p.background == spec.background,
        color=first is not None and first.color == spec.objects[0].color,
        category=first is not None and first.category == spec.objects[0].category,
        position=first is not None and first.position == spec.objects[0].position,
        all_present=all(present),
        count=len(p.objects) == len(spec.objects),
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
