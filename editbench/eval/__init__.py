"""Evaluation: CLIP/DINO metrics, benchmark suites (YAML -> long-format results table) and reports.

See ``docs/evaluation.md``. Main entry points: :func:`run_suite`, :func:`write_report`, :func:`load_clip`.
"""

from editbench.eval.metrics import (
    SCALES,
    ClipScorer,
    DinoEncoder,
    aggregate,
    artifact_stats,
    check_scale,
    composition_hits,
    composition_score,
    composition_threshold,
    cosine_matrix,
    fill_prompt,
    image_alignment,
    load_clip,
    load_dino,
    pair_alignment,
    superclass_prompt,
    text_alignment,
    to_scale,
)
from editbench.eval.report import write_report
from editbench.eval.results import collect
from editbench.eval.runner import generate, run_suite
from editbench.eval.spec import Suite, bundled_suites, load_suite, parse_shard, shard_cells

__all__ = ["SCALES", "ClipScorer", "DinoEncoder", "Suite", "aggregate", "artifact_stats", "bundled_suites",
           "check_scale", "collect", "composition_hits", "composition_score", "composition_threshold",
           "cosine_matrix", "fill_prompt", "generate", "image_alignment", "load_clip", "load_dino", "load_suite",
           "pair_alignment", "parse_shard", "run_suite", "shard_cells", "superclass_prompt", "text_alignment",
           "to_scale", "write_report"]
