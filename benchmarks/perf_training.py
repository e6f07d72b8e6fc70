"""Training: one optimizer step's time and the peak memory of ``Editor.fit`` for every registered method, in fresh
processes, as ratios to the reference method (:data:`perf_common.REFERENCE`) of the same round."""

from __future__ import annotations

import itertools
import time

import torch
from perf_common import (
    METHODS,
    REFERENCE,
    PeakRSS,
    bench_pipeline,
    config_overrides,
    in_subprocess,
    median,
    placeholder_for,
    random_concept,
    resolution,
)


def _editor(method: str, steps: int, batch_size: int):
    from editbench import methods

    return methods.get(method)(**config_overrides(method, steps=steps, batch_size=batch_size, grad_accum=1))


def measure_setup(method: str, kind: str = "auto", steps: int = 8, batch_size: int = 4) -> dict:
    """Time of the one-off setup of ``method`` on ``kind``'s pipeline: ``Editor.shaped_artifact`` runs the
    method's own training setup, which fills the caches kept per base model (e.g. a text covariance) on disk.
    :func:`measure_training` runs it in a fresh process first, so that those caches are never built inside the
    measured ``fit`` and its peak memory is not lowered by memory the setup freed."""
    pipe, name = bench_pipeline(kind)
    concept = random_concept(placeholder_for(method), "star", size=resolution(pipe))
    t = time.perf_counter()
    _editor(method, steps, batch_size).shaped_artifact(pipe, concept)
    return {"method": method, "pipeline": name, "setup_s": time.perf_counter() - t}


def measure_training(method: str, kind: str = "auto", steps: int = 8, batch_size: int = 4, seed: int = 0) -> dict:
    """One method's optimizer-step time (median of steps 3..``steps``) and peak RSS above the loaded pipeline,
    for ``fit`` on ``kind``'s pipeline with ``batch_size`` and no prior preservation (the same batch for every
    method). Run it in a fresh process (:func:`in_subprocess`) so peaks are not hidden by earlier allocations."""
    in_subprocess("setup", method=method, kind=kind, steps=steps, batch_size=batch_size)  # per-base-model caches
    torch.manual_seed(seed)
    pipe, name = bench_pipeline(kind)
    size = resolution(pipe)
    concept = random_concept(placeholder_for(method), "star", size=size)
    editor = _editor(method, steps, batch_size)
    stamps: list[float] = []
    prepare = editor.prepare_training

    def timed_prepare(*args, **kwargs):
        session = prepare(*args, **kwargs)
        after = session.after_step

        def after_step(step):
            after(step)
            stamps.append(time.perf_counter())
        session.after_step = after_step
        return session

    editor.prepare_training = timed_prepare
    with PeakRSS() as mem:
        t = time.perf_counter()
        art = editor.fit(pipe, concept, progress=False, seed=seed)
        fit_s = time.perf_counter() - t
    diffs = [b - a for a, b in itertools.pairwise(stamps)][1:]  # steps 3.. (step 1 has no start stamp, 2 warms up)
    trainable = int(sum(p.numel() for p in _trainable(art)))
    return {"method": method, "pipeline": name, "steps": steps, "batch_size": batch_size,
            "step_s": median(diffs), "step_s_all": diffs, "fit_s": fit_s, "peak_rss_delta": mem.delta,
            "reported_peak": art.metadata["training"]["peak_memory_bytes"], "artifact_floats": trainable}


def _trainable(art) -> list[torch.Tensor]:
    return list(art.tensors.values())


def measure_training_all(kind: str = "auto", rounds: int = 2, steps: int = 8, batch_size: int = 4,
                         method_list: tuple[str, ...] = METHODS) -> dict:
    """:func:`measure_training` of every method in fresh processes, ``rounds`` rounds interleaved; ratios of each
    method to the reference method's (DreamBooth's) run of the same round (median over rounds)."""
    runs: dict[str, list[dict]] = {m: [] for m in method_list}
    for r in range(rounds):
        order = list(method_list) if r % 2 == 0 else list(reversed(method_list))
        for m in order:
            runs[m].append(in_subprocess("training", method=m, kind=kind, steps=steps, batch_size=batch_size))
    out = {"pipeline": runs[method_list[0]][0]["pipeline"], "rounds": rounds, "steps": steps,
           "batch_size": batch_size, "methods": {}}
    for m in method_list:
        rows = runs[m]
        out["methods"][m] = {
            "step_s": median([x["step_s"] for x in rows]),
            "peak_rss_delta": median([x["peak_rss_delta"] for x in rows]),
            "reported_peak": median([x["reported_peak"] for x in rows]),
            f"time_vs_{REFERENCE}": median([x["step_s"] / y["step_s"] for x, y in zip(rows, runs[REFERENCE])]),
            f"memory_vs_{REFERENCE}": median([x["peak_rss_delta"] / y["peak_rss_delta"]
                                              for x, y in zip(rows, runs[REFERENCE])]),
        }
    return out
