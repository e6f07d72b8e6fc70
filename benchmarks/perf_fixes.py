"""Before/after of the library fixes that are not measured by another benchmark kind: fingerprinting a base model
(hashing through the buffer protocol) and writing an artifact (no clone of every tensor). Fresh process per call."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from perf_common import (
    TEXT_WIDTH,
    WORK,
    PeakRSS,
    build_artifact,
    full_unet,
    geometry_pipeline,
    random_concept,
    resolution,
    text_encoder,
)


def _update_with_tensor_copying(digest: Any, name: str, tensor: torch.Tensor) -> None:
    """``editbench.fingerprint.update_with_tensor`` before the fix: hashed a ``bytes`` copy of every tensor."""
    t = tensor.detach()
    digest.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode())
    if t.numel():
        digest.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _write_safetensors_cloning(path, tensors, metadata):
    """``editbench.storage.write_safetensors`` before the fix: cloned every tensor before writing."""
    from safetensors.torch import save_file

    from editbench.storage import atomic_target

    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_target(path) as tmp:
        save_file(flat, str(tmp), metadata=dict(metadata))
    return Path(path)


def measure_fingerprint(variant: str = "after", geometry: str = "sd15") -> dict:
    """Time and peak RSS of fingerprinting a base model (text encoder + full-size UNet, what DreamBooth, LoRA,
    Custom Diffusion and textual inversion hash in every ``fit``/``apply``), with the current code ("after") or
    the copying one ("before"). Fresh process per call (:func:`perf_common.in_subprocess`)."""
    import hashlib

    from editbench import fingerprint as F

    update = F.update_with_tensor if variant == "after" else _update_with_tensor_copying
    tensors = {**F.module_tensors(text_encoder(TEXT_WIDTH[geometry]), "text_encoder."),
               **F.module_tensors(full_unet(geometry), "unet.")}

    def run() -> str:
        d = hashlib.sha256(b"editbench-fingerprint/1|")
        for name in sorted(tensors):
            update(d, name, tensors[name])
        return d.hexdigest()[:16]

    with PeakRSS() as mem:
        t = time.perf_counter()
        digest = run()
        secs = time.perf_counter() - t
    t = time.perf_counter()
    run()
    secs2 = time.perf_counter() - t
    nbytes = sum(v.numel() * v.element_size() for v in tensors.values())
    return {"variant": variant, "geometry": geometry, "bytes": nbytes, "seconds": min(secs, secs2),
            "peak_rss_delta": mem.delta, "digest": digest}


def measure_save(variant: str = "after", geometry: str = "sd15") -> dict:
    """Time and peak RSS of ``Artifact.save`` of a DreamBooth artifact (the whole UNet, float32) with the current
    writer ("after") or the cloning one ("before"); fresh process per call."""
    import hashlib

    import editbench.methods.base as B

    if variant == "before":
        B.write_safetensors = _write_safetensors_cloning
    pipe = geometry_pipeline(geometry)
    art = build_artifact("dreambooth", pipe, random_concept("sks", "dog", size=resolution(pipe)))
    path = WORK.parent / f"save-bench-{variant}-{os.getpid()}.safetensors"
    try:
        with PeakRSS() as mem:
            t = time.perf_counter()
            art.save(path)
            secs = time.perf_counter() - t
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
        size = path.stat().st_size
    finally:
        path.unlink(missing_ok=True)
    return {"variant": variant, "geometry": geometry, "seconds": secs, "peak_rss_delta": mem.delta,
            "file_bytes": size, "file_sha256": h.hexdigest()[:16]}
