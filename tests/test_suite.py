"""Suite mechanics: parsing, cells, resume after a kill, sharding, artifact reuse, path sanitizing.

Fast tests use a fake pipeline, a fake CLIP and a fake Editor (registered only inside each test); the slow test
runs a stub Editor through the real training loop on the tiny pipeline with a tiny random open_clip model.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from _eval_stubs import FakeClip, FakeEditor, FakePipeline, FakeRareWordEditor, registered

from editbench.errors import EditbenchError
from editbench.eval import results, runner
from editbench.eval import spec as suite_spec
from editbench.eval.sources import TOY_TEST, TOY_VALIDATION
from editbench.methods.tokens import RARE_WORDS

BASE = {"name": "t", "model": "tiny", "concepts": ["zebra", "sunny", "target"], "pairs": [["zebra", "sunny"]],
        "seeds": [0, 1], "max_prompts": 2, "images_per_prompt": 2, "steps": 3,
        "methods": ["base", {"name": "fake", "sweep": {"scale": [0.5, 1.0]}}, "fake_single"]}


def _run(tmp_path, spec=None, **kw):
    suite = suite_spec.load_suite(spec or BASE)
    return runner.run_suite(suite, tmp_path / "out", pipeline=kw.pop("pipeline", FakePipeline()), clip=FakeClip(),
                       progress=False, **kw)


def _expected_rows(spec=BASE) -> int:
    """Cells x prompts x images, skipping the multi-concept cells of fake_single (no multi-concept support)."""
    suite = suite_spec.load_suite(spec)
    return sum(len(c.prompts) * suite.images_per_prompt for c in suite.cells()
               if not (c.method.name == "fake_single" and len(c.concepts) > 1))


@pytest.fixture
def fakes():
    FakeEditor.fits.clear()
    with registered(FakeEditor, FakeRareWordEditor):
        yield


def test_cells_cover_the_grid(fakes):
    suite = suite_spec.load_suite(BASE)
    cells = suite.cells()
    # 3 methods x (3 concepts + 1 pair) x 2 seeds, the fake method with 2 settings
    assert len(cells) == (1 + 2 + 1) * 4 * 2
    assert len({c.id for c in cells}) == len(cells)
    assert {c.settings.get("scale") for c in cells if c.method.name == "fake"} == {0.5, 1.0}
    assert all(len(c.prompts) == 2 for c in cells)
    pair = next(c for c in cells if c.concepts == ("zebra", "sunny"))
    assert all("{0}" in t and "{1}" in t for _, t in pair.prompts)


def test_run_writes_one_row_per_image_and_reuses_artifacts(tmp_path, fakes):
    df = _run(tmp_path)
    out = tmp_path / "out"
    assert len(df) == _expected_rows()
    key = ["label", "concepts", "seed", "setting", "prompt_index", "image_index"]
    assert not df.duplicated(key).any()
    assert (out / "results.csv").is_file() and (out / "results.parquet").is_file()
    assert len(pd.read_parquet(out / "results.parquet")) == len(df)
    assert all((out / p).is_file() for p in df["image"])
    # artifacts trained once per (method, concept, seed): reused across settings and by the pair cells
    assert len(FakeEditor.fits) == len(set(FakeEditor.fits)) == 2 * 3 * 2
    # the pair cells of the single-artifact method are recorded as skipped, with the reason
    skips = list((out / "cells").glob("*.skip.json"))
    assert len(skips) == 2 and "compose" in json.loads(skips[0].read_text())["reason"]
    # the rare-word method got single-token placeholders, the new-token method <name>
    assert {p for m, p, _ in FakeEditor.fits if m == "fake_single"} <= set(RARE_WORDS)
    assert {p for m, p, _ in FakeEditor.fits if m == "fake"} == {"<zebra>", "<sunny>", "<target>"}
    # the phrase reached the prompt; text alignment uses the superclass prompt
    fake = df[(df["label"] == "fake") & (df["n_concepts"] == 1)]
    assert fake["prompt"].str.contains("<").all() and not fake["eval_prompt"].str.contains("<").any()
    assert (df.loc[df.label == "fake_single", "prompt"].str.split().apply(set)
            .apply(lambda w: bool(w & set(RARE_WORDS)))).all()
    # settings change the images (the edit is applied) and are undone afterwards
    a = fake[fake.setting == "scale=0.5"]["image_cosine"].to_numpy()
    b = fake[fake.setting == "scale=1.0"]["image_cosine"].to_numpy()
    assert (a != b).any()
    assert (df[df.label == "fake"]["storage_bytes"] > 0).all() and (df[df.label == "base"]["storage_bytes"] == 0).all()
    multi = df[df.n_concepts == 2]
    assert multi["composition_hit"].isin([0.0, 1.0]).all() and multi["image_alignment_1"].notna().all()


def test_rerun_skips_finished_cells(tmp_path, fakes):
    first = _run(tmp_path)
    pipe = FakePipeline()
    fits = len(FakeEditor.fits)
    again = _run(tmp_path, pipeline=pipe)
    assert pipe.calls == 0 and len(FakeEditor.fits) == fits
    pd.testing.assert_frame_equal(first, again)


def test_kill_mid_run_then_resume_has_no_duplicate_or_missing_rows(tmp_path, fakes, monkeypatch):
    written = []
    real = runner.write_csv

    def dying_write(path, df):
        if path.parent.name == "cells" and len(written) == 5:  # the 6th cell dies after its samples were saved
            raise KeyboardInterrupt
        written.append(path)
        real(path, df)

    monkeypatch.setattr(runner, "write_csv", dying_write)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path)
    monkeypatch.setattr(runner, "write_csv", real)
    assert len(list((tmp_path / "out" / "cells").glob("*.csv"))) == 5
    pipe = FakePipeline()
    df = _run(tmp_path, pipeline=pipe)
    key = ["label", "concepts", "seed", "setting", "prompt_index", "image_index"]
    assert len(df) == _expected_rows() and not df.duplicated(key).any()
    total = len([c for c in suite_spec.load_suite(BASE).cells()])
    assert pipe.calls > 0
    assert len(list((tmp_path / "out" / "cells").glob("*.csv"))) + 2 == total  # + 2 skipped pair cells
    assert not list((tmp_path / "out" / "cells").glob(".*.tmp"))


def test_shards_partition_the_cells_exactly(fakes):
    cells = suite_spec.load_suite(BASE).cells()
    for n in (1, 2, 3, 7):
        parts = [suite_spec.shard_cells(cells, (i, n)) for i in range(n)]
        ids = [c.id for p in parts for c in p]
        assert sorted(ids) == sorted(c.id for c in cells)  # disjoint and complete
        for p in parts:  # a (concepts, seed) unit, hence every entry sharing its artifacts, never straddles shards
            units = {c.unit for c in p}
            assert len(p) == sum(c.unit in units for c in cells)
        if n == 2:  # the single-concept units (most of the training) are spread evenly
            singles = [sum(len(c.concepts) == 1 for c in {c.unit: c for c in p}.values()) for p in parts]
            assert max(singles) - min(singles) <= 1, singles
    assert suite_spec.shard_cells(cells, "1/3") == suite_spec.shard_cells(cells, (1, 3))
    order = suite_spec.run_order(cells)  # singles first (their artifacts are on disk before any pair needs them)
    k = [len(c.concepts) for c in order]
    assert sorted(c.id for c in order) == sorted(c.id for c in cells) and k == sorted(k) and k[-1] == 2
    for bad in ("3/3", "-1/2", "a/b", "2", (0, 0)):
        with pytest.raises(EditbenchError, match="shard"):
            suite_spec.parse_shard(bad)


def test_sharded_runs_assemble_the_full_table(tmp_path, fakes):
    """Three shards into one folder give the table of one unsharded run, cell by cell (timings aside), and each
    cell is run by exactly one shard."""
    full = _run(tmp_path / "unsharded")
    cells = suite_spec.load_suite(BASE).cells()
    parts, owner = [], {}
    for i in range(3):
        parts.append(_run(tmp_path, shard=f"{i}/3"))
        for c in suite_spec.shard_cells(cells, f"{i}/3"):
            assert c.id not in owner, f"cell {c.id} is in shards {owner[c.id]} and {i}"
            owner[c.id] = i
    assert set(owner) == {c.id for c in cells}
    assert len(full) == _expected_rows() and len(parts[0]) < len(parts[-1])
    key = ["label", "concepts", "seed", "setting", "prompt_index", "image_index"]
    cols = [c for c in full.columns if not c.endswith("time_s")]
    assert set(cols) <= set(parts[-1].columns) and not parts[-1].duplicated(key).any()
    a = full[cols].sort_values(key).reset_index(drop=True)
    b = parts[-1][cols].sort_values(key).reset_index(drop=True)   # the last shard's assembly: every shard's cells
    pd.testing.assert_frame_equal(a, b)
    on_disk = pd.read_csv(tmp_path / "out" / "results.csv")
    assert len(on_disk) == len(full)


@pytest.mark.parametrize("shard", [None, "1/3", "2/3"])
def test_the_cli_shard_option_runs_that_shards_cells(tmp_path, fakes, monkeypatch, capsys, shard):
    """``editbench bench --shard i/N`` reaches the runner: exactly the cells of shard i of N are run (all of them
    without the option)."""
    from editbench.cli import main
    from editbench.eval import report as report_module

    real = runner.run_suite
    seen = []

    def run_suite(suite, out, **kw):
        seen.append(kw["shard"])
        return real(suite_spec.load_suite(BASE), out, shard=kw["shard"], pipeline=FakePipeline(), clip=FakeClip(),
                    progress=False)

    monkeypatch.setattr(runner, "run_suite", run_suite)
    monkeypatch.setattr(report_module, "write_report", lambda out: out / "report.md")   # plots: not tested here
    out = tmp_path / "out"
    argv = ["bench", "--suite", "toy-quick", "--out", str(out)] + ([] if shard is None else ["--shard", shard])
    assert main(argv) == 0
    assert seen == [shard or "0/1"]
    cells = suite_spec.load_suite(BASE).cells()
    expect = {c.id for c in suite_spec.shard_cells(cells, shard or "0/1")}
    done = {p.name.removesuffix(".csv").removesuffix(".skip.json") for p in (out / "cells").iterdir()
            if p.name.endswith((".csv", ".skip.json"))}
    assert done == expect and (shard in (None, "0/1")) == (len(expect) == len(cells))


@pytest.mark.parametrize("bad", ["../../escape", "/abs/path", "..", "a/../../b", "~user", "x\\..\\y"])
def test_names_from_suite_files_stay_inside_the_output(tmp_path, fakes, bad):
    spec = dict(BASE, name=bad, concepts=["zebra"], pairs=None, seeds=[0], max_prompts=1, images_per_prompt=1,
                methods=[{"name": "fake", "label": bad}])
    if bad.strip("./\\~") == "":
        with pytest.raises(EditbenchError, match="file name"):
            suite_spec.load_suite(spec)
        return
    _run(tmp_path, spec)
    out = (tmp_path / "out").resolve()
    for p in tmp_path.rglob("*"):
        assert p.resolve().is_relative_to(out) or p.resolve() == out or out.is_relative_to(p.resolve())
    name = suite_spec.safe_name(bad)
    assert name and "/" not in name and not name.startswith(".")


def test_safe_name_and_inside_guard(tmp_path):
    assert suite_spec.safe_name("perfusion beta/0.7") == "perfusion_beta_0.7"
    with pytest.raises(EditbenchError):
        suite_spec.safe_name("../..")
    with pytest.raises(EditbenchError, match="outside"):
        suite_spec.inside(tmp_path / "out", tmp_path / "out" / ".." / "x")


def test_suite_file_errors_name_the_problem(tmp_path):
    def err(**change):
        with pytest.raises(EditbenchError) as e:
            suite_spec.load_suite({**BASE, **change})
        return str(e.value)

    assert "unknown suite key" in err(method=["x"])
    assert "not a toy-world concept" in err(concepts=["nope"])
    assert "labels must be unique" in err(methods=["base", "base"])
    assert "sweep" in err(methods=[{"name": "fake", "sweep": {"scale": 0.5}}])
    assert "seeds" in err(seeds=[-1])
    assert "images_per_prompt" in err(images_per_prompt=0)
    assert "unknown score scale" in err(metrics={"text_scale": "percent"})
    assert "pair" in err(pairs=[["zebra", "nope"]])
    with pytest.raises(EditbenchError, match="bundled"):
        suite_spec.load_suite("no-such-suite")
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [unclosed")
    with pytest.raises(EditbenchError, match="YAML"):
        suite_spec.load_suite(bad)
    with pytest.raises(EditbenchError, match="unknown method"):
        suite_spec.load_suite({**BASE, "methods": ["no_such_method"]}).validate()


def test_bad_inference_setting_is_caught_before_running(tmp_path, fakes):
    spec = {**BASE, "methods": [{"name": "fake", "sweep": {"scale": [-1.0]}}]}
    with pytest.raises(EditbenchError, match="scale"):
        _run(tmp_path, spec)
    assert not (tmp_path / "out" / "cells").exists()


def test_method_crash_fails_only_its_cell(tmp_path, fakes, monkeypatch):
    def broken(self, pipeline, artifacts, handle, settings):
        raise RuntimeError("boom")

    monkeypatch.setattr(FakeRareWordEditor, "install", broken)
    with pytest.raises(EditbenchError, match="cell\\(s\\) failed"):
        _run(tmp_path)
    errors = list((tmp_path / "out" / "cells").glob("*.error.txt"))
    assert errors and all("boom" in p.read_text() for p in errors)
    df = pd.read_csv(tmp_path / "out" / "results.csv")
    assert set(df["label"]) == {"base", "fake"}
    monkeypatch.undo()
    df = _run(tmp_path)                                   # fixed: the re-run retries only the failed cells
    assert len(df) == _expected_rows() and not list((tmp_path / "out" / "cells").glob("*.error.txt"))


def test_changed_suite_makes_new_cells(tmp_path, fakes):
    _run(tmp_path)
    df = _run(tmp_path, {**BASE, "images_per_prompt": 1})
    assert len(df) == _expected_rows({**BASE, "images_per_prompt": 1})
    assert (df["image_index"] == 0).all()


def test_dreambench_and_customconcept101_folders(tmp_path):
    from editbench import toyworld

    data = toyworld.DATA
    spec = {"model": "tiny", "methods": ["base"],
            "concepts": [{"dreambench": str(data / "dreambench"), "names": ["zebra", "halo"]},
                         {"customconcept101": str(data / "customconcept101.json"), "names": ["sunny"]}],
            "pairs": "auto"}
    suite = suite_spec.load_suite(spec)
    assert set(suite.concepts) == {"zebra", "halo", "sunny"}
    z = suite.concepts["zebra"]
    assert z.superclass == "heart" and len(z.images) == 5 and z.masks and len(z.prompts) == 8
    # CustomConcept101's pairs whose two concepts are both in the suite (zebra from the DreamBench folder)
    assert [p.names for p in suite.pairs] == [("zebra", "sunny")] and len(suite.pairs[0].prompts) == 3
    # DreamBench's own prompts_and_classes.txt layout
    root = tmp_path / "db"
    (root / "dog2").mkdir(parents=True)
    for i in range(2):
        (root / "dog2" / f"0{i}.jpg").write_bytes((data / "dreambench" / "zebra" / f"0{i}.png").read_bytes())
    (root / "prompts_and_classes.txt").write_text(
        "Classes\nsubject_name,class\ndog2,dog\n\nPrompts\nObject Prompts\nprompt_list = [\n"
        "'a {0} {1} in the jungle'.format(unique_token, class_token),\n]\n\nLive Subject Prompts\n"
        "prompt_list = [\n'a {0} {1} in the snow'.format(unique_token, class_token),\n]\n")
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump({"model": "tiny", "methods": ["base"], "concepts": [{"dreambench": "db"}]}))
    dog = suite_spec.load_suite(cfg).concepts["dog2"]
    assert dog.superclass == "dog" and dog.prompts == ("a {} in the snow",) and dog.masks is None
    with pytest.raises(EditbenchError, match="not found"):
        suite_spec.load_suite({**spec, "concepts": [{"dreambench": str(tmp_path / "missing")}]})


def test_bundled_suites_parse():
    names = suite_spec.bundled_suites()
    assert {"toy-quick", "toy-full", "dreambench", "customconcept101"} <= set(names)
    quick = suite_spec.load_suite("toy-quick")
    assert {m.name for m in quick.methods} >= {"perfusion", "custom_diffusion", "textual_inversion", "dreambooth",
                                               "lora"}
    assert len(quick.concepts) == 2 and len(quick.seeds) == 1
    full = suite_spec.load_suite("toy-full")
    assert len(full.seeds) == 3 and full.pairs
    for suite in (quick, full, suite_spec.load_suite("toy-results")):  # report test concepts, tune on validation
        assert set(suite.concepts) <= set(TOY_TEST) and set(suite.validation) == set(TOY_VALIDATION)
        assert all(set(p.names) <= set(TOY_TEST) and p.prompts for p in suite.pairs)
    assert set(full.concepts) == set(TOY_TEST) and len(full.pairs) == 4
    assert any("beta" in m.sweep for m in full.methods)
    for name in ("dreambench", "customconcept101"):
        path = suite_spec.BUNDLED / f"{name}.yaml"
        raw = yaml.safe_load(path.read_text())
        assert raw["model"].startswith("/path/to/")  # a placeholder the user edits
        with pytest.raises(EditbenchError, match="not found"):
            suite_spec.load_suite(path)


# ------------------------------------------------------------------------------------------------ multi: joint
class FakeJointEditor(FakeEditor):
    """Trains several concepts in one fit (like Custom Diffusion: ``max_concepts = None``), applies one artifact."""

    name = "fake_joint"
    max_artifacts = 1
    max_concepts = None

    def fit(self, pipeline, concept, *, steps=None, seed=0, progress=True, checkpoint_dir=None):
        many = isinstance(concept, list)
        concepts = concept if many else [concept]
        FakeEditor.fits.append((self.name, tuple(c.placeholder for c in concepts) if many else concept.placeholder,
                                seed))
        art = super().fit(pipeline, concepts[0], steps=steps, seed=seed)
        FakeEditor.fits.pop()
        info = [{"placeholder": c.placeholder, "superclass": c.superclass} for c in concepts]
        art.metadata["concept"] = info if many else info[0]
        art.metadata["phrase"] = [c.placeholder for c in concepts] if many else concept.placeholder
        return art

    def compose(self, artifacts, pipeline=None):
        arts = list(artifacts)
        return type(arts[0])(self.name, {"delta": sum(a.tensors["delta"] for a in arts)},
                             {"base_fingerprint": "fake", "composed_from": len(arts)})


JOINT = {"name": "j", "model": "tiny", "concepts": ["zebra", "sunny"], "pairs": [["zebra", "sunny"]], "seeds": [0],
         "max_prompts": 1, "images_per_prompt": 1, "steps": 3,
         "methods": [{"name": "fake_joint"}, {"name": "fake_joint", "label": "fj-joint", "multi": "joint"}]}


def test_multi_option_is_parsed_and_validated(fakes):
    suite = suite_spec.load_suite(JOINT)
    assert [m.multi for m in suite.methods] == ["separate", "joint"]
    for old in ("merge", "together", None, ["joint"]):   # any other value is refused with the two values to write
        with pytest.raises(EditbenchError, match=r"multi must be one of \['separate', 'joint'\], got "
                                                 f"{re.escape(repr(old))}; "
                                                 r"write 'multi: separate' .* or 'multi: joint'"):
            suite_spec.load_suite({**JOINT, "methods": [{"name": "fake_joint", "multi": old}]})
    with registered(FakeJointEditor):
        suite.validate()
        for name in ("fake", "fake_single"):               # max_concepts = 1: one concept per fit
            with pytest.raises(EditbenchError, match=f"{name}.*multi: joint"):
                suite_spec.load_suite({**JOINT, "methods": [{"name": name, "multi": "joint"}]}).validate()
        with pytest.raises(EditbenchError, match="multi"):
            suite_spec.load_suite({**JOINT, "methods": [{"name": "base", "multi": "joint"}]}).validate()
    # an entry's cell ids do not depend on the other entries, and 'multi' is part of them: the same label with
    # 'multi: joint' makes other cells (its single-concept cells included)
    with registered(FakeJointEditor):  # cell ids cover the method's resolved config: it must be registered
        plain = suite_spec.load_suite({**JOINT, "methods": ["fake_joint"]}).cells()
        assert [c.id for c in plain] == [c.id for c in suite.cells() if c.method.label == "fake_joint"]
        assert {c.id for c in suite.cells() if c.method.label == "fj-joint"}.isdisjoint(c.id for c in plain)
        assert [c.id for c in plain] == [c.id for c in suite_spec.load_suite(
            {**JOINT, "methods": [{"name": "fake_joint", "multi": "separate"}]}).cells()]
        joint = suite_spec.load_suite({**JOINT, "methods": [{"name": "fake_joint", "multi": "joint"}]}).cells()
    assert [c.id.rsplit("-", 1)[0] for c in joint] == [c.id.rsplit("-", 1)[0] for c in plain]
    assert {c.id for c in joint}.isdisjoint(c.id for c in plain)


def test_joint_pair_cell_trains_one_artifact_on_both_concepts(tmp_path, fakes):
    with registered(FakeJointEditor):
        df = _run(tmp_path, JOINT)
        fits = list(FakeEditor.fits)
        out = tmp_path / "out"
        # separate: one fit per concept (merged with compose); joint: ONE fit on the pair, and its single-concept
        # cells reuse the separate entry's artifacts (same method and config: same files under the method name)
        assert Counter(f[1] for f in fits) == {"<zebra>": 1, "<sunny>": 1, ("<zebra>", "<sunny>"): 1}
        joint = sorted((out / "artifacts" / "fake_joint" / "zebra+sunny").glob("seed0-*.safetensors"))
        assert len(joint) == 1 and not (out / "artifacts" / "fj-joint").exists()
        from editbench.methods.base import Artifact

        meta = Artifact.load(joint[0]).metadata
        assert [c["placeholder"] for c in meta["concept"]] == ["<zebra>", "<sunny>"]
        assert set(df["multi"]) == {"separate", "joint"}
        pair = df[df.n_concepts == 2].set_index("label")
        assert pair.loc["fj-joint", "multi"] == "joint" and pair.loc["fake_joint", "multi"] == "separate"
        # cost of the joint cell: the one artifact (its own train time and file size), not a sum over concepts
        assert pair.loc["fj-joint", "train_time_s"] == 1.5 and pair.loc["fake_joint", "train_time_s"] == 3.0
        assert pair.loc["fj-joint", "storage_bytes"] == joint[0].stat().st_size
        assert "<zebra>" in pair.loc["fj-joint", "prompt"] and "<sunny>" in pair.loc["fj-joint", "prompt"]
        # single-concept cells of the joint entry behave as usual
        assert len(df[(df.label == "fj-joint") & (df.n_concepts == 1)]) == 2
        # re-run: everything is done, nothing is trained or generated again
        pipe, before = FakePipeline(), len(FakeEditor.fits)
        again = _run(tmp_path, JOINT, pipeline=pipe)
        assert pipe.calls == 0 and len(FakeEditor.fits) == before
        pd.testing.assert_frame_equal(df, again)
        # a lost cell file: the joint artifact is reused from disk, not retrained
        cell = next(c for c in suite_spec.load_suite(JOINT).cells()
                    if c.method.label == "fj-joint" and len(c.concepts) == 2)
        (out / "cells" / f"{cell.id}.csv").unlink()
        _run(tmp_path, JOINT, pipeline=pipe)
        assert pipe.calls > 0 and len(FakeEditor.fits) == before


def test_cells_written_by_an_older_editbench_are_refused_by_name(tmp_path, fakes):
    df = _run(tmp_path, {**BASE, "pairs": None, "seeds": [0], "methods": ["fake"]})
    assert tuple(df.columns[:len(results.CELL_COLUMNS)]) == results.CELL_COLUMNS  # what every current cell has
    out = tmp_path / "out"
    old = sorted((out / "cells").glob("*.csv"))[0]
    pd.read_csv(old).drop(columns="multi").to_csv(old, index=False)   # a cell from before the 'multi' option
    with pytest.raises(EditbenchError, match=rf"{old.name} has no column\(s\) \['multi'\]: it was written by an "
                                             r"older editbench; run the suite into a new --out folder"):
        results.collect(out)


@pytest.mark.slow
def test_joint_custom_diffusion_on_the_tiny_pipeline(tmp_path):
    """Real Custom Diffusion: the default entry merges two single-concept artifacts (compose), the joint entry
    trains one artifact on both concepts; a re-run trains nothing."""
    from _eval_stubs import tiny_clip

    from editbench.methods.base import Artifact
    from editbench.testing import tiny_pipeline

    prior = {"num_class_images": 2, "class_inference_steps": 2, "merge_captions": 50}
    spec = {"model": "tiny", "concepts": ["zebra", "sunny"], "pairs": [["zebra", "sunny"]], "seeds": [0],
            "max_prompts": 1, "images_per_prompt": 1, "steps": 2,
            "generation": {"num_inference_steps": 2, "guidance_scale": 2.0},
            "methods": [{"name": "custom_diffusion", "config": prior},
                        {"name": "custom_diffusion", "label": "cd-joint", "config": prior, "multi": "joint"}]}
    pipe, clip = tiny_pipeline(), tiny_clip()
    df = runner.run_suite(suite_spec.load_suite(spec), tmp_path, pipeline=pipe, clip=clip, progress=False)
    pair = df[df.n_concepts == 2].set_index("label")
    assert set(pair.index) == {"custom_diffusion", "cd-joint"}
    assert pair.loc["cd-joint", "multi"] == "joint" and pair.loc["custom_diffusion", "multi"] == "separate"
    joint = list((tmp_path / "artifacts" / "custom_diffusion" / "zebra+sunny").glob("*.safetensors"))
    assert len(joint) == 1
    meta = Artifact.load(joint[0]).metadata
    assert meta["modifier_tokens"] == ["<zebra>", "<sunny>"] and len(meta["categories"]) == 2
    assert [c["placeholder"] for c in meta["concept"]] == ["<zebra>", "<sunny>"]
    assert "composed_from" not in meta
    assert pair.loc["cd-joint", "train_steps"] == 2 and pair.loc["custom_diffusion", "train_steps"] == 4
    assert pair.loc["cd-joint", "storage_bytes"] == joint[0].stat().st_size
    assert "<zebra> heart" in pair.loc["cd-joint", "prompt"]
    # 2 singles shared by both entries (same config) + the joint pair artifact (the merged one is not saved)
    assert len(list((tmp_path / "artifacts").rglob("*.safetensors"))) == 3
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "artifacts").rglob("*.safetensors")}
    again = runner.run_suite(suite_spec.load_suite(spec), tmp_path, pipeline=pipe, clip=clip, progress=False)
    pd.testing.assert_frame_equal(df, again)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "artifacts").rglob("*.safetensors")} == mtimes


@pytest.mark.slow
def test_real_training_loop_with_tiny_pipeline_and_open_clip(tmp_path):
    from _eval_stubs import StubEditor, tiny_clip

    from editbench.testing import tiny_pipeline

    spec = {"model": "tiny", "concepts": ["zebra", "sunny"], "pairs": [["zebra", "sunny"]], "seeds": [0],
            "max_prompts": 1, "images_per_prompt": 2, "steps": 2,
            "generation": {"num_inference_steps": 2, "guidance_scale": 2.0},
            "methods": [{"name": "stub", "sweep": {"scale": [0.0, 1.0]}}]}
    with registered(StubEditor):
        df = runner.run_suite(suite_spec.load_suite(spec), tmp_path, pipeline=tiny_pipeline(), clip=tiny_clip(),
                              progress=False)
    assert len(df) == 3 * 2 * 2
    assert (df["storage_bytes"] > 0).all() and (df["train_time_s"] > 0).all()
    assert len(list(Path(tmp_path, "artifacts").rglob("*.safetensors"))) == 2


@pytest.mark.slow
def test_all_builtin_methods_on_the_tiny_pipeline(tmp_path):
    """The five real methods through the suite: phrases, rare words, compose, sweeps (perfusion beta, LoRA scale,
    Custom Diffusion compression rank), artifacts reused across settings."""
    from _eval_stubs import tiny_clip

    from editbench.testing import tiny_pipeline

    prior = {"num_class_images": 2, "class_inference_steps": 2}
    spec = {"model": "tiny", "concepts": ["zebra", "sunny"], "pairs": [["zebra", "sunny"]], "seeds": [0],
            "max_prompts": 1, "images_per_prompt": 1, "steps": 2,
            "generation": {"num_inference_steps": 2, "guidance_scale": 2.0},
            "methods": [{"name": "perfusion", "sweep": {"beta": [0.6, 0.7]}},
                        {"name": "custom_diffusion", "config": prior, "sweep": {"rank": [1, 2]}},
                        "textual_inversion", {"name": "dreambooth", "config": prior},
                        {"name": "lora", "sweep": {"scale": [0.5, 1.0]}}]}
    df = runner.run_suite(suite_spec.load_suite(spec), tmp_path, pipeline=tiny_pipeline(), clip=tiny_clip(),
                          progress=False)
    single = df[df.n_concepts == 1]
    assert set(single["label"]) == {"perfusion", "custom_diffusion", "textual_inversion", "dreambooth", "lora"}
    assert single.groupby("label")["setting"].nunique().to_dict() == {
        "perfusion": 2, "custom_diffusion": 2, "textual_inversion": 1, "dreambooth": 1, "lora": 2}
    prompts = dict(zip(single["label"] + single["concepts"], single["prompt"]))
    assert "<zebra> heart" in prompts["custom_diffusionzebra"] and "<zebra>" in prompts["perfusionzebra"]
    assert any(f"{w} heart" in prompts["dreamboothzebra"] for w in RARE_WORDS)
    cd = single[single.label == "custom_diffusion"].groupby("setting")["storage_bytes"].first()
    assert cd["rank=1"] < cd["rank=2"]                              # compression changes the stored size
    assert len(list((tmp_path / "artifacts").rglob("*.safetensors"))) == 5 * 2
    multi = df[df.n_concepts == 2]
    assert {"perfusion", "custom_diffusion", "textual_inversion", "lora"} <= set(multi["label"])
    assert list((tmp_path / "cells").glob("dreambooth__zebra+sunny*.skip.json"))


@pytest.mark.slow
def test_toy_quick_runs_every_method(tmp_path):
    """The bundled toy-quick suite end to end. Its wall time (the README's figure) is measured, not asserted, by
    ``python benchmarks/perf.py suite`` (benchmarks/perf_suite.py): a test does not depend on the machine's speed."""
    from editbench import toyworld
    from editbench.eval import write_report

    if not (toyworld.WEIGHTS / "model").is_dir():
        pytest.skip("the toy world's weights are not installed")
    df = runner.run_suite("toy-quick", tmp_path, progress=False)
    report = write_report(tmp_path)
    assert {"perfusion", "custom_diffusion", "textual_inversion", "dreambooth", "lora"} <= set(df["method"])
    assert df["text_alignment"].notna().all() and report.is_file()


def test_explicit_toy_pairs_get_the_toy_worlds_composition_prompts_and_splits_are_selectable():
    s = suite_spec.load_suite({"name": "t", "model": "toyworld", "concepts": [{"toyworld": "test"}],
                               "validation": [{"toyworld": "validation"}], "pairs": [["polka", "zebra"]],
                               "methods": ["lora"]})
    assert list(s.concepts) == list(TOY_TEST) and list(s.validation) == list(TOY_VALIDATION)
    (pair,) = s.pairs
    assert pair.names == ("polka", "zebra") and len(pair.prompts) == 3
    assert all("{0}" in p and "{1}" in p for p in pair.prompts)
