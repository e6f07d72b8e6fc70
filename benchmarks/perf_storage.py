"""Storage per concept: the artifact file of every registered method on full-size SD 1.5 / SD 2.1 / SDXL geometry,
built by the methods' own artifact builders (``Editor.shaped_artifact``) and measured on disk."""

from __future__ import annotations

import collections
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from perf_common import (
    METHODS,
    TEXT_WIDTH,
    WORK,
    build_artifact,
    geometry_pipeline,
    placeholder_for,
    random_concept,
    resolution,
)

STORAGE_NOTES = {  # what the artifact holds, for the storage table; by registry name (see storage_note)
    "perfusion": "embedding + i* + o*_V per layer (o*_K recomputed from the superclass; C cached per base model)",
    "custom_diffusion": "full K/V deltas of every cross-attention layer + modifier embedding (uncompressed)",
    "textual_inversion": "one embedding vector",
    "lora": "peft rank-4 adapters on to_q/to_k/to_v/to_out.0 of every attention layer",
    "dreambooth": "the whole UNet",
}
SDXL_NOTE = ("SDXL: a StableDiffusionXLPipeline with the full SDXL UNet and SDXL's two text encoders (768 + 1280 "
             "wide; 2 layers each: only widths matter for artifacts); every method's own SDXL artifact")
LARGE_BYTES = 4 * 2**30
"""Float32 artifacts above this size (a whole SDXL UNet) are not written when sizes are derived (``derive_large``):
writing one needs about four copies of it in RAM (artifact clone, writer clone, serialised bytes)."""


def storage_note(method: str, art) -> str:
    """What ``method``'s artifact holds, for the storage table: its :data:`STORAGE_NOTES` entry (keyed by registry
    name) or, for a method without one, the artifact's tensor names grouped by their first component."""
    if method in STORAGE_NOTES:
        return STORAGE_NOTES[method]
    groups = collections.Counter(k.split(".")[0] for k in art.tensors)
    return ", ".join(f"{g} ({n} tensors)" if n > 1 else g for g, n in sorted(groups.items()))


def too_large_to_write(art) -> bool:
    """Whether ``art`` in float32 is above :data:`LARGE_BYTES`."""
    return safetensors_size(art, torch.float32) > LARGE_BYTES


def safetensors_size(art, dtype: torch.dtype | None) -> int:
    """Size of ``art.save(path, dtype=dtype)`` computed without writing it: 8 bytes + the JSON header (dtype,
    shape and offsets of every tensor + ``__metadata__``, padded to 8 bytes) + the tensor bytes, as safetensors
    lays files out. Used where writing would need several copies of an SDXL UNet in RAM; checked against the
    real files of the other cases in :func:`measure_storage` (``*_derived_error``)."""
    sizes = {}
    for k, v in art.tensors.items():
        dt = dtype if (dtype is not None and v.is_floating_point()) else v.dtype
        sizes[k] = (_ST_NAMES[dt], list(v.shape), v.numel() * torch.empty((), dtype=dt).element_size())
    offset, entries = 0, {}
    for k in sorted(sizes):
        entries[k] = {"dtype": sizes[k][0], "shape": sizes[k][1], "data_offsets": [offset, offset + sizes[k][2]]}
        offset += sizes[k][2]
    head = json.dumps({"__metadata__": _artifact_header(art, sizes), **entries}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return 8 + len(head) + offset


_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32"}


def _dtype_of(name: str) -> torch.dtype:
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
            "I64": torch.int64, "I32": torch.int32}[name]


def _artifact_header(art, sizes: dict) -> dict:
    """The ``editbench`` header entry ``Artifact.save`` writes, with a placeholder checksum of the same length."""
    from editbench import __version__
    from editbench.methods.base import _RESERVED, ARTIFACT_FORMAT

    meta = {k: v for k, v in art.metadata.items() if k not in _RESERVED}
    meta.update(format=ARTIFACT_FORMAT, method=art.method, library_version=__version__,
                shapes={k: sizes[k][1] for k in sorted(sizes)},
                dtypes={k: str(_dtype_of(sizes[k][0])).removeprefix("torch.") for k in sorted(sizes)},
                checksum="0" * 16)
    return {"editbench": json.dumps(meta, sort_keys=True)}


def measure_storage(geometry: str = "sd15", out: str | None = None, derive_large: bool | None = None) -> dict:
    """Bytes on disk of one concept's artifact for every method on ``geometry`` (float32 and float16 files).

    With ``derive_large`` (default: on SDXL) the pipeline is built in float16 and the sizes of artifacts above
    :data:`LARGE_BYTES` (DreamBooth's whole UNet) are derived from shapes (:func:`safetensors_size`), not written.
    """
    from editbench.methods.base import Artifact

    if derive_large is None:
        derive_large = geometry == "sdxl"
    folder = Path(out or tempfile.mkdtemp(prefix=f"editbench-storage-{geometry}-", dir=WORK.parent))
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pipe = geometry_pipeline(geometry, torch.float16 if derive_large else torch.float32)
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    build_s = time.perf_counter() - t0
    fps: dict = {}
    rows = {}
    for method in METHODS:
        concept = random_concept(placeholder_for(method), "dog", size=resolution(pipe))
        t = time.perf_counter()
        art = build_artifact(method, pipe, concept, fingerprints=fps, reference=True)  # real-SD settings
        row = {"tensors": len(art.tensors), "floats": int(sum(v.numel() for v in art.tensors.values())),
               "build_s": round(time.perf_counter() - t, 2), "note": storage_note(method, art)}
        derive = derive_large and too_large_to_write(art)
        for label, dtype in (("float32", torch.float32), ("float16", torch.float16)):
            derived = safetensors_size(art, dtype)
            if derive:
                row[label] = derived
                row[f"{label}_how"] = "derived from shapes (not written)"
                continue
            path = folder / f"{method}-{label}.safetensors"
            art.save(path, dtype=dtype)
            row[label] = path.stat().st_size
            row[f"{label}_how"] = "saved file"
            row[f"{label}_derived_error"] = derived - row[label]   # check of safetensors_size
            Artifact.load(path, method=method) if row[label] < 1 << 30 else None  # loadable
            path.unlink()
        rows[method] = row
        del art
        gc.collect()
    return {"geometry": geometry, "unet_params": unet_params, "text_width": TEXT_WIDTH[geometry],
            "pipeline_build_s": round(build_s, 1), "methods": rows, "note": SDXL_NOTE if geometry == "sdxl" else ""}
