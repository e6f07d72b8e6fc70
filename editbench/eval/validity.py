"""Metric validity: do the proxy scores (CLIP, DINO) rank the method x setting cells as the ground truth does?

``rank_agreement(df)`` averages every score per (method label, setting) over the single-concept images, then
gives Spearman's rho and Kendall's tau between every pair of scores, with 95% cluster-bootstrap intervals: each
resample draws the clusters (concept, seed, prompt) with replacement, recomputes every cell's means and the
correlations, so the interval says how much the ranking itself is a measurement. ``disagreements(df)`` picks the
images where CLIP image alignment and the ground-truth identity disagree most, for a person to look at.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
from scipy import stats

__all__ = ["SCORES", "disagreements", "rank_agreement"]

SCORES = {"image_alignment": "CLIP image", "dino_image": "DINO image", "text_alignment": "CLIP text",
          "identity": "identity", "identity_frac": "identity attrs", "prompt_fidelity": "prompt fidelity"}
_CLUSTER = ["concepts", "seed", "prompt_index"]


def _quantile(v, p: float) -> float:
    return float(np.quantile(v, p)) if len(v) > 10 else math.nan


def _cell_means(d: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    return d.groupby(["label", "setting"])[cols].mean()


def rank_agreement(df: pd.DataFrame, *, n_boot: int = 500, seed: int = 0) -> pd.DataFrame:
    """One row per pair of scores present in ``df``: Spearman and Kendall over the (label, setting) cells of the
    single-concept rows, with 2.5% / 97.5% bootstrap quantiles; ``cells`` is how many cells were ranked."""
    single = df[df["n_concepts"] == 1] if "n_concepts" in df else df
    cols = [c for c in SCORES if c in single and single[c].notna().any()]
    means = _cell_means(single, cols)
    clusters = single.groupby(_CLUSTER, dropna=False).ngroup().to_numpy()
    n_cl = int(clusters.max()) + 1 if len(clusters) else 0
    rng = np.random.default_rng(seed)
    boot = {pair: ([], []) for pair in itertools.combinations(cols, 2)}
    by_cluster = [single.index[clusters == k] for k in range(n_cl)]
    for _ in range(n_boot if n_cl > 1 else 0):
        pick = rng.integers(0, n_cl, n_cl)
        idx = np.concatenate([by_cluster[k] for k in pick])
        m = _cell_means(single.loc[idx], cols).reindex(means.index)
        for a, b in boot:
            ok = m[[a, b]].dropna()
            if len(ok) >= 3 and ok[a].nunique() > 1 and ok[b].nunique() > 1:
                boot[a, b][0].append(stats.spearmanr(ok[a], ok[b]).statistic)
                boot[a, b][1].append(stats.kendalltau(ok[a], ok[b]).statistic)
    rows = []
    for (a, b), (sp, kd) in boot.items():
        ok = means[[a, b]].dropna()
        valid = len(ok) >= 3 and ok[a].nunique() > 1 and ok[b].nunique() > 1
        rho = stats.spearmanr(ok[a], ok[b]).statistic if valid else math.nan
        tau = stats.kendalltau(ok[a], ok[b]).statistic if valid else math.nan
        rows.append({"score_a": SCORES[a], "score_b": SCORES[b], "cells": len(ok), "spearman": rho,
                     "spearman_lo": _quantile(sp, 0.025), "spearman_hi": _quantile(sp, 0.975), "kendall": tau,
                     "kendall_lo": _quantile(kd, 0.025), "kendall_hi": _quantile(kd, 0.975)})
    return pd.DataFrame(rows)


def disagreements(df: pd.DataFrame, n: int = 6) -> pd.DataFrame:
    """Images where CLIP and the ground truth disagree most: the ``n`` highest CLIP image alignments whose
    identity is 0, and the ``n`` lowest whose identity is 1 (column ``kind``)."""
    d = df[(df["n_concepts"] == 1) & df["identity"].notna()] if "identity" in df else df.iloc[:0]
    high = d[d["identity"] == 0].nlargest(n, "image_alignment").assign(kind="CLIP high, identity wrong")
    low = d[d["identity"] == 1].nsmallest(n, "image_alignment").assign(kind="CLIP low, identity right")
    return pd.concat([high, low], ignore_index=True)
