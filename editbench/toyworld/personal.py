"""The toy world's personal concepts: objects of a known category with an appearance the base model never saw.

Each is an exact (category, body color, pattern, pattern color) that base training excludes, while every part of
it (the category, the colors, the pattern, the category with that pattern) is in base training: the base model
can draw the concept when it is described in words, as Stable Diffusion can, but its superclass word alone does
not give it. Their reference images deliberately cover few
backgrounds, positions and sizes, so that overfitting shows up as lost text alignment on prompts asking for
others: the trade-off the papers measure.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from editbench.toyworld.scenes import ObjectSpec, SceneSpec


@dataclass(frozen=True)
class PersonalConcept:
    name: str  # short name, also the placeholder "<name>"
    category: str  # the superclass word
    color: str
    pattern: str
    pattern_color: str
    backgrounds: tuple[str, ...]  # the few backgrounds its reference images show
    positions: tuple[str, ...] = ("center",)
    sizes: tuple[str, ...] = ("large",)

    @property
    def placeholder(self) -> str:
        return f"<{self.name}>"

    @property
    def appearance(self) -> tuple:
        return (self.category, self.color, self.pattern, self.pattern_color)

    def object(self, position: str = "center", size: str = "large", jitter=(0.0, 0.0)) -> ObjectSpec:
        return ObjectSpec(self.category, self.color, position, size, self.pattern, self.pattern_color, jitter)

    def reference_specs(self, n: int = 5, seed: int = 0) -> list[SceneSpec]:
        """The ``n`` reference scenes (deterministic): few backgrounds, positions and sizes."""
        rng = random.Random(f"{self.name}-{seed}")
        specs = []
        for i in range(n):
            obj = self.object(position=self.positions[i % len(self.positions)],
                              size=self.sizes[i % len(self.sizes)],
                              jitter=(rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)))
            specs.append(SceneSpec((obj,), self.backgrounds[i % len(self.backgrounds)], name=self.placeholder))
        return specs


PERSONAL_CONCEPTS: tuple[PersonalConcept, ...] = (
    PersonalConcept("zebra", "heart", "white", "diagonal", "black", ("yellow", "green")),
    PersonalConcept("sunny", "star", "yellow", "border", "orange", ("blue", "purple"), sizes=("large", "medium")),
    PersonalConcept("target", "circle", "red", "bullseye", "white", ("black", "green")),
    PersonalConcept("plus", "cross", "black", "center dot", "red", ("white", "yellow"), positions=("center", "left")),
    PersonalConcept("polka", "square", "purple", "dots", "yellow", ("white", "orange")),
    PersonalConcept("chess", "diamond", "green", "checker", "white", ("red", "black")),
    PersonalConcept("halo", "ring", "blue", "stripes", "orange", ("white", "yellow"), sizes=("large", "medium")),
    PersonalConcept("ember", "triangle", "orange", "two-tone", "red", ("blue", "white"), positions=("center", "right")),
)

EXCLUDED_APPEARANCES = frozenset(c.appearance for c in PERSONAL_CONCEPTS)
