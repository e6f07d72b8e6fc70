"""Sampling measurements: the time per image of the unedited model and with 1 and 10 Perfusion concepts / unfused
LoRA adapters applied, and its peak memory (:meth:`gpubench.runner.Runner.sample`).
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
from perf_common import build_artifact, placeholder_for, random_concept

from .plan import SAMPLE_PRECISIONS


def artifacts(runner, method: str, n: int, pipe, geometry: str, res: int) -> list:
    """``n`` artifacts of ``method`` from the method's own builder (no training: sampling cost does not depend
    on the values), perturbed so that they are distinct and change the output (LoRA: non-zero B)."""
    fps = runner.fingerprints.setdefault(geometry, {})
    g = torch.Generator().manual_seed(1)
    arts = []
    for i in range(n):
        placeholder = f"<bench-{i}>" if method == "perfusion" else placeholder_for(method)
        art = build_artifact(method, pipe, random_concept(placeholder, "dog", size=res, n=1, seed=i),
                             fingerprints=fps)
        for k, v in art.tensors.items():
            if not v.is_floating_point() or (method == "lora" and ".lora_B." not in k):
                continue
            noise = torch.randn(v.shape, generator=g).to(v)
            art.tensors[k] = 0.01 * noise if method == "lora" else v + 0.3 * v.float().std().to(v) * noise
        arts.append(art)
    return arts


def measure(runner, row: dict) -> None:
    """Sample a warm-up image and ``--repeats`` timed images with ``row``'s artifacts applied (undone after); the
    median time per image and the peak memory into ``row``."""
    from editbench import methods

    geometry = row["geometry"]
    pipe = runner.pipeline(geometry)
    res = runner.pipe_info[geometry]["resolution"]
    row["resolution"] = res
    handle = None
    word = "dog"
    if row["method"] is not None:
        n = int(row["case"].rsplit("_", 1)[1])
        editor = methods.get(row["method"])()
        runner.cached_fingerprint(editor, geometry)
        arts = runner.artifacts(row["method"], n, pipe, geometry, res)
        handle = editor.apply(pipe, arts)
        word = "<bench-0> dog" if row["method"] == "perfusion" else f"{placeholder_for(row['method'])} dog"
    dtype = SAMPLE_PRECISIONS[row["precision"]]
    autocast = contextlib.nullcontext if dtype is None else (lambda: torch.autocast(runner.device.type, dtype))

    def once() -> float:
        runner.sync()
        t = time.perf_counter()
        with torch.no_grad(), autocast():
            images = pipe(f"a photo of a {word}", num_inference_steps=runner.args.sample_steps,
                          guidance_scale=runner.args.guidance, height=res, width=res,
                          generator=torch.Generator().manual_seed(0), output_type="pt").images
        runner.sync()
        if not torch.isfinite(images).all():
            raise RuntimeError("the sampled image has non-finite values")
        return time.perf_counter() - t

    try:
        with runner.memory(row):
            once()                                                  # warm-up
            row["seconds"] = statistics.median(once() for _ in range(runner.args.repeats))
    finally:
        if handle is not None:
            handle.undo()
