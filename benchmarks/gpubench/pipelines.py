"""Random-weight pipelines of full SD 1.5 / SDXL geometry (or tiny: the same architectures at 16x16 px): the
builder is :func:`editbench.testing.random_pipeline` (shared with the slow full-geometry tests).
"""

from __future__ import annotations

from editbench.testing import random_pipeline as build_pipeline

__all__ = ["build_pipeline", "param_count"]


def param_count(module) -> int | None:
    return None if module is None else int(sum(p.numel() for p in module.parameters()))
