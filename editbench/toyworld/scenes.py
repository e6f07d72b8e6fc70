"""The toy world's renderer: procedural scenes from a caption grammar, deterministic per seed.

A scene is one or two flat objects (a category, a body color, an optional pattern in a second color, a size
and a position) on a solid background. ``render(spec)`` draws it with 4x supersampling (anti-aliased edges)
and returns the image, the caption, the attributes and one mask per object.

Coordinates are normalised: x to the right, y downwards, both in [0, 1].
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from PIL import Image

from editbench.errors import EditbenchError

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 60),
    "blue": (35, 75, 215),
    "yellow": (240, 215, 40),
    "purple": (135, 55, 175),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLORS = tuple(PALETTE)

CATEGORIES = ("circle", "square", "triangle", "star", "heart", "ring", "cross", "diamond")

# phrase -> (x0, y0, x1, y1): the cell of a 3x3 grid the object's centre lies in
POSITIONS: dict[str, tuple[float, float, float, float]] = {
    "top left": (0.0, 0.0, 1 / 3, 1 / 3),
    "top": (1 / 3, 0.0, 2 / 3, 1 / 3),
    "top right": (2 / 3, 0.0, 1.0, 1 / 3),
    "left": (0.0, 1 / 3, 1 / 3, 2 / 3),
    "center": (1 / 3, 1 / 3, 2 / 3, 2 / 3),
    "right": (2 / 3, 1 / 3, 1.0, 2 / 3),
    "bottom left": (0.0, 2 / 3, 1 / 3, 1.0),
    "bottom": (1 / 3, 2 / 3, 2 / 3, 1.0),
    "bottom right": (2 / 3, 2 / 3, 1.0, 1.0),
}
# where an object in each cell is drawn (its centre), before a small jitter
_ANCHOR = {"left": 0.27, "center": 0.5, "right": 0.73}
_POS_PHRASE = {"center": "in the center", "left": "on the left", "right": "on the right"}

SIZES: dict[str, float] = {"small": 0.17, "medium": 0.22, "large": 0.28}  # radius as a fraction of the side

# The second-color patterns; base training draws all of them, never in a personal concept's exact appearance.
PATTERNS = ("stripes", "dots", "checker", "two-tone", "diagonal", "border", "bullseye", "center dot")
_PATTERN_PHRASE = {
    "stripes": "with {c} stripes",
    "dots": "with {c} dots",
    "checker": "with a {c} checker pattern",
    "two-tone": "with a {c} half",
    "diagonal": "with {c} diagonal stripes",
    "border": "with a {c} border",
    "bullseye": "with {c} rings inside",
    "center dot": "with a {c} center dot",
}


@dataclass(frozen=True)
class ObjectSpec:
    category: str
    color: str
    position: str = "center"
    size: str = "medium"
    pattern: str | None = None
    pattern_color: str | None = None
    jitter: tuple[float, float] = (0.0, 0.0)

    @property
    def appearance(self) -> tuple:
        return (self.category, self.color, self.pattern, self.pattern_color)


@dataclass(frozen=True)
class SceneSpec:
    objects: tuple[ObjectSpec, ...]
    background: str
    # which attributes the caption states (the others are still drawn, as in real captions)
    say_position: bool = True
    say_size: bool = True
    say_background: bool = True
    name: str | None = None  # a personal concept's placeholder replaces the object's description if set

    def caption(self, names: tuple[str | None, ...] | None = None) -> str:
        """The scene's caption. ``names[i]`` replaces the description of object ``i`` (e.g. ``"<zebra> heart"``)."""
        parts = []
        for i, obj in enumerate(self.objects):
            name = names[i] if names else None
            parts.append(describe(obj, say_position=self.say_position, say_size=self.say_size, name=name))
        text = " and ".join(parts)
        if self.say_background:
            text += f" on a {self.background} background"
        return text


@dataclass
class Rendered:
    image: Image.Image
    caption: str
    spec: SceneSpec
    masks: list[np.ndarray] = field(default_factory=list)  # one float mask in [0, 1] per object, (H, W)

    @property
    def attributes(self) -> dict:
        return asdict(self.spec)


def describe(obj: ObjectSpec, *, say_position=True, say_size=True, name: str | None = None) -> str:
    """``"a small red star with blue stripes on the left"`` (``name`` replaces ``"red star with ..."``)."""
    words = ["a"]
    if say_size and obj.size != "medium":
        words.append(obj.size)
    if name is not None:
        words.append(name)
    else:
        words += [obj.color, obj.category]
        if obj.pattern:
            words.append(_PATTERN_PHRASE[obj.pattern].format(c=obj.pattern_color))
    if say_position:
        words.append(position_phrase(obj.position))
    return " ".join(words)


def position_phrase(position: str) -> str:
    if position in _POS_PHRASE:
        return _POS_PHRASE[position]
    return f"at the {position}"


def _center(obj: ObjectSpec) -> tuple[float, float]:
    region = POSITIONS[obj.position]
    col = "left" if region[0] == 0.0 else "right" if region[2] == 1.0 else "center"
    row = "left" if region[1] == 0.0 else "right" if region[3] == 1.0 else "center"
    return _ANCHOR[col] + obj.jitter[0], _ANCHOR[row] + obj.jitter[1]


# ---------------------------------------------------------------------------------------------- geometry
def _shape_mask(category: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a unit shape; ``u, v`` are coordinates relative to the centre in units of the radius."""
    r = np.hypot(u, v)
    if category == "circle":
        return r <= 1.0
    if category == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if category == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if category == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if category == "cross":
        return ((np.abs(u) <= 0.32) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.32) & (np.abs(u) <= 0.95))
    if category == "triangle":  # upward, base at v = 0.75, apex at v = -0.95
        return (v <= 0.75) & (v >= -0.95) & (np.abs(u) <= (v + 0.95) / 1.7 * 1.0)
    if category == "star":  # five-pointed, inner radius 0.5
        ang = np.arctan2(u, -v) % (2 * np.pi / 5) - np.pi / 5
        # boundary between the outer tip (radius 1 at ang 0) and inner vertex (0.45 at ang +-pi/5)
        rb = _star_radius(np.abs(ang))
        return r <= rb
    if category == "heart":
        x, y = u * 0.95, -(v * 0.95) + 0.2
        return (x**2 + y**2 - 0.62) ** 3 - x**2 * y**3 <= 0
    raise ValueError(f"unknown category {category!r}")


def _star_radius(a: np.ndarray) -> np.ndarray:
    # Radius of the star's edge at angle a in [0, pi/5] from a tip: line from (1, 0) to 0.45 at pi/5 (polar).
    p1 = np.array([0.0, 1.0])
    p2 = np.array([0.5 * np.sin(np.pi / 5), 0.5 * np.cos(np.pi / 5)])
    d = p2 - p1
    # ray (sin a, cos a) * t intersects p1 + s d: solve for t
    sa, ca = np.sin(a), np.cos(a)
    den = sa * d[1] - ca * d[0]
    return (p1[0] * d[1] - p1[1] * d[0]) / den


# Pattern geometry in units of the object's radius: band width of the stripes (across v), of the diagonal stripes
# (across u + v), side of a checker cell, cell of the dot grid, width of a bullseye ring; a dot's and the center
# dot's radius. Coarse enough to survive the VAE's 2x downsampling at the small size (radius 5.4 px at 32 px).
PATTERN_PERIOD = {"stripes": 0.55, "diagonal": 0.6, "checker": 0.65, "dots": 1.0, "bullseye": 0.4}
_DOT_RADIUS, _CENTER_DOT_RADIUS = 0.32, 0.45


def _pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray, body: np.ndarray) -> np.ndarray:
    """Where the second color goes, within the unit shape."""
    w = PATTERN_PERIOD.get(pattern)
    if pattern == "stripes":
        return (np.floor((v + 2.0) / w) % 2) == 1
    if pattern == "dots":
        gu, gv = (u + 2.0) / w, (v + 2.0) / w
        return np.hypot(gu - np.floor(gu) - 0.5, gv - np.floor(gv) - 0.5) < _DOT_RADIUS
    if pattern == "checker":
        return ((np.floor((u + 2.0) / w) + np.floor((v + 2.0) / w)) % 2) == 1
    if pattern == "two-tone":
        return u > 0
    if pattern == "diagonal":
        return (np.floor((u + v + 4.0) / w) % 2) == 1
    if pattern == "border":
        return body & ~_shrink(body)
    if pattern == "bullseye":
        return (np.floor(np.hypot(u, v) / w) % 2) == 1
    if pattern == "center dot":
        return np.hypot(u, v) < _CENTER_DOT_RADIUS
    raise ValueError(f"unknown pattern {pattern!r}")


def _shrink(body: np.ndarray) -> np.ndarray:
    # Erode the supersampled mask by 5 samples in each direction: a border of 1.25 px at any size.
    out = body.copy()
    for dy, dx in ((0, 5), (0, -5), (5, 0), (-5, 0), (4, 4), (-4, -4), (4, -4), (-4, 4)):
        out &= np.roll(np.roll(body, dy, axis=0), dx, axis=1)
    return out


_SS = 4  # supersampling factor


def render(spec: SceneSpec, size: int = 32, *, caption_names: tuple[str | None, ...] | None = None) -> Rendered:
    """Draw ``spec`` at ``size`` x ``size`` pixels; later objects are drawn over earlier ones."""
    n = size * _SS
    coords = (np.arange(n) + 0.5) / n
    gx, gy = np.meshgrid(coords, coords)  # (n, n): x right, y down
    rgb = np.empty((n, n, 3), np.float32)
    rgb[:] = PALETTE[spec.background]
    masks = []
    for obj in spec.objects:
        cx, cy = _center(obj)
        rad = SIZES[obj.size]
        u, v = (gx - cx) / rad, (gy - cy) / rad
        body = _shape_mask(obj.category, u, v)
        rgb[body] = PALETTE[obj.color]
        if obj.pattern:
            sec = body & _pattern_mask(obj.pattern, u, v, body)
            rgb[sec] = PALETTE[obj.pattern_color]
        for m in masks:  # occlusion
            m &= ~body
        masks.append(body)
    img = rgb.reshape(size, _SS, size, _SS, 3).mean(axis=(1, 3))
    small_masks = [m.reshape(size, _SS, size, _SS).mean(axis=(1, 3)).astype(np.float32) for m in masks]
    image = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
    return Rendered(image=image, caption=spec.caption(caption_names), spec=spec, masks=small_masks)


# ------------------------------------------------------------------------------------------------ grammar
def _stable_hash(*parts) -> int:
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16)


def is_heldout_combo(category: str, color: str, background: str) -> bool:
    """1 in 10 (category, color, background) triples never appear in base training: held-out captions."""
    return _stable_hash("heldout", category, color, background) % 10 == 0


_TWO_OBJECT_PAIRS = (
    ("left", "right"), ("top", "bottom"), ("top left", "bottom right"), ("top right", "bottom left"),
    ("left", "top right"), ("right", "bottom left"), ("top", "bottom left"), ("bottom", "top right"),
)


def sample_object(rng: random.Random, *, position: str | None = None, size: str | None = None,
                  avoid_colors=(), pattern_prob: float = 0.3, patterns=PATTERNS) -> ObjectSpec:
    category = rng.choice(CATEGORIES)
    color = rng.choice([c for c in COLORS if c not in avoid_colors])
    pattern = pattern_color = None
    if patterns and rng.random() < pattern_prob:
        pattern = rng.choice(patterns)
        pattern_color = rng.choice([c for c in COLORS if c not in (color, *avoid_colors)])
    return ObjectSpec(
        category=category, color=color,
        position=position or rng.choice(tuple(POSITIONS)),
        size=size or rng.choice(tuple(SIZES)),
        pattern=pattern, pattern_color=pattern_color,
        jitter=(rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)),
    )


def sample_scene(rng: random.Random, *, split: str = "train", two_object_prob: float = 0.25,
                 pattern_prob: float = 0.3, patterns=PATTERNS, excluded=frozenset(),
                 unsaid_position: str | None = None) -> SceneSpec:
    """A random scene from the grammar.

    ``split="train"`` never yields a held-out (category, color, background) triple, ``"heldout"`` only yields
    those (for single objects), ``"any"`` ignores the split. ``excluded`` is a set of appearance tuples
    ``(category, color, pattern, pattern_color)`` that must never be drawn (the personal concepts').
    ``unsaid_position``: where a single object is placed when the caption does not say its position (as in
    photos, where an object nobody placed is centred); None places it anywhere. Every random draw is the same
    either way, so the two settings give the same scenes apart from that object's position.
    """
    if unsaid_position is not None and unsaid_position not in POSITIONS:
        raise EditbenchError(f"unsaid_position must be one of {sorted(POSITIONS)} or None, got {unsaid_position!r}")
    while True:
        background = rng.choice(COLORS)
        if rng.random() < two_object_prob:
            pa, pb = rng.choice(_TWO_OBJECT_PAIRS)
            if rng.random() < 0.5:
                pa, pb = pb, pa
            a = sample_object(rng, position=pa, size=rng.choice(("small", "medium")), avoid_colors=(background,),
                              pattern_prob=pattern_prob, patterns=patterns)
            b = sample_object(rng, position=pb, size=rng.choice(("small", "medium")),
                              avoid_colors=(background, a.color), pattern_prob=pattern_prob, patterns=patterns)
            objects = (a, b)
        else:
            objects = (sample_object(rng, avoid_colors=(background,), pattern_prob=pattern_prob,
                                     patterns=patterns),)
        if any(o.appearance in excluded for o in objects):
            continue
        held = [is_heldout_combo(o.category, o.color, background) for o in objects]
        if split == "train" and any(held):
            continue
        if split == "heldout" and not all(held):
            continue
        spec = SceneSpec(
            objects=objects, background=background,
            say_position=rng.random() < 0.85, say_size=rng.random() < 0.7, say_background=rng.random() < 0.9,
        )
        if unsaid_position is not None and not spec.say_position and len(objects) == 1:
            spec = replace(spec, objects=(replace(objects[0], position=unsaid_position),))
        return spec


def random_scene(seed: int, **kwargs) -> Rendered:
    """The scene of ``seed`` (deterministic), rendered at 32 px."""
    size = kwargs.pop("size", 32)
    return render(sample_scene(random.Random(seed), **kwargs), size)


def fully_specified(spec: SceneSpec) -> SceneSpec:
    return replace(spec, say_position=True, say_size=True, say_background=True)
