"""``editbench tune``: Optuna hyperparameter search with the same budget of trials for every method.

A method's search space is ``Config.search_space()`` in its ``config.py``: :class:`editbench.training.Param`
entries naming a config field, an inference setting or the training steps, checked against the method's Config
and Settings before anything runs (:func:`check_space`); the tuner reads nothing else about a method. Each trial
samples a point (``TPESampler(seed=0)``, two objectives), runs the suite restricted to that method and to the
suite's ``validation:`` concepts (:func:`validation_suite`) with :func:`run_suite` into ``<out>/trials/<n>/``, and
returns the means over the generated images of two scores, both maximized (:func:`objectives`): the toy world's
ground-truth ``identity`` and ``prompt_fidelity``, or CLIP ``image_alignment`` and ``text_alignment`` when a
validation concept is not a toy-world one.

Budget: ``trials`` is the study's total of COMPLETE trials (``MaxTrialsCallback``), so re-running the command
resumes the study after a crash (or ``kill -9``) and adds only what is missing; the tuned point is chosen among
the first ``trials`` completed trials (:func:`choose`), so every method gets exactly the same budget even when
several processes share one study. A study is bound to its job: method, suite, objectives, search space,
validation concepts and the base model's weights (:func:`editbench.fingerprint.pipeline_fingerprint`); resuming it
with any of them changed is an error. The study (``sqlite:///<out>/study.db`` by default, or any database URL
Optuna accepts) uses heartbeats: a trial whose process died is failed once its heartbeat is ``GRACE_S`` seconds
old and retried with the same parameters, in the same trial folder (finished cells and training checkpoints are
reused); a trial stopped with Ctrl-C is queued again the same way. A trial whose cells fail (e.g. a non-finite
loss at a high learning rate) is recorded as FAIL and does not count; ``MAX_FAILED_IN_A_ROW`` failures in a row
stop the run. The sampler of a resumed or joining process is seeded with the number of trials already in the
study (0 for a new one), so it does not repeat the first samples.

Outputs: ``<out>/tuned.json`` (the chosen config / settings / steps, objective values, budget, wall times; read by
``editbench bench --tuned``, :func:`apply_tuned`), ``<out>/trials.csv`` (``study.trials_dataframe()``),
``<out>/study.json`` (which study the folder belongs to) and ``<out>/trials/<n>/`` (each trial's suite run).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from editbench.errors import EditbenchError
from editbench.eval.runner import Runner, run_suite
from editbench.eval.spec import BASE_METHOD, MethodSpec, Suite, load_suite, safe_name
from editbench.fingerprint import pipeline_fingerprint
from editbench.methods.tokens import base_tokenizer
from editbench.storage import atomic_target, read_json, write_json
from editbench.training import Param

__all__ = ["CLIP_OBJECTIVES", "FLOORS", "GROUND_TRUTH", "RULE", "apply_tuned", "check_space", "choose",
           "complete_trials", "objectives", "open_storage", "study_name_of", "tune", "validation_suite"]

KINDS = ("log", "float", "int", "categorical")
TARGETS = ("config", "settings", "steps")
GROUND_TRUTH = ("identity", "prompt_fidelity")
CLIP_OBJECTIVES = ("image_alignment", "text_alignment")
FLOORS = {"prompt_fidelity": 0.8}
"""The least second objective a tuned point should keep (no floor for CLIP text alignment: its scale varies)."""
RULE = ("among the Pareto-optimal trials of the budget, the highest first objective among those whose second "
        "objective reaches its floor (prompt_fidelity >= 0.8); if none does, or the second objective has no floor, "
        "the highest sum of both; ties go to the lower trial number")
HEARTBEAT_S, GRACE_S, MAX_RETRY, MAX_FAILED_IN_A_ROW = 30, 90, 3, 5
FORMAT = "editbench-tuned/1"


class _TrialFailed(Exception):
    """A trial whose cells failed (the method crashed or diverged at these parameters): FAIL, the study goes on."""


# ------------------------------------------------------------------------------------------------ search space
def check_space(method: str) -> list[Param]:
    """``method``'s search space (``Config.search_space()``), checked: every name is a Config field, an inference
    setting or ``steps``; kinds, ranges and choices are well-formed; every bound and choice is accepted by the
    Config's / Settings' own validation. EditbenchError naming the problem otherwise (also for unknown methods)."""
    from editbench import methods as registry

    if method == BASE_METHOD:
        raise EditbenchError("'base' is the unedited model: it has nothing to tune")
    cls = registry.get(method)
    where = f"search space of {method} ({cls.Config.__name__}.search_space())"
    space = list(cls.Config.search_space())
    if not space:
        raise EditbenchError(f"{method} defines no search space; add a search_space() classmethod to its Config "
                             "(see editbench/methods/perfusion/config.py)")
    fields = {"config": {f.name for f in dataclasses.fields(cls.Config)} - {"steps"},
              "settings": {f.name for f in dataclasses.fields(cls.Settings)}, "steps": {"steps"}}
    names = [getattr(p, "name", None) for p in space]
    for p in space:
        if not isinstance(p, Param):
            raise EditbenchError(f"{where}: entries must be editbench.training.Param, got {p!r}")
        if p.target not in TARGETS or p.kind not in KINDS:
            raise EditbenchError(f"{where}: {p.name!r} has target {p.target!r} and kind {p.kind!r}; targets: "
                                 f"{list(TARGETS)}, kinds: {list(KINDS)}")
        if p.name not in fields[p.target]:
            hint = " (the training steps are target='steps')" if p.name == "steps" else ""
            raise EditbenchError(f"{where}: {p.name!r} is not a {p.target} name of {method}{hint}; valid: "
                                 f"{sorted(fields[p.target])}")
        if names.count(p.name) > 1:
            raise EditbenchError(f"{where}: {p.name!r} appears more than once")
        if p.kind == "categorical":
            if not p.choices or not all(v is None or isinstance(v, (bool, int, float, str)) for v in p.choices):
                raise EditbenchError(f"{where}: {p.name!r} needs a non-empty tuple of scalar choices")
            values = list(p.choices)
        else:
            ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                     for v in (p.low, p.high)) and p.low < p.high
            ok = ok and (p.kind != "log" or p.low > 0) and (p.kind != "int" or all(isinstance(v, int)
                                                                                  for v in (p.low, p.high)))
            if not ok:
                raise EditbenchError(f"{where}: {p.name!r} ({p.kind}) needs finite low < high"
                                     f"{' > 0' if p.kind == 'log' else ''}{', both ints' if p.kind == 'int' else ''}"
                                     f"; got {p.low!r}, {p.high!r}")
            values = [p.low, p.high]
        for v in values:
            try:
                if p.target == "config":
                    cls.Config(**{p.name: v}).validate()
                elif p.target == "settings":
                    cls().settings(1, **{p.name: v})
                elif not (isinstance(v, int) and v >= 1):
                    raise EditbenchError(f"steps must be ints >= 1, got {v!r}")
            except (EditbenchError, TypeError) as err:
                raise EditbenchError(f"{where}: {p.name}={v!r} is not accepted: {err}") from None
    return space


def _suggest(trial: Any, space: Sequence[Param]) -> dict[str, Any]:
    """One point of ``space`` from an Optuna trial (fixed values for an enqueued / retried trial)."""
    out = {}
    for p in space:
        if p.kind == "categorical":
            out[p.name] = trial.suggest_categorical(p.name, list(p.choices))
        elif p.kind == "int":
            out[p.name] = trial.suggest_int(p.name, int(p.low), int(p.high))
        else:
            out[p.name] = trial.suggest_float(p.name, float(p.low), float(p.high), log=p.kind == "log")
    return out


def _split(space: Sequence[Param], params: dict[str, Any]) -> dict[str, Any]:
    """``{"config": {...}, "settings": {...}, "steps": int | None}`` of a sampled point."""
    parts: dict[str, Any] = {"config": {}, "settings": {}, "steps": None}
    for p in space:
        if p.target == "steps":
            parts["steps"] = int(params[p.name])
        else:
            parts[p.target][p.name] = params[p.name]
    return parts


# ------------------------------------------------------------------------------------------------ trials
def validation_suite(suite: Suite, method: str, parts: dict | None = None) -> Suite:
    """The one-method suite a trial runs: ``suite`` with its ``validation:`` concepts as the (only) concepts, no
    pairs, and one entry of ``method``: the suite's first entry of it (its config and settings; sweeps dropped),
    or the defaults, with ``parts`` (config / settings / steps of the trial) on top."""
    if not suite.validation:
        raise EditbenchError(f"suite {suite.name!r} lists no validation concepts; add 'validation: [...]' (concepts "
                             "used only for tuning, none of them in 'concepts:'), e.g. the toy world's "
                             "[sunny, plus, chess, ember]")
    parts = parts or {"config": {}, "settings": {}, "steps": None}
    base = next((m for m in suite.methods if m.name == method), MethodSpec(method, safe_name(method)))
    config = {**base.config, **{k: tuple(v) if isinstance(v, list) else v for k, v in parts["config"].items()}}
    entry = MethodSpec(method, safe_name(method), config, parts["steps"] or base.steps,
                       {**base.settings, **parts["settings"]})
    return dataclasses.replace(suite, concepts=dict(suite.validation), validation={}, pairs=[], methods=[entry],
                               tuned=[])


def objectives(suite: Suite) -> tuple[str, str]:
    """The two maximized objectives: ground truth if every validation concept is a toy-world one (and the oracle
    is installed), else CLIP image and text alignment."""
    concepts = suite.validation or suite.concepts
    toy = all(c.source == "toyworld" for c in concepts.values())
    return GROUND_TRUTH if toy and importlib.util.find_spec("editbench.toyworld.oracle") else CLIP_OBJECTIVES


def _score(df: pd.DataFrame, names: Sequence[str]) -> list[float]:
    single = df[df["n_concepts"] == 1] if "n_concepts" in df else df
    missing = [n for n in names if n not in single]
    if single.empty or missing:
        raise EditbenchError(f"the trial's results have no {missing or list(names)} column(s) to optimize")
    values = [float(single[n].mean()) for n in names]
    if not all(math.isfinite(v) for v in values):
        raise _TrialFailed(f"objectives {dict(zip(names, values))} are not finite")
    return values


def choose(trials: Iterable[Any], names: Sequence[str], floors: dict[str, float] = FLOORS) -> Any:
    """The tuned trial (see :data:`RULE`) among the COMPLETE ``trials`` (Optuna FrozenTrials with two values)."""
    from optuna.trial import TrialState

    done = [t for t in trials if t.state == TrialState.COMPLETE and t.values is not None]
    if not done:
        raise EditbenchError("no trial completed, so there is nothing to choose; re-run to resume the study")

    def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    front = [t for t in done if not any(dominates(u.values, t.values) for u in done)]
    floor = floors.get(names[1])
    ok = [t for t in front if floor is not None and t.values[1] >= floor]
    if ok:
        return max(ok, key=lambda t: (t.values[0], t.values[1], -t.number))
    return max(front, key=lambda t: (t.values[0] + t.values[1], t.values[0], -t.number))


# ------------------------------------------------------------------------------------------------ storage
def _redact(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL sqlalchemy can parse: show it without anything after '@'
        return url.split("@")[-1]


def open_storage(url: str) -> Any:
    """An Optuna ``RDBStorage`` for ``url`` with heartbeats (``HEARTBEAT_S``, grace ``GRACE_S``) and stale trials
    retried (up to ``MAX_RETRY`` times) with their parameters; EditbenchError if it cannot be opened."""
    import optuna

    engine = {"connect_args": {"timeout": 60}} if str(url).startswith("sqlite") else {}
    try:
        with warnings.catch_warnings():  # heartbeats and the retry callback are "experimental" in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)  # Optuna >= 4.9
            kw = ({"heartbeat_stale_trial_callback": retry(max_retry=MAX_RETRY)} if retry else
                  {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=MAX_RETRY)})
            return optuna.storages.RDBStorage(str(url), engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                                              grace_period=GRACE_S, **kw)
    except Exception as err:  # noqa: BLE001 - sqlalchemy / driver errors of every kind
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise EditbenchError(f"cannot open the study storage {_redact(str(url))} ({type(err).__name__}: {first}); "
                             "give a database URL Optuna accepts, e.g. sqlite:///runs/tune/study.db (its folder must "
                             "exist) or postgresql://user:password@host/db (pip install psycopg2-binary)") from None


def _study(storage: Any, name: str, attrs: dict, url: str) -> Any:
    """Load the study ``name`` if it exists and was made for the same tuning job (``attrs``), else create it.

    The sampler is ``TPESampler(seed=n)``, n the number of trials already in the study: 0 for a new study (a
    fresh single-process run is reproducible), another seed for a resumed or joining process, which would
    otherwise repeat the first samples."""
    import optuna

    try:
        sid = storage.get_study_id_from_name(name)
    except KeyError:
        sid = None
    n = len(storage.get_all_trials(sid, deepcopy=False)) if sid is not None else 0
    if sid is not None:
        have = storage.get_study_user_attrs(sid)
        diff = sorted(k for k, v in attrs.items() if have.get(k) != v)
        if diff and (have or n):  # no attributes and no trials: a creation that died before tagging it
            base = (f" (base model {have.get('base_model')} there, {attrs['base_model']} here: settings tuned on "
                    "other weights do not carry over)" if "base_model" in diff else "")
            raise EditbenchError(f"study {name!r} in {_redact(url)} was made for method {have.get('method')!r} on "
                                 f"suite {have.get('suite')!r} with other {diff} than this run{base}; nothing was "
                                 "changed: use another --out (or --storage) for this tuning job")
        if list(storage.get_study_directions(sid)) != [optuna.study.StudyDirection.MAXIMIZE] * 2:
            raise EditbenchError(f"study {name!r} in {_redact(url)} does not maximize two objectives; it was not "
                                 "made by editbench tune: use another --out (or --storage)")
    study = optuna.create_study(study_name=name, storage=storage, sampler=optuna.samplers.TPESampler(seed=n),
                                load_if_exists=True, directions=["maximize", "maximize"])
    if sid is None or not study.user_attrs:
        for k, v in attrs.items():
            study.set_user_attr(k, v)
        with warnings.catch_warnings():  # trials.csv columns values_<objective> instead of values_0, values_1
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(attrs["objectives"])
    return study


def study_name_of(suite: str, method: str) -> str:
    """The Optuna study name of ``method`` tuned on the suite named ``suite`` (one study per pair)."""
    return f"{suite}:{method}"


def complete_trials(url: str, suite: str, method: str) -> int:
    """How many COMPLETE trials the study of (``suite``, ``method``) in the storage ``url`` holds; 0 when the
    storage has no such study."""
    import optuna

    try:
        study = optuna.load_study(study_name=study_name_of(suite, method), storage=str(url))
    except KeyError:
        return 0
    return len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


# ------------------------------------------------------------------------------------------------ tune
def tune(suite: str | Any, method: str, trials: int, out: str | Any, storage: str | None = None,
         progress: bool = True, *, device: Any = None, dtype: Any = None, pipeline: Any = None,
         clip: Any = None) -> dict:
    """Tune ``method`` on ``suite``'s validation concepts with a total budget of ``trials`` complete trials;
    write ``<out>/tuned.json`` and ``<out>/trials.csv`` and return the tuned.json content (see the module doc).

    ``storage``: an Optuna database URL (default ``sqlite:///<out>/study.db``); processes running the same call
    with the same storage share the study. ``pipeline`` / ``clip`` inject ready models (tests)."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState
    from editbench.progress import progress as progress_bar

    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise EditbenchError(f"--trials must be a positive int (the study's total budget), got {trials!r}")
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    space = check_space(method)
    vsuite = validation_suite(suite, method)
    vsuite.validate()
    names = objectives(suite)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EditbenchError(f"output {out} exists and is not a folder; choose another --out")
    study_name = study_name_of(suite.name, method)
    marker = out / "study.json"
    if marker.is_file() and read_json(marker).get("study") != study_name:
        raise EditbenchError(f"{out} belongs to the study {read_json(marker).get('study')!r}; use another --out for "
                             f"{study_name!r} (nothing was changed)")
    if storage is None:
        out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    storage_ = open_storage(url)
    runner = Runner(vsuite, out, device=device, dtype=dtype, progress=False, pipeline=pipeline, clip=clip)
    pipe = runner.pipeline  # loaded here: the study is bound to the base model's weights
    attrs = json.loads(json.dumps({"method": method, "suite": suite.name, "objectives": list(names),
                                   "search_space": [dataclasses.asdict(p) for p in space],
                                   "validation": sorted(suite.validation),
                                   "base_model": pipeline_fingerprint(pipe, base_tokenizer(pipe.tokenizer))}))
    study = _study(storage_, study_name, attrs, url)
    out.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"study": study_name, "method": method, "suite": suite.name, "storage": _redact(url)})
    study.set_user_attr("budget", trials)

    def objective(trial: Any) -> list[float]:
        folder = trial.user_attrs.get("folder") or f"trials/{trial.number}"  # a retried trial inherits it
        trial.set_user_attr("folder", folder)
        parts = _split(space, _suggest(trial, space))
        t0 = time.perf_counter()
        try:  # models are loaded once, at the first trial that runs
            df = run_suite(validation_suite(suite, method, parts), out / folder, progress=False, device=device,
                           dtype=dtype, pipeline=runner.pipeline, clip=runner.clip, dino=runner.dino)
        except KeyboardInterrupt:  # Ctrl-C: the next run retries this point in this folder (finished cells kept)
            study.enqueue_trial(trial.params, user_attrs={"folder": folder})
            raise
        except EditbenchError as err:
            if not any((out / folder / "cells").glob("*.error.txt")):
                raise  # a user error (bad data, settings): stop, fix, re-run
            trial.set_user_attr("error", str(err)[:500])
            raise _TrialFailed(str(err)) from err
        values = _score(df, names)
        trial.set_user_attr("run_s", round(time.perf_counter() - t0, 3))
        return values

    def complete() -> list[Any]:
        return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))

    failed = [0]
    if len(complete()) < trials:
        with progress_bar(total=trials, initial=len(complete()), desc=f"tune {study_name}",
                          disable=not progress) as bar:
            def after(st: Any, t: Any) -> None:
                failed[0] = failed[0] + 1 if t.state == TrialState.FAIL else 0
                if failed[0] >= MAX_FAILED_IN_A_ROW:
                    st.stop()
                bar.n = min(len(complete()), trials)
                bar.refresh()

            study.optimize(objective, catch=(_TrialFailed,),
                           callbacks=[MaxTrialsCallback(trials, states=(TrialState.COMPLETE,)), after])
    with atomic_target(out / "trials.csv") as tmp:
        study.trials_dataframe().to_csv(tmp, index=False)
    if failed[0] >= MAX_FAILED_IN_A_ROW:
        raise EditbenchError(f"{failed[0]} trials in a row failed; see {out}/trials/<n>/cells/*.error.txt (and the "
                             "'error' column of trials.csv), fix and re-run to resume")
    done = sorted(complete(), key=lambda t: (t.datetime_complete, t.number))
    used = done[:trials]
    best = choose(used, names)
    walls = {t.number: (t.datetime_complete - t.datetime_start).total_seconds() for t in used}
    result = {
        "format": FORMAT, "method": method, "suite": suite.name, "study": study_name, "storage": _redact(url),
        "validation": sorted(suite.validation), "base_model": attrs["base_model"], "objectives": list(names),
        "rule": RULE,
        "trial": best.number, "values": dict(zip(names, best.values)), "params": dict(best.params),
        **_split(space, best.params),
        "budget": trials, "trials_used": len(used), "trials_completed": len(done),
        "trials_failed": len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))),
        "search_space": attrs["search_space"],
        "base_entry": {k: getattr(vsuite.methods[0], k) for k in ("config", "settings", "steps")},
        "wall_s": {"per_trial": {str(k): round(v, 3) for k, v in walls.items()},
                   "trials_total": round(sum(walls.values()), 3),
                   "study": round((max(t.datetime_complete for t in used)
                                   - min(t.datetime_start for t in used)).total_seconds(), 3)},
    }
    result = json.loads(json.dumps(result))  # exactly what tuned.json holds
    write_json(out / "tuned.json", result)
    return result


# ------------------------------------------------------------------------------------------------ bench --tuned
def apply_tuned(suite: str | Any, tuned: Iterable[str | Any]) -> Suite:
    """``suite`` with the tuned config / settings / steps of every ``tuned.json`` (a tuning folder or the file)
    applied to each entry of its method: config and settings merged over the entry's own, steps replaced, and a
    sweep over a tuned setting dropped (the tuned value is the point). The suite's ``tuned`` lists what was applied
    (recorded in suite.json). EditbenchError for a missing / foreign file, two files for one method, a method the
    suite does not list, or a suite that reports a concept the settings were tuned on."""
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    methods, seen, provenance = list(suite.methods), {}, []
    for item in tuned:
        path = Path(item) / "tuned.json" if Path(item).is_dir() else Path(item)
        t = read_json(path)
        if not isinstance(t, dict) or t.get("format") != FORMAT:
            raise EditbenchError(f"{path} is not a tuned.json written by editbench tune")
        m = t["method"]
        if m in seen:
            raise EditbenchError(f"--tuned {seen[m]} and {path} both tune {m}; give one per method")
        seen[m] = path
        idx = [i for i, e in enumerate(methods) if e.name == m]
        if not idx:
            raise EditbenchError(f"{path} tunes {m}, which suite {suite.name!r} does not list; add it to 'methods:' "
                                 "or drop this --tuned")
        leak = sorted(set(t.get("validation") or ()) & set(suite.concepts))
        if leak:
            raise EditbenchError(f"{path} was tuned on {leak}, which suite {suite.name!r} reports ('concepts:'); "
                                 "evaluate tuned settings on concepts they were not tuned on")
        for i in idx:
            e = methods[i]
            config = {**e.config, **{k: tuple(v) if isinstance(v, list) else v for k, v in t["config"].items()}}
            methods[i] = dataclasses.replace(e, config=config, settings={**e.settings, **t["settings"]},
                                             sweep={k: v for k, v in e.sweep.items() if k not in t["settings"]},
                                             steps=t["steps"] if t["steps"] is not None else e.steps)
        provenance.append({"file": str(path), "method": m, "labels": [methods[i].label for i in idx],
                           **{k: t.get(k) for k in ("suite", "study", "trial", "values", "config", "settings",
                                                    "steps", "budget", "trials_used", "validation", "base_model")}})
    out = dataclasses.replace(suite, methods=methods, tuned=provenance)
    out.validate()
    return out
