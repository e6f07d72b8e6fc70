"""Measure the toy world: the base model's quality gate, its describability gate, and the evaluator CLIP's
retrieval and concept gap.

* quality gate: held-out captions (category, color, background, position, both objects present, and exactly one
  object for single-object captions), read by :mod:`editbench.toyworld.checker`;
* describability gate: each personal concept's full verbal description ("a white heart with black diagonal
  stripes on a blue background") on backgrounds its references never show must draw the concept's exact
  appearance (category, body color, pattern, pattern color), as Stable Diffusion can draw the parts of almost any
  concept; the superclass prompt ("a heart on a blue background") must not; and both prompts, which state no
  position, must show exactly one object.
"""

from __future__ import annotations

import random

import pandas as pd
import torch

from editbench.toyworld import scenes as R
from editbench.toyworld.checker import check, heldout_specs
from editbench.toyworld.personal import PERSONAL_CONCEPTS
from editbench.progress import progress as progress_bar

GATE = {"category": 0.85, "color": 0.85, "background": 0.90, "position": 0.75, "both_present": 0.60,
        "one_object": 0.90}
# described: mean over the eight concepts; superclass_max: the highest of the eight; one_object: every image of
# both prompt kinds (single objects whose position the prompt does not state)
DESCRIBE_GATE = {"described": 0.60, "superclass_max": 0.10, "one_object": 0.90}


@torch.no_grad()
def generate(pipe, prompts: list[str], *, seed: int = 0, batch_size: int = 50, steps: int = 25,
             guidance_scale: float = 4.0, guidance_rescale: float = 0.7, progress=True) -> list:
    images = []
    for i in progress_bar(range(0, len(prompts), batch_size), desc="sample", disable=not progress):
        chunk = prompts[i:i + batch_size]
        gens = [torch.Generator(pipe.device).manual_seed(seed * 100003 + i + j) for j in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance_scale,
                   guidance_rescale=guidance_rescale, generator=gens, output_type="pil")
        images += out.images
    return images


def quality_gate(pipe, *, n_single: int = 200, n_double: int = 100, seed: int = 0, progress=True,
                 **sample_kwargs) -> tuple[pd.DataFrame, dict]:
    """Sample held-out captions, check every image; returns the per-image table and the summary rates."""
    rows = []
    for two, n in ((False, n_single), (True, n_double)):
        specs = heldout_specs(n, seed=seed, two_object=two)
        images = generate(pipe, [s.caption() for s in specs], seed=seed + int(two), progress=progress,
                          **sample_kwargs)
        for spec, img in zip(specs, images):
            c = check(img, spec)
            rows.append({"prompt": spec.caption(), "objects": len(spec.objects), "background": c.background,
                         "color": c.color, "category": c.category, "position": c.position,
                         "all_present": c.all_present, "count": c.count})
    df = pd.DataFrame(rows)
    single, double = df[df.objects == 1], df[df.objects == 2]
    summary = {k: float(single[k].mean()) for k in ("category", "color", "background", "position")}
    summary["both_present"] = float(double["all_present"].mean()) if len(double) else float("nan")
    summary["one_object"] = float(single["count"].mean())
    summary["passes"] = all(summary[k] >= v for k, v in GATE.items())
    return df, summary


def unseen_backgrounds(c) -> list[str]:
    """Backgrounds a concept's references never show, and that are none of its colors."""
    return [b for b in R.COLORS if b not in c.backgrounds and b not in (c.color, c.pattern_color)]


def describability(pipe, *, images_per_background: int = 4, seed: int = 0, progress=True, grid_path=None,
                   **sample_kwargs) -> tuple[pd.DataFrame, dict]:
    """Prompt the base model with every personal concept's full description and with its superclass word, on
    every background its references never show; read each image's object with the pattern-aware checker.

    Returns the per-image table (with what the reader saw, ``read``) and the summary: per concept the fraction of
    images with all four identity attributes right (``described``) and the same for the superclass prompt
    (``superclass``). ``grid_path``: also write the described images with their readings, to look at."""
    from editbench.toyworld.checker import parse
    from editbench.toyworld.oracle import asked, describe_concept, score_parsed

    rows, prompts, what = [], [], []
    for c in PERSONAL_CONCEPTS:
        for bg in unseen_backgrounds(c):
            target = asked(f"a {{}} on a {bg} background", [c])  # both prompts are scored against the concept
            for kind, text in (("described", describe_concept(c, background=bg)),
                               ("superclass", f"a {c.category} on a {bg} background")):
                for _ in range(images_per_background):
                    prompts.append(text)
                    rows.append({"concept": c.name, "kind": kind, "background": bg, "prompt": text})
                    what.append(target)
    images = generate(pipe, prompts, seed=seed, progress=progress, **sample_kwargs)
    for r, img, w in zip(rows, images, what):
        p = parse(img)
        sc = score_parsed(p, w)
        r.update(identity=sc["identity"], identity_frac=sc["identity_frac"], background_ok=sc["background_ok"],
                 one_object=sc["count_ok"], read="; ".join(_reading(d) for d in p.objects))
    df = pd.DataFrame(rows)
    if grid_path is not None:
        keep = [i for i, r in enumerate(rows) if r["kind"] == "described"]
        labelled_grid([images[i] for i in keep], [rows[i]["read"] or "(nothing)" for i in keep],
                      [rows[i]["identity"] == 1.0 for i in keep], grid_path, columns=16)
    per = df.pivot_table(index="concept", columns="kind", values="identity", aggfunc="mean")
    summary = {"per_concept": {n: {"described": float(per.loc[n, "described"]),
                                   "superclass": float(per.loc[n, "superclass"])} for n in per.index},
               "described": float(df[df.kind == "described"]["identity"].mean()),
               "described_min": float(per["described"].min()),
               "superclass": float(df[df.kind == "superclass"]["identity"].mean()),
               "superclass_max": float(per["superclass"].max()),
               "one_object": float(df["one_object"].mean())}
    summary["passes"] = (summary["described"] >= DESCRIBE_GATE["described"]
                         and summary["superclass_max"] <= DESCRIBE_GATE["superclass_max"]
                         and summary["one_object"] >= DESCRIBE_GATE["one_object"])
    return df, summary


def _reading(d) -> str:
    pattern = f" {d.pattern} {d.pattern_color}" if d.pattern else ""
    return f"{d.color} {d.category}{pattern}"


def labelled_grid(images: list, labels: list[str], ok: list[bool], path, *, columns: int = 8, scale: int = 4) -> None:
    """Images upscaled ``scale`` x (nearest), each with its label underneath (green when ``ok``, red when not)."""
    from PIL import Image, ImageDraw

    w = images[0].width * scale
    cell_h = w + 24
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for k, (im, text, good) in enumerate(zip(images, labels, ok)):
        x, y = (k % columns) * w, (k // columns) * cell_h
        grid.paste(im.resize((w, w), Image.NEAREST), (x, y))
        colour = (0, 120, 0) if good else (190, 0, 0)
        words = text.split(" ")
        mid = (len(words) + 1) // 2  # two short lines fit a 128-px cell
        draw.text((x + 2, y + w + 1), " ".join(words[:mid])[:24], fill=colour)
        draw.text((x + 2, y + w + 12), " ".join(words[mid:])[:24], fill=colour)
    grid.save(path)


def _embed_images(model, preprocess, images) -> torch.Tensor:
    x = torch.stack([preprocess(im) for im in images])
    f = model.encode_image(x)
    return f / f.norm(dim=-1, keepdim=True)


@torch.no_grad()
def evaluator_report(model, preprocess, tokenizer, *, n: int = 500, seed: int = 7, group: int = 100) -> dict:
    """Caption->image top-1 retrieval on held-out scenes (in groups of ``group``), and, per personal concept,
    the image-image cosine of its renders to each other minus to plain renders of its superclass."""
    rng = random.Random(f"evaluator-report:{seed}")
    hits = 0
    for g in range(n // group):
        specs = [R.fully_specified(R.sample_scene(rng, split="any", pattern_prob=0.3)) for _ in range(group)]
        img = _embed_images(model, preprocess, [R.render(s).image for s in specs])
        txt = model.encode_text(tokenizer([s.caption() for s in specs]))
        txt = txt / txt.norm(dim=-1, keepdim=True)
        hits += int((txt @ img.T).argmax(-1).eq(torch.arange(group)).sum())
    gaps = {}
    for c in PERSONAL_CONCEPTS:
        same = [R.render(s).image for s in c.reference_specs(5, seed=seed)]
        plain = [R.render(R.SceneSpec((R.ObjectSpec(c.category, col, "center", "large"),), s.background)).image
                 for s, col in zip(c.reference_specs(5, seed=seed),
                                   [k for k in R.COLORS if k not in (c.color,)][:5])]
        fs, fp = _embed_images(model, preprocess, same), _embed_images(model, preprocess, plain)
        within = (fs @ fs.T)[~torch.eye(len(fs), dtype=torch.bool)].mean()
        gaps[c.name] = float(within - (fs @ fp.T).mean())
    return {"retrieval_top1": hits / (group * (n // group)), "group_size": group, "concept_gap": gaps,
            "concept_gap_min": min(gaps.values())}


def summary_table(summary: dict, described: dict | None = None) -> str:
    lines = ["| attribute | measured | gate |", "| --- | --- | --- |"]
    for k, v in GATE.items():
        lines.append(f"| {k} | {summary[k]:.3f} | >= {v:.2f} |")
    if described:
        lines.append(f"| described concepts (mean of 8; min {described['described_min']:.3f}) | "
                     f"{described['described']:.3f} | >= {DESCRIBE_GATE['described']:.2f} |")
        lines.append(f"| superclass prompt reproduces the concept (max of 8) | {described['superclass_max']:.3f} | "
                     f"<= {DESCRIBE_GATE['superclass_max']:.2f} |")
        lines.append(f"| exactly one object, position-free prompts | {described['one_object']:.3f} | "
                     f">= {DESCRIBE_GATE['one_object']:.2f} |")
        lines += ["", "| concept | described | superclass |", "| --- | --- | --- |"]
        lines += [f"| {n} | {v['described']:.3f} | {v['superclass']:.3f} |"
                  for n, v in described["per_concept"].items()]
    return "\n".join(lines)


def plot_training_log(log_path, out_png) -> None:
    """Loss curves of every stage of ``editbench world train`` (from its ``training_log.json``), one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd
    import seaborn as sns

    from editbench.storage import read_json

    log = read_json(log_path)
    rows = [{"stage": stage, "step": s, "loss": loss}
            for stage, info in log["stages"].items() for s, loss in info["losses"]]
    g = sns.relplot(data=pd.DataFrame(rows), x="step", y="loss", col="stage", kind="line",
                    facet_kws={"sharex": False, "sharey": False}, height=2.6, aspect=1.1)
    g.set(yscale="log")
    g.savefig(out_png, dpi=110)
