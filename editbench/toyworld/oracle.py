"""Ground-truth scores of generated toy-world images: identity, prompt fidelity, object count, composition.

A suite prompt is a sentence of the renderer's caption grammar in which ``{}`` (or ``{0}``, ``{1}``) stands for a
personal concept. ``asked(template, concepts)`` reads what it asks: every object (the concepts with their exact
appearance, other objects with their category and color), and the background, positions and sizes it states.
``score(image, asked)`` reads the image with :func:`editbench.toyworld.checker.parse` and compares:

* ``identity_j``: the object standing for concept ``j`` has its category, body color, pattern and pattern color
  (1/0; for the half-and-half patterns the two colors in either order, ``checker.SWAPPABLE``);
  ``identity_frac_j``: the fraction of those four that are right (0 when no object stands for it);
* ``prompt_fidelity``: the fraction of what the prompt asks besides the concepts' appearance that the image shows
  (the background; each stated position and size; each other object's category and color);
  ``background_ok``: the asked background alone;
* ``count_ok``: as many objects as asked;
* ``composition_oracle`` (two concepts or more): every concept present with its identity, each where asked.

Objects are assigned to what was asked by a minimum-cost matching on the identity attributes and the asked
position (:func:`editbench.toyworld.checker.match`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from editbench.errors import EditbenchError
from editbench.toyworld import scenes as R
from editbench.toyworld.checker import Parsed, identity_hits, match, parse
from editbench.toyworld.personal import PERSONAL_CONCEPTS, PersonalConcept

__all__ = ["Asked", "AskedObject", "asked", "concept_by_name", "describe_concept", "score", "score_parsed"]


@dataclass(frozen=True)
class AskedObject:
    """One object a prompt asks for; ``None`` where the prompt leaves an attribute open."""

    category: str
    color: str | None
    pattern: str | None
    pattern_color: str | None
    position: str | None = None
    size: str | None = None
    concept: int | None = None  # index of the concept slot it stands for ({0}, {1}; {} is 0)


@dataclass(frozen=True)
class Asked:
    objects: tuple[AskedObject, ...]
    background: str | None

    @property
    def n_concepts(self) -> int:
        return sum(o.concept is not None for o in self.objects)


def concept_by_name(name: str) -> PersonalConcept:
    for c in PERSONAL_CONCEPTS:
        if c.name == name:
            return c
    raise EditbenchError(f"{name!r} is not a toy-world concept; toy concepts: {[c.name for c in PERSONAL_CONCEPTS]}")


def describe_concept(c: PersonalConcept, *, background: str | None = None, size: str | None = None) -> str:
    """The concept's full verbal description in the caption grammar, e.g. ``"a white heart with black diagonal
    stripes on a blue background"`` (what the base model is asked in the describability gate)."""
    obj = R.ObjectSpec(c.category, c.color, size=size or "medium", pattern=c.pattern, pattern_color=c.pattern_color)
    text = R.describe(obj, say_position=False, say_size=size is not None)
    return text + (f" on a {background} background" if background else "")


_COLOR = "|".join(R.COLORS)
_CAT = "|".join(R.CATEGORIES)
_PATTERN_RE = [(p, re.compile("^" + re.escape(ph).replace(re.escape("{c}"), f"(?P<pc>{_COLOR})") + r"\b"))
               for p, ph in R._PATTERN_PHRASE.items()]
_POSITION_RE = {R.position_phrase(p): p for p in R.POSITIONS}
_SLOT = re.compile(r"^\{(\d*)\}")


def _object(phrase: str, slot_default: int) -> AskedObject:
    words = phrase.strip()
    if not words.startswith("a "):
        raise EditbenchError(f"cannot read the object phrase {phrase!r} (the toy grammar: 'a [size] <object> "
                             "[position]')")
    rest = words[2:]
    size = None
    for s in R.SIZES:
        if rest.startswith(s + " "):
            size, rest = s, rest[len(s) + 1:]
    position = None
    for ph, pos in sorted(_POSITION_RE.items(), key=lambda kv: -len(kv[0])):
        if rest.endswith(" " + ph):
            position, rest = pos, rest[: -len(ph) - 1]
            break
    m = _SLOT.match(rest)
    if m:
        if rest[m.end():].strip() not in ("",) + R.CATEGORIES:  # "<new1> heart": the superclass may follow
            raise EditbenchError(f"cannot read the concept phrase in {phrase!r}")
        slot = int(m.group(1)) if m.group(1) else slot_default
        return AskedObject("", None, None, None, position, size, concept=slot)
    m = re.match(rf"^(?P<color>{_COLOR}) (?P<cat>{_CAT})\b", rest)
    if not m:
        raise EditbenchError(f"cannot read the object {rest!r} in {phrase!r}: expected '<color> <category>'")
    tail = rest[m.end():].strip()
    pattern = pcolor = None
    if tail:
        for p, rx in _PATTERN_RE:
            pm = rx.match(tail)
            if pm:
                pattern, pcolor = p, pm.group("pc")
                break
        else:
            raise EditbenchError(f"cannot read the pattern {tail!r} in {phrase!r}")
    return AskedObject(m.group("cat"), m.group("color"), pattern, pcolor, position, size)


def asked(template: str, concepts: list[PersonalConcept]) -> Asked:
    """What ``template`` asks, its concept slots filled with ``concepts``' appearances (EditbenchError if the
    template is not in the toy grammar)."""
    text = template.strip()
    background = None
    m = re.search(rf" on an? (?P<bg>{_COLOR}) background$", text)
    if m:
        background, text = m.group("bg"), text[: m.start()]
    objs = []
    for i, phrase in enumerate(text.split(" and ")):
        o = _object(phrase, slot_default=0)
        if o.concept is not None:
            if o.concept >= len(concepts):
                raise EditbenchError(f"prompt {template!r} has slot {{{o.concept}}} but {len(concepts)} concept(s)")
            c = concepts[o.concept]
            o = AskedObject(c.category, c.color, c.pattern, c.pattern_color, o.position, o.size, o.concept)
        objs.append(o)
    return Asked(tuple(objs), background)


def score(image, what: Asked) -> dict:
    """The ground-truth scores of one image (see the module doc)."""
    return score_parsed(parse(image), what)


def score_parsed(p: Parsed, what: Asked) -> dict:
    idx = match(list(what.objects), p.objects)
    out: dict = {"count_ok": float(len(p.objects) == len(what.objects)),
                 "background_ok": float(what.background is None or p.background == what.background)}
    asks, placed = [], []
    if what.background is not None:
        asks.append(p.background == what.background)
    for o, i in zip(what.objects, idx):
        d = p.objects[i] if i is not None else None
        if o.concept is not None:
            right = identity_hits(o, d)
            out[f"identity_{o.concept}"] = float(all(right))
            out[f"identity_frac_{o.concept}"] = sum(right) / len(right)
        else:
            asks += [d is not None and d.category == o.category, d is not None and d.color == o.color]
        for k in ("position", "size"):
            if getattr(o, k) is not None:
                ok = d is not None and getattr(d, k) == getattr(o, k)
                asks.append(ok)
                if o.concept is not None and k == "position":
                    placed.append(ok)
    n = what.n_concepts
    out["identity"] = sum(out[f"identity_{j}"] for j in range(n)) / n if n else float("nan")
    out["identity_frac"] = sum(out[f"identity_frac_{j}"] for j in range(n)) / n if n else float("nan")
    out["prompt_fidelity"] = sum(asks) / len(asks) if asks else float("nan")
    if n > 1:
        out["composition_oracle"] = float(all(out[f"identity_{j}"] for j in range(n)) and all(placed))
    return out
