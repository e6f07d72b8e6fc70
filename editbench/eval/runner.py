"""Running a suite: train or load each cell's artifacts, apply them, generate, score, write the cell's rows.

Each finished cell writes its rows atomically to ``cells/<cell id>.csv`` (the done marker; a cell that cannot
run, e.g. a multi-concept cell of a method without multi-concept support, writes ``cells/<cell id>.skip.json``);
:func:`editbench.eval.results.collect` assembles ``results.csv`` from them. Re-running skips finished cells, so a
killed run loses at most the cell in flight. Trained artifacts live in ``artifacts/<method name>/`` keyed by a
hash of what determines them (method, config, steps, seed, model, concept) and are reused across inference
settings, multi-concept cells, re-runs and method entries: two entries (labels) of one method with the same
config train once.

Output layout (every name coming from a suite file is sanitized; nothing is written outside ``out``)::

    out/suite.json                    resolved suite (cells and their specs)
    out/cells/<cell>.csv              rows of one finished cell
    out/artifacts/<method>/<concept>/seed<k>-<hash>.safetensors
    out/artifacts/<method>/<a>+<b>/seed<k>-<hash>.safetensors   (``multi: joint``: one artifact for the pair)
    out/samples/<cell>/pNN_iNN.png    generated images
    out/results.csv, results.parquet  the long-format table, one row per generated image
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from editbench.errors import EditbenchError, TrainingError
from editbench.eval import metrics as M
from editbench.eval.results import collect
from editbench.eval.spec import (
    BASE_METHOD,
    Cell,
    MethodSpec,
    Suite,
    inside,
    load_suite,
    parse_shard,
    run_order,
    setting_label,
    shard_cells,
    spec_hash,
    split_settings,
)
from editbench.storage import parse_dtype, write_csv, write_json

__all__ = ["Runner", "generate", "run_suite"]


def _image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_index}:{image_index}".encode()).digest()[:7], "big")


def generate(pipeline: Any, prompts: Sequence[tuple[int, str]], *, images_per_prompt: int, seed: int,
             batch_size: int = 8, progress: bool = False, **call_kwargs: Any) -> list:
    """PIL images for every ``(prompt index, prompt)``, ``images_per_prompt`` each, prompt-major order.

    Image ``j`` of prompt index ``p`` starts from noise seeded by ``(seed, p, j)`` alone, so every method and
    setting sees the same starting noise and batching does not change the result."""
    from editbench.progress import progress as progress_bar

    jobs = [(p, text, j) for p, text in prompts for j in range(images_per_prompt)]
    out = []
    for k in progress_bar(range(0, len(jobs), batch_size), desc="generating", leave=False, disable=not progress):
        chunk = jobs[k:k + batch_size]
        gens = [torch.Generator("cpu").manual_seed(_image_seed(seed, p, j)) for p, _, j in chunk]
        with torch.no_grad():
            res = pipeline(prompt=[t for _, t, _ in chunk], generator=gens, num_images_per_prompt=1,
                           output_type="pil", **call_kwargs)
        out.extend(res.images)
    return out


class Runner:
    """Runs the cells of one suite into ``out``; loads the pipeline, scorers and artifacts on first use."""

    def __init__(self, suite: Suite, out: Path, *, device: Any, dtype: Any, progress: bool, pipeline: Any = None,
                 clip: Any = None, dino: Any = None):
        suite = suite.with_dtype(dtype)
        self.suite, self.out, self.progress = suite, out, progress
        self.device = device or suite.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if str(self.device) == "cuda" and os.environ.get("LOCAL_RANK", "").isdigit():  # one GPU per launched process
            self.device = f"cuda:{os.environ['LOCAL_RANK']}"
        self.dtype = parse_dtype(suite.dtype)
        self._pipe, self._clip, self._dino = pipeline, clip, dino
        self._editors: dict[str, Any] = {}
        self._artifacts: dict[tuple, Any] = {}
        self._refs: dict[tuple[str, str], torch.Tensor] = {}

    # lazily loaded, so that a run with nothing left to do loads nothing
    @property
    def pipeline(self) -> Any:
        if self._pipe is None:
            model = self.suite.model
            if model == "toyworld":
                from editbench import toyworld

                self._pipe = toyworld.load_pipeline(device=self.device, dtype=self.dtype)
            elif model == "tiny":
                from editbench.testing import tiny_pipeline

                self._pipe = tiny_pipeline().to(self.device, self.dtype)
            else:
                folder = self.suite.model_folder()
                from diffusers import DiffusionPipeline

                from editbench.models import dtype_kwargs
                from editbench.progress import quiet_loading

                quiet_loading()
                self._pipe = DiffusionPipeline.from_pretrained(folder, **dtype_kwargs(self.dtype or torch.float32),
                                                               local_files_only=True).to(self.device)
                self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    @property
    def clip(self) -> M.ClipScorer:
        if self._clip is None:
            self._clip = M.load_clip(self.suite.metrics.get("clip"), self.device,
                                     arch=self.suite.metrics.get("clip_arch"))
        return self._clip

    @property
    def dino(self) -> Any:
        if self._dino is None and self.suite.metrics.get("dino"):
            self._dino = M.load_dino(self.suite.metrics["dino"], self.device,
                                     **({"arch": self.suite.metrics["dino_arch"]}
                                        if self.suite.metrics.get("dino_arch") else {}))
        return self._dino

    def editor(self, m: MethodSpec) -> Any:
        if m.label not in self._editors:
            from editbench import methods as registry

            self._editors[m.label] = registry.get(m.name)(**m.config)
        return self._editors[m.label]

    def concept_data(self, editor: Any, name: str) -> Any:
        from editbench.concepts import ConceptData

        c = self.suite.concepts[name]
        tokenizer = None if editor.new_token else self.pipeline.tokenizer  # the pipeline loads only if needed
        placeholder = editor.placeholder(tokenizer, c.placeholder, self.suite.word_index(name))
        return ConceptData(placeholder, c.superclass, list(c.images), list(c.masks) if c.masks else None,
                           templates=c.templates)

    def artifact(self, m: MethodSpec, name: str | tuple[str, ...], seed: int) -> tuple[Any, Any]:
        """(artifact, ConceptData) of (method, concept, seed): loaded if saved, else trained and saved.

        ``name`` a tuple of several concepts: ONE artifact trained jointly on all of them (``multi: joint``),
        saved under ``artifacts/<method>/<a>+<b>/``; the second item is then the list of their ConceptData."""
        editor = self.editor(m)
        names = (name,) if isinstance(name, str) else tuple(name)
        data = [self.concept_data(editor, n) for n in names]
        steps = m.steps or self.suite.steps
        config, class_data = self.suite.class_data_keys(dataclasses.asdict(editor.config), names)
        what = {"method": m.name, "config": config, "steps": steps, "seed": seed,
                "model": self.suite.model_identity(), **self.suite.dtype_key(), **class_data}
        if len(names) == 1:
            what.update(concept=self.suite.concepts[names[0]].identity(), placeholder=data[0].placeholder)
        else:
            what.update(joint=[self.suite.concepts[n].identity() for n in names],
                        placeholders=[c.placeholder for c in data])
        key = spec_hash(what)
        concept = data[0] if len(names) == 1 else data
        folder = "+".join(names)
        # keyed by the method's registry name, not the entry's label: entries that differ only in inference
        # settings (e.g. perfusion and perfusion-global) share their artifacts
        if (m.name, folder, seed, key) in self._artifacts:
            return self._artifacts[(m.name, folder, seed, key)], concept
        path = inside(self.out, self.out / "artifacts" / m.name / folder / f"seed{seed}-{key}.safetensors")
        art = None
        if path.is_file():
            with contextlib.suppress(EditbenchError):
                art = editor.load(path)
        if art is None:
            ckpt = path.with_suffix(".ckpt")
            art = editor.fit(self.pipeline, concept, steps=steps, seed=seed, progress=self.progress,
                             checkpoint_dir=ckpt)
            art.save(path)
            with contextlib.suppress(OSError):
                for f in ckpt.glob("*"):
                    f.unlink()
                ckpt.rmdir()
        self._artifacts[(m.name, folder, seed, key)] = art
        return art, concept

    def references(self, encoder: Any, name: str) -> torch.Tensor:
        key = (encoder.name, name)
        if key not in self._refs:
            self._refs[key] = encoder.encode_images(list(self.suite.concepts[name].images))
        return self._refs[key]

    def cell_path(self, cell: Cell, suffix: str = ".csv") -> Path:
        return inside(self.out, self.out / "cells" / f"{cell.id}{suffix}")

    def done(self, cell: Cell) -> bool:
        return self.cell_path(cell).is_file() or self.cell_path(cell, ".skip.json").is_file()

    def run_cell(self, cell: Cell) -> None:
        s, m = self.suite, cell.method
        concepts = [s.concepts[n] for n in cell.concepts]
        cost: dict[str, Any] = {"storage_bytes": 0, "train_time_s": 0.0, "peak_memory_bytes": 0,
                                "memory_kind": None, "train_steps": 0}
        handle = None
        if m.name == BASE_METHOD:
            phrases = [c.superclass for c in concepts]
        else:
            editor = self.editor(m)
            inference, transform = split_settings(editor, cell.settings)
            n = len(concepts)
            joint = n > 1 and m.multi == "joint"
            if n > 1 and not joint and editor.max_artifacts is not None and editor.max_artifacts < n \
                    and not editor.can_compose():
                write_json(self.cell_path(cell, ".skip.json"),
                           {"cell": cell.id, "reason": f"{m.name} applies at most {editor.max_artifacts} artifact(s) "
                            "and has no merge (compose)"}, default=str)
                return
            arts, phrases = [], []
            # joint: one artifact trained on all the cell's concepts; separate: one artifact per concept
            for unit in [cell.concepts] if joint else cell.concepts:
                art, concept = self.artifact(m, unit, cell.seed)
                st = M.artifact_stats(art)
                cost["train_time_s"] += st["train_time_s"]
                cost["train_steps"] += st["train_steps"]
                cost["peak_memory_bytes"] = max(cost["peak_memory_bytes"], st["peak_memory_bytes"])
                cost["memory_kind"] = st["memory_kind"]
                if transform:
                    art = editor.transform(art, **transform)
                cost["storage_bytes"] += art.nbytes
                arts.append(art)
                phrases += [editor.phrase(art, c.placeholder) for c in (concept if joint else [concept])]
            if len(arts) > 1 and editor.max_artifacts is not None and editor.max_artifacts < len(arts):
                arts = [editor.compose(arts, self.pipeline)]
                cost["storage_bytes"] = arts[0].nbytes
            handle = editor.apply(self.pipeline, arts, **inference)
        t0 = time.perf_counter()
        try:
            prompts = [(p, M.fill_prompt(t, phrases)) for p, t in cell.prompts]
            gen = dict(s.generation)
            batch = int(gen.pop("batch_size", 8))
            images = generate(self.pipeline, prompts, images_per_prompt=s.images_per_prompt, seed=cell.seed,
                              batch_size=batch, progress=self.progress, **gen)
        finally:
            if handle is not None:
                handle.undo()
        gen_time = (time.perf_counter() - t0) / max(len(images), 1)
        rows = self.score(cell, prompts, images)
        sample_dir = inside(self.out, self.out / "samples" / cell.id)
        sample_dir.mkdir(parents=True, exist_ok=True)
        for r, img in zip(rows, images):
            img.save(self.out / r["image"])
            r.update(cost, gen_time_s=gen_time)
        write_csv(self.cell_path(cell), pd.DataFrame(rows))

    def score(self, cell: Cell, prompts: list[tuple[int, str]], images: list) -> list[dict]:
        s, mt = self.suite, self.suite.metrics
        concepts = [s.concepts[n] for n in cell.concepts]
        k = s.images_per_prompt
        templates = dict(cell.prompts)
        eval_texts = [M.superclass_prompt(templates[p], [c.superclass for c in concepts]) for p, _ in prompts]
        clip = self.clip
        emb = clip.encode_images(images)                                          # (n, d)
        texts = sorted(set(eval_texts))
        temb = clip.encode_texts(texts)
        idx = torch.tensor([texts.index(eval_texts[i // k]) for i in range(len(images))])
        text_cos = (emb * temb[idx]).sum(1)                                       # (n,)
        per_img_cos, per_img_scaled, thresholds = [], [], []
        comp = mt["composition"]
        for c in concepts:
            ref = self.references(clip, c.name)
            per_img_cos.append(M.pair_alignment(emb, ref))
            per_img_scaled.append(M.pair_alignment(emb, ref, scale=mt["image_scale"]))
            thresholds.append(M.composition_threshold(ref, quantile=comp["quantile"], margin=comp["margin"]))
        cos_mat = torch.stack(per_img_cos, 1)                                     # (n, concepts)
        dino = self.dino
        dino_vals = (torch.stack([M.pair_alignment(dino.encode_images(images), self.references(dino, c.name))
                                  for c in concepts], 1) if dino is not None else None)
        hits = M.composition_hits(cos_mat, thresholds) if len(concepts) > 1 else None
        text_scaled = M.to_scale(text_cos, mt["text_scale"])
        base = {"suite": s.name, "cell": cell.id, "method": cell.method.name, "label": cell.method.label,
                "multi": cell.method.multi, "concepts": "+".join(cell.concepts), "n_concepts": len(concepts),
                "seed": cell.seed,
                "setting": setting_label(cell.settings), "settings": json.dumps(cell.settings, sort_keys=True),
                **{f"set_{key}": v for key, v in cell.settings.items()},
                "clip_model": clip.name, "text_scale": mt["text_scale"], "image_scale": mt["image_scale"]}
        rows = []
        for i, img in enumerate(images):
            p, prompt = prompts[i // k]
            r = dict(base, prompt_index=p, prompt=prompt, eval_prompt=eval_texts[i // k], image_index=i % k,
                     image=f"samples/{cell.id}/p{p:02d}_i{i % k:02d}.png",
                     text_alignment=float(text_scaled[i]), text_cosine=float(text_cos[i]),
                     image_alignment=float(torch.stack(per_img_scaled, 1)[i].mean()),
                     image_cosine=float(cos_mat[i].mean()))
            for j, c in enumerate(concepts):
                r[f"concept_{j}"] = c.name
                r[f"image_alignment_{j}"] = float(per_img_scaled[j][i])
                r[f"image_cosine_{j}"] = float(per_img_cos[j][i])
                if dino_vals is not None:
                    r[f"dino_image_{j}"] = float(dino_vals[i, j])
                if len(concepts) > 1:
                    r[f"composition_threshold_{j}"] = thresholds[j]
            if dino_vals is not None:
                r["dino_model"], r["dino_image"] = dino.name, float(dino_vals[i].mean())
            if hits is not None:
                r["composition_hit"] = math.nan if any(math.isnan(t) for t in thresholds) else float(hits[i])
            rows.append(r)
        if all(c.source == "toyworld" for c in concepts):  # exact scores from the renderer's ground truth
            from editbench.toyworld import oracle

            personal = [oracle.concept_by_name(c.name) for c in concepts]
            asked = {p: oracle.asked(templates[p], personal) for p, _ in prompts}
            for i, (r, img) in enumerate(zip(rows, images)):
                r.update(oracle.score(img, asked[prompts[i // k][0]]))
        return rows


def run_suite(suite: str | os.PathLike | Suite, out: str | os.PathLike, *, shard: tuple[int, int] | str = (0, 1),
              device: Any = None, dtype: Any = None, progress: bool = True, pipeline: Any = None,
              clip: Any = None, dino: Any = None) -> pd.DataFrame:
    """Run (or resume) a suite into ``out``; returns the assembled long-format results table.

    ``suite`` is a bundled name, a YAML path or a :class:`Suite`. ``shard=(i, N)`` (or ``"i/N"``) runs one
    deterministic slice of the cells. ``device``/``dtype`` override the suite's. ``pipeline``, ``clip`` (a
    :class:`~editbench.eval.metrics.ClipScorer`) and ``dino`` inject ready models (tests, notebooks).
    Cells that raise are recorded in ``cells/<cell>.error.txt`` and the others still run; an EditbenchError
    listing them is raised at the end (re-running retries them).
    """
    from editbench.progress import progress as progress_bar

    suite = (suite if isinstance(suite, Suite) else load_suite(suite)).with_dtype(dtype)
    shard = parse_shard(shard)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EditbenchError(f"output {out} exists and is not a folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    cells = suite.cells()
    suite.validate()
    write_json(out / "suite.json", {"name": suite.name, "model": suite.model, "metrics": suite.metrics,
                                    "images_per_prompt": suite.images_per_prompt,
                                    "cells": [c.id for c in cells],
                                    "methods": [dataclasses.asdict(m) for m in suite.methods],
                                    **({"tuned": suite.tuned} if suite.tuned else {})}, default=str)
    runner = Runner(suite, out, device=device, dtype=dtype, progress=progress, pipeline=pipeline, clip=clip,
                    dino=dino)
    todo = run_order([c for c in shard_cells(cells, shard) if not runner.done(c)])
    failed, group = [], None
    for cell in progress_bar(todo, desc=f"{suite.name} shard {shard[0]}/{shard[1]}", disable=not progress):
        if cell.group != group:  # keep only the current group's artifacts in memory (DreamBooth's are big)
            runner._artifacts.clear()
            group = cell.group
        err_path = runner.cell_path(cell, ".error.txt")
        try:
            runner.run_cell(cell)
        except TrainingError:  # e.g. a non-finite loss: that cell failed, the others can still run
            failed.append(cell.id)
            err_path.parent.mkdir(parents=True, exist_ok=True)
            err_path.write_text(traceback.format_exc())
            continue
        except EditbenchError as err:  # user errors (bad data, settings) stop the run: fix, then re-run
            raise EditbenchError(f"cell {cell.id}: {err}") from err
        except Exception:  # noqa: BLE001 - a method bug fails its cell, not the whole run
            failed.append(cell.id)
            err_path.parent.mkdir(parents=True, exist_ok=True)
            err_path.write_text(traceback.format_exc())
        else:
            err_path.unlink(missing_ok=True)
    df = collect(out, [c.id for c in cells])
    if failed:
        raise EditbenchError(f"{len(failed)} cell(s) failed: {failed[:5]}{' ...' if len(failed) > 5 else ''}; "
                             f"see {out / 'cells'}/<cell>.error.txt, fix and re-run (finished cells are kept)")
    return df
