"""Shared pieces of the method tests: a toy concept drawn with PIL, fast configs, snapshots, cached short fits.

Fits are cached per process (``trained``), so the table and the method-specific tests train each method once.
The tiny pipeline is deterministic (seeded weights), so every ``tiny_pipeline()`` has the same fingerprint.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from editbench import methods
from editbench.concepts import ConceptData
from editbench.methods.base import Artifact
from editbench.testing import tiny_pipeline

_TMP = Path(tempfile.mkdtemp(prefix="editbench-method-tests-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)
CLASS_CACHE = str(_TMP / "class_images")


def star_images(folder: Path, n: int = 4, size: int = 32, color=(240, 200, 30), bg=(40, 60, 160)) -> list[Path]:
    """``n`` PNG images of a five-pointed star on a plain background, slightly moved from image to image."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = Image.new("RGB", (size, size), bg)
        cx, cy, r = size / 2 + (i - 1.5), size / 2 - (i % 2), size * 0.38
        pts = [(cx + (r if k % 2 == 0 else r * 0.45) * math.cos(math.pi / 2 + k * math.pi / 5),
                cy - (r if k % 2 == 0 else r * 0.45) * math.sin(math.pi / 2 + k * math.pi / 5)) for k in range(10)]
        ImageDraw.Draw(img).polygon(pts, fill=color)
        paths.append(folder / f"star{i}.png")
        img.save(paths[-1])
    return paths


def concept_for(name: str, placeholder: str | None = None, superclass: str = "star", color=(240, 200, 30)
                ) -> ConceptData:
    """A toy concept for method ``name``: a new word ("<toy-star>") or, for rare-word methods, "sks"."""
    editor = methods.get(name)
    if placeholder is None:
        placeholder = "<toy-star>" if editor.new_token else "sks"
    folder = _TMP / f"{placeholder.strip('<>')}-{superclass}-{'-'.join(map(str, color))}"
    return ConceptData(placeholder, superclass, star_images(folder, color=color))


FAST = {"batch_size": 2, "num_class_images": 2, "class_inference_steps": 2, "class_cache_dir": CLASS_CACHE,
        "merge_captions": 200}


def editor(name: str, **overrides):
    """Method ``name`` with the test-speed settings its config has (batch 2, 2 class images, ...)."""
    cls = methods.get(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    return cls(**{k: v for k, v in {**FAST, **overrides}.items() if k in fields})


@functools.cache
def trained(name: str, steps: int = 2, seed: int = 0, placeholder: str | None = None, superclass: str = "star",
            color=(240, 200, 30), **overrides) -> Path:
    """Path of a saved artifact: ``steps`` steps of method ``name`` on the toy concept (cached per process)."""
    ed, pipe = editor(name, **overrides), tiny_pipeline()
    before = snapshot(pipe)
    art = ed.fit(pipe, concept_for(name, placeholder, superclass, color), steps=steps, seed=seed, progress=False)
    assert_same(before, snapshot(pipe))  # fit must leave the pipeline exactly as it was
    key = "-".join(str(x) for x in (name, steps, seed, placeholder, superclass, *color, *sorted(overrides.items())))
    return art.save(_TMP / "artifacts" / f"{abs(hash(key))}.safetensors")


def load(name: str, path: Path) -> Artifact:
    return methods.get(name)().load(path)


def generate(pipe, prompt: str, steps: int = 2, seed: int = 0, **kwargs) -> np.ndarray:
    """Images ``(1, H, W, 3)`` in [0, 1] for ``prompt`` (DDIM, ``steps`` steps, fixed seed)."""
    return pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                output_type="np", **kwargs).images


def snapshot(pipe) -> dict:
    """Everything undo must restore: every UNet/text-encoder tensor (by name), module types, tokenizer length."""
    return {"tensors": {f"{c}.{k}": v.detach().clone() for c in ("unet", "text_encoder")
                        for k, v in getattr(pipe, c).state_dict().items()},
            "tokenizer": len(pipe.tokenizer), "vocab": len(pipe.tokenizer.get_vocab()),
            "embedding": type(pipe.text_encoder.get_input_embeddings()),
            "modules": [(n, type(m)) for n, m in pipe.unet.named_modules()]}


def assert_same(before: dict, after: dict) -> None:
    assert after["tokenizer"] == before["tokenizer"] and after["vocab"] == before["vocab"]
    assert after["embedding"] is before["embedding"]
    assert after["modules"] == before["modules"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), f"{k} changed"


def other_shapes_pipeline():
    """A tiny SD pipeline with other widths (text 48, SD-2-style UNet): artifacts of the tiny SD-1 one do not fit."""
    from diffusers import StableDiffusionPipeline

    from editbench.testing import tiny_text_encoder, tiny_unet, tiny_vae

    base = tiny_pipeline()
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=tiny_text_encoder(48), tokenizer=base.tokenizer,
                                   unet=tiny_unet("sd21"), scheduler=base.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def denoising_loss(pipe, concept: ConceptData, phrase: str, seed: int = 0) -> float:
    """Deterministic diffusion loss of ``concept``'s images (first template, fixed noise, 8 spread timesteps)."""
    from diffusers import DDPMScheduler

    from editbench.training import encode_prompts
    from editbench.training.loop import encode_images, scale_latents

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    images = concept.load_images(pipe.unet.config.sample_size * pipe.vae_scale_factor)     # (n, 3, H, W)
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        mean, _ = encode_images(pipe, images)
        latents = scale_latents(pipe, mean)                                                # (n, c, h, w)
        cond = encode_prompts(pipe, [concept.templates[0].format(phrase)] * len(images))
        for t in torch.linspace(50, 950, 8).long():
            noise = torch.randn(latents.shape, generator=g)
            noisy = sched.add_noise(latents, noise, t.expand(len(images)))
            pred = pipe.unet(noisy, t, encoder_hidden_states=cond).sample
            total += float((pred - noise).pow(2).mean())
    return total / 8


def small_corpus_fixture(n: int):
    """A module-scoped autouse fixture: Perfusion's covariance corpus cut to its first ``n`` captions and cached in
    a temporary folder (the full corpus takes minutes); yields the captions."""
    import pytest

    from editbench import text_covariance as corpus

    @pytest.fixture(scope="module", autouse=True)
    def small_corpus(tmp_path_factory):
        captions = corpus.default_captions()[:n]
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("EDITBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
            mp.setattr(corpus, "default_captions", lambda: list(captions))
            yield captions

    return small_corpus
