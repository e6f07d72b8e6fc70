"""Run one performance measurement in a fresh process and print its result as one JSON line:

    python benchmarks/perf.py <what> [json args]      # measure_<what>(**args), e.g. storage '{"geometry": "sd21"}'

``run_all.py`` and the pytest-benchmark files (``benchmarks/test_bench_*.py``) do this (``perf_common.in_subprocess``)
for everything that measures peak memory. The measurements live in one module per benchmark kind:

* ``perf_common``: machine description, timing and memory helpers, models, artifact building (shared);
* ``perf_storage``: artifact bytes per method and geometry;
* ``perf_inference``: sampling time with Perfusion and LoRA against the unedited model;
* ``perf_training``: optimizer-step time and peak memory of every method against DreamBooth;
* ``perf_merge``: Custom Diffusion's closed-form merge, factored against unfactored;
* ``perf_covariance``: text covariance estimation throughput and memory;
* ``perf_fixes``: before/after of library fixes measured nowhere else (fingerprint, artifact writing);
* ``perf_suite``: the ``toy-quick`` suite's wall time.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import perf_covariance
import perf_fixes
import perf_inference
import perf_merge
import perf_storage
import perf_suite
import perf_training

KINDS = (perf_storage, perf_inference, perf_training, perf_merge, perf_covariance, perf_fixes, perf_suite)


def measurement(what: str) -> Callable[..., dict]:
    """The function ``measure_<what>`` of the benchmark kind modules."""
    for module in KINDS:
        fn = getattr(module, f"measure_{what}", None)
        if fn is not None:
            return fn
    known = sorted(name.removeprefix("measure_") for m in KINDS for name in vars(m) if name.startswith("measure_"))
    raise SystemExit(f"unknown measurement {what!r}; known: {', '.join(known)}")


def main(argv: list[str]) -> None:
    what = argv[0]
    kwargs = json.loads(argv[1]) if len(argv) > 1 else {}
    print(json.dumps(measurement(what)(**kwargs), default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
