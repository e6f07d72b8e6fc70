"""Fingerprints of base-model weights: which model an artifact or cache entry belongs to.

A fingerprint is the first 16 hex digits of a SHA-256 over named tensors (name, dtype, shape and raw bytes, in
name order) and, optionally, a tokenizer's vocabulary (token -> id, added tokens included). It changes when any
covered weight changes by a single bit, and it does not depend on the device the weights live on. It does depend
on the dtype: a float16 copy of a float32 model has another fingerprint (its bytes differ).

Cost: one pass over the covered tensor bytes (about 1 s per GB on one core; tensors are never cached, so a weight
fingerprint cannot be stale); the vocabulary digest is cached per tokenizer object and vocabulary size.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["LENGTH", "files_fingerprint", "fingerprint", "folder_fingerprint", "module_tensors",
           "pipeline_fingerprint", "text_encoder_fingerprint", "update_with_tensor"]

LENGTH = 16
"""Hex digits kept (64 bits): collisions are not a concern for telling base models apart."""


def update_with_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    """Feed ``name``, dtype, shape and the raw bytes of ``tensor`` (any device, any dtype) into ``digest``."""
    t = tensor.detach()
    digest.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode())
    if t.numel():
        # view as bytes so that bfloat16 & co. hash without a numpy round trip; hashed through the buffer
        # protocol, without a bytes copy (a copy of every tensor doubled the memory and time of fingerprints)
        digest.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


_VOCAB_DIGESTS: dict[int, tuple[Any, int, int, bytes]] = {}


def _vocabulary_digest(tokenizer: Any) -> bytes:
    """SHA-256 of the vocabulary, cached per tokenizer object, backend object and vocabulary size.

    (A vocabulary can only grow through the tokenizer API, which changes the size; ``get_vocab`` of a 49k-word
    vocabulary costs up to a second on a busy CPU, hence the cache.)
    """
    key = id(tokenizer)
    state = (id(getattr(tokenizer, "_tokenizer", None)), len(tokenizer))
    hit = _VOCAB_DIGESTS.get(key)
    if hit is not None and hit[0]() is tokenizer and hit[1:3] == state:
        return hit[3]
    digest = hashlib.sha256(_vocabulary_bytes(tokenizer)).digest()
    try:
        _VOCAB_DIGESTS[key] = (weakref.ref(tokenizer), *state, digest)
    except TypeError:  # not weak-referenceable: do not cache
        pass
    return digest


def _vocabulary_bytes(tokenizer: Any) -> bytes:
    import numpy as np

    vocab = tokenizer.get_vocab()                                   # token -> id, added tokens included
    tokens = sorted(vocab, key=vocab.__getitem__)                   # by id
    ids = np.fromiter(map(vocab.__getitem__, tokens), dtype=np.int64, count=len(tokens))
    return "\n".join(tokens).encode() + b"|" + ids.tobytes()


def _hexdigest(header: bytes, named: Iterable[tuple[str, torch.Tensor]], tokenizer: Any, length: int) -> str:
    """Short hex SHA-256 of ``header``, the ``(name, tensor)`` pairs in the given order, and the vocabulary."""
    digest = hashlib.sha256(header)
    for name, t in named:
        update_with_tensor(digest, name, t)
    if tokenizer is not None:
        digest.update(b"vocab|" + _vocabulary_digest(tokenizer))
    return digest.hexdigest()[:length]


def fingerprint(tensors: Mapping[str, torch.Tensor], tokenizer: Any = None, *, length: int = LENGTH) -> str:
    """Short hex SHA-256 of ``tensors`` (sorted by name) and of ``tokenizer``'s vocabulary when given."""
    return _hexdigest(b"editbench-fingerprint/1|", ((n, tensors[n]) for n in sorted(tensors)), tokenizer, length)


def module_tensors(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """``{prefix + name: tensor}`` for every parameter and persistent buffer of ``module``."""
    return {prefix + name: t for name, t in module.state_dict(keep_vars=True).items()}


def text_encoder_fingerprint(text_encoder: torch.nn.Module, tokenizer: Any = None) -> str:
    """Fingerprint of a text encoder's weights (and of its tokenizer's vocabulary when given)."""
    return fingerprint(module_tensors(text_encoder, "text_encoder."), tokenizer)


PIPELINE_PARTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
"""The pipeline components :func:`pipeline_fingerprint` covers (those present): the denoiser and text encoder(s)."""


def pipeline_fingerprint(pipeline: Any, tokenizer: Any = None) -> str:
    """Fingerprint of a pipeline's denoiser and text encoder(s) (:data:`PIPELINE_PARTS`) and of ``tokenizer``'s
    vocabulary: which base model a tuning study or a run belongs to.

    Floating-point weights are hashed as float32 values, one tensor at a time, so a float16 checkpoint loaded in
    float16 on a GPU and in float32 on a CPU has one fingerprint (a bfloat16 load rounds, and differs)."""
    def named() -> Iterator[tuple[str, torch.Tensor]]:  # lazily: one float32 copy at a time
        for part in PIPELINE_PARTS:
            module = getattr(pipeline, part, None)
            if isinstance(module, torch.nn.Module):
                tensors = module_tensors(module, part + ".")
                for name in sorted(tensors):
                    t = tensors[name]
                    yield name, (t.float() if t.is_floating_point() else t)

    return _hexdigest(b"editbench-pipeline/1|", named(), tokenizer, LENGTH)


# ------------------------------------------------------------------------------------------ files on disk
def files_fingerprint(paths: Iterable[str | os.PathLike], root: str | os.PathLike | None = None) -> str:
    """Fingerprint of files' contents, in the given order: for each file its name (relative to ``root``; no name
    without a root, so the same images under another folder have the same fingerprint), size and bytes.
    A missing or unreadable file is an EditbenchError naming it. Cached per process on the files' paths, sizes and
    modification times (a suite asks for its concepts' fingerprints once per cell)."""
    from editbench.errors import EditbenchError

    paths = [Path(p) for p in paths]
    try:
        stats = tuple((str(p.resolve()), st.st_size, st.st_mtime_ns) for p in paths for st in (p.stat(),))
    except OSError as err:
        raise EditbenchError(f"cannot read {err.filename}: {err.strerror or err}") from None
    names = tuple(p.relative_to(root).as_posix() if root is not None else "" for p in paths)
    key = (stats, names)
    if key in _FILES_CACHE:
        return _FILES_CACHE[key]
    digest = hashlib.sha256(b"editbench-files/1|")
    for path, name in zip(paths, names):
        try:
            with open(path, "rb") as f:
                digest.update(f"{name}|{os.fstat(f.fileno()).st_size}|".encode())
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
        except OSError as err:
            raise EditbenchError(f"cannot read {path}: {err.strerror or err}") from None
    _FILES_CACHE[key] = digest.hexdigest()[:LENGTH]
    return _FILES_CACHE[key]


_FILES_CACHE: dict[tuple, str] = {}


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """:func:`files_fingerprint` of every file under ``folder`` (recursive, sorted, names relative to it; hidden
    files and folders such as ``.cache`` left out): the identity of a model folder's weights and configs (a
    diffusers folder of SDXL is ~7 GB, about 10 s to hash once per process)."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    return files_fingerprint(files, root)
