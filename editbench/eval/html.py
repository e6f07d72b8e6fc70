"""``report.html``: the whole report as one self-contained page that opens offline.

Everything the page shows is inside the file: the plots and sample images as base64 PNG ``data:`` URIs, the CSS and
the JS (sorting the results table by a click on a column header) inline; it requests nothing from the network.
Sections: the single-concept results table and the composition table (means with 95% intervals, sortable), the
plots (CLIP and ground-truth alignment planes, storage, training time), then, for each prompt of each concept (and
each pair), one row with every method's images of the first seed and each image's scores.

Images larger than :data:`THUMB_PX` are embedded as thumbnails (the full images stay in ``samples/``); at most
``max_images`` images are embedded, prompt by prompt, and the page says how many prompts it left out.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from pathlib import Path

import pandas as pd

__all__ = ["IMAGE_CELL_CLASS", "MAX_IMAGES", "THUMB_PX", "sample_rows", "write_html"]

THUMB_PX = 128
"""Embedded sample images are at most this many pixels on a side (smaller ones are embedded as they are)."""
MAX_IMAGES = 1500
"""Default cap on the sample images one page embeds (about 2-40 KB each)."""
_EMPH = re.compile(r"[*]([^*]+)[*]")  # report.md's *emphasis* in the notes
IMAGE_CELL_CLASS = "sample"
"""The CSS class of one sample image with its scores (``<figure class="sample">``)."""

# per-image scores shown under a sample: (column, short name); the legend above the samples spells them out
_SINGLE_SCORES = (("text_alignment", "txt"), ("image_alignment", "img"), ("dino_image", "dino"),
                  ("identity", "id"), ("prompt_fidelity", "fid"))
_PAIR_SCORES = (("text_alignment", "txt"), ("image_alignment_0", "imgA"), ("image_alignment_1", "imgB"),
                ("composition_hit", "comp"), ("identity_0", "idA"), ("identity_1", "idB"),
                ("composition_oracle", "comp-gt"))
_LEGEND = {"txt": "CLIP text alignment", "img": "CLIP image alignment", "dino": "DINO image alignment",
           "id": "identity (ground truth)", "fid": "prompt fidelity (ground truth)",
           "imgA": "CLIP image alignment to concept A", "imgB": "... to concept B",
           "comp": "composition hit (CLIP)", "idA": "identity of A (ground truth)", "idB": "identity of B",
           "comp-gt": "composition (ground truth)"}

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222;max-width:100%}
h1{font-size:1.5em}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd}h3{font-size:1.05em}
table.results{border-collapse:collapse;font-size:.85em;margin:.5em 0}
table.results th,table.results td{border:1px solid #ccc;padding:.25em .5em;text-align:right;white-space:nowrap}
table.results td:nth-child(-n+2),table.results th:nth-child(-n+2){text-align:left}
table.results th{background:#f2f2f2;cursor:pointer;user-select:none}
table.results th.asc::after{content:" \\25B2"}table.results th.desc::after{content:" \\25BC"}
.plots img{max-width:48%;min-width:320px;margin:.3em;border:1px solid #eee}
.prompt{margin:1em 0 .3em;font-weight:600}.prompt .concept{color:#666;font-weight:400}
.row{display:flex;flex-wrap:wrap;gap:.6em;align-items:flex-start}
.method{border:1px solid #ddd;border-radius:4px;padding:.3em;background:#fafafa}
.method h4{margin:0 0 .2em;font-size:.8em;font-weight:600;max-width:22em;overflow-wrap:anywhere}
.method .imgs{display:flex;gap:.3em}
figure.sample{margin:0;width:96px;font-size:.66em;line-height:1.25}
figure.sample img{width:96px;height:96px;image-rendering:pixelated;display:block;background:#eee}
figure.sample figcaption{font-variant-numeric:tabular-nums;color:#333}
.scroll{overflow-x:auto}.strip img{max-width:100%}
.note{color:#555;font-size:.9em}.legend{font-size:.85em;color:#444}
"""

_JS = """
(function(){
  function key(td){var v=td.getAttribute('data-v');return v===null?td.textContent.trim():parseFloat(v);}
  document.querySelectorAll('table.results').forEach(function(table){
    table.querySelectorAll('th').forEach(function(th,col){
      th.addEventListener('click',function(){
        var asc=!th.classList.contains('asc');
        table.querySelectorAll('th').forEach(function(h){h.classList.remove('asc','desc');});
        th.classList.add(asc?'asc':'desc');
        var body=table.tBodies[0],rows=Array.prototype.slice.call(body.rows);
        rows.sort(function(a,b){
          var x=key(a.cells[col]),y=key(b.cells[col]);
          var nx=typeof x==='number'&&!isNaN(x),ny=typeof y==='number'&&!isNaN(y);
          if(nx&&ny){return asc?x-y:y-x;}
          if(nx!==ny){return nx?-1:1;}
          return asc?String(x).localeCompare(String(y)):String(y).localeCompare(String(x));
        });
        rows.forEach(function(r){body.appendChild(r);});
      });
    });
  });
})();
"""


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _png_uri(path: Path, thumb: int | None = None) -> str | None:
    """``data:image/png;base64,...`` of the image at ``path`` (a thumbnail if ``thumb`` and larger); None if
    the file is missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if thumb is None and img.format == "PNG":
                data = path.read_bytes()
            else:
                im = img.convert("RGB")
                if thumb is not None and max(im.size) > thumb:
                    im.thumbnail((thumb, thumb), Image.Resampling.LANCZOS)
                buf = io.BytesIO()
                im.save(buf, format="PNG", optimize=True)
                data = buf.getvalue()
    except (OSError, UnidentifiedImageError):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _num(v) -> float:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return math.nan
    return v


def _table(t: pd.DataFrame, cols: list[tuple[str, str]], cost: bool) -> str:
    """A sortable table of per-(method, setting) means with their intervals; ``data-v`` holds the number sorted on."""
    if t.empty:
        return "<p class='note'>(none)</p>"
    from editbench.eval.report import _bytes, _fmt

    head = ["method", "setting", "images"] + [title for col, title in cols if col in t]
    if cost:
        head += ["storage", "train time", "peak memory"]
    rows = []
    for _, r in t.iterrows():
        cells = [f"<td>{_esc(r['method'])}</td>", f"<td>{_esc(r['setting'])}</td>",
                 f"<td data-v='{int(r['images'])}'>{int(r['images'])}</td>"]
        for col, _title in cols:
            if col in t:
                m = _num(r[col])
                cells.append(f"<td data-v='{m if not math.isnan(m) else ''}'>"
                             f"{_esc(_fmt(m, _num(r[f'{col}_lo']), _num(r[f'{col}_hi'])))}</td>")
        if cost:
            for col, text in (("storage_bytes", _bytes(_num(r["storage_bytes"]))),
                              ("train_time_s", "-" if math.isnan(_num(r["train_time_s"]))
                               else f"{_num(r['train_time_s']):.1f} s"),
                              ("peak_memory_bytes", _bytes(_num(r["peak_memory_bytes"])))):
                v = _num(r[col])
                cells.append(f"<td data-v='{v if not math.isnan(v) else ''}'>{_esc(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    heads = "".join(f"<th title='click to sort'>{_esc(h)}</th>" for h in head)
    return ("<div class='scroll'><table class='results'><thead><tr>" + heads
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>")


def sample_rows(df: pd.DataFrame, n_concepts: int) -> list[tuple[tuple[str, int], pd.DataFrame]]:
    """The sample rows of the page for single concepts (``n_concepts=1``) or pairs (``2``+): one per (concept(s),
    prompt), each with every (method, setting)'s images of the first seed, in the suite's method order."""
    d = df[(df["n_concepts"] == 1) if n_concepts == 1 else (df["n_concepts"] > 1)]
    if d.empty:
        return []
    d = d[d["seed"] == d["seed"].min()]
    order = {lab: i for i, lab in enumerate(dict.fromkeys(df["label"]))}
    d = d.assign(_o=d["label"].map(order)).sort_values(["_o", "setting", "image_index"], kind="stable")
    keys = list(dict.fromkeys(zip(d["concepts"], d["prompt_index"])))
    groups = {k: g for k, g in d.groupby(["concepts", "prompt_index"], sort=False)}
    return [(k, groups[k]) for k in keys]


def _scores(r, scores) -> str:
    parts = []
    for col, short in scores:
        v = _num(getattr(r, col, math.nan))
        if not math.isnan(v):
            text = f"{v:.2f}"
            if abs(v) < 1:  # ".31" / "-.17": narrow captions
                text = text.replace("0.", ".", 1)
            parts.append(f"{short}&nbsp;{text}")
    return "<br>".join(" ".join(parts[i:i + 2]) for i in range(0, len(parts), 2))


def _samples(out: Path, df: pd.DataFrame, n_concepts: int, budget: list[int]) -> tuple[str, int, int]:
    """HTML of the sample rows; (html, images embedded, prompts left out). ``budget[0]`` images may still go in."""
    scores = _SINGLE_SCORES if n_concepts == 1 else _PAIR_SCORES
    parts, shown, left = [], 0, 0
    for (concepts, _pi), g in sample_rows(df, n_concepts):
        if len(g) > budget[0]:
            left += 1
            continue
        prompt = g["prompt"].iloc[0]
        parts.append(f"<div class='prompt'><span class='concept'>{_esc(concepts)}:</span> {_esc(prompt)}</div>"
                     "<div class='row'>")
        for (label, setting), m in g.groupby(["label", "setting"], sort=False):
            figs = []
            for r in m.itertuples():
                uri = _png_uri(out / str(r.image), THUMB_PX)
                img = (f"<img alt='{_esc(label)} {_esc(setting)} image {int(r.image_index)}' src='{uri}'>"
                       if uri else "<div class='missing'>(image missing)</div>")
                figs.append(f"<figure class='{IMAGE_CELL_CLASS}'>{img}<figcaption>{_scores(r, scores)}"
                            "</figcaption></figure>")
                shown += 1
            title = label if setting == "default" else f"{label} · {setting}"
            parts.append(f"<div class='method'><h4>{_esc(title)}</h4><div class='imgs'>{''.join(figs)}</div></div>")
        parts.append("</div>")
        budget[0] -= len(g)
    return "".join(parts), shown, left


def write_html(out: Path, df: pd.DataFrame, summary: pd.DataFrame, comp: pd.DataFrame, *, title: str,
               intro: str, single_cols: list[tuple[str, str]], pair_cols: list[tuple[str, str]],
               plots: list[Path], notes: list[str], extra_images: list[tuple[Path, str]] = (), skipped: list[str] = (),
               failed: list[str] = (), max_images: int = MAX_IMAGES) -> Path:
    """Write ``out/report.html`` (see the module docstring) and return its path. ``intro`` is plain text; the
    tables show the columns ``single_cols`` / ``pair_cols`` (``(column, title)``) that exist in them;
    ``extra_images`` are ``(png, heading)`` shown after the plots."""
    budget = [max_images]
    single_html, n_single, left_single = _samples(out, df, 1, budget)
    pair_html, n_pair, left_pair = _samples(out, df, 2, budget)
    body = [f"<h1>{_esc(title)}</h1>", f"<p>{_esc(intro)}</p>",
            "<h2 id='single'>Single concept</h2>", "<p class='note'>Click a column header to sort.</p>",
            _table(summary, single_cols, cost=True),
            "<h2 id='pairs'>Multi-concept composition</h2>", _table(comp, pair_cols, cost=False)]
    if notes:
        body += ["<h2>Scores that do not vary</h2><ul>"]
        body += ["<li>" + _EMPH.sub(r"<em>\1</em>", _esc(n)) + "</li>" for n in notes] + ["</ul>"]
    body.append("<h2 id='plots'>Plots</h2><div class='plots'>")
    for p in plots:
        uri = _png_uri(p)
        if uri:
            body.append(f"<img alt='{_esc(p.stem)}' title='{_esc(p.stem)}' src='{uri}'>")
    body.append("</div>")
    for p, caption in extra_images:
        uri = _png_uri(p)
        if uri:
            body += [f"<h3>{_esc(caption)}</h3>", f"<div class='strip'><img alt='{_esc(p.stem)}' src='{uri}'></div>"]
    used = [short for scores, n in ((_SINGLE_SCORES, n_single), (_PAIR_SCORES, n_pair)) if n
            for col, short in scores if col in df and df[col].notna().any()]
    legend = "; ".join(f"<b>{_esc(k)}</b> {_esc(_LEGEND[k])}" for k in dict.fromkeys(used))
    seed = int(df["seed"].min())
    body += [f"<h2 id='samples'>Samples</h2><p class='legend'>Seed {seed}, one row per prompt, every method's images "
             f"side by side. Scores under each image: {legend}.</p>", single_html or "<p class='note'>(none)</p>"]
    if pair_html or left_pair:
        body += ["<h2 id='pair-samples'>Pair samples</h2>", pair_html]
    if left_single or left_pair:
        body.append(f"<p class='note'>{left_single + left_pair} more prompts are not shown (the page embeds at most "
                    f"{max_images} images); their samples are in the grids/ and samples/ folders.</p>")
    if skipped:
        body += ["<h2>Skipped cells</h2><ul>"] + [f"<li>{_esc(s)}</li>" for s in skipped] + ["</ul>"]
    if failed:
        body += ["<h2>Failed cells (re-run the suite to retry)</h2><ul>"]
        body += [f"<li>{_esc(s)}</li>" for s in failed] + ["</ul>"]
    page = ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            "<meta name='viewport' content='width=device-width,initial-scale=1'>"
            f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>\n" + "\n".join(body)
            + f"\n<script>{_JS}</script>\n</body></html>\n")
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
