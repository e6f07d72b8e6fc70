"""Generate ``captions.txt``: a generic English caption corpus for estimating text-feature second moments.

Written for editbench from hand-made word lists and templates (objects, animals, people, colors, materials,
scenes, styles); deterministic (fixed seed), no concept or placeholder words. Regenerate with

    python editbench/data/make_captions.py            # rewrites captions.txt next to this file
"""

from __future__ import annotations

import random
from pathlib import Path

N_CAPTIONS = 3000
SEED = 0

ANIMALS = (
    "dog", "cat", "horse", "cow", "sheep", "goat", "pig", "rabbit", "fox", "deer", "bear", "wolf", "lion", "tiger",
    "elephant", "giraffe", "zebra", "monkey", "owl", "eagle", "parrot", "duck", "swan", "chicken", "penguin", "frog",
    "turtle", "fish", "dolphin", "whale", "butterfly", "bee", "squirrel", "hedgehog", "raccoon",
)

THINGS = (
    "teddy bear", "backpack", "handbag", "suitcase", "umbrella", "hat", "sneaker", "boot", "pair of sunglasses",
    "watch",
    "necklace", "scarf", "jacket", "dress", "chair", "table", "sofa", "lamp", "bed", "bookshelf", "clock", "vase",
    "mug", "teapot", "cup", "bowl", "plate", "bottle", "candle", "mirror", "pillow", "rug", "car", "bicycle",
    "motorcycle", "bus", "train", "truck", "boat", "sailboat", "airplane", "tractor", "scooter", "skateboard",
    "guitar", "piano", "violin", "drum", "trumpet", "camera", "laptop", "phone", "television", "radio", "robot",
    "toy car", "wooden toy", "apple", "banana", "orange", "strawberry", "pizza", "burger", "sandwich", "cake",
    "cookie", "loaf of bread", "piece of cheese", "salad", "bowl of soup", "ice cream cone", "donut", "tree",
    "flower", "rose", "sunflower", "cactus", "mushroom", "pumpkin", "house", "castle", "bridge", "lighthouse",
    "tower", "church", "barn", "tent", "fountain", "statue", "mountain", "river", "lake", "waterfall", "box",
    "basket", "kite", "ball", "book", "key", "shoe", "glove",
)

OBJECTS = ANIMALS + THINGS

PEOPLE = ("man", "woman", "child", "old man", "old woman", "girl", "boy", "chef", "farmer", "musician",
          "painter", "firefighter", "astronaut", "dancer", "student", "doctor", "fisherman", "cyclist")

COLORS = ("red", "blue", "green", "yellow", "orange", "purple", "pink", "white", "black", "gray", "brown",
          "golden", "silver", "teal", "beige", "dark", "pale", "bright", "colorful", "striped")

MATERIALS = ("wooden", "metal", "glass", "plastic", "ceramic", "stone", "paper", "knitted", "leather",
             "marble", "porcelain", "rusty", "shiny", "fluffy", "velvet")

SIZES = ("small", "large", "tiny", "huge", "old", "new", "vintage", "modern", "broken", "cute", "tall", "round")

SCENES = ("on a beach", "in a forest", "in a city street", "on a wooden table", "in a kitchen", "in a garden",
          "on a snowy mountain", "in a desert", "in a living room", "at night", "in the rain", "under a bridge",
          "next to a river", "in a field of flowers", "on a rooftop", "in a library", "in a classroom",
          "on a boat", "in a park", "at sunset", "at sunrise", "in the fog", "in a market", "on the moon",
          "in a cave", "in a museum", "on a grassy hill", "near a lake", "in a small village", "in the snow",
          "inside a cafe", "on a train platform", "in an empty room", "on a windowsill", "under a tree",
          "in the jungle", "by the sea", "in a busy restaurant", "on a city bridge", "in front of a red wall")

STYLES = ("a photo of", "a painting of", "a watercolor painting of", "an oil painting of", "a sketch of",
          "a pencil drawing of", "a 3d render of", "a cartoon of", "an illustration of", "a close-up photo of",
          "a black and white photo of", "a blurry photo of", "a bright photo of", "a cropped photo of",
          "a digital painting of", "a pixel art image of", "an anime drawing of", "a studio photo of",
          "a vintage photograph of", "a low-poly model of", "a mosaic of", "an embroidery of",
          "a charcoal drawing of", "a poster of", "a picture of")

ACTIONS = ("sitting", "sleeping", "running", "standing", "jumping", "playing", "resting", "walking", "looking up",
           "lying down", "eating", "swimming")

ADVERBS = ("in the style of impressionism", "in the style of cubism", "in the style of pop art",
           "in the style of a children's book", "in the style of ukiyo-e", "in the style of art nouveau",
           "with dramatic lighting", "with soft lighting", "in high resolution", "with a shallow depth of field",
           "with a bokeh background", "with a minimalist composition", "in pastel colors", "in warm colors",
           "in cold colors", "at golden hour", "seen from above", "seen from the side", "in the distance",
           "reflected in a puddle")

TEMPLATES = (
    "{style} a {adj} {obj}",
    "{style} a {adj} {obj} {scene}",
    "{style} a {color} {obj} {scene}",
    "a {color} {obj} {scene}",
    "a {adj} {color} {obj}",
    "a {material} {obj} {scene}",
    "{style} a {material} {obj}",
    "two {objs} {scene}",
    "a group of {objs} {scene}",
    "a {animal} {action} {scene}",
    "a {adj} {animal} {action} {scene}",
    "a {person} with a {color} {obj}",
    "a {person} holding a {adj} {obj} {scene}",
    "a {person} {action} {scene}",
    "{style} a {person} {scene}",
    "a {obj} next to a {obj2}",
    "a {color} {obj} and a {color2} {obj2} {scene}",
    "a {obj} {scene}, {adverb}",
    "{style} a {obj} {adverb}",
    "{style} a {color} {obj}, {adverb}",
    "the {obj} is {color}",
    "a {obj} made of {material_noun}",
    "a {adj} {obj} on top of a {obj2}",
    "an empty street {scene}",
    "a landscape {scene}, {adverb}",
)

MATERIAL_NOUNS = ("wood", "glass", "stone", "paper", "clay", "metal", "ice", "gold", "yarn", "chocolate",
                  "lego bricks", "leaves", "sand")


def _article_fix(text: str) -> str:
    """'a apple' -> 'an apple'."""
    words = text.split(" ")
    for i, w in enumerate(words[:-1]):
        if w in ("a", "an"):
            words[i] = "an" if words[i + 1][:1] in "aeiou" else "a"
    return " ".join(words)


_IRREGULAR = {"sheep": "sheep", "fish": "fish", "deer": "deer", "wolf": "wolves", "scarf": "scarves"}


def _plural(noun: str) -> str:
    """English plural of the head noun ('pair of sunglasses' -> 'pairs of sunglasses', 'bus' -> 'buses')."""
    head, sep, rest = noun.partition(" of ")
    words = head.split(" ")
    w = words[-1]
    if w in _IRREGULAR:
        w = _IRREGULAR[w]
    elif w.endswith(("s", "sh", "ch", "x")):
        w += "es"
    elif w.endswith("y") and w[-2:-1] not in "aeiou":
        w = w[:-1] + "ies"
    else:
        w += "s"
    return " ".join(words[:-1] + [w]) + sep + rest


def generate(n: int = N_CAPTIONS, seed: int = SEED) -> list[str]:
    """``n`` distinct captions, deterministic for a given ``seed``."""
    rng = random.Random(seed)
    objects = list(OBJECTS)
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        obj, obj2 = rng.sample(objects, 2)
        color, color2 = rng.sample(COLORS, 2)
        caption = rng.choice(TEMPLATES).format(
            style=rng.choice(STYLES), adj=rng.choice(SIZES), obj=obj, objs=_plural(obj), animal=rng.choice(ANIMALS),
            obj2=obj2, color=color, color2=color2,
            scene=rng.choice(SCENES), material=rng.choice(MATERIALS), person=rng.choice(PEOPLE),
            action=rng.choice(ACTIONS), adverb=rng.choice(ADVERBS), material_noun=rng.choice(MATERIAL_NOUNS))
        caption = _article_fix(caption)
        if caption not in seen:
            seen.add(caption)
            out.append(caption)
    return out


def main() -> None:
    path = Path(__file__).with_name("captions.txt")
    path.write_text("\n".join(generate()) + "\n", encoding="utf-8")
    print(f"wrote {N_CAPTIONS} captions to {path}")


if __name__ == "__main__":
    main()
