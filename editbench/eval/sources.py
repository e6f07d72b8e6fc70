"""Where a suite's concepts come from: the toy world, DreamBench and CustomConcept101 folders, custom entries.

Every loader returns :class:`ConceptSpec` objects (reference images, optional masks, superclass word, prompts with
``{}`` for the concept phrase) and, where the source defines them, :class:`PairSpec` composition prompts (``{0}``,
``{1}``). Problems raise EditbenchError naming the file and the fix.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from editbench.errors import EditbenchError

__all__ = ["TOY_SPLITS", "TOY_TEST", "TOY_VALIDATION", "ConceptSpec", "PairSpec", "custom_concept",
           "customconcept101_concepts", "dreambench_concepts", "images_in", "toy_concepts", "toy_pair"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)


# ------------------------------------------------------------------------------------------------ concepts
@dataclass(frozen=True)
class ConceptSpec:
    """One concept of a suite: reference images (and optional masks), superclass word and prompts (``{}``)."""

    name: str
    superclass: str
    images: tuple[Path, ...]
    prompts: tuple[str, ...]
    masks: tuple[Path, ...] | None = None
    placeholder: str = ""
    source: str = "custom"
    templates: tuple[str, ...] | None = None   # training prompt templates (None: the library default)

    def identity(self) -> dict:
        """What a cached artifact or cell of this concept depends on: the images' and masks' contents (not their
        paths: the same suite in another checkout or on another machine reuses its results), the words and the
        training templates."""
        from editbench.fingerprint import files_fingerprint

        return {"name": self.name, "superclass": self.superclass, "placeholder": self.placeholder,
                "images": files_fingerprint(self.images), "masks": files_fingerprint(self.masks or ()),
                "templates": list(self.templates or ())}


@dataclass(frozen=True)
class PairSpec:
    """Two concepts and their composition prompts (``{0}``, ``{1}``)."""

    names: tuple[str, str]
    prompts: tuple[str, ...]


def _masks(folder: Path, n: int) -> tuple[Path, ...] | None:
    m = folder / "masks"
    found = images_in(m) if m.is_dir() else []
    return tuple(found) if len(found) == n else None


TOY_VALIDATION = ("sunny", "plus", "chess", "ember")
"""The toy world's validation concepts: tuning (``validation:`` of a suite, ``editbench tune``) uses only these."""
TOY_TEST = ("zebra", "target", "polka", "halo")
"""The toy world's test concepts: the ones to report after tuning (never tuned on)."""


def toy_concepts() -> tuple[dict[str, ConceptSpec], list[PairSpec]]:
    from editbench import toyworld
    from editbench.toyworld.benchmark import concept_pairs

    templates = getattr(toyworld, "TEMPLATES", None)
    cs = {c.name: ConceptSpec(c.name, c.superclass, tuple(c.images), tuple(c.prompts),
                              tuple(c.masks) if len(c.masks) == len(c.images) else None, c.placeholder, "toyworld",
                              tuple(templates) if templates else None)
          for c in toyworld.concepts()}
    pairs = [PairSpec((a.name, b.name), tuple(toyworld.pair_prompts(a, b))) for a, b in concept_pairs()]
    return cs, pairs


TOY_SPLITS = {"test": TOY_TEST, "validation": TOY_VALIDATION}
"""``{toyworld: test}`` / ``{toyworld: validation}`` in a suite's concept list name these splits."""


def toy_pair(names: tuple[str, str]) -> PairSpec:
    """Any two toy-world concepts with the toy world's composition prompts (the source's own pairs are only the
    neighbouring ones; a suite's explicit ``pairs:`` may name others, e.g. pairs of test concepts)."""
    from editbench import toyworld
    from editbench.toyworld.personal import PERSONAL_CONCEPTS

    by_name = {c.name: c for c in PERSONAL_CONCEPTS}
    return PairSpec(tuple(names), tuple(toyworld.pair_prompts(by_name[names[0]], by_name[names[1]])))


def _dreambench_prompts(text: str) -> tuple[dict[str, str], list[str], list[str]]:
    """Parse DreamBench's ``prompts_and_classes.txt``: classes, object prompts, live-subject prompts (``{}``)."""
    classes, objects, live, section = {}, [], [], None
    for line in text.splitlines():
        s = line.strip()
        low = s.lower()
        if low.startswith("object prompts"):
            section = objects
        elif low.startswith("live subject prompts"):
            section = live
        elif section is None and re.fullmatch(r"[\w-]+,[\w -]+", s) and low != "subject_name,class":
            k, v = s.split(",", 1)
            classes[k] = v.strip()
        elif section is not None:
            m = re.match(r"""['"](.*)['"]\.format\(""", s)
            if m:
                section.append(m.group(1).replace("{0} {1}", "{}"))
    return classes, objects, live


def dreambench_concepts(root: Path, names: Iterable[str] | None) -> dict[str, ConceptSpec]:
    if not root.is_dir():
        raise EditbenchError(f"DreamBench folder {root} not found; point 'dreambench:' at the folder holding one "
                             "sub-folder of images per subject")
    classes: dict[str, str] = {}
    objects: list[str] = []
    live: list[str] = []
    if (root / "concepts.csv").is_file():
        with open(root / "concepts.csv", newline="") as fh:
            classes = {r["concept"]: r["class"] for r in csv.DictReader(fh)}
    elif (root / "prompts_and_classes.txt").is_file():
        classes, objects, live = _dreambench_prompts((root / "prompts_and_classes.txt").read_text())
    else:
        raise EditbenchError(f"{root} has neither concepts.csv (concept,class) nor DreamBench's "
                             "prompts_and_classes.txt; add one so the superclass words are known")
    out = {}
    for name in (names if names is not None else sorted(classes)):
        if name not in classes:
            raise EditbenchError(f"DreamBench concept {name!r} is not listed in {root}; available: {sorted(classes)}")
        folder = root / name
        if not folder.is_dir() or not images_in(folder):
            raise EditbenchError(f"DreamBench concept {name!r}: no images in {folder}")
        pfile = root / f"prompts_{name}.txt"
        if pfile.is_file():
            prompts = [p for p in pfile.read_text().splitlines() if p.strip()]
        else:
            prompts = live if classes[name] in ("dog", "cat") else objects
        if not prompts:
            raise EditbenchError(f"DreamBench concept {name!r} has no prompts; add {pfile} (one prompt per line, "
                                 "{} for the concept)")
        images = images_in(folder)
        out[name] = ConceptSpec(name, classes[name].split()[-1], tuple(images), tuple(prompts),
                                _masks(folder, len(images)), f"<{name}>", "dreambench")
    return out


def _prompts_of(entry: dict, base: Path, key: str = "prompts") -> list[str]:
    if key in entry:
        return list(entry[key])
    if "prompt_filename" in entry:
        return [p for p in (base / entry["prompt_filename"]).read_text().splitlines() if p.strip()]
    return []


def customconcept101_concepts(path: Path, names: Iterable[str] | None) -> tuple[dict[str, ConceptSpec], list[PairSpec]]:
    if path.is_dir():
        found = [path / n for n in ("customconcept101.json", "dataset.json") if (path / n).is_file()]
        if not found:
            raise EditbenchError(f"{path} holds no customconcept101.json or dataset.json")
        path = found[0]
    if not path.is_file():
        raise EditbenchError(f"CustomConcept101 file {path} not found; point 'customconcept101:' at its JSON file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EditbenchError(f"{path} is not valid JSON ({err})") from None
    single, multi = (data.get("single", []), data.get("multi", [])) if isinstance(data, dict) else (data, [])
    base, out = path.parent, {}
    for e in single:
        try:
            folder = base / e["instance_data_dir"]
            name = e.get("name") or Path(e["instance_data_dir"]).name
            sup = e["class_prompt"].split()[-1]
        except (KeyError, TypeError, AttributeError):
            raise EditbenchError(f"{path}: each concept entry needs instance_data_dir and class_prompt, got "
                                 f"{e!r}") from None
        if names is not None and name not in names:
            continue
        images = images_in(folder) if folder.is_dir() else []
        if not images:
            raise EditbenchError(f"CustomConcept101 concept {name!r}: no images in {folder}")
        prompts = _prompts_of(e, base)
        if not prompts:
            raise EditbenchError(f"CustomConcept101 concept {name!r} has no prompts ('prompts' or 'prompt_filename')")
        out[name] = ConceptSpec(name, sup, tuple(images), tuple(prompts), _masks(folder, len(images)),
                                f"<{name}>", "customconcept101")
    missing = sorted(set(names or ()) - set(out))
    if missing:
        raise EditbenchError(f"concepts {missing} are not in {path}")
    pairs = [PairSpec(tuple(e["names"]), tuple(_prompts_of(e, base))) for e in multi
             if isinstance(e, dict) and len(e.get("names", ())) == 2]
    return out, pairs


def custom_concept(e: dict, base: Path) -> ConceptSpec:
    unknown = set(e) - {"name", "superclass", "images", "masks", "prompts", "placeholder", "templates"}
    if unknown or not {"name", "superclass", "images", "prompts"} <= set(e):
        raise EditbenchError(f"a custom concept needs name, superclass, images (folder or list), prompts (list or "
                             f"file) [, masks, placeholder, templates]; got keys {sorted(e)}")
    imgs = e["images"]
    folder = base / imgs if isinstance(imgs, str) else None
    images = images_in(folder) if folder is not None and folder.is_dir() else [base / p for p in
                                                                                  (imgs if folder is None else [])]
    if not images:
        raise EditbenchError(f"concept {e['name']!r}: no images found at {imgs!r}")
    prompts = e["prompts"]
    if isinstance(prompts, str):
        prompts = [p for p in (base / prompts).read_text().splitlines() if p.strip()]
    masks = e.get("masks")
    if isinstance(masks, str):
        masks = images_in(base / masks)
    return ConceptSpec(str(e["name"]), str(e["superclass"]), tuple(images), tuple(prompts),
                       tuple(base / m for m in masks) if masks else None,
                       str(e.get("placeholder") or f"<{e['name']}>"), "custom",
                       tuple(e["templates"]) if e.get("templates") else None)
