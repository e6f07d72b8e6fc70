"""Training measurements: the time of one optimizer step after a warm-up step and the peak memory of the whole
``Editor.fit`` (:meth:`gpubench.runner.Runner.train`).
"""

from __future__ import annotations

import math
import statistics
import time

import torch
from perf_common import config_overrides, placeholder_for, random_concept

from .plan import PIPELINE_DTYPES, TRAIN_VARIANTS


def measure(runner, row: dict) -> None:
    """Train ``row``'s method for a warm-up step and ``--repeats`` timed steps; the median step time, the peak
    memory (the setup's included) and the loop's own peak into ``row``."""
    from editbench import methods

    pipe = runner.pipeline(row["geometry"], PIPELINE_DTYPES.get(row["case"], torch.float32))
    res = runner.pipe_info[row["geometry"]]["resolution"]
    row["resolution"] = res
    repeats = runner.args.repeats
    cfg = config_overrides(row["method"], steps=1 + repeats, batch_size=1, grad_accum=1, resolution=res,
                           **TRAIN_VARIANTS[row["case"]])
    editor = methods.get(row["method"])(**cfg)
    runner.cached_fingerprint(editor, row["geometry"])
    concept = random_concept(placeholder_for(row["method"]), "dog", size=res, n=2)
    stamps: list[float] = []
    setup_peak = [0]
    prepare = editor.prepare_training

    def timed_prepare(*a, **kw):
        session = prepare(*a, **kw)
        if runner.cuda:  # the loop resets CUDA's peak statistics when it starts: keep the setup's peak
            setup_peak[0] = int(torch.cuda.max_memory_allocated(runner.device))
        after = session.after_step

        def after_step(step):
            after(step)
            runner.sync()
            stamps.append(time.perf_counter())
        session.after_step = after_step
        return session

    editor.prepare_training = timed_prepare
    with runner.memory(row):
        art = editor.fit(pipe, concept, progress=False, seed=0)
    row["peak_memory_bytes"] = max(row["peak_memory_bytes"], setup_peak[0])
    steps = [b - a for a, b in zip(stamps, stamps[1:])]          # after the warm-up step
    row["seconds"] = statistics.median(steps)
    training = art.metadata.get("training", {})
    row["loop_peak_memory_bytes"] = training.get("peak_memory_bytes")
    loss = training.get("loss_last")
    if loss is not None and not math.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss}")
