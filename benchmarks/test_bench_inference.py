"""Sampling time with Perfusion (1 and 10 concepts) and unfused peft LoRA (1 and 10 adapters) against the unedited
model, side by side on the same pipeline (toy world, else ``tiny_pipeline``; ``--bench-pipeline``).

Each test times its case with pytest-benchmark and records in ``extra_info`` the median over ``--bench-rounds``
interleaved rounds of ``time(case) / time(base)`` (and, for Perfusion, against LoRA with as many adapters and
against itself with the per-step output cache off, i.e. the code path before the fix).
"""

from __future__ import annotations

import pytest
from perf_common import interleaved, ratio
from perf_inference import inference_setup, uncached_case

CASES = ("base", "perfusion_1", "perfusion_10", "lora_1", "lora_10")


@pytest.fixture(scope="module")
def setup(bench_pipeline_kind):
    return inference_setup(bench_pipeline_kind, (1, 10), steps=25)


@pytest.mark.parametrize("case", CASES)
def test_sampling(benchmark, setup, case, bench_rounds):
    cases = setup["cases"]
    side = {case: cases[case], "base": cases["base"]}
    if case.startswith("perfusion_"):
        n = int(case.split("_")[1])
        side[f"lora_{n}"] = cases[f"lora_{n}"]
        side["uncached"] = uncached_case(setup, n)
    times = interleaved(side, rounds=bench_rounds, warmup=1)
    info = {"pipeline": setup["pipeline"], "steps": setup["steps"], "vs_base": ratio(times, case, "base")}
    if case.startswith("perfusion_"):
        info[f"vs_lora_{n}"] = ratio(times, case, f"lora_{n}")
        info["uncached_vs_base"] = ratio(times, "uncached", "base")
        info["goal_vs_base"] = 1.05 if n == 1 else 1.15
    benchmark.group = "inference"
    benchmark.extra_info.update(info)
    benchmark.pedantic(cases[case], rounds=bench_rounds, iterations=1, warmup_rounds=1)
