"""Storage per concept: artifact files of every method on full-size SD 1.5 / SD 2.1 / SDXL geometry.

The timed operation is ``Artifact.save`` (float32); ``extra_info`` holds the file sizes in float32 and float16
and the ratio to DreamBooth's artifact on the same geometry. Select geometries with ``--bench-geometries``.
"""

from __future__ import annotations

import gc

import pytest
import torch
from perf_common import (
    METHODS,
    REFERENCE,
    build_artifact,
    geometry_pipeline,
    placeholder_for,
    random_concept,
    resolution,
)
from perf_storage import safetensors_size, too_large_to_write


@pytest.fixture(scope="module")
def geometry_setup(geometry):
    pipe = geometry_pipeline(geometry, torch.float16 if geometry == "sdxl" else torch.float32)
    fps: dict = {}
    arts = {m: build_artifact(m, pipe, random_concept(placeholder_for(m), "dog", size=resolution(pipe)),
                              fingerprints=fps)
            for m in METHODS}
    del pipe
    gc.collect()
    return arts


@pytest.mark.parametrize("method", METHODS)
def test_artifact_storage(benchmark, geometry, geometry_setup, method, tmp_path):
    art = geometry_setup[method]
    sizes = {label: safetensors_size(art, dt) for label, dt in (("float32", torch.float32),
                                                                ("float16", torch.float16))}
    ref = safetensors_size(geometry_setup[REFERENCE], torch.float32)
    benchmark.group = f"storage-{geometry}"
    benchmark.extra_info.update(geometry=geometry, method=method, bytes_float32=sizes["float32"],
                                bytes_float16=sizes["float16"], **{f"ratio_to_{REFERENCE}": sizes["float32"] / ref})
    if geometry == "sdxl" and too_large_to_write(art):  # writing needs ~4 copies of it in RAM: size derived only
        benchmark.extra_info["how"] = "derived from shapes"
        benchmark.pedantic(safetensors_size, args=(art, torch.float32), rounds=1, iterations=1)
        return
    path = tmp_path / f"{method}.safetensors"
    benchmark.pedantic(lambda: art.save(path, dtype=torch.float32), rounds=1, iterations=1)
    assert path.stat().st_size == sizes["float32"]  # the derivation matches the real file
    benchmark.extra_info["how"] = "saved file"
    path.unlink()
