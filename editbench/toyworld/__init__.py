"""The toy world: an offline, CPU-sized stand-in for SD 1.5 + CLIP + DreamBench (see docs/toyworld.md).

* ``model_path()``: a standard diffusers folder; ``StableDiffusionPipeline.from_pretrained(model_path())``.
* ``load_pipeline(device=None, dtype=None)``: that pipeline, ready to sample (progress bars off).
* ``evaluator()``: ``(model, preprocess, tokenizer)`` of the evaluator CLIP, as open_clip returns them.
* ``concepts()``: the personal concepts' reference images, masks and prompts.
* ``PALETTE``, ``CATEGORIES``, ``POSITIONS``: the renderer's vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from editbench.errors import EditbenchError
from editbench.toyworld.benchmark import ConceptFiles, pair_prompts, single_prompts, write_concept_data
from editbench.toyworld.personal import PERSONAL_CONCEPTS, PersonalConcept
from editbench.toyworld.scenes import (CATEGORIES, PALETTE, POSITIONS, ObjectSpec, SceneSpec, random_scene,
                                       render)

WEIGHTS = Path(__file__).parent / "weights"
DATA = Path(__file__).parent / "data"

__all__ = ["CATEGORIES", "PALETTE", "POSITIONS", "PERSONAL_CONCEPTS", "PersonalConcept", "SceneSpec", "ObjectSpec",
           "render", "random_scene", "model_path", "load_pipeline", "evaluator", "concepts", "ConceptFiles",
           "single_prompts", "pair_prompts", "write_concept_data", "concept_data", "TEMPLATES"]

# Training prompt templates for the toy concepts, in the base model's caption grammar (the references show the
# concept alone, mostly large and central, on a plain background).
TEMPLATES = ("a {}", "a large {}", "a {} in the center", "a large {} in the center")


def _require(path: Path) -> Path:
    if not path.exists():
        raise EditbenchError(f"the toy world's weights are missing at {path}; run `editbench world train --out "
                             f"{WEIGHTS}` (about 90 minutes on a 2-core CPU) or reinstall editbench")
    return path


def model_path() -> str:
    """The toy world's diffusers pipeline folder (works offline like a local SD 1.5 folder)."""
    return str(_require(WEIGHTS / "model"))


def load_pipeline(device=None, dtype=None, path=None):
    """The toy world's ``StableDiffusionPipeline`` on ``device`` (default CPU) in ``dtype`` (default float32);
    ``path``: another toy-world pipeline folder (e.g. a fresh ``editbench world train --out DIR``'s ``DIR/model``).

    The weights are stored in float16 to keep the repository small; they are loaded in float32 unless a
    ``dtype`` is given (float16 is for GPUs).
    """
    import torch
    from diffusers import StableDiffusionPipeline

    from editbench.models import dtype_kwargs
    from editbench.progress import quiet_loading

    if path is not None and not Path(path, "model_index.json").is_file():
        raise EditbenchError(f"{path} is not a diffusers pipeline folder (no model_index.json); give a toy-world "
                             "pipeline folder, e.g. OUT/model of `editbench world train --out OUT`")
    quiet_loading()
    pipe = StableDiffusionPipeline.from_pretrained(str(path or model_path()), **dtype_kwargs(dtype or torch.float32))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or "cpu")


def evaluator(device=None, path=None):
    """``(model, preprocess, tokenizer)`` of the toy world's evaluator CLIP, like
    ``open_clip.create_model_and_transforms`` + ``open_clip.get_tokenizer`` (``path``: another evaluator folder)."""
    import open_clip

    from editbench.toyworld.train import EVALUATOR_NAME, register_evaluator_config

    register_evaluator_config()
    weights = _require(Path(path or WEIGHTS / "evaluator") / "open_clip_model.safetensors")
    model, _, preprocess = open_clip.create_model_and_transforms(EVALUATOR_NAME, pretrained=str(weights),
                                                                 device=device or "cpu")
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(EVALUATOR_NAME)


def concepts() -> list[ConceptFiles]:
    """The personal concepts (name, placeholder, superclass, image and mask paths, prompts), from the data
    committed in ``editbench/toyworld/data`` (re-created by ``write_concept_data`` if missing)."""
    files = []
    for c in PERSONAL_CONCEPTS:
        folder = DATA / "dreambench" / c.name
        images = tuple(sorted(folder.glob("[0-9]*.png")))
        masks = tuple(sorted((folder / "masks").glob("*.png")))
        if not images:
            return write_concept_data(DATA)
        files.append(ConceptFiles(c.name, c.placeholder, c.category, images, masks, tuple(single_prompts(c))))
    return files


def concept_data(name: str, *, with_masks: bool = True):
    """The toy concept ``name`` as :class:`editbench.concepts.ConceptData` (placeholder ``<name>``)."""
    from editbench.concepts import ConceptData

    for f in concepts():
        if f.name == name:
            return ConceptData(f.placeholder, f.superclass, list(f.images),
                               masks=list(f.masks) if with_masks else None, templates=TEMPLATES)
    raise EditbenchError(f"unknown toy concept {name!r}; choose one of {[c.name for c in PERSONAL_CONCEPTS]}")
