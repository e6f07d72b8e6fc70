"""Reports: confidence intervals, scale handling, report.md, plots and sample grids."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _eval_stubs import FakeClip, FakeEditor, FakePipeline, FakeRareWordEditor, registered
from PIL import Image

from editbench.errors import EditbenchError
from editbench.eval import report as R
from editbench.eval import runner
from editbench.eval import spec as suite_spec


def _frame(values, clusters, scale="cosine"):
    return pd.DataFrame({"concepts": [f"c{c}" for c in clusters], "seed": 0, "prompt_index": 0, "x": values,
                         "text_scale": scale})


def test_bootstrap_ci_mean_interval_and_clamp():
    rng = np.random.default_rng(0)
    vals = rng.normal(0.3, 0.1, size=200)
    df = _frame(vals, np.repeat(np.arange(40), 5))
    m, lo, hi = R.bootstrap_ci(df, "x")
    assert m == pytest.approx(vals.mean(), abs=1e-12)
    assert lo < m < hi and hi - lo < 0.1
    assert R.bootstrap_ci(df, "x") == (m, lo, hi)                    # fixed seed: reproducible
    const = _frame([0.5] * 6, [0, 0, 1, 1, 2, 2])
    assert R.bootstrap_ci(const, "x") == pytest.approx((0.5, 0.5, 0.5))
    one = _frame([0.1, 0.2], [0, 0])                                 # one cluster: no interval
    m1, lo1, _ = R.bootstrap_ci(one, "x")
    assert m1 == pytest.approx(0.15) and np.isnan(lo1)
    neg = _frame([-30.0, -10.0, 5.0, 1.0], [0, 1, 2, 3], "torchmetrics")
    m2, lo2, hi2 = R.bootstrap_ci(neg, "x", scale="torchmetrics")    # clamped at 0 after averaging
    assert m2 == 0.0 and lo2 == 0.0 and hi2 >= 0.0
    # clusters, not rows, are resampled: 2 clusters of very different size
    lop = _frame([1.0] * 99 + [0.0], [0] * 99 + [1])
    m3, lo3, hi3 = R.bootstrap_ci(lop, "x")
    assert m3 == pytest.approx(0.99) and lo3 == pytest.approx(0.0) and hi3 == pytest.approx(1.0)


def test_paired_difference_against_a_float64_reference():
    rng = np.random.default_rng(1)
    rows = []
    for label in ("a", "b"):
        for c in range(6 if label == "a" else 7):                   # b has a cluster a lacks: left out
            for k in range(1 + c % 3):                              # unequal cluster sizes
                rows.append({"label": label, "setting": "s", "n_concepts": 1, "concepts": f"c{c}", "seed": 0,
                             "prompt_index": 0, "x": float(rng.normal())})
    rows.append({"label": "a", "setting": "s", "n_concepts": 2, "concepts": "c0+c1", "seed": 0, "prompt_index": 0,
                 "x": 100.0})                                       # a pair cell: not a single-concept row
    df = pd.DataFrame(rows)
    m, lo, hi = R.paired_difference(df, ("a", "s"), ("b", "s"), "x")
    sums = {lab: np.array([df[(df.label == lab) & (df.n_concepts == 1) & (df.concepts == f"c{c}")].x.sum()
                           for c in range(6)]) for lab in "ab"}
    counts = np.array([1 + c % 3 for c in range(6)], float)
    assert m == pytest.approx(sums["a"].sum() / counts.sum() - sums["b"].sum() / counts.sum(), abs=1e-12)
    idx = np.random.default_rng(0).integers(0, 6, size=(1000, 6))
    boots = (sums["a"][idx].sum(1) - sums["b"][idx].sum(1)) / counts[idx].sum(1)
    assert (lo, hi) == pytest.approx((np.quantile(boots, 0.025), np.quantile(boots, 0.975)), abs=1e-12)
    shifted = df.assign(label="c", x=df.x - 0.25)[df.label == "a"]  # a constant shift: a zero-width interval
    assert R.paired_difference(pd.concat([df, shifted]), ("a", "s"), ("c", "s"), "x") == pytest.approx(
        (0.25, 0.25, 0.25), abs=1e-12)
    with pytest.raises(EditbenchError, match="label 'z'"):
        R.paired_difference(df, ("a", "s"), ("z", "s"), "x")
    with pytest.raises(EditbenchError, match="share no"):
        R.paired_difference(df.assign(seed=np.where(df.label == "a", 0, 1)), ("a", "s"), ("b", "s"), "x")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    spec = {"name": "rep", "model": "tiny", "concepts": ["zebra", "sunny"], "pairs": [["zebra", "sunny"]],
            "seeds": [0, 1], "max_prompts": 2, "images_per_prompt": 2,
            "methods": ["base", {"name": "fake", "label": "perfusion-like", "sweep": {"scale": [0.2, 0.5, 1.0]}},
                        "fake_single"]}
    with registered(FakeEditor, FakeRareWordEditor):
        runner.run_suite(suite_spec.load_suite(spec), out, pipeline=FakePipeline(), clip=FakeClip(), progress=False)
    return out


def test_report_tables_plots_and_grids(results):
    path = R.write_report(results)
    text = path.read_text()
    assert path == results / "report.md"
    for needle in ("# Results: rep", "## Single concept", "## Multi-concept composition", "perfusion-like",
                   "scale=0.5", "fake_single", "## Skipped cells", "plots/alignment.png", "grids/base.png"):
        assert needle in text, needle
    summary = pd.read_csv(results / "summary.csv")
    # one row per (method, setting) of the single-concept cells, each over 2 concepts x 2 seeds x 2 x 2 images
    assert len(summary) == 1 + 3 + 1 and (summary["images"] == 16).all()
    df = pd.read_csv(results / "results.csv")
    base = df[(df.label == "base") & (df.n_concepts == 1)]
    row = summary[summary.method == "base"].iloc[0]
    assert row["text_alignment"] == pytest.approx(base["text_alignment"].mean())
    assert row["text_alignment_lo"] <= row["text_alignment"] <= row["text_alignment_hi"]
    assert row["storage_bytes"] == 0 and summary[summary.method == "fake_single"]["storage_bytes"].iloc[0] > 0
    comp = pd.read_csv(results / "composition.csv")
    assert set(comp["method"]) == {"base", "perfusion-like"} and comp["composition_hit"].between(0, 1).all()
    for name in ("alignment", "storage", "training_time"):
        with Image.open(results / "plots" / f"{name}.png") as img:
            assert img.size[0] > 300
    with Image.open(results / "grids" / "perfusion-like.png") as grid:
        # rows: 2 single concepts + 1 pair, 2 prompts each; columns: 3 settings x 2 images
        assert grid.size == (200 + 96 * 6, 16 + 96 * 6)
        px = np.asarray(grid)[16 + 40, 200 + 40]
        assert not (px == 255).all()                          # a sample was pasted, not left blank


def test_sweep_parameter_becomes_a_curve(results):
    df = pd.read_csv(results / "results.csv")
    assert R._sweep_param(df[df.label == "perfusion-like"]) == "set_scale"
    assert R._sweep_param(df[df.label == "base"]) is None


def test_mixed_scales_are_refused(results, tmp_path):
    df = pd.read_csv(results / "results.csv")
    df.loc[df.index[:3], "text_scale"] = "hessel"
    (tmp_path / "mixed").mkdir()
    df.to_csv(tmp_path / "mixed" / "results.csv", index=False)
    with pytest.raises(EditbenchError, match="mix"):
        R.write_report(tmp_path / "mixed")


def test_report_of_a_suite_without_pairs(results, tmp_path):
    """A suite with single-concept cells only (like toy-quick) still gets its report; composition is empty."""
    df = pd.read_csv(results / "results.csv")
    single = df[df.n_concepts == 1]
    assert len(single) < len(df)
    out = tmp_path / "single"
    out.mkdir()
    single.to_csv(out / "results.csv", index=False)
    text = R.write_report(out).read_text()
    comp = text.split("## Multi-concept composition")[1].split("## Plots")[0]
    assert "_(none)_" in comp and "perfusion-like" in text.split("## Multi-concept composition")[0]


def test_report_errors(tmp_path):
    with pytest.raises(EditbenchError, match="not a results folder"):
        R.write_report(tmp_path / "missing")
    with pytest.raises(EditbenchError, match="no results.csv"):
        R.write_report(tmp_path)
