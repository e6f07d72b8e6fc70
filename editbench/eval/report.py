"""``write_report(out)``: ``report.md`` with per-method means and 95% confidence intervals, cost, and plots.

Confidence intervals are cluster-bootstrap percentile intervals (1,000 resamples, fixed seed): the clusters are
(concept(s), seed, prompt), because images of one prompt share the prompt and the trained artifact and are not
independent. Scores are aggregated on the scale recorded in the table (``torchmetrics``: clamped at 0 after
averaging, inside every resample); tables never mix scales.

Outputs in ``out``: ``report.md``, ``summary.csv`` (the single-concept table), ``composition.csv``,
``plots/alignment.png`` (text vs image alignment; methods with a numeric sweep, e.g. Perfusion's ``beta``,
drawn as a curve over it, as the papers plot their Pareto fronts), ``plots/storage.png`` (log scale),
``plots/training_time.png``, ``grids/<method>.png`` (samples per prompt x setting), and ``report.html``: all of it
on one self-contained page with every method's images side by side per prompt (:mod:`editbench.eval.html`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from editbench.errors import EditbenchError
from editbench.eval.html import write_html
from editbench.eval.results import collect
from editbench.eval.spec import safe_name
from editbench.eval.validity import disagreements, rank_agreement

__all__ = ["bootstrap_ci", "composition_table", "console_table", "paired_difference", "paired_table",
           "summary_table", "write_report"]

_CLUSTER = ["concepts", "seed", "prompt_index"]
# ground-truth scores of toy-world suites (editbench.toyworld.oracle), aggregated like the CLIP scores:
# (column, title in report.md)
ORACLE_SINGLE = (("identity", "identity"), ("identity_frac", "identity attrs"), ("prompt_fidelity", "prompt fidelity"),
                 ("background_ok", "background"), ("count_ok", "count"))
ORACLE_PAIR = (("identity_0", "identity A"), ("identity_1", "identity B"), ("prompt_fidelity", "prompt fidelity"),
               ("count_ok", "count"), ("composition_oracle", "composition (ground truth)"))
# every score of report.md's tables, (column, title): single-concept and multi-concept cells
SINGLE_SCORES = (("text_alignment", "text alignment"), ("image_alignment", "image alignment"),
                 ("dino_image", "DINO image"), *ORACLE_SINGLE)
PAIR_SCORES = (("text_alignment", "text alignment"), ("image_alignment_0", "image alignment A"),
               ("image_alignment_1", "image alignment B"), ("composition_hit", "composition (CLIP)"), *ORACLE_PAIR)


def bootstrap_ci(df: pd.DataFrame, column: str, *, scale: str = "cosine", n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)`` of ``column``: cluster-bootstrap percentile interval over (concept(s), seed, prompt).

    ``scale="torchmetrics"`` clamps each mean at 0 (after averaging), like the point estimate."""
    d = df[[*_CLUSTER, column]].dropna(subset=[column])
    if d.empty:
        return (math.nan, math.nan, math.nan)
    g = d.groupby(_CLUSTER, dropna=False)[column].agg(["sum", "count"])
    sums, counts = g["sum"].to_numpy(float), g["count"].to_numpy(float)

    def clamp(x: Any) -> Any:
        return np.maximum(x, 0.0) if scale == "torchmetrics" else x

    mean = float(clamp(sums.sum() / counts.sum()))
    if len(sums) < 2:
        return (mean, math.nan, math.nan)
    idx = np.random.default_rng(seed).integers(0, len(sums), size=(n_boot, len(sums)))
    boots = clamp(sums[idx].sum(1) / counts[idx].sum(1))
    a = (1 - level) / 2
    return (mean, float(np.quantile(boots, a)), float(np.quantile(boots, 1 - a)))


def paired_difference(df: pd.DataFrame, a: tuple[str, str], b: tuple[str, str], column: str, *,
                      single: bool = True, n_boot: int = 1000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)`` of ``column`` in rows ``a`` minus rows ``b``, each a ``(label, setting)``.

    Paired over the (concept(s), seed, prompt) clusters both rows have (others are left out): each bootstrap
    resample draws clusters once and takes both rows' means over them, so what a cluster shares between the two
    (the concept's difficulty, the prompt, the training seed's data) cancels, and the interval is narrower than two
    independent intervals would suggest. ``single`` selects single-concept cells (else multi-concept cells). The
    difference is of raw means: a score on the ``torchmetrics`` scale is not clamped at 0 here."""
    d = df[(df["n_concepts"] == 1) == single] if "n_concepts" in df else df
    sides = []
    for label, setting in (a, b):
        rows = d[(d["label"] == label) & (d["setting"] == setting)][[*_CLUSTER, column]].dropna(subset=[column])
        if rows.empty:
            raise EditbenchError(f"no {'single' if single else 'multi'}-concept rows with a {column!r} score for "
                                 f"label {label!r}, setting {setting!r}")
        sides.append(rows.groupby(_CLUSTER, dropna=False)[column].agg(["sum", "count"]))
    shared = sides[0].index.intersection(sides[1].index)
    if shared.empty:
        raise EditbenchError(f"{a} and {b} share no (concept(s), seed, prompt) cluster: nothing to pair")
    (sa, ca), (sb, cb) = ((g.loc[shared, "sum"].to_numpy(float), g.loc[shared, "count"].to_numpy(float))
                          for g in sides)
    mean = float(sa.sum() / ca.sum() - sb.sum() / cb.sum())
    if len(shared) < 2:
        return (mean, math.nan, math.nan)
    idx = np.random.default_rng(seed).integers(0, len(shared), size=(n_boot, len(shared)))  # (resample, cluster)
    boots = sa[idx].sum(1) / ca[idx].sum(1) - sb[idx].sum(1) / cb[idx].sum(1)
    q = (1 - level) / 2
    return (mean, float(np.quantile(boots, q)), float(np.quantile(boots, 1 - q)))


def paired_table(df: pd.DataFrame, a: tuple[str, str], b: tuple[str, str], *, single: bool = True) -> pd.DataFrame:
    """:func:`paired_difference` of ``a`` minus ``b`` on every score of report.md's table (single- or multi-concept)
    that the run has: columns ``score``, ``difference``, ``low``, ``high``."""
    cells = df[(df["n_concepts"] == 1) == single]
    rows = [(col, *paired_difference(df, a, b, col, single=single)) for col, _ in
            (SINGLE_SCORES if single else PAIR_SCORES) if col in cells and cells[col].notna().any()]
    return pd.DataFrame(rows, columns=["score", "difference", "low", "high"])


def _one(df: pd.DataFrame, column: str, name: str) -> Any:
    vals = df[column].dropna().unique() if column in df else []
    if len(vals) > 1:
        raise EditbenchError(f"the results mix {name}s {sorted(map(str, vals))}; scores on different scales are not "
                             "comparable: report each run folder separately")
    return vals[0] if len(vals) else None


def _fmt(m: float, lo: float, hi: float, digits: int = 3) -> str:
    if math.isnan(m):
        return "-"
    return f"{m:.{digits}f}" + ("" if math.isnan(lo) else f" [{lo:.{digits}f}, {hi:.{digits}f}]")


def _groups(df: pd.DataFrame) -> list[tuple[tuple[str, str], pd.DataFrame]]:
    order = list(dict.fromkeys(df["label"]))
    return sorted(df.groupby(["label", "setting"], sort=False), key=lambda kv: (order.index(kv[0][0]), kv[0][1]))


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """Single-concept rows summarised per (method label, setting): alignment means with CIs and cost."""
    single = df[df["n_concepts"] == 1]
    text_scale, image_scale = _one(df, "text_scale", "text scale"), _one(df, "image_scale", "image scale")
    rows = []
    for (label, setting), g in _groups(single):
        cells = g.drop_duplicates("cell")
        r = {"method": label, "setting": setting, "images": len(g)}
        for col, scale in (("text_alignment", text_scale), ("image_alignment", image_scale),
                           ("dino_image", "cosine"), *((c, "cosine") for c, _ in ORACLE_SINGLE)):
            if col in g and g[col].notna().any():
                m, lo, hi = bootstrap_ci(g, col, scale=scale)
                r.update({col: m, f"{col}_lo": lo, f"{col}_hi": hi})
        r.update(storage_bytes=cells["storage_bytes"].mean(), train_time_s=cells["train_time_s"].mean(),
                 peak_memory_bytes=cells["peak_memory_bytes"].mean())
        rows.append(r)
    return pd.DataFrame(rows)


def console_table(summary: pd.DataFrame) -> str:
    """The summary's means (no interval columns), for a terminal: CLIP beside the ground-truth scores."""
    cols = [c for c in ("method", "setting", "images", "text_alignment", "image_alignment", "dino_image",
                        "identity", "prompt_fidelity", "background_ok", "count_ok", "train_time_s")
            if c in summary]
    return summary[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}")


def composition_table(df: pd.DataFrame) -> pd.DataFrame:
    """Multi-concept rows per (method label, setting): text alignment, image alignment per concept, composition."""
    multi = df[df["n_concepts"] > 1]
    text_scale, image_scale = _one(df, "text_scale", "text scale"), _one(df, "image_scale", "image scale")
    rows = []
    for (label, setting), g in _groups(multi):
        r = {"method": label, "setting": setting, "images": len(g)}
        for col, scale in (("text_alignment", text_scale), ("image_alignment_0", image_scale),
                           ("image_alignment_1", image_scale), ("composition_hit", "cosine"),
                           *((c, "cosine") for c, _ in ORACLE_PAIR)):
            if col in g and g[col].notna().any():
                m, lo, hi = bootstrap_ci(g, col, scale=scale)
                r.update({col: m, f"{col}_lo": lo, f"{col}_hi": hi})
        rows.append(r)
    return pd.DataFrame(rows)


def _md(df: pd.DataFrame) -> str:
    if df.empty:
        return "_(none)_\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _bytes(n: float) -> str:
    if n is None or math.isnan(n):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def _display(t: pd.DataFrame, cols: list[tuple[str, str]]) -> pd.DataFrame:
    if t.empty:  # e.g. a suite without multi-concept cells: no composition rows
        return pd.DataFrame()
    out = t[["method", "setting", "images"]].copy()
    for col, title in cols:
        if col in t:
            out[title] = [_fmt(m, lo, hi) for m, lo, hi in zip(t[col], t[f"{col}_lo"], t[f"{col}_hi"])]
    return out


def _informative(df: pd.DataFrame, cols: list[tuple[str, str]], notes: list[str], kind: str) -> list[tuple[str, str]]:
    """``cols`` without the scores that take one value in every cell of ``df`` (a constant column cannot rank
    anything); each dropped score gets a sentence in ``notes``."""
    keep = []
    for col, title in cols:
        if col not in df or df[col].isna().all():
            continue
        means = df.groupby("cell")[col].mean().dropna()
        if len(means) > 1 and means.nunique() == 1:
            notes.append(f"*{title}* is {means.iloc[0]:.3f} in every one of the {len(means)} {kind} cells: it does "
                         "not separate the methods here, so it is not tabulated.")
            continue
        keep.append((col, title))
    return keep


def _sweep_param(g: pd.DataFrame) -> str | None:
    """The numeric ``set_*`` column that varies within one method's rows (e.g. ``set_beta``), if exactly one."""
    cols = [c for c in g.columns if c.startswith("set_") and pd.api.types.is_numeric_dtype(g[c])
            and g[c].nunique() > 1]
    return cols[0] if len(cols) == 1 else None


def _plots(df: pd.DataFrame, summary: pd.DataFrame, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="notebook")
    folder.mkdir(parents=True, exist_ok=True)
    made = []
    single = df[df["n_concepts"] == 1]
    labels = list(dict.fromkeys(summary["method"]))
    # tab10 repeats its colours after ten labels (a toy-full report has twelve): evenly spaced hues beyond that
    palette = dict(zip(labels, sns.color_palette("tab10" if len(labels) <= 10 else "husl", max(len(labels), 1))))
    planes = (("text_alignment", "image_alignment", f"text alignment ({_one(df, 'text_scale', 'text scale')})",
               f"image alignment ({_one(df, 'image_scale', 'image scale')})", "text vs image alignment (95% CI)",
               "alignment.png"),
              ("prompt_fidelity", "identity", "prompt fidelity (ground truth)", "identity (ground truth)",
               "identity vs prompt fidelity (95% CI)", "oracle.png"))
    for x, y, xlabel, ylabel, title, name in planes:
        if summary.empty or not {x, y} <= set(summary):
            continue
        fig, ax = plt.subplots(figsize=(9.5, 5))
        for label in labels:
            s = summary[summary["method"] == label].copy()
            param = _sweep_param(single[single["label"] == label])
            if param:
                vals = single[single["label"] == label].groupby("setting")[param].first()
                s["_v"] = s["setting"].map(vals)
                s = s.sort_values("_v")
            ax.errorbar(s[x], s[y], xerr=[s[x] - s[f"{x}_lo"], s[f"{x}_hi"] - s[x]],
                        yerr=[s[y] - s[f"{y}_lo"], s[f"{y}_hi"] - s[y]],
                        fmt="o-" if param else "o", color=palette[label], label=label, capsize=3, alpha=0.9)
            if param:
                for _, r in s.iterrows():
                    ax.annotate(f"{param.removeprefix('set_')}={r['_v']:g}", (r[x], r[y]),
                                textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the points stay visible
        fig.tight_layout()
        made.append(folder / name)
        fig.savefig(made[-1], dpi=120)
        plt.close(fig)
    cost = single.drop_duplicates("cell")
    cost = cost[cost["method"] != "base"]
    for col, name, title, log in (("storage_bytes", "storage.png", "storage per concept (bytes, log scale)", True),
                                  ("train_time_s", "training_time.png", "training wall time per concept (s)", False)):
        d = cost[cost[col].notna() & (cost[col] > 0)] if log else cost[cost[col].notna()]
        if d.empty:
            continue
        # one bar per method, or per (method, setting) where the setting changes the value (e.g. a compression rank)
        varies = d.groupby(["label", "concepts", "seed"])[col].nunique().groupby("label").max() > 1
        d = d.assign(bar=[f"{lab}\n{st}" if varies.get(lab, False) else lab
                          for lab, st in zip(d["label"], d["setting"])])
        d = d.drop_duplicates(["bar", "concepts", "seed"])  # one value per trained (or transformed) artifact
        fig, ax = plt.subplots(figsize=(max(6.5, 0.9 * d["bar"].nunique()), 3.8))
        sns.barplot(data=d, x="bar", y=col, hue="label", palette=palette, ax=ax, errorbar=("ci", 95),
                    legend=False)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("")
        ax.set_ylabel(col)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
        fig.tight_layout()
        made.append(folder / name)
        fig.savefig(made[-1], dpi=120)
        plt.close(fig)
    return made


def _grid(out: Path, g: pd.DataFrame, path: Path, *, max_rows: int = 12, max_cols: int = 12, cell_px: int = 96) -> Path:
    """Samples of one method: a row per (concept(s), prompt), columns = settings x images (first seed)."""
    from PIL import Image, ImageDraw

    g = g[g["seed"] == g["seed"].min()]
    row_keys = list(dict.fromkeys(zip(g["concepts"], g["prompt_index"])))[:max_rows]
    col_keys = list(dict.fromkeys(zip(g["setting"], g["image_index"])))[:max_cols]
    margin, header = 200, 16
    canvas = Image.new("RGB", (margin + cell_px * len(col_keys), header + cell_px * len(row_keys)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (setting, _) in enumerate(col_keys):
        draw.text((margin + j * cell_px + 2, 2), setting[:16], fill="black")
    lookup = {(r.concepts, r.prompt_index, r.setting, r.image_index): r.image for r in g.itertuples()}
    prompts = dict(zip(zip(g["concepts"], g["prompt_index"]), g["prompt"]))
    for i, key in enumerate(row_keys):
        y = header + i * cell_px
        text = f"{key[0]}: {prompts[key]}"
        for k in range(0, min(len(text), 150), 30):
            draw.text((2, y + 2 + (k // 30) * 12), text[k:k + 30], fill="black")
        for j, ck in enumerate(col_keys):
            rel = lookup.get((*key, *ck))
            if rel is not None and (out / rel).is_file():
                with Image.open(out / rel) as img:
                    canvas.paste(img.convert("RGB").resize((cell_px, cell_px), Image.Resampling.NEAREST),
                                 (margin + j * cell_px, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _strip(out: Path, rows: pd.DataFrame, path: Path, *, cell_px: int = 96) -> Path:
    """A column of images, each with its method, prompt and scores beside it."""
    from PIL import Image, ImageDraw

    width = cell_px + 420
    canvas = Image.new("RGB", (width, cell_px * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, r in enumerate(rows.itertuples()):
        y = i * cell_px
        if (out / r.image).is_file():
            with Image.open(out / r.image) as img:
                canvas.paste(img.convert("RGB").resize((cell_px, cell_px), Image.Resampling.NEAREST), (0, y))
        lines = [r.kind, f"{r.label} {r.setting}"[:60], str(r.prompt)[:60], str(r.prompt)[60:120],
                 f"CLIP image {r.image_alignment:.3f}  identity {r.identity:.0f}  attrs {r.identity_frac:.2f}"]
        for k, line in enumerate(lines):
            draw.text((cell_px + 6, y + 4 + 14 * k), line, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def write_report(out: str | os.PathLike) -> Path:
    """Write ``out/report.md`` (+ plots, grids, summary CSVs) from ``out/results.csv``; returns its path."""
    out = Path(out)
    if not out.is_dir():
        raise EditbenchError(f"{out} is not a results folder; run a suite first "
                             "(editbench bench --suite SUITE --out DIR)")
    if (out / "suite.json").is_file():
        df = collect(out)
    elif (out / "results.csv").is_file():
        df = pd.read_csv(out / "results.csv")
    else:
        raise EditbenchError(f"{out} holds no results.csv or suite.json; run a suite into it first")
    if df.empty:
        raise EditbenchError(f"{out} has no finished cells yet; run (or resume) the suite first")
    meta = json.loads((out / "suite.json").read_text()) if (out / "suite.json").is_file() else {}
    summary, comp = summary_table(df), composition_table(df)
    summary.to_csv(out / "summary.csv", index=False)
    comp.to_csv(out / "composition.csv", index=False)
    plots = _plots(df, summary, out / "plots")
    grids = [_grid(out, g, out / "grids" / f"{safe_name(label)}.png") for label, g in df.groupby("label", sort=False)]

    text_scale, image_scale = _one(df, "text_scale", "text scale"), _one(df, "image_scale", "image scale")
    notes: list[str] = []
    single_cols = _informative(df[df["n_concepts"] == 1], list(SINGLE_SCORES), notes, "single-concept")
    pair_cols = _informative(df[df["n_concepts"] > 1], list(PAIR_SCORES), notes, "multi-concept")
    shown = _display(summary, single_cols)
    if not summary.empty:
        shown["storage"] = [_bytes(v) for v in summary["storage_bytes"]]
        shown["train time"] = [f"{v:.1f} s" if not math.isnan(v) else "-" for v in summary["train_time_s"]]
        shown["peak memory"] = [_bytes(v) for v in summary["peak_memory_bytes"]]
    comp_shown = _display(comp, pair_cols)
    extra: list[tuple[Path, str]] = []  # images report.html shows after the plots
    skipped = sorted((out / "cells").glob("*.skip.json")) if (out / "cells").is_dir() else []
    failed = sorted((out / "cells").glob("*.error.txt")) if (out / "cells").is_dir() else []
    intro = (f"Model `{meta.get('model', '?')}`, CLIP `{_one(df, 'clip_model', 'CLIP model')}`; text alignment on "
             f"the **{text_scale}** scale, image alignment on the **{image_scale}** scale (see docs/evaluation.md). "
             f"{df['cell'].nunique()} finished cells, {len(df)} images. Means with 95% cluster-bootstrap intervals "
             "(clusters: concept(s) x seed x prompt).")
    md = [f"# Results: {meta.get('name', out.name)}", "", intro, "",
          *([("Tuned with `editbench tune` (equal budget per method): " + "; ".join(  # suite.json of bench --tuned
              f"{t['method']} trial {t['trial']} of {t['trials_used']} (budget {t['budget']}; validation concepts of "
              f"{t['suite']}: {', '.join(t['validation'] or [])})" for t in meta["tuned"]) + "."), ""]
            if meta.get("tuned") else []),
          "## Single concept", "", _md(shown),
          ("Storage is the artifact file per concept; training time is wall time per concept; peak memory is "
          f"`{', '.join(map(str, df['memory_kind'].dropna().unique())) if 'memory_kind' in df else '-'}`."),
          "", "## Multi-concept composition", "",
          ("Image alignment against each concept separately; *composition (CLIP)* is the fraction of images in "
          "which both concepts' raw CLIP image alignments reach their calibrated thresholds."), "", _md(comp_shown)]
    if "identity" in df:
        md += ["## Ground truth (toy world)", "",
               ("Read from the pixels against the renderer's ground truth (`editbench.toyworld.oracle`): *identity* is "
                "the fraction of images whose object for the concept has its category, body color, pattern and "
                "pattern color (*identity attrs*: the fraction of those four); *prompt fidelity* the fraction of "
                "what the prompt asks besides the concept (background, stated positions and sizes, other objects' "
                "category and color); *background* the asked background alone; *count* as many objects as asked; "
                "*composition (ground truth)* both concepts with their identity, each where asked."), ""]
        val = rank_agreement(df)
        if not val.empty:
            val.to_csv(out / "validity.csv", index=False)
            vshown = val[["score_a", "score_b", "cells"]].copy()
            vshown["Spearman"] = [_fmt(m, lo, hi, 2) for m, lo, hi in
                                  zip(val["spearman"], val["spearman_lo"], val["spearman_hi"])]
            vshown["Kendall"] = [_fmt(m, lo, hi, 2) for m, lo, hi in
                                 zip(val["kendall"], val["kendall_lo"], val["kendall_hi"])]
            md += ["### Do the proxies rank like the ground truth?", "",
                   ("Rank correlation across the method x setting cells (single concept) of each score's mean, with "
                    "95% cluster-bootstrap intervals (`validity.csv`)."
                    + ("" if "dino_image" in df else " No DINO model is configured, so DINO is not compared.")),
                   "", _md(vshown)]
        dis = disagreements(df)
        if not dis.empty:
            path = _strip(out, dis, out / "grids" / "clip_vs_ground_truth.png")
            extra.append((path, "Where CLIP image alignment and identity disagree most"))
            md += [(f"Where CLIP image alignment and identity disagree most: ![disagreements]"
                    f"({path.relative_to(out).as_posix()})"), ""]
    if notes:
        md += ["## Scores that do not vary", ""] + [f"* {n}" for n in notes] + [""]
    md += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in plots] + [""]
    md += ["## Samples", ""] + [f"* [{p.stem}]({p.relative_to(out).as_posix()})" for p in grids] + [""]
    if skipped:
        md += ["## Skipped cells", ""]
        md += [f"* `{json.loads(p.read_text())['cell']}`: {json.loads(p.read_text())['reason']}" for p in skipped]
        md += [""]
    if failed:
        md += ["## Failed cells (re-run the suite to retry)", ""]
        md += [f"* `{p.name.removesuffix('.error.txt')}`" for p in failed] + [""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    write_html(out, df, summary, comp, title=f"Results: {meta.get('name', out.name)}",
               intro=intro.replace("*", "").replace("`", ""),
               single_cols=single_cols, pair_cols=pair_cols, plots=plots, notes=notes, extra_images=extra,
               skipped=[f"{json.loads(p.read_text())['cell']}: {json.loads(p.read_text())['reason']}"
                        for p in skipped],
               failed=[p.name.removesuffix(".error.txt") for p in failed])
    return path
