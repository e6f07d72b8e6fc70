"""Benchmark suites: a YAML file of methods x concepts x seeds x inference settings, parsed into cells.

A *cell* is one (method, concept(s), seed, inference setting) unit: apply the trained artifact(s) with that
setting, generate ``images_per_prompt`` images for every prompt, score them (:mod:`editbench.eval.runner`).
A cell's id hashes everything that determines its rows, so a changed suite makes new cells. ``--shard i/N``
runs a deterministic slice: the (concepts, seed) units in sorted order, every N-th from the i-th; ``--shard auto``
reads i and N from the launcher's environment (:func:`shard_from_env`: SLURM arrays, torchrun, srun).

See ``docs/evaluation.md`` for the YAML schema.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from editbench.errors import EditbenchError
from editbench.eval import metrics as M
from editbench.eval.sources import (
    TOY_SPLITS,
    ConceptSpec,
    PairSpec,
    custom_concept,
    customconcept101_concepts,
    dreambench_concepts,
    toy_concepts,
    toy_pair,
)

__all__ = ["BASE_METHOD", "BUNDLED", "MULTI_MODES", "Cell", "ConceptSpec", "MethodSpec", "PairSpec", "Suite",
           "bundled_suites", "inside", "load_suite", "parse_shard", "run_order", "safe_name", "setting_label",
           "shard_cells", "shard_from_env", "spec_hash", "split_settings"]

BUNDLED = Path(__file__).parent / "suites"
BASE_METHOD = "base"
"""Pseudo-method: the unedited model prompted with the superclass word (a reference point; nothing trained)."""

_TOP_KEYS = {"name", "description", "model", "device", "dtype", "seeds", "concepts", "pairs", "prompts",
             "pair_prompts", "max_prompts", "images_per_prompt", "steps", "generation", "metrics", "methods",
             "validation"}
_METHOD_KEYS = {"name", "label", "config", "steps", "settings", "sweep", "multi"}
MULTI_MODES = ("separate", "joint")
"""How a method entry handles a multi-concept cell (``multi:``): ``separate`` (default): one artifact per concept,
applied together, or merged with ``compose`` if the method applies only one; ``joint``: one artifact trained on all
the cell's concepts in one ``fit`` (methods with ``max_concepts != 1``)."""
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


def inside(out: Path, path: Path) -> Path:
    """``path`` if it resolves inside ``out``, else EditbenchError (defence in depth after :func:`safe_name`)."""
    if not path.resolve().is_relative_to(out.resolve()):
        raise EditbenchError(f"refusing to write {path}: it is outside the output folder {out}")
    return path


def spec_hash(obj: Any, n: int = 10) -> str:
    """Short SHA-256 of ``obj`` as key-sorted JSON (:func:`_key_json`): the cache key of cells and artifacts."""
    return hashlib.sha256(json.dumps(_key_json(obj, "cache key"), sort_keys=True).encode()).hexdigest()[:n]


def parse_shard(shard: str | Sequence[int]) -> tuple[int, int]:
    """``"i/N"`` or ``(i, N)`` -> ``(i, N)`` with ``0 <= i < N``; EditbenchError otherwise."""
    try:
        i, n = (int(x) for x in shard.split("/")) if isinstance(shard, str) else (int(shard[0]), int(shard[1]))
    except (ValueError, TypeError, IndexError):
        raise EditbenchError(f"shard must look like 'i/N' (e.g. '0/4'), got {shard!r}") from None
    if n < 1 or not 0 <= i < n:
        raise EditbenchError(f"shard {i}/{n}: need N >= 1 and 0 <= i < N (shards are numbered from 0)")
    return i, n


def _env_int(env: dict, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise EditbenchError(f"--shard auto: {name}={env[name]!r} is not an integer") from None


def shard_from_env(env: dict | None = None) -> tuple[int, int, str]:
    """``--shard auto``: ``(i, N, how)`` read from the launcher's environment (``os.environ`` by default).

    Two levels, multiplied: a SLURM job array (``SLURM_ARRAY_TASK_ID`` counted from ``SLURM_ARRAY_TASK_MIN`` in
    steps of ``SLURM_ARRAY_TASK_STEP``, of ``SLURM_ARRAY_TASK_COUNT`` tasks: one task per node, say) and, inside
    each task, the processes of a launch: ``RANK`` / ``WORLD_SIZE`` (torchrun, ``accelerate launch``), else
    ``LOCAL_RANK`` / ``WORLD_SIZE``, else ``SLURM_PROCID`` / ``SLURM_NTASKS`` (``srun --ntasks``). Array task ``a``
    of ``A`` with process ``r`` of ``W`` runs shard ``a * W + r`` of ``A * W``. No launcher variables: ``0/1``
    (everything). ``how`` names the variables read. EditbenchError on values that are not a valid shard."""
    env = dict(os.environ if env is None else env)
    levels, how = [], []
    if "SLURM_ARRAY_TASK_ID" in env:
        if "SLURM_ARRAY_TASK_COUNT" not in env:
            raise EditbenchError("--shard auto: SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; give "
                                 "--shard i/N")
        task, count = _env_int(env, "SLURM_ARRAY_TASK_ID"), _env_int(env, "SLURM_ARRAY_TASK_COUNT")
        first = _env_int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
        if step < 1 or (task - first) % step:
            raise EditbenchError(f"--shard auto: SLURM array task {task} is not on the array's grid (min {first}, "
                                 f"step {step})")
        levels.append(((task - first) // step, count))
        how.append(f"SLURM_ARRAY_TASK_ID={task} of SLURM_ARRAY_TASK_COUNT={count}"
                   + (f" from SLURM_ARRAY_TASK_MIN={first}" if first else "")
                   + (f" step {step}" if step != 1 else ""))
    for rank, size in (("RANK", "WORLD_SIZE"), ("LOCAL_RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank in env and size in env:
            levels.append((_env_int(env, rank), _env_int(env, size)))
            how.append(f"{rank}={env[rank]} of {size}={env[size]}")
            break
    i, n = 0, 1
    for k, m in levels:
        if m < 1 or not 0 <= k < m:
            raise EditbenchError(f"--shard auto: {'; '.join(how)} is not a shard (need 0 <= index < count)")
        i, n = i * m + k, n * m
    return i, n, "; ".join(how) or "no launcher variables (SLURM_ARRAY_TASK_ID, RANK, LOCAL_RANK, SLURM_PROCID)"


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

    def resolved(self) -> dict:
        """The method's full ``Config`` (its defaults with this entry's overrides) and its ``Settings`` defaults, as
        plain data ({} for the base model): part of every cell's key, so that new method defaults (e.g. from a new
        tuning) give new cells instead of reusing the old results. An override equal to the default (same value and
        type) keeps the key."""
        from editbench import methods as registry

        if self.name == BASE_METHOD:
            return {}
        cls = registry.get(self.name)
        settings = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(cls.Settings)
                    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
        return {"config": dataclasses.asdict(cls(**self.config).config), "settings": settings}


def _key_json(value: Any, where: str) -> Any:
    """``value`` as JSON types for a cache key, the same in every process: tuples and lists as lists, sets sorted,
    paths as strings, enums by value. Anything else (an object whose text would carry a memory address) is an
    EditbenchError naming it, instead of keys that differ between processes and shards."""
    import enum

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return _key_json(value.value, where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, dict):
        return {str(k): _key_json(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_key_json(v, where) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_key_json(v, where) for v in value), key=repr)
    raise EditbenchError(f"{where}: a value of type {type(value).__name__} ({value!r:.60}) cannot be part of a cache "
                         "key; use None, bool, int, float, str, a path, an enum or a list / dict of them")


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

    def model_identity(self) -> dict:
        """What the cached cells and artifacts of this suite depend on besides the method and the concept: the base
        model's files by content (``toyworld``: the committed weights folder, the evaluator's included; a diffusers
        folder: every file in it; ``tiny``: its builder is seeded). New weights under the same name never reuse
        results of the old ones."""
        from editbench.fingerprint import folder_fingerprint

        if self.model == "tiny":
            return {"name": "tiny"}
        if self.model == "toyworld":
            from editbench import toyworld

            return {"name": "toyworld", "files": folder_fingerprint(toyworld.WEIGHTS)}
        return {"name": "folder", "files": folder_fingerprint(self.model_folder())}

    def model_folder(self) -> Path:
        """The suite's diffusers folder (``model:`` other than ``toyworld`` / ``tiny``); EditbenchError if absent."""
        if not Path(self.model).is_dir():
            raise EditbenchError(f"model folder {self.model} not found; set 'model:' in the suite to a local "
                                 "diffusers folder (or 'toyworld')")
        return Path(self.model)

    def word_index(self, name: str) -> int:
        """The concept's index among the suite's concepts in sorted order: a method that binds a concept to an
        existing rare word picks the word by it (``Editor.placeholder``), so it is part of such a method's cell keys."""
        return sorted(self.concepts).index(name)

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

    def with_dtype(self, dtype: Any) -> Suite:
        """This suite with ``dtype`` (a name or torch dtype) in place of its own, or itself if ``dtype`` is None: a
        run's ``--dtype`` override goes into the suite, so its cells and artifacts are keyed by it."""
        from editbench.storage import dtype_name, parse_dtype

        if dtype is None:
            return self
        return dataclasses.replace(self, dtype=dtype_name(parse_dtype(dtype)))

    def dtype_key(self) -> dict:
        """The suite's dtype for cache keys: {} for float32 (and None, which loads float32), else {"dtype": name}."""
        import torch

        from editbench.storage import dtype_name, parse_dtype

        dtype = parse_dtype(self.dtype)
        return {} if dtype in (None, torch.float32) else {"dtype": dtype_name(dtype)}

    def class_data_keys(self, config: dict, names: Sequence[str]) -> tuple[dict, dict]:
        """``(config, {"class_data": [...]})`` for a cache key: if ``config`` reads class images from a folder
        (``class_data_dir``), the folder's contents per concept of ``names`` (see
        :func:`editbench.methods.prior.class_data_key`) replace its path; else ``(config, {})``."""
        from editbench.methods.prior import class_data_key

        keys = [class_data_key(config.get("class_data_dir"), self.concepts[n].superclass) for n in names]
        if all(k is None for k in keys):
            return config, {}
        return {k: v for k, v in config.items() if k != "class_data_dir"}, {"class_data": keys}

    def cells(self) -> list[Cell]:
        """Every cell, ordered by group (method label, concepts, seed), then setting."""
        from editbench import methods as registry

        units = [(n,) for n in self.concepts] + [p.names for p in self.pairs]
        common = {"model": self.model_identity(), "images_per_prompt": self.images_per_prompt, "steps": self.steps,
                  "generation": self.generation, "metrics": self.metrics, **self.dtype_key()}
        # the entry's config overrides are keyed as the config they resolve to
        method = {m.label: {**{k: v for k, v in dataclasses.asdict(m).items() if k != "config"},
                            "resolved": m.resolved()} for m in self.methods}
        # a method that binds a concept to an existing rare word picks it by the concept's index in the suite
        # (word_index): another concept list can give the same concept another word
        rare_word = {m.label: m.name != BASE_METHOD and not registry.get(m.name).new_token for m in self.methods}
        out = []
        for m, names in itertools.product(self.methods, units):  # what the (method, concepts) cells share
            prompts = tuple(self.concept_prompts(names))
            config, class_data = self.class_data_keys(method[m.label]["resolved"].get("config", {}), names)
            mspec = {**method[m.label], "resolved": {**method[m.label]["resolved"], "config": config}} if class_data \
                else method[m.label]
            unit = {**common, "method": mspec, "concepts": [self.concepts[n].identity() for n in names],
                    "prompts": prompts, **class_data,
                    **({"word_index": [self.word_index(n) for n in names]} if rare_word[m.label] else {})}
            for seed, point in itertools.product(self.seeds, m.points()):
                out.append(Cell(m, names, seed, point, prompts, spec_hash({**unit, "seed": seed, "settings": point})))
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
                inference, transform = split_settings(editor, point)
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
    if multi not in MULTI_MODES:
        raise EditbenchError(f"method {e['name']!r}: multi must be one of {list(MULTI_MODES)}, got {multi!r}; write "
                             "'multi: separate' for one artifact per concept (applied together, or merged with the "
                             "method's compose) or 'multi: joint' for one artifact trained on all of a cell's concepts")
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
            if want == "all":
                want = sorted(toy[0])
            else:
                want = list(TOY_SPLITS[want]) if isinstance(want, str) and want in TOY_SPLITS \
                    else _as_list(want, "toyworld")
            for n in want:
                if n not in toy[0]:
                    raise EditbenchError(f"{n!r} is not a toy-world concept; toy concepts: {sorted(toy[0])} (for a "
                                         "folder on disk use {dreambench: path} or a custom concept mapping)")
                concepts[n] = toy[0][n]
            source_pairs += toy[1]
        elif isinstance(e, dict) and "dreambench" in e:
            names = e.get("names", "all")
            concepts.update(dreambench_concepts(base / e["dreambench"],
                                                None if names == "all" else _as_list(names, "names")))
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
            raise EditbenchError(f"bad {key} entry {e!r}; use a toy-world name, {{toyworld: all | test | validation}}, "
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

    from editbench.values import load_yaml

    path = None
    if isinstance(suite, dict):
        raw, base = suite, Path.cwd()
    else:
        path = _suite_path(suite)
        try:
            raw = load_yaml(path.read_text())  # the --set parser: 1e-4 is a number (YAML 1.1 reads a string)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise EditbenchError(f"suite {path} is not valid YAML: {getattr(err, 'problem', None) or err}{where}"
                                 ) from None
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
                raise EditbenchError(f"each pair is a list of two of the suite's concepts {sorted(concepts)}, "
                                     f"got {pr!r}")
            names = (safe_name(pr[0]), safe_name(pr[1]))
            own = next((p.prompts for p in source_pairs if p.names == names), ())
            if not own and all(concepts[n].source == "toyworld" for n in names):
                own = toy_pair(names).prompts
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


def split_settings(editor: Any, settings: dict) -> tuple[dict, dict]:
    """``settings`` split into the editor's ``Settings`` fields and the rest (its ``transform_settings``, e.g.
    Custom Diffusion's ``rank``, checked by :meth:`Suite.validate`)."""
    names = {f.name for f in dataclasses.fields(editor.Settings)}
    return {k: v for k, v in settings.items() if k in names}, {k: v for k, v in settings.items() if k not in names}
