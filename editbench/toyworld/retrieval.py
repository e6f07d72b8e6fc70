"""The toy world's "retrieval": real class images of a category with their captions, for prior preservation.

Custom Diffusion regularizes with ~200 real images whose LAION captions are close to the category (diffusers'
``retrieve.py`` writes them as ``images/``, ``images.txt`` and ``caption.txt``, paired by line). The toy world's
equivalent of LAION is the base model's own training set: :func:`retrieve_specs` picks, in a seeded random order, the
base training scenes (:func:`editbench.toyworld.train.base_spec`, the scenes ``editbench world train`` trains on)
that show an object of the category, with their training captions. Those never show a personal concept's exact
appearance (base training excludes them) nor a held-out (category, color, background) triple.
:func:`write_retrieval` (and ``editbench world prior``) writes them in the retrieval layout, which
``class_data_dir`` of the prior-preserving methods reads (:mod:`editbench.methods.prior`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

from editbench.errors import EditbenchError
from editbench.storage import atomic_target
from editbench.toyworld import scenes as R
from editbench.toyworld.personal import EXCLUDED_APPEARANCES

__all__ = ["CAPTIONS", "IMAGE_DIR", "IMAGE_LIST", "RETRIEVAL_VERSION", "retrieval_key", "retrieve",
           "retrieve_specs", "write_retrieval"]

CAPTIONS, IMAGE_LIST, IMAGE_DIR = "caption.txt", "images.txt", "images"
RETRIEVAL_VERSION = 1  # bump when the selection or the rendering changes (cache keys include it)


def _world(cfg=None):
    from editbench.toyworld.train import WorldConfig

    return cfg or WorldConfig()


def retrieve_specs(category: str, n: int, *, seed: int = 0, cfg=None) -> list[R.SceneSpec]:
    """The specs of ``n`` base-training scenes showing a ``category`` object (alone or beside another object), in
    a seeded random order of the training set; deterministic per ``seed``.

    ``cfg``: the :class:`~editbench.toyworld.train.WorldConfig` of the base model (default: the committed world's).
    EditbenchError for an unknown category or more scenes than the training set holds."""
    from editbench.toyworld.train import base_spec

    cfg = _world(cfg)
    if category not in R.CATEGORIES:
        raise EditbenchError(f"the toy world has no category {category!r}; choose one of {list(R.CATEGORIES)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise EditbenchError(f"n must be a positive int, got {n!r}")
    order = list(range(cfg.n_scenes))
    random.Random(f"retrieval:{seed}:{category}").shuffle(order)
    out = []
    for i in order:
        spec = base_spec(cfg, i)
        if not any(o.category == category for o in spec.objects):
            continue
        if any(o.appearance in EXCLUDED_APPEARANCES for o in spec.objects):  # base_spec never yields one
            raise AssertionError(f"base scene {i} shows a personal concept's appearance")
        out.append(spec)
        if len(out) == n:
            return out
    raise EditbenchError(f"the toy world's {cfg.n_scenes} training scenes show only {len(out)} {category}s; ask "
                         f"for at most {len(out)}")


def retrieve(category: str, n: int, *, seed: int = 0, cfg=None) -> list[R.Rendered]:
    """:func:`retrieve_specs` rendered at the world's image size, each with its training caption."""
    cfg = _world(cfg)
    return [R.render(spec, cfg.image_size) for spec in retrieve_specs(category, n, seed=seed, cfg=cfg)]


def retrieval_key(category: str, n: int, seed: int = 0, cfg=None) -> str:
    """A short hash of everything that determines :func:`retrieve`'s output (cache folder names)."""
    spec = {"category": category, "n": n, "seed": seed, "version": RETRIEVAL_VERSION, "world": asdict(_world(cfg))}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def write_retrieval(out: str | os.PathLike, category: str, n: int, *, seed: int = 0, cfg=None) -> Path:
    """Write :func:`retrieve`'s scenes to ``out`` in diffusers' retrieval layout: ``images/000000.png`` ...,
    ``images.txt`` (one image path per line, relative to ``out``) and ``caption.txt`` (the caption of the image on
    the same line). Returns ``out``.

    The folder is built next to ``out`` and renamed into place when complete, so ``out`` is either absent or whole.
    ``out`` must not exist or be an empty folder (EditbenchError otherwise); if another process completes ``out``
    first, its folder is kept."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EditbenchError(f"{out} already exists and is not an empty folder; choose a new folder")
    scenes = retrieve(category, n, seed=seed, cfg=cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        (tmp / IMAGE_DIR).mkdir()
        names = []
        for k, scene in enumerate(scenes):
            name = f"{IMAGE_DIR}/{k:06d}.png"
            with atomic_target(tmp / name) as t:
                scene.image.save(t, format="PNG")
            names.append(name)
        with atomic_target(tmp / IMAGE_LIST) as t:
            t.write_text("".join(f"{x}\n" for x in names), encoding="utf-8")
        with atomic_target(tmp / CAPTIONS) as t:
            t.write_text("".join(f"{s.caption}\n" for s in scenes), encoding="utf-8")
        try:
            os.rename(tmp, out)  # atomic; replaces an empty folder, fails on a non-empty one
        except OSError:
            if not (out / CAPTIONS).is_file():
                raise
            # another process wrote the same folder first: keep it
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.suppress(OSError):  # make the rename durable (POSIX)
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return out
