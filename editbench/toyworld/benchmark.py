"""The toy world's personal-concept benchmark data: reference images, masks, prompts, on-disk layouts.

``write_concept_data(root)`` renders every personal concept's reference images and masks and writes them in
two layouts real benchmarks use:

* DreamBench: ``dreambench/<concept>/NN.png`` + ``dreambench/concepts.csv`` (``concept,class``) and
  ``dreambench/prompts_<concept>.txt`` (one prompt per line, ``{}`` stands for the concept phrase);
* CustomConcept101-like: ``customconcept101.json`` with single-concept entries (``instance_data_dir``,
  ``class_prompt``, ``prompts``) and multi-concept pairs with composition prompts.

Masks are written beside the images as ``masks/NN.png``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from editbench.toyworld.personal import PERSONAL_CONCEPTS, PersonalConcept
from editbench.toyworld.scenes import COLORS, position_phrase, render

N_REFERENCE_IMAGES = 5


@dataclass(frozen=True)
class ConceptFiles:
    name: str
    placeholder: str
    superclass: str
    images: tuple[Path, ...]
    masks: tuple[Path, ...]
    prompts: tuple[str, ...]


def single_prompts(c: PersonalConcept) -> list[str]:
    """Prompts that change the background, position and size, and add a generic second object.

    ``{}`` stands for the concept phrase (a placeholder such as ``<zebra>``, or ``<new1> heart``, or, for
    text alignment, the superclass word).
    """
    new_bgs = [b for b in COLORS if b not in c.backgrounds and b not in (c.color, c.pattern_color)][:3]
    new_pos = [p for p in ("top left", "bottom right", "top", "right", "bottom left") if p not in c.positions][:3]
    other = [k for k in COLORS if k not in (c.color, c.pattern_color, new_bgs[0])][0]
    second = "square" if c.category != "square" else "circle"
    return [
        f"a {{}} on a {new_bgs[0]} background",
        f"a {{}} on a {new_bgs[1]} background",
        f"a {{}} {position_phrase(new_pos[0])} on a {c.backgrounds[0]} background",
        f"a {{}} {position_phrase(new_pos[1])} on a {new_bgs[2]} background",
        f"a small {{}} {position_phrase(new_pos[2])} on a {new_bgs[0]} background",
        f"a small {{}} in the center on a {c.backgrounds[0]} background",
        f"a {{}} on the left and a {other} {second} on the right on a {new_bgs[1]} background",
        f"a {{}} at the top and a {other} {second} at the bottom on a {new_bgs[2]} background",
    ]


def pair_prompts(a: PersonalConcept, b: PersonalConcept) -> list[str]:
    """Composition prompts for two concepts: ``{0}`` and ``{1}`` stand for their phrases."""
    bgs = [k for k in COLORS if k not in (a.color, a.pattern_color, b.color, b.pattern_color)]
    return [
        f"a {{0}} on the left and a {{1}} on the right on a {bgs[0]} background",
        f"a {{0}} at the top and a {{1}} at the bottom on a {bgs[-1]} background",
        f"a {{1}} on the left and a {{0}} on the right on a {bgs[0]} background",
    ]


def concept_pairs() -> list[tuple[PersonalConcept, PersonalConcept]]:
    """Pairs of concepts for multi-concept prompts: neighbours in the list (8 pairs)."""
    cs = PERSONAL_CONCEPTS
    return [(cs[i], cs[(i + 1) % len(cs)]) for i in range(len(cs))]


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_concept_data(root: str | Path) -> list[ConceptFiles]:
    """Render and write every personal concept (deterministic); returns what was written."""
    root = Path(root)
    out = []
    db = root / "dreambench"
    for c in PERSONAL_CONCEPTS:
        folder = db / c.name
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        images, masks = [], []
        for i, spec in enumerate(c.reference_specs(N_REFERENCE_IMAGES)):
            r = render(spec)
            ip, mp = folder / f"{i:02d}.png", folder / "masks" / f"{i:02d}.png"
            ip.write_bytes(_png_bytes(r.image))
            mp.write_bytes(_png_bytes(Image.fromarray((r.masks[0] * 255).round().astype(np.uint8), "L")))
            images.append(ip)
            masks.append(mp)
        prompts = single_prompts(c)
        (db / f"prompts_{c.name}.txt").write_text("\n".join(prompts) + "\n")
        out.append(ConceptFiles(c.name, c.placeholder, c.category, tuple(images), tuple(masks), tuple(prompts)))
    with open(db / "concepts.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["concept", "class"])
        w.writerows((c.name, c.category) for c in PERSONAL_CONCEPTS)
    single = [{"name": c.name, "instance_data_dir": f"dreambench/{c.name}", "class_prompt": c.category,
               "prompts": single_prompts(c)} for c in PERSONAL_CONCEPTS]
    multi = [{"names": [a.name, b.name], "class_prompts": [a.category, b.category], "prompts": pair_prompts(a, b)}
             for a, b in concept_pairs()]
    (root / "customconcept101.json").write_text(json.dumps({"single": single, "multi": multi}, indent=1))
    return out

