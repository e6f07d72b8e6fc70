"""The toy-world defaults are the committed tuning's chosen points (benchmarks/tuning/toy-quick/<method>/).

Every method's Config defaults (training steps and the tuned config fields) and the tuned inference settings the
bundled toy suites set (Perfusion's beta / tau) equal the chosen point of its committed ``tuned.json`` within 1%
(the code writes 2-3 significant digits); every study was made on the committed toy-world weights (its recorded
base-model fingerprint is the committed world's), on the same validation concepts, with the same budget.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from editbench import methods
from editbench.eval.spec import load_suite

TUNING = Path(__file__).resolve().parents[1] / "benchmarks" / "tuning" / "toy-quick"
METHODS = ("perfusion", "custom_diffusion", "textual_inversion", "dreambooth", "lora")
TOY_SUITES = ("toy-quick", "toy-results", "toy-full", "toy-prior")


def tuned(method: str) -> dict:
    return json.loads((TUNING / method / "tuned.json").read_text())


def close(a, b) -> bool:
    if isinstance(b, float) and isinstance(a, (int, float)):
        return math.isclose(a, b, rel_tol=1e-2)
    return a == (tuple(b) if isinstance(b, list) else b)


@pytest.mark.parametrize("method", METHODS)
def test_config_defaults_are_the_tuned_point(method):
    t = tuned(method)
    cfg = methods.get(method).Config()
    wrong = {k: (getattr(cfg, k), v) for k, v in t["config"].items() if not close(getattr(cfg, k), v)}
    if t["steps"] is not None and cfg.steps != t["steps"]:
        wrong["steps"] = (cfg.steps, t["steps"])
    assert not wrong, f"{method}: Config() default vs tuned.json (trial {t['trial']}): {wrong}"


@pytest.mark.parametrize("suite", TOY_SUITES)
def test_toy_suites_set_the_tuned_inference_settings(suite):
    s = load_suite(suite)
    for entry in s.methods:
        if entry.name == "base":
            continue
        for k, v in tuned(entry.name)["settings"].items():
            if k in entry.settings:
                assert close(entry.settings[k], v), (suite, entry.label, k, entry.settings[k], v)
            elif k in entry.sweep and entry.label == entry.name:  # the method's own sweep contains the tuned point
                assert any(close(x, v) for x in entry.sweep[k]), (suite, entry.label, k, entry.sweep[k], v)


def test_every_study_had_the_same_budget_on_the_same_base_model():
    ts = {m: tuned(m) for m in METHODS}
    assert len({t["budget"] for t in ts.values()}) == 1, {m: t["budget"] for m, t in ts.items()}
    assert all(t["trials_used"] == t["budget"] for t in ts.values())
    assert len({tuple(t["validation"]) for t in ts.values()}) == 1
    bases = {t.get("base_model") for t in ts.values()}
    assert len(bases) == 1 and None not in bases, bases
    from editbench import toyworld
    from editbench.fingerprint import pipeline_fingerprint

    pipe = toyworld.load_pipeline()
    assert pipeline_fingerprint(pipe, pipe.tokenizer) in bases, "the studies were made on other toy-world weights"
