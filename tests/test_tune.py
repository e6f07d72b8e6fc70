"""``editbench tune`` (editbench.eval.tune): search spaces, the total trial budget and resuming, retried trials,
the chosen-point rule, tuned.json, bad inputs, validation/test concepts and ``bench --tuned``.

Fast: textual inversion on the tiny random pipeline with a tiny open_clip, a 2-parameter space of 1-3 training
steps, one validation concept, one 2-step image per trial (about half a second per trial).
"""

from __future__ import annotations

import copy
import json
import sqlite3
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from _eval_stubs import tiny_clip

from editbench import methods
from editbench.errors import EditbenchError
from editbench.eval import metrics as M
from editbench.eval import tune as T
from editbench.eval.sources import TOY_TEST, TOY_VALIDATION
from editbench.eval.spec import load_suite
from editbench.methods.textual_inversion.config import TextualInversionConfig
from editbench.training import Param

METHOD = "textual_inversion"
SPACE = [Param("lr", "log", 1e-3, 1e-1), Param("steps", "int", 1, 3, target="steps")]
SPEC = {"name": "t", "model": "tiny", "concepts": ["zebra"], "validation": ["sunny"], "seeds": [0],
        "max_prompts": 1, "images_per_prompt": 1, "generation": {"num_inference_steps": 2, "guidance_scale": 2.0},
        "methods": ["base", {"name": METHOD, "config": {"checkpoint_every": 0}}]}
COMPLETE, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL


@pytest.fixture(scope="module")
def models():
    from editbench.testing import tiny_pipeline

    return tiny_pipeline(), tiny_clip()


@pytest.fixture(autouse=True)
def small_space(monkeypatch):
    monkeypatch.setattr(TextualInversionConfig, "search_space", classmethod(lambda cls: list(SPACE)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def run(models, out, n, spec=SPEC, method=METHOD, **kw):
    pipe, clip = models
    return T.tune(load_suite(spec), method, n, out, progress=False, pipeline=pipe, clip=clip, **kw)


def study_trials(out, name="t:textual_inversion"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}").trials


def states(out):
    return [t.state for t in study_trials(out)]


# ------------------------------------------------------------------------------------------------ search spaces
def test_every_builtin_search_space_fits_its_config(monkeypatch):
    monkeypatch.undo()  # the real spaces, not the small test one
    for name in methods.available():
        space = T.check_space(name)
        assert [p for p in space if p.target == "steps"] and [p for p in space if p.kind == "log"], name
        lrs = {f for f in methods.get(name).Config.__dataclass_fields__ if f == "lr" or f.startswith("lr_")}
        assert {p.name for p in space if p.kind == "log"} <= lrs
    assert {p.name for p in T.check_space("perfusion") if p.target == "settings"} == {"beta", "tau"}
    assert any(p.name == "rank" and p.choices == (2, 4, 8, 16) for p in T.check_space("lora"))


@pytest.mark.parametrize("bad, words", [
    (Param("learning_rate", "log", 1e-3, 1e-1), "not a config name"),      # not a Config field
    (Param("beta", "float", 0.1, 0.9, target="settings"), "not a settings name"),  # TI has no such setting
    (Param("steps", "int", 10, 20), "target='steps'"),                       # steps go through the suite
    (Param("lr", "log", 0.0, 1e-1), "low < high > 0"),                      # log needs a positive range
    (Param("lr", "log", -1.0, 1e-1), "low < high > 0"),
    (Param("num_vectors", "categorical", choices=(1, 0)), "num_vectors=0 is not accepted"),  # Config refuses 0
    (Param("lr", "normal", 1e-3, 1e-1), "kinds"),
])
def test_a_search_space_that_does_not_fit_is_refused_up_front(tmp_path, models, monkeypatch, bad, words):
    monkeypatch.setattr(TextualInversionConfig, "search_space", classmethod(lambda cls: [bad]))
    with pytest.raises(EditbenchError, match="search space of textual_inversion") as err:
        run(models, tmp_path / "t", 1)
    assert words in str(err.value)
    assert not (tmp_path / "t").exists()  # refused before anything was written


# ------------------------------------------------------------------------------------------------ budget
def test_trials_is_the_total_budget_and_a_rerun_resumes_it(tmp_path, models):
    out = tmp_path / "t"
    r2 = run(models, out, 2)
    assert states(out) == [COMPLETE] * 2 and r2["trials_used"] == 2
    r3 = run(models, out, 3)
    assert states(out) == [COMPLETE] * 3                                     # exactly one more trial
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0", "1", "2"]
    assert (r3["budget"], r3["trials_used"], r3["trials_completed"], r3["trials_failed"]) == (3, 3, 3, 0)
    again = run(models, out, 2)                                              # smaller budget: nothing runs,
    assert len(study_trials(out)) == 3 and again["trials_used"] == 2         # the choice uses the first 2

    # tuned.json: the chosen point split by destination, values, budget, wall times
    tuned = json.loads((out / "tuned.json").read_text())
    assert tuned == again
    trials = study_trials(out)
    best = T.choose(trials[:2], T.GROUND_TRUTH)
    assert tuned["trial"] == best.number and tuned["params"] == best.params
    assert tuned["config"] == {"lr": best.params["lr"]} and tuned["settings"] == {}
    assert tuned["steps"] == best.params["steps"] and 1 <= tuned["steps"] <= 3
    assert tuned["values"] == dict(zip(T.GROUND_TRUTH, best.values))
    assert (tuned["method"], tuned["suite"], tuned["study"]) == (METHOD, "t", "t:textual_inversion")
    assert tuned["objectives"] == list(T.GROUND_TRUTH) and tuned["validation"] == ["sunny"]
    assert tuned["rule"] == T.RULE and [p["name"] for p in tuned["search_space"]] == ["lr", "steps"]
    assert set(tuned["wall_s"]["per_trial"]) == {"0", "1"} and tuned["wall_s"]["trials_total"] > 0
    study = optuna.load_study(study_name="t:textual_inversion", storage=f"sqlite:///{out / 'study.db'}")
    assert study.user_attrs["method"] == METHOD and study.user_attrs["suite"] == "t"
    assert study.user_attrs["budget"] == 2 and study.user_attrs["objectives"] == list(T.GROUND_TRUTH)
    url = f"sqlite:///{out / 'study.db'}"                                  # what benchmarks/tuning/run.py reads
    assert T.complete_trials(url, "t", METHOD) == 3 and T.complete_trials(url, "t", "lora") == 0
    table = __import__("pandas").read_csv(out / "trials.csv")
    assert len(table) == 3 and {"values_identity", "values_prompt_fidelity", "params_lr"} <= set(table.columns)
    # each trial ran the method alone on the validation concept
    rows = __import__("pandas").read_csv(out / "trials" / "0" / "results.csv")
    assert set(rows["concepts"]) == {"sunny"} and set(rows["method"]) == {METHOD}


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_a_killed_trial_is_retried_with_its_parameters(tmp_path, models):
    """A RUNNING trial whose heartbeat is older than the grace period (its process was killed) is failed and
    retried with the same parameters, in the same folder; the budget still completes."""
    out = tmp_path / "t"
    run(models, out, 1)
    storage = T.open_storage(f"sqlite:///{out / 'study.db'}")
    study = optuna.load_study(study_name="t:textual_inversion", storage=storage)
    trial = study.ask()
    params = T._suggest(trial, SPACE)
    trial.set_user_attr("folder", f"trials/{trial.number}")
    storage.record_heartbeat(trial._trial_id)
    with sqlite3.connect(out / "study.db") as db:
        db.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-10 minutes')")
    r = run(models, out, 2)
    trials = study_trials(out)
    assert trials[trial.number].state == FAIL
    retried = [t for t in trials if t.number > trial.number]
    assert len(retried) == 1 and retried[0].state == COMPLETE and retried[0].params == params
    assert retried[0].user_attrs["folder"] == f"trials/{trial.number}"
    assert r["trials_completed"] == 2 and (out / "trials" / str(trial.number) / "results.csv").is_file()


def test_an_interrupted_trial_is_queued_again(tmp_path, models, monkeypatch):
    real = T.run_suite

    def interrupted(suite, out, **kw):
        monkeypatch.setattr(T, "run_suite", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "run_suite", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(models, tmp_path / "t", 2)
    r = run(models, tmp_path / "t", 2)
    first, retried, other = study_trials(tmp_path / "t")
    assert (first.state, retried.state, other.state) == (FAIL, COMPLETE, COMPLETE)
    assert retried.params == first.params and retried.user_attrs["folder"] == "trials/0"
    assert r["trials_used"] == 2


def test_a_failing_trial_does_not_count_and_failures_in_a_row_stop(tmp_path, models, monkeypatch):
    real, calls = T.run_suite, []

    def flaky(suite, out, **kw):  # the first trial's cell crashes (as a non-finite loss would)
        calls.append(out)
        if len(calls) == 1 or always:
            (Path(out) / "cells").mkdir(parents=True, exist_ok=True)
            (Path(out) / "cells" / "x.error.txt").write_text("boom")
            raise EditbenchError("1 cell(s) failed")
        return real(suite, out, **kw)

    always = False
    monkeypatch.setattr(T, "run_suite", flaky)
    r = run(models, tmp_path / "t", 2)
    assert states(tmp_path / "t") == [FAIL, COMPLETE, COMPLETE]
    assert r["trials_used"] == 2 and r["trials_failed"] == 1
    assert study_trials(tmp_path / "t")[0].user_attrs["error"] == "1 cell(s) failed"

    always = True
    monkeypatch.setattr(T, "MAX_FAILED_IN_A_ROW", 2)
    with pytest.raises(EditbenchError, match="2 trials in a row failed"):
        run(models, tmp_path / "t", 3)
    assert states(tmp_path / "t") == [FAIL, COMPLETE, COMPLETE, FAIL, FAIL]


# ------------------------------------------------------------------------------------------------ the rule
def _trials(values):
    study = optuna.create_study(directions=["maximize", "maximize"])
    for v in values:
        study.add_trial(optuna.trial.create_trial(values=list(v)))
    study.add_trial(optuna.trial.create_trial(state=FAIL))
    return study.trials


def test_chosen_point_rule():
    # Pareto front: 0 (0.9, 0.5), 1 (0.7, 0.85), 2 (0.6, 0.95); 3 and 4 are dominated by 1
    trials = _trials([(0.9, 0.5), (0.7, 0.85), (0.6, 0.95), (0.5, 0.8), (0.65, 0.82)])
    assert T.choose(trials, T.GROUND_TRUTH).number == 1     # highest identity with prompt_fidelity >= 0.8
    assert T.choose(trials, T.GROUND_TRUTH, floors={}).number == 1   # no floor: highest sum (1.55)
    assert T.choose(_trials([(0.9, 0.5), (0.6, 0.7)]), T.GROUND_TRUTH).number == 0  # none reaches 0.8: best sum
    assert T.choose(_trials([(0.5, 0.3), (0.45, 0.36)]), T.CLIP_OBJECTIVES).number == 1  # CLIP: no floor
    assert T.choose(_trials([(0.4, 0.9), (0.4, 0.9)]), T.GROUND_TRUTH).number == 0   # ties: lower number
    with pytest.raises(EditbenchError, match="no trial completed"):
        T.choose(_trials([]), T.GROUND_TRUTH)


# ------------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_raise_and_leave_the_stored_study_intact(tmp_path, models, monkeypatch):
    out = tmp_path / "t"
    run(models, out, 1)

    def snapshot():
        return [(t.number, t.state, t.params, t.values) for t in study_trials(out)], (out / "tuned.json").read_text()

    before = snapshot()
    with pytest.raises(EditbenchError, match="unknown method 'nope'"):
        run(models, out, 2, method="nope")
    with pytest.raises(EditbenchError, match="neither a file nor a bundled suite"):
        T.tune("no-such-suite", METHOD, 2, out, progress=False)
    with pytest.raises(EditbenchError, match="cannot open the study storage"):
        run(models, tmp_path / "u", 2, storage="sqlite:////nonexistent/dir/x.db")
    assert not Path("/nonexistent").exists() and not (tmp_path / "u").exists()
    with pytest.raises(EditbenchError, match="belongs to the study 't:textual_inversion'"):
        run(models, out, 2, method="lora")                          # another method into the same folder
    monkeypatch.setattr(TextualInversionConfig, "search_space", classmethod(lambda cls: SPACE[:1]))
    with pytest.raises(EditbenchError, match=r"other \['search_space'\]"):
        run(models, out, 2)                                          # the space changed since the study began
    monkeypatch.setattr(TextualInversionConfig, "search_space", classmethod(lambda cls: list(SPACE)))
    moved = copy.deepcopy(models[0])
    with torch.no_grad():
        moved.unet.conv_in.bias[0] += 1e-3                           # other base-model weights (a retrained world)
    with pytest.raises(EditbenchError, match=r"other \['base_model'\].*base model [0-9a-f]{16} there"):
        run((moved, models[1]), out, 2)
    other = optuna.create_study(study_name="t:textual_inversion", storage=f"sqlite:///{tmp_path / 'o.db'}",
                                directions=["maximize", "maximize"])
    other.set_user_attr("method", "lora")                            # a study of the same name made for another job
    with pytest.raises(EditbenchError, match="made for method 'lora'"):
        run(models, tmp_path / "v", 2, storage=f"sqlite:///{tmp_path / 'o.db'}")
    assert optuna.load_study(study_name="t:textual_inversion",
                             storage=f"sqlite:///{tmp_path / 'o.db'}").user_attrs == {"method": "lora"}
    with pytest.raises(EditbenchError, match="positive int"):
        run(models, out, 0)
    assert snapshot() == before


# ------------------------------------------------------------------------------------------------ validation
def test_validation_concepts_are_apart_from_test_concepts():
    with pytest.raises(EditbenchError, match=r"\['sunny'\] are both test"):
        load_suite({**SPEC, "concepts": ["zebra", "sunny"]})
    with pytest.raises(EditbenchError, match="lists no validation concepts"):
        T.validation_suite(load_suite({k: v for k, v in SPEC.items() if k != "validation"}), METHOD)
    quick = load_suite("toy-quick")
    assert sorted(quick.validation) == sorted(TOY_VALIDATION) and set(quick.concepts) <= set(TOY_TEST)
    raw = yaml.safe_load(Path(quick.path).read_text())
    del raw["validation"]                                            # validation concepts are not cells:
    assert [c.id for c in load_suite(raw).cells()] == [c.id for c in quick.cells()]   # the hashes are unchanged
    v = T.validation_suite(quick, "perfusion", {"config": {"lr_values": 0.1}, "settings": {"beta": 0.5}, "steps": 7})
    assert sorted(v.concepts) == sorted(TOY_VALIDATION) and not v.pairs and len(v.methods) == 1
    assert (v.methods[0].config, v.methods[0].settings, v.methods[0].sweep, v.methods[0].steps) == (
        {"lr_values": 0.1}, {**quick.methods[1].settings, "beta": 0.5}, {}, 7)   # merged over the entry's own


# ------------------------------------------------------------------------------------------------ CLI, bench --tuned
def test_cli_tune_then_bench_tuned(tmp_path, monkeypatch, capsys):
    from editbench.cli import main

    monkeypatch.setattr(M, "load_clip", lambda *a, **k: tiny_clip())
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump({**SPEC, "methods": [{"name": METHOD, "config": {"checkpoint_every": 0},
                                                          "steps": 50}]}))
    argv = ["tune", "--suite", str(suite), "--method", METHOD, "--trials", "2", "--out", str(tmp_path / "tn")]
    assert main(argv) == 0
    assert "chosen trial" in capsys.readouterr().out
    tuned = json.loads((tmp_path / "tn" / "tuned.json").read_text())
    assert tuned["trials_used"] == 2 and tuned["steps"] in (1, 2, 3)

    assert main(["bench", "--suite", str(suite), "--out", str(tmp_path / "b"), "--tuned", str(tmp_path / "tn")]) == 0
    meta = json.loads((tmp_path / "b" / "suite.json").read_text())
    assert meta["methods"][0]["config"] == {"checkpoint_every": 0, **tuned["config"]}
    assert meta["methods"][0]["steps"] == tuned["steps"]             # the entry's own 50 steps are replaced
    assert meta["tuned"][0]["budget"] == 2 and meta["tuned"][0]["trial"] == tuned["trial"]
    art = methods.get(METHOD)().load(next((tmp_path / "b" / "artifacts").rglob("*.safetensors")))
    assert art.metadata["config"]["lr"] == tuned["config"]["lr"]
    assert art.metadata["training"]["steps"] == tuned["steps"]
    assert "Tuned with `editbench tune`" in (tmp_path / "b" / "report.md").read_text()

    # the tuned settings are refused where they would leak or clash
    assert main(["bench", "--suite", str(suite), "--out", str(tmp_path / "c"), "--tuned", str(tmp_path / "tn"),
                 "--tuned", str(tmp_path / "tn")]) == 2
    assert "both tune textual_inversion" in capsys.readouterr().err
    leak = tmp_path / "leak.yaml"
    leak.write_text(yaml.safe_dump({**SPEC, "concepts": ["sunny"], "validation": ["zebra"]}))
    assert main(["bench", "--suite", str(leak), "--out", str(tmp_path / "d"), "--tuned", str(tmp_path / "tn")]) == 2
    assert "was tuned on ['sunny']" in capsys.readouterr().err
    assert main(["tune", "--suite", str(suite), "--method", "nope", "--trials", "2", "--out", str(tmp_path / "e")]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
