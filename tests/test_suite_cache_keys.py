"""Suite cache keys: cells and artifacts are keyed by what they depend on (the reference images' and the base
model's file contents), not by paths or names."""

from __future__ import annotations

import dataclasses
import enum
import re
from pathlib import Path

import pytest
from _eval_stubs import FakeEditor, FakeRareWordEditor, registered

from editbench.errors import EditbenchError
from editbench.eval import spec as suite_spec
from editbench.training import TrainConfig


def _copy_concept_folder(dst: Path) -> Path:
    """The toy world's zebra and halo reference folders (DreamBench layout) copied to ``dst``."""
    from editbench import toyworld

    for name in ("zebra", "halo"):
        src = toyworld.DATA / "dreambench" / name
        for f in src.rglob("*.png"):
            (dst / name / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dst / name / f.relative_to(src)).write_bytes(f.read_bytes())
    for f in ("concepts.csv", "prompts_zebra.txt", "prompts_halo.txt"):
        (dst / f).write_bytes((toyworld.DATA / "dreambench" / f).read_bytes())
    return dst


def _model_folder(dst: Path) -> Path:
    (dst / "unet").mkdir(parents=True)
    (dst / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights-v1")
    (dst / "model_index.json").write_text("{}")
    return dst


def test_cells_are_keyed_by_content_not_by_paths(tmp_path):
    """The same images and model files in another folder (another checkout, another machine) give the same cell
    and artifact keys; one changed byte of an image or of the model's weights gives new ones."""
    def ids(images: Path, model: Path) -> list[str]:
        suite = suite_spec.load_suite({"model": str(model), "methods": ["base", "fake"], "seeds": [0],
                                       "concepts": [{"dreambench": str(images), "names": ["zebra", "halo"]}]})
        return [c.id for c in suite.cells()]

    _copy_concept_folder(tmp_path / "a")
    _model_folder(tmp_path / "ma")
    with registered(FakeEditor):
        a = ids(tmp_path / "a", tmp_path / "ma")
        assert ids(_copy_concept_folder(tmp_path / "b"), _model_folder(tmp_path / "mb")) == a
        first = sorted((tmp_path / "b" / "zebra").glob("*.png"))[0]
        first.write_bytes(first.read_bytes() + b"\0")                   # one more byte in one zebra image
        changed = ids(tmp_path / "b", tmp_path / "mb")
        assert [x == y for x, y in zip(a, changed)] == ["halo" in x for x in a]   # only zebra's cells are new
        (tmp_path / "mb" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights-v2")
        assert not set(ids(tmp_path / "a", tmp_path / "mb")) & set(a)  # new base weights: every cell is new
    from editbench.fingerprint import files_fingerprint

    first.unlink()
    with pytest.raises(EditbenchError, match=re.escape(str(first))):          # a reference image gone missing
        files_fingerprint([first])


def test_toyworld_cells_depend_on_the_committed_weights(monkeypatch, tmp_path):
    from editbench import toyworld

    before = [c.id for c in suite_spec.load_suite("toy-quick").cells()]
    fake = tmp_path / "weights"
    for f in toyworld.WEIGHTS.rglob("*"):
        if f.is_file() and not f.name.endswith(".safetensors"):
            (fake / f.relative_to(toyworld.WEIGHTS)).parent.mkdir(parents=True, exist_ok=True)
            (fake / f.relative_to(toyworld.WEIGHTS)).write_bytes(f.read_bytes())
    monkeypatch.setattr(toyworld, "WEIGHTS", fake)
    assert not set(c.id for c in suite_spec.load_suite("toy-quick").cells()) & set(before)


def test_a_missing_model_folder_is_one_clear_error_for_cells_and_the_runner(tmp_path):
    from editbench.eval.runner import Runner

    _copy_concept_folder(tmp_path / "a")
    suite = suite_spec.load_suite({"model": str(tmp_path / "nowhere"), "methods": ["base"], "seeds": [0],
                                   "concepts": [{"dreambench": str(tmp_path / "a"), "names": ["zebra"]}]})
    want = re.escape(f"model folder {tmp_path / 'nowhere'} not found")
    with pytest.raises(EditbenchError, match=want):
        suite.cells()
    with pytest.raises(EditbenchError, match=want):
        Runner(suite, tmp_path / "out", device="cpu", dtype=None, progress=False).pipeline


def _suite(tmp_path, methods, names=("zebra",), **top):
    if not (tmp_path / "a").exists():
        _copy_concept_folder(tmp_path / "a")
        _model_folder(tmp_path / "m")
    return suite_spec.load_suite({"model": str(tmp_path / "m"), "methods": methods, "seeds": [0],
                                  "concepts": [{"dreambench": str(tmp_path / "a"), "names": list(names)}], **top})


def test_new_method_defaults_give_new_cells(tmp_path):
    """A method whose Config or Settings defaults change (a new tuning) gets new cells, the other entries keep
    theirs: a results folder never serves results made at the old defaults. An override equal to the default (same
    value and type) keeps the key: the key is the resolved config, not how it was written."""
    @dataclasses.dataclass
    class RetunedConfig(TrainConfig):
        lr: float = 1e-3
        steps: int = 40

    @dataclasses.dataclass
    class RetunedSettings:
        scale: float = 0.5

    def ids(entry) -> list[str]:
        return [c.id for c in _suite(tmp_path, ["base", entry]).cells()]

    with registered(FakeEditor):
        before = ids("fake")
        same_written_out = ids({"name": "fake", "config": {"steps": FakeEditor.Config().steps}})
    assert same_written_out == before
    for change in ({"Config": RetunedConfig}, {"Settings": RetunedSettings}):
        retuned = type("FakeEditor", (FakeEditor,), change)
        with registered(retuned):
            after = ids("fake")
        assert [x == y for x, y in zip(before, after)] == ["base__" in x for x in before], change


def test_cells_and_artifacts_are_keyed_by_a_dtype_other_than_float32(tmp_path):
    """A bfloat16 run (suite ``dtype:`` or the run's ``--dtype``) never reuses float32 cells or artifacts; float32
    and no dtype (which loads float32) share them."""
    from editbench.eval.runner import Runner

    with registered(FakeEditor):
        plain = _suite(tmp_path, ["base", "fake"])
        ids = {name: [c.id for c in plain.with_dtype(name).cells()] for name in (None, "float32", "bf16", "fp16")}
        assert ids[None] == ids["float32"] == [c.id for c in _suite(tmp_path, ["base", "fake"], dtype="fp32").cells()]
        assert ids["bf16"] == [c.id for c in _suite(tmp_path, ["base", "fake"], dtype="bfloat16").cells()]
        assert len({tuple(ids[k]) for k in ("float32", "bf16", "fp16")}) == 3
        assert not set(ids["bf16"]) & set(ids["float32"])
        runner = Runner(plain, tmp_path / "out", device="cpu", dtype="bf16", progress=False, pipeline=object())
        assert runner.suite.dtype_key() == {"dtype": "bfloat16"} and plain.dtype_key() == {}


def test_rare_word_cells_depend_on_the_concepts_index(tmp_path):
    """A method that binds a concept to an existing rare word picks the word by the concept's index among the
    suite's concepts: adding a concept that sorts before it gives that method new cells; a method that adds a new
    token keeps its cells."""
    with registered(FakeEditor, FakeRareWordEditor):
        one = {c.method.label: c.id for c in _suite(tmp_path, ["fake", "fake_single"], ["zebra"]).cells()}
        two = {c.method.label: c.id for c in _suite(tmp_path, ["fake", "fake_single"], ["zebra", "halo"]).cells()
               if c.concepts == ("zebra",)}
    assert one["fake"] == two["fake"] and one["fake_single"] != two["fake_single"]


def test_key_values_are_the_same_in_every_process_or_refused():
    """Cache keys take JSON-like values, sets in sorted order, paths as text, enums by value; an object whose
    text would carry a memory address is refused by name instead of giving each process (shard) other keys."""
    class Mode(enum.Enum):
        FAST = "fast"

    assert suite_spec._key_json({"a": (1, 2.5), "b": {"y", "x"}, "c": Path("/p/q"), "d": Mode.FAST, "e": None},
                                "cfg") == {"a": [1, 2.5], "b": ["x", "y"], "c": "/p/q", "d": "fast", "e": None}
    with pytest.raises(EditbenchError, match=r"cfg\.hook: a value of type object"):
        suite_spec._key_json({"hook": object()}, "cfg")
    # spec_hash, the key of every cell and artifact, encodes so
    assert suite_spec.spec_hash({"b": {"y", "x"}}) == suite_spec.spec_hash({"b": ["x", "y"]})
    with pytest.raises(EditbenchError, match=r"cache key\.config\.hook: a value of type object"):
        suite_spec.spec_hash({"config": {"hook": object()}})


def test_a_class_image_folder_is_keyed_by_its_contents(tmp_path):
    """A method reading real class images from a folder (``class_data_dir``, ``{}`` = the superclass) gets new cells
    when an image in it changes and keeps them when the same images sit under another path; generated images and the
    toy world's retrieval are keyed by the config value alone."""
    @dataclasses.dataclass
    class FolderConfig(TrainConfig):
        class_data_dir: str | None = None

    def folder(path: Path, extra: bytes = b"") -> Path:
        (path / "heart" / "images").mkdir(parents=True, exist_ok=True)
        (path / "heart" / "images" / "0.png").write_bytes(b"png-bytes" + extra)
        (path / "heart" / "caption.txt").write_text("a heart\n")
        return path

    def ids(class_data_dir) -> list[str]:
        entry = {"name": "fake", "config": {"class_data_dir": class_data_dir}}
        return [c.id for c in _suite(tmp_path, [entry]).cells()]

    with registered(type("FakeEditor", (FakeEditor,), {"Config": FolderConfig})):
        assert _suite(tmp_path, ["fake"]).concepts["zebra"].superclass == "heart"
        a = ids(str(folder(tmp_path / "ca")) + "/{}")
        assert ids(str(folder(tmp_path / "cb")) + "/{}") == a                  # the same images under another path
        assert not set(ids(str(folder(tmp_path / "cb", b"!")) + "/{}")) & set(a)  # one image changed
        assert len({tuple(ids(None)), tuple(ids("toyworld")), tuple(a)}) == 3    # other sources, other cells
        assert ids(str(tmp_path / "nowhere")) != ids(str(tmp_path / "elsewhere"))  # not a folder: keyed by path
