"""Training: optimizer-step time and peak memory of every method relative to DreamBooth, same model (toy world,
else ``tiny_pipeline``) and batch (4, no prior preservation).

Each test runs the method and DreamBooth in fresh processes (peak memory needs a fresh process), alternating,
and records the ratios in ``extra_info``; the timed operation is one ``fit`` of the method in a fresh process.
"""

from __future__ import annotations

import perf
import pytest

STEPS = 10


@pytest.mark.parametrize("method", perf.METHODS)
def test_training_step(benchmark, method, bench_pipeline_kind):
    runs, refs = [], []
    for r in range(2):
        pair = [("m", method), ("ref", "dreambooth")] if r % 2 == 0 else [("ref", "dreambooth"), ("m", method)]
        for tag, m in pair:
            res = perf.in_subprocess("training", method=m, kind=bench_pipeline_kind, steps=STEPS)
            (runs if tag == "m" else refs).append(res)
    benchmark.group = "training"
    benchmark.extra_info.update(
        pipeline=runs[0]["pipeline"], batch_size=runs[0]["batch_size"],
        step_s=perf.median([x["step_s"] for x in runs]),
        peak_rss_delta=perf.median([x["peak_rss_delta"] for x in runs]),
        time_vs_dreambooth=perf.median([x["step_s"] / y["step_s"] for x, y in zip(runs, refs)]),
        memory_vs_dreambooth=perf.median([x["peak_rss_delta"] / y["peak_rss_delta"] for x, y in zip(runs, refs)]),
        goal=("time <= 0.8, memory <= 0.6" if method == "perfusion" else ""))
    benchmark.pedantic(perf.in_subprocess, args=("training",),
                       kwargs={"method": method, "kind": bench_pipeline_kind, "steps": STEPS}, rounds=1, iterations=1)
