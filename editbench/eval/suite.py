"""Benchmark suites: a YAML file of methods x concepts x seeds x inference settings, run into one results table.

A *cell* is one (method, concept(s), seed, inference setting) unit: apply the trained artifact(s) with that
setting, generate ``images_per_prompt`` images for every prompt, score them. Each finished cell writes its rows
atomically to ``cells/<cell id>.csv`` (the done marker; a cell that cannot run, e.g. a multi-concept cell of a
method without multi-concept support, writes ``cells/<cell id>.skip.json``); ``results.csv`` (and
``results.parquet``) are assembled from the cell files of the current suite. Re-running skips finished cells, so a
killed run loses at most the cell in flight. Trained artifacts live in ``artifacts/<method name>/`` keyed by a
hash of what determines them (method, config, steps, seed, model, concept) and are reused across inference
settings, multi-concept cells, re-runs and method entries: two entries (labels) of one method with the same
config train once. ``--shard i/N``
runs a deterministic slice: the (method, concept(s), seed) groups in sorted order, every N-th from the i-th.

Output layout (every name coming from a suite file is sanitized; nothing is written outside ``out``)::

    out/suite.json                    resolved suite (cells and their specs)
    out/cells/<cell>.csv              rows of one finished cell
    out/artifacts/<method>/<concept>/seed<k>-<hash>.safetensors
    out/artifacts/<method>/<a>+<b>/seed<k>-<hash>.safetensors   (``multi: joint``: one artifact for the pair)
    out/samples/<cell>/pNN_iNN.png    generated images
    out/results.csv, results.parquet  the long-format table, one row per generated image

See ``docs/evaluation.md`` for the YAML schema.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from editbench.errors import EditbenchError, TrainingError
from editbench.eval import metrics as M
from editbench.eval.sources import (
    ConceptSpec,
    PairSpec,
    custom_concept,
    customconcept101_concepts,
    dreambench_concepts,
    toy_concepts,
)
from editbench.storage import atomic_target

__all__ = ["BUNDLED", "Cell", "ConceptSpec", "MethodSpec", "PairSpec", "Suite", "bundled_suites", "collect",
           "generate", "load_suite", "parse_shard", "run_order", "run_suite", "safe_name", "shard_cells",
           "write_report"]

BUNDLED = Path(__file__).parent / "suites"
BASE_METHOD = "base"
"""Pseudo-method: the unedited model prompted with the superclass word (a reference point; nothing trained)."""

_TOP_KEYS = {"name", "description", "model", "device", "dtype", "seeds", "concepts", "pairs", "prompts",
             "pair_prompts", "max_prompts", "images_per_prompt", "steps", "generation", "metrics", "methods",
             "validation"}
_METHOD_KEYS = {"name", "label", "config", "steps", "settings", "sweep", "multi"}
MULTI_MODES = ("separate", "joint")
"""How a method entry handles a multi-concept cell (``multi:``): ``separate`` (default; ``merge`` is accepted as
a synonym): one artifact per concept, applied together, or merged with ``compose`` if the method applies only one;
``joint``: one artifact trained on all the cell's concepts in one ``fit`` (methods with ``max_concepts != 1``)."""
_MULTI_ALIASES = {"merge": "separate"}
_METRIC_KEYS = {"clip", "clip_arch", "dino", "dino_arch", "text_scale", "image_scale", "composition"}
_NAME_OK = re.compile(r"[^A-Za-z0-9._+=-]+")


# ------------------------------------------------------------------------------------------------ helpers
def safe_name(name: Any, what: str = "name", max_len: int = 80) -> str:
    """A file-name-safe slug of ``name`` (letters, digits, ``._+=-``; no leading dot; no path separators).

    EditbenchError if nothing usable is left (e.g. ``".."``)."""
    slug = _NAME_OK.sub("_", str(name)).strip("._")[:max_len].strip("._")
    if not slug:
        raise EditbenchError(f"{what} {name!r} has no usable characters for a file name; use letters and digits")
    return slug


def _inside(out: Path, path: Path) -> Path:
    """``path`` if it resolves inside ``out``, else EditbenchError (defence in depth after :func:`safe_name`)."""
    if not path.resolve().is_relative_to(out.resolve()):
        raise EditbenchError(f"refusing to write {path}: it is outside the output folder {out}")
    return path


def _hash(obj: Any, n: int = 10) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def parse_shard(shard: str | Sequence[int]) -> tuple[int, int]:
    """``"i/N"`` or ``(i, N)`` -> ``(i, N)`` with ``0 <= i < N``; EditbenchError otherwise."""
    try:
        i, n = (int(x) for x in shard.split("/")) if isinstance(shard, str) else (int(shard[0]), int(shard[1]))
    except (ValueError, TypeError, IndexError):
        raise EditbenchError(f"shard must look like 'i/N' (e.g. '0/4'), got {shard!r}") from None
    if n < 1 or not 0 <= i < n:
        raise EditbenchError(f"shard {i}/{n}: need N >= 1 and 0 <= i < N (shards are numbered from 0)")
    return i, n


# ------------------------------------------------------------------------------------------------ suite
@dataclass(frozen=True)
class MethodSpec:
    """One method entry: registry ``name``, unique ``label``, config overrides, training steps, settings, and
    ``multi``, how multi-concept cells get their artifact(s) (see :data:`MULTI_MODES`)."""

    name: str
    label: str
    config: dict = field(default_factory=dict)
    steps: int | None = None
    settings: dict = field(default_factory=dict)
    sweep: dict = field(default_factory=dict)
    multi: str = "separate"

    def points(self) -> list[dict]:
        """Every inference setting: fixed ``settings`` + one point of the ``sweep`` grid (sweep key order)."""
        keys = list(self.sweep)
        return [{**self.settings, **dict(zip(keys, vals))}
                for vals in itertools.product(*(self.sweep[k] for k in keys))] or [dict(self.settings)]


def setting_label(settings: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in settings.items()) or "default"


@dataclass(frozen=True)
class Cell:
    """One (method, concept(s), seed, setting) unit of a suite."""

    method: MethodSpec
    concepts: tuple[str, ...]
    seed: int
    settings: dict
    prompts: tuple[tuple[int, str], ...]   # (index in the concept's prompt list, template)
    spec_hash: str

    @property
    def group(self) -> tuple[str, tuple[str, ...], int]:
        return (self.method.label, self.concepts, self.seed)

    @property
    def unit(self) -> tuple[tuple[str, ...], int]:
        """(concepts, seed): the cells that can share trained artifacts (every method entry and setting)."""
        return (self.concepts, self.seed)

    @property
    def id(self) -> str:
        slug = "__".join([self.method.label, "+".join(self.concepts), f"s{self.seed}",
                          safe_name(setting_label(self.settings), "setting", 40)])
        return f"{safe_name(slug, 'cell', 140)}-{self.spec_hash}"


@dataclass
class Suite:
    """A parsed, validated suite file (see :func:`load_suite`)."""

    name: str
    path: Path | None
    model: str
    methods: list[MethodSpec]
    concepts: dict[str, ConceptSpec]
    pairs: list[PairSpec]
    seeds: list[int]
    prompts: str | list[str] = "default"
    pair_prompts: str | list[str] = "default"
    max_prompts: int | None = None
    images_per_prompt: int = 4
    steps: int | None = None
    generation: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    device: str | None = None
    dtype: str | None = None
    validation: dict[str, ConceptSpec] = field(default_factory=dict)
    """Concepts for tuning (``validation:``, ``editbench tune``); never cells, disjoint from ``concepts``."""
    tuned: list[dict] = field(default_factory=list)
    """Provenance of the tuned settings applied to the methods (``bench --tuned``), recorded in suite.json."""

    def concept_prompts(self, names: tuple[str, ...]) -> list[tuple[int, str]]:
        if len(names) == 1:
            own, given = self.concepts[names[0]].prompts, self.prompts
        else:
            own = next((p.prompts for p in self.pairs if p.names == names), ())
            given = self.pair_prompts
        prompts = list(own) if given == "default" else list(given)
        if not prompts:
            raise EditbenchError(f"no prompts for {'+'.join(names)}; give 'pair_prompts:' (with {{0}} and {{1}})"
                                 if len(names) > 1 else f"no prompts for concept {names[0]}")
        for p in prompts:  # fails early on a prompt without its slots
            M.fill_prompt(p, [f"x{i}" for i in range(len(names))])
        pairs = list(enumerate(prompts))
        return pairs[: self.max_prompts] if self.max_prompts else pairs

    def cells(self) -> list[Cell]:
        """Every cell, ordered by group (method label, concepts, seed), then setting."""
        units = [(n,) for n in self.concepts] + [p.names for p in self.pairs]
        common = {"model": self.model, "images_per_prompt": self.images_per_prompt, "steps": self.steps,
                  "generation": self.generation, "metrics": self.metrics}
        out = []
        for m, names, seed in itertools.product(self.methods, units, self.seeds):
            prompts = tuple(self.concept_prompts(names))
            method = dataclasses.asdict(m)
            if m.multi == "separate":  # the default leaves the hash as before the option existed: old cells stay
                del method["multi"]
            for point in m.points():
                spec = {**common, "method": method, "concepts": [self.concepts[n].identity() for n in names],
                        "seed": seed, "settings": point, "prompts": prompts}
                out.append(Cell(m, names, seed, point, prompts, _hash(spec)))
        return sorted(out, key=lambda c: (c.group, list(c.method.points()).index(c.settings)))

    def validate(self) -> None:
        """Import the methods and check config overrides and every inference setting (EditbenchError)."""
        from editbench import methods as registry

        for m in self.methods:
            if m.name == BASE_METHOD:
                if m.config or m.settings or m.sweep or m.multi != "separate":
                    raise EditbenchError("method 'base' (the unedited model) takes no config, settings, sweep or "
                                         "multi")
                continue
            editor = registry.get(m.name)(**m.config)
            if m.multi == "joint" and editor.max_concepts is not None and editor.max_concepts < 2:
                raise EditbenchError(f"{m.label}: method {m.name!r} trains one concept per fit (max_concepts="
                                     f"{editor.max_concepts}), so 'multi: joint' is not possible; use 'multi: "
                                     "separate' (the default)")
            for point in m.points():
                inference, transform = _split_settings(editor, point)
                for n in {1} | ({2} if self.pairs and m.multi != "joint" else set()):  # joint: one artifact
                    editor.settings(n, **inference)
                unknown = set(transform) - set(editor.transform_settings)
                if unknown:
                    raise EditbenchError(f"{m.label}: unknown inference setting(s) {sorted(unknown)}")


def _as_list(v: Any, what: str) -> list:
    if v is None:
        return []
    if isinstance(v, (str, int, float, dict)):
        return [v]
    if not isinstance(v, list):
        raise EditbenchError(f"{what} must be a list, got {v!r}")
    return v


def _method_spec(e: Any) -> MethodSpec:
    e = {"name": e} if isinstance(e, str) else e
    if not isinstance(e, dict) or "name" not in e:
        raise EditbenchError(f"each entry of 'methods' is a method name or a mapping with 'name', got {e!r}")
    unknown = set(e) - _METHOD_KEYS
    if unknown:
        raise EditbenchError(f"method {e['name']!r}: unknown key(s) {sorted(unknown)}; valid: {sorted(_METHOD_KEYS)}")
    sweep = e.get("sweep") or {}
    if not isinstance(sweep, dict) or not all(isinstance(v, list) and v for v in sweep.values()):
        raise EditbenchError(f"method {e['name']!r}: sweep must map setting names to non-empty lists, got {sweep!r}")
    for key in ("config", "settings"):
        if not isinstance(e.get(key) or {}, dict):
            raise EditbenchError(f"method {e['name']!r}: {key} must be a mapping, got {e[key]!r}")
    steps = e.get("steps")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise EditbenchError(f"method {e['name']!r}: steps must be a positive int, got {steps!r}")
    multi = e.get("multi", "separate")
    multi = _MULTI_ALIASES.get(multi, multi) if isinstance(multi, str) else multi
    if multi not in MULTI_MODES:
        raise EditbenchError(f"method {e['name']!r}: multi must be one of {list(MULTI_MODES)} (or 'merge', the same "
                             f"as 'separate'), got {e['multi']!r}")
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in (e.get("config") or {}).items()}
    return MethodSpec(str(e["name"]), safe_name(e.get("label") or e["name"], "method label"), config, steps,
                      dict(e.get("settings") or {}), {k: list(v) for k, v in sweep.items()}, multi)


def _parse_concepts(entries: Any, base: Path, key: str = "concepts") -> tuple[dict[str, ConceptSpec], list[PairSpec]]:
    """The concepts of a ``concepts:`` (or ``validation:``) list, keyed by their file-name-safe names, and the
    sources' own pairs."""
    concepts: dict[str, ConceptSpec] = {}
    source_pairs: list[PairSpec] = []
    toy = None
    for e in _as_list(entries, key):
        if isinstance(e, str) or (isinstance(e, dict) and "toyworld" in e):
            toy = toy or toy_concepts()
            want = [e] if isinstance(e, str) else e["toyworld"]
            want = sorted(toy[0]) if want == "all" else _as_list(want, "toyworld")
            for n in want:
                if n not in toy[0]:
                    raise EditbenchError(f"{n!r} is not a toy-world concept; toy concepts: {sorted(toy[0])} (for a "
                                         "folder on disk use {dreambench: path} or a custom concept mapping)")
                concepts[n] = toy[0][n]
            source_pairs += toy[1]
        elif isinstance(e, dict) and "dreambench" in e:
            names = e.get("names", "all")
            concepts.update(dreambench_concepts(base / e["dreambench"], None if names == "all" else _as_list(names, "names")))
        elif isinstance(e, dict) and "customconcept101" in e:
            names = e.get("names", "all")
            found, prs = customconcept101_concepts(base / e["customconcept101"],
                                           None if names == "all" else _as_list(names, "names"))
            concepts.update(found)
            source_pairs += prs
        elif isinstance(e, dict):
            c = custom_concept(e, base)
            concepts[c.name] = c
        else:
            raise EditbenchError(f"bad {key} entry {e!r}; use a toy-world name, {{toyworld: all}}, "
                                 "{dreambench: folder}, {customconcept101: file} or a custom concept mapping")
    slugs = {}
    for n in concepts:
        s = safe_name(n, "concept name")
        if s in slugs:
            raise EditbenchError(f"concepts {slugs[s]!r} and {n!r} map to the same folder name {s!r}; rename one")
        slugs[s] = n
    return {safe_name(n): dataclasses.replace(c, name=safe_name(n)) for n, c in concepts.items()}, source_pairs


def bundled_suites() -> list[str]:
    """Names of the suites shipped in ``editbench/eval/suites``."""
    return sorted(p.stem for p in BUNDLED.glob("*.yaml"))


def _suite_path(suite: str | os.PathLike) -> Path:
    path = Path(suite).expanduser()
    if path.is_file():
        return path
    if isinstance(suite, str) and (BUNDLED / f"{suite}.yaml").is_file():
        return BUNDLED / f"{suite}.yaml"
    raise EditbenchError(f"suite {str(suite)!r} is neither a file nor a bundled suite; bundled: {bundled_suites()}")


def load_suite(suite: str | os.PathLike | dict) -> Suite:
    """Parse a suite: a bundled name (``"toy-quick"``), a YAML path, or an already-parsed mapping.

    Relative data paths resolve against the suite file's folder. EditbenchError names any problem."""
    import yaml

    path = None
    if isinstance(suite, dict):
        raw, base = suite, Path.cwd()
    else:
        path = _suite_path(suite)
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise EditbenchError(f"suite {path} is not valid YAML: {err}") from None
        base = path.parent
    if not isinstance(raw, dict):
        raise EditbenchError(f"a suite file is a YAML mapping (keys {sorted(_TOP_KEYS)}), got {type(raw).__name__}")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise EditbenchError(f"unknown suite key(s) {sorted(unknown)}; valid: {sorted(_TOP_KEYS)}")
    metrics = dict(raw.get("metrics") or {})
    if set(metrics) - _METRIC_KEYS:
        raise EditbenchError(f"unknown metrics key(s) {sorted(set(metrics) - _METRIC_KEYS)}; valid: "
                             f"{sorted(_METRIC_KEYS)}")
    metrics.setdefault("text_scale", "cosine")
    metrics.setdefault("image_scale", "cosine")
    M.check_scale(metrics["text_scale"])
    M.check_scale(metrics["image_scale"])
    comp = {"quantile": 0.1, "margin": 0.05, **(metrics.get("composition") or {})}
    if set(comp) != {"quantile", "margin"}:
        raise EditbenchError(f"metrics.composition takes quantile and margin, got {sorted(comp)}")
    metrics["composition"] = comp
    for key in ("clip", "dino"):
        if metrics.get(key) is not None:
            metrics[key] = str((base / str(metrics[key]).replace("~", str(Path.home()), 1))
                               if not str(metrics[key]).startswith("hf-hub:") else metrics[key])

    concepts, source_pairs = _parse_concepts(raw.get("concepts"), base)
    if not concepts:
        raise EditbenchError("the suite lists no concepts")
    validation = _parse_concepts(raw.get("validation"), base, "validation")[0]
    overlap = sorted(set(validation) & set(concepts))
    if overlap:
        raise EditbenchError(f"concept(s) {overlap} are both test ('concepts:') and validation ('validation:') "
                             "concepts; tuning on test concepts would leak into the reported scores: keep them apart")

    pairs_raw = raw.get("pairs")
    pairs: list[PairSpec] = []
    if pairs_raw == "auto":
        pairs = [p for p in source_pairs if all(n in concepts for n in p.names)]
    elif pairs_raw:
        for pr in _as_list(pairs_raw, "pairs"):
            if not (isinstance(pr, list) and len(pr) == 2 and all(safe_name(n) in concepts for n in pr)):
                raise EditbenchError(f"each pair is a list of two of the suite's concepts {sorted(concepts)}, got {pr!r}")
            names = (safe_name(pr[0]), safe_name(pr[1]))
            own = next((p.prompts for p in source_pairs if p.names == names), ())
            pairs.append(PairSpec(names, own))
    pairs = list({p.names: p for p in pairs}.values())

    methods = [_method_spec(e) for e in _as_list(raw.get("methods"), "methods")]
    if not methods:
        raise EditbenchError("the suite lists no methods")
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise EditbenchError(f"method labels must be unique, got {labels}; give repeated methods a 'label'")
    seeds = raw.get("seeds", [0])
    seeds = list(range(seeds)) if isinstance(seeds, int) and not isinstance(seeds, bool) else seeds
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise EditbenchError(f"seeds must be a count or a list of ints >= 0, got {raw.get('seeds')!r}")
    ipp = raw.get("images_per_prompt", 4)
    if isinstance(ipp, bool) or not isinstance(ipp, int) or ipp < 1:
        raise EditbenchError(f"images_per_prompt must be a positive int, got {ipp!r}")
    mp = raw.get("max_prompts")
    if mp is not None and (isinstance(mp, bool) or not isinstance(mp, int) or mp < 1):
        raise EditbenchError(f"max_prompts must be a positive int or null, got {mp!r}")
    for key in ("prompts", "pair_prompts"):
        v = raw.get(key, "default")
        if v != "default" and not (isinstance(v, list) and v and all(isinstance(p, str) for p in v)):
            raise EditbenchError(f"{key} must be 'default' or a list of prompt strings, got {v!r}")
    model = str(raw.get("model", "toyworld"))
    if model not in ("toyworld", "tiny"):
        model = str(base / model.replace("~", str(Path.home()), 1))
    name = safe_name(raw.get("name") or (path.stem if path else "suite"), "suite name")
    gen = dict(raw.get("generation") or {})
    return Suite(name, path, model, methods, concepts, pairs, list(dict.fromkeys(seeds)),
                 raw.get("prompts", "default"), raw.get("pair_prompts", "default"), mp, ipp, raw.get("steps"), gen,
                 metrics, raw.get("device"), raw.get("dtype"), validation)


def shard_cells(cells: Sequence[Cell], shard: tuple[int, int] | str) -> list[Cell]:
    """The cells of shard ``i`` of ``N``: units (concepts, seed) in sorted order, single concepts first, every
    N-th from i.

    Every method entry and setting of one concept set and seed stays in one shard, so entries that share an
    artifact (``perfusion`` and ``perfusion-global``, say) never train it twice on two shards; listing the
    single-concept units first balances them over the shards (they hold most of the training)."""
    i, n = parse_shard(shard)
    units = sorted({c.unit for c in cells}, key=lambda u: (len(u[0]), u))
    mine = {u for k, u in enumerate(units) if k % n == i}
    return [c for c in cells if c.unit in mine]


def run_order(cells: Sequence[Cell]) -> list[Cell]:
    """Single-concept cells first, then multi-concept cells, each in suite order.

    Multi-concept cells of ``separate`` entries apply the single-concept artifacts: once every shard has done its
    singles, those are on disk (possibly trained by another shard running beside it in the same ``--out``), so
    concurrent shards rarely train one twice."""
    return sorted(cells, key=lambda c: len(c.concepts) > 1)


# ------------------------------------------------------------------------------------------------ generation
def _image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_index}:{image_index}".encode()).digest()[:7], "big")


def generate(pipeline: Any, prompts: Sequence[tuple[int, str]], *, images_per_prompt: int, seed: int,
             batch_size: int = 8, progress: bool = False, **call_kwargs: Any) -> list:
    """PIL images for every ``(prompt index, prompt)``, ``images_per_prompt`` each, prompt-major order.

    Image ``j`` of prompt index ``p`` starts from noise seeded by ``(seed, p, j)`` alone, so every method and
    setting sees the same starting noise and batching does not change the result."""
    from tqdm.auto import tqdm

    jobs = [(p, text, j) for p, text in prompts for j in range(images_per_prompt)]
    out = []
    for k in tqdm(range(0, len(jobs), batch_size), desc="generating", leave=False, disable=not progress):
        chunk = jobs[k:k + batch_size]
        gens = [torch.Generator("cpu").manual_seed(_image_seed(seed, p, j)) for p, _, j in chunk]
        with torch.no_grad():
            res = pipeline(prompt=[t for _, t, _ in chunk], generator=gens, num_images_per_prompt=1,
                           output_type="pil", **call_kwargs)
        out.extend(res.images)
    return out


# ------------------------------------------------------------------------------------------------ running
def _split_settings(editor: Any, settings: dict) -> tuple[dict, dict]:
    """``settings`` split into the editor's ``Settings`` fields and the rest (its ``transform_settings``, e.g.
    Custom Diffusion's ``rank``, checked by :meth:`Suite.validate`)."""
    names = {f.name for f in dataclasses.fields(editor.Settings)}
    return {k: v for k, v in settings.items() if k in names}, {k: v for k, v in settings.items() if k not in names}


def _write_csv(path: Path, df: pd.DataFrame) -> None:
    with atomic_target(path) as tmp:
        df.to_csv(tmp, index=False)


def _write_json(path: Path, data: Any) -> None:
    with atomic_target(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))


def _resolve_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    d = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(d, torch.dtype):
        raise EditbenchError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    return d


class _Runner:
    def __init__(self, suite: Suite, out: Path, *, device: Any, dtype: Any, progress: bool, pipeline: Any = None,
                 clip: Any = None, dino: Any = None):
        self.suite, self.out, self.progress = suite, out, progress
        self.device = device or suite.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if str(self.device) == "cuda" and os.environ.get("LOCAL_RANK", "").isdigit():  # one GPU per launched process
            self.device = f"cuda:{os.environ['LOCAL_RANK']}"
        self.dtype = _resolve_dtype(dtype or suite.dtype)
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
                if not Path(model).is_dir():
                    raise EditbenchError(f"model folder {model} not found; set 'model:' in the suite to a local "
                                         "diffusers folder (or 'toyworld')")
                from diffusers import DiffusionPipeline

                self._pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=self.dtype or torch.float32,
                                                               local_files_only=True).to(self.device)
                self._pipe.set_progress_bar_config(disable=True)
        return self._pipe

    @property
    def clip(self) -> M.ClipScorer:
        if self._clip is None:
            self._clip = M.load_clip(self.suite.metrics.get("clip"), self.device, arch=self.suite.metrics.get("clip_arch"))
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
        placeholder = editor.placeholder(tokenizer, c.placeholder, sorted(self.suite.concepts).index(name))
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
        what = {"method": m.name, "config": dataclasses.asdict(editor.config), "steps": steps, "seed": seed,
                "model": self.suite.model}
        if len(names) == 1:
            what.update(concept=self.suite.concepts[names[0]].identity(), placeholder=data[0].placeholder)
        else:
            what.update(joint=[self.suite.concepts[n].identity() for n in names],
                        placeholders=[c.placeholder for c in data])
        key = _hash(what)
        concept = data[0] if len(names) == 1 else data
        folder = "+".join(names)
        # keyed by the method's registry name, not the entry's label: entries that differ only in inference
        # settings (e.g. perfusion and perfusion-global) share their artifacts
        if (m.name, folder, seed, key) in self._artifacts:
            return self._artifacts[(m.name, folder, seed, key)], concept
        path = _inside(self.out, self.out / "artifacts" / m.name / folder / f"seed{seed}-{key}.safetensors")
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
        return _inside(self.out, self.out / "cells" / f"{cell.id}{suffix}")

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
            inference, transform = _split_settings(editor, cell.settings)
            n = len(concepts)
            joint = n > 1 and m.multi == "joint"
            if n > 1 and not joint and editor.max_artifacts is not None and editor.max_artifacts < n \
                    and not editor.can_compose():
                _write_json(self.cell_path(cell, ".skip.json"),
                            {"cell": cell.id, "reason": f"{m.name} applies at most {editor.max_artifacts} artifact(s) "
                             "and has no merge (compose)"})
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
        sample_dir = _inside(self.out, self.out / "samples" / cell.id)
        sample_dir.mkdir(parents=True, exist_ok=True)
        for r, img in zip(rows, images):
            img.save(self.out / r["image"])
            r.update(cost, gen_time_s=gen_time)
        _write_csv(self.cell_path(cell), pd.DataFrame(rows))

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


def collect(out: str | os.PathLike, cells: Iterable[str] | None = None) -> pd.DataFrame:
    """Assemble ``results.csv`` (and ``results.parquet`` if pyarrow is installed) from the finished cells of
    the suite recorded in ``out/suite.json`` (or ``cells``); returns the table (empty if nothing finished)."""
    out = Path(out)
    if cells is None:
        manifest = out / "suite.json"
        if not manifest.is_file():
            raise EditbenchError(f"{out} holds no suite.json; run a suite into it first (editbench bench --suite SUITE --out DIR)")
        cells = json.loads(manifest.read_text())["cells"]
    frames = [pd.read_csv(out / "cells" / f"{c}.csv") for c in cells if (out / "cells" / f"{c}.csv").is_file()]
    for f in frames:  # cells written before the 'multi' option existed were all trained separately
        if "multi" not in f.columns and "label" in f.columns:
            f.insert(int(f.columns.get_loc("label")) + 1, "multi", "separate")
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    _write_csv(out / "results.csv", df)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        pass
    else:
        with atomic_target(out / "results.parquet") as tmp:
            df.to_parquet(tmp, index=False)
    return df


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
    from tqdm.auto import tqdm

    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    shard = parse_shard(shard)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EditbenchError(f"output {out} exists and is not a folder; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    cells = suite.cells()
    suite.validate()
    _write_json(out / "suite.json", {"name": suite.name, "model": suite.model, "metrics": suite.metrics,
                                     "images_per_prompt": suite.images_per_prompt,
                                     "cells": [c.id for c in cells],
                                     "methods": [dataclasses.asdict(m) for m in suite.methods],
                                     **({"tuned": suite.tuned} if suite.tuned else {})})
    runner = _Runner(suite, out, device=device, dtype=dtype, progress=progress, pipeline=pipeline, clip=clip,
                     dino=dino)
    todo = run_order([c for c in shard_cells(cells, shard) if not runner.done(c)])
    failed, group = [], None
    for cell in tqdm(todo, desc=f"{suite.name} shard {shard[0]}/{shard[1]}", disable=not progress):
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


def write_report(out: str | os.PathLike) -> Path:
    """Write ``report.md`` and its plots for the results in ``out`` (see :mod:`editbench.eval.report`)."""
    from editbench.eval.report import write_report as _write

    return _write(out)
