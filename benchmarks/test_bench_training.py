"""Training: optimizer-step time and peak memory of every method relative to DreamBooth, same model (toy world,
else ``tiny_pipeline``) and batch (4, no prior preservation).

Each test runs the method and DreamBooth in fresh processes (peak memory needs a fresh process), alternating,
and records the ratios in ``extra_info``; the timed operation is one ``fit`` of the method in a fresh process.
"""

from __future__ import annotations

import pytest
from perf_common import METHODS, REFERENCE, in_subprocess, median

STEPS = 10


@pytest.mark.parametrize("method", METHODS)
def test_training_step(benchmark, method, bench_pipeline_kind):
    runs, refs = [], []
    for r in range(2):
        pair = [("m", method), ("ref", REFERENCE)] if r % 2 == 0 else [("ref", REFERENCE), ("m", method)]
        for tag, m in pair:
            res = in_subprocess("training", method=m, kind=bench_pipeline_kind, steps=STEPS)
            (runs if tag == "m" else refs).append(res)
    benchmark.group = "training"
    benchmark.extra_info.update(
        pipeline=runs[0]["pipeline"], batch_size=runs[0]["batch_size"],
        step_s=median([x["step_s"] for x in runs]),
        peak_rss_delta=median([x["peak_rss_delta"] for x in runs]),
        goal=("time <= 0.8, memory <= 0.6" if method == "perfusion" else ""),
        **{f"time_vs_{REFERENCE}": median([x["step_s"] / y["step_s"] for x, y in zip(runs, refs)]),
           f"memory_vs_{REFERENCE}": median([x["peak_rss_delta"] / y["peak_rss_delta"] for x, y in zip(runs, refs)])})
    benchmark.pedantic(in_subprocess, args=("training",),
                       kwargs={"method": method, "kind": bench_pipeline_kind, "steps": STEPS}, rounds=1, iterations=1)
