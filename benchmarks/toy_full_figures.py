"""The figures and paired differences of docs/results.md, from a finished ``toy-full`` run folder.

    python benchmarks/toy_full_figures.py runs/full            # after: editbench report runs/full

Writes ``docs/img/results_identity_fidelity.png`` and ``results_alignment.png`` (the report's ``plots/oracle.png``
and ``plots/alignment.png``), ``docs/img/results_samples.png`` (first row each test concept's references, then one
image per method at its tuned point: training seed 0, image 0, three prompts per concept) and ``paired.csv`` in the
run folder: every two single-concept rows' paired difference (``editbench.eval.report.paired_table``) in
identity, prompt fidelity, background and CLIP image / text alignment, the numbers the findings quote.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw
from tqdm import tqdm

from editbench.eval.report import paired_table
from editbench.eval.results import collect
from editbench.toyworld import concepts

ROOT = Path(__file__).resolve().parents[1]
SCORES = ("identity", "prompt_fidelity", "background_ok", "image_alignment", "text_alignment")
# (label, setting, row title): each method at its tuned point (Perfusion's: the setting of its tuned beta)
ROWS = (("perfusion", None, "Perfusion"), ("dreambooth", "default", "DreamBooth"),
        ("lora", "scale=1.0", "LoRA"), ("custom_diffusion", "default", "Custom Diff."),
        ("custom_diffusion-joint", "default", "Custom Diff."),  # toy-full: the full-rank single-concept artifact
        ("textual_inversion", "default", "Text. inv."))
PROMPTS = (0, 2, 3)  # a new background; a new position on a reference background; a new position and background


def samples_figure(run: Path, df: pd.DataFrame, path: Path, *, cell: int = 84, margin: int = 130) -> None:
    names = list(dict.fromkeys(df[df["n_concepts"] == 1]["concepts"]))
    refs = {c.name: c.images for c in concepts()}
    seed0 = df[(df["seed"] == df["seed"].min()) & (df["image_index"] == 0) & (df["n_concepts"] == 1)]
    beta = json.loads((ROOT / "benchmarks" / "tuning" / "toy-quick" / "perfusion" / "tuned.json").read_text())
    beta = beta["settings"]["beta"]
    perf = (df[(df["label"] == "perfusion") & df["set_beta"].sub(beta).abs().lt(0.01 * beta)]["setting"]
            if "set_beta" in df else pd.Series(dtype=str))
    have = set(zip(seed0["label"], seed0["setting"]))
    rows = [("references", None)] + [(title, (label, setting if setting else perf.iloc[0]))
                                     for label, setting, title in ROWS
                                     if (label, setting) in have or (setting is None and not perf.empty)]
    canvas = Image.new("RGB", (margin + cell * len(names) * len(PROMPTS), 20 + cell * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, name in enumerate(names):
        draw.text((margin + j * len(PROMPTS) * cell + 2, 4), name, fill="black")
        for i, (title, key) in enumerate(rows):
            for k, p in enumerate(PROMPTS):
                if key is None:
                    src = refs[name][k]
                else:
                    hit = seed0[(seed0["label"] == key[0]) & (seed0["setting"] == key[1])
                                & (seed0["concepts"] == name) & (seed0["prompt_index"] == p)]
                    if hit.empty:
                        continue
                    src = run / hit["image"].iloc[0]
                with Image.open(src) as img:
                    tile = img.convert("RGB").resize((cell - 2, cell - 2), Image.Resampling.NEAREST)
                canvas.paste(tile, (margin + (j * len(PROMPTS) + k) * cell, 20 + i * cell))
    for i, (title, _) in enumerate(rows):
        draw.text((8, 20 + i * cell + cell // 2 - 6), title, fill="black")
    canvas.save(path)


def all_pairs(df: pd.DataFrame) -> pd.DataFrame:
    single = df[df["n_concepts"] == 1]
    keys = list(dict.fromkeys(zip(single["label"], single["setting"])))
    rows = []
    for a, b in tqdm(list(itertools.combinations(keys, 2)), desc="paired differences"):
        r = {"a": f"{a[0]} {a[1]}", "b": f"{b[0]} {b[1]}"}
        for t in paired_table(single, a, b).itertuples():
            if t.score in SCORES:
                r[t.score], r[f"{t.score}_lo"], r[f"{t.score}_hi"] = t.difference, t.low, t.high
        rows.append(r)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a toy-full output folder, reported (editbench report RUN)")
    ap.add_argument("--img", type=Path, default=ROOT / "docs" / "img")
    args = ap.parse_args(argv)
    df = collect(args.run)
    for src, dst in (("oracle.png", "results_identity_fidelity.png"), ("alignment.png", "results_alignment.png")):
        shutil.copyfile(args.run / "plots" / src, args.img / dst)
    samples_figure(args.run, df, args.img / "results_samples.png")
    all_pairs(df).to_csv(args.run / "paired.csv", index=False, float_format="%.4f")
    print(f"wrote {args.img}/results_*.png and {args.run / 'paired.csv'}")


if __name__ == "__main__":
    main()
