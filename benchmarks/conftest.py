"""pytest-benchmark configuration of the performance suite: ``python -m pytest benchmarks --benchmark-only``.

Not collected by the default ``python -m pytest`` run (``testpaths = ["tests"]``). Options:

* ``--bench-pipeline {auto,toy,tiny}``: the model of the inference and training benchmarks (auto: the toy world
  once its weights exist, else ``tiny_pipeline``);
* ``--bench-geometries sd15[,sd21,sdxl]``: the full-size geometries of the storage benchmarks (default sd15);
* ``--bench-rounds N``: rounds of the interleaved side-by-side comparisons (default 5).

Every comparison is recorded in the benchmark's ``extra_info`` as a ratio against its peer measured in the same
test (``--benchmark-json out.json`` keeps them); ``benchmarks/run_all.py`` writes ``docs/performance.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import perf_common


def pytest_addoption(parser):
    group = parser.getgroup("editbench benchmarks")
    group.addoption("--bench-pipeline", default="auto", choices=("auto", "toy", "tiny"))
    group.addoption("--bench-geometries", default="sd15")
    group.addoption("--bench-rounds", type=int, default=5)


def pytest_report_header(config):
    m = perf_common.machine()
    lines = [(f"machine: nproc={m['nproc']} torch={m['torch']} threads={m['torch_threads']} "
              f"OMP_NUM_THREADS={m['OMP_NUM_THREADS']} load={m['loadavg']}")]
    if m["competing_jobs"]:
        lines.append(f"WARNING: competing jobs running, absolute times are unreliable: {m['competing_jobs']}")
    return lines


@pytest.fixture(scope="session")
def bench_pipeline_kind(request) -> str:
    return request.config.getoption("--bench-pipeline")


@pytest.fixture(scope="session")
def bench_rounds(request) -> int:
    return request.config.getoption("--bench-rounds")


def pytest_generate_tests(metafunc):
    if "geometry" in metafunc.fixturenames:
        geos = [g.strip() for g in metafunc.config.getoption("--bench-geometries").split(",") if g.strip()]
        bad = sorted(set(geos) - set(perf_common.GEOMETRIES))
        if bad:
            raise pytest.UsageError(f"unknown geometries {bad}; choose from {perf_common.GEOMETRIES}")
        metafunc.parametrize("geometry", geos, scope="module")
