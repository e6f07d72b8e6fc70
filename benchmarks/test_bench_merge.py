"""Custom Diffusion's closed-form merge of 2 and 10 concepts on SD 1.5 geometry (32 K/V projections, 768-d keys,
cached C): the factored solver (``merge_projections``) against the unfactored code it replaced."""

from __future__ import annotations

import perf_merge
import pytest
from perf_common import interleaved, ratio

from editbench.methods.custom_diffusion.merge import merge_projections


@pytest.fixture(scope="module", params=[2, 10], ids=lambda n: f"{n}concepts")
def problem(request):
    return request.param, perf_merge.merge_problem(request.param, "sd15")


@pytest.mark.parametrize("variant", ["factored", "unfactored"])
def test_merge(benchmark, problem, variant, bench_rounds):
    n, args = problem
    fns = {"factored": lambda: merge_projections(*args), "unfactored": lambda: perf_merge.merge_unfactored(*args)}
    times = interleaved(fns, rounds=max(2, bench_rounds // 2), warmup=0)
    benchmark.group = f"merge-{n}-concepts"
    benchmark.extra_info.update(concepts=n, projections=len(args[0]),
                                factored_vs_unfactored=ratio(times, "factored", "unfactored"),
                                goal_s=1.0 if n == 2 else None)
    benchmark.pedantic(fns[variant], rounds=3, iterations=1)
