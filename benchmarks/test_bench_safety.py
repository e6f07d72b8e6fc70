"""Time of refusing a decompression bomb (a 10,000 x 10,000 PNG, 300 MB once decoded) from its header: the
figure that used to be a "< 5 s" assertion in tests/test_reliability_fuzz_concepts.py (the test now checks that
nothing is decoded and the peak memory in a fresh interpreter; speed is a measurement, not a test)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from editbench.concepts import ConceptData
from editbench.errors import ConceptDataError

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from test_reliability_fuzz_concepts import full_bomb_png  # noqa: E402


def test_decompression_bomb_refusal(benchmark, tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(full_bomb_png(10_000, 10_000))

    def refuse():
        with pytest.raises(ConceptDataError, match="decompression"):
            ConceptData("<k>", "star", [path])

    benchmark.group = "safety"
    benchmark.extra_info.update(pixels=10_000 * 10_000, goal_s=5.0)
    benchmark.pedantic(refuse, rounds=5, iterations=1)
