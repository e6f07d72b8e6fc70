"""Names coming from artifact metadata or suite files cannot leave their output folder (``../``, absolute paths,
separators, symlinks)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from _method_helpers import load, trained
from _reliability import FIGURES, FUZZ_EXAMPLES, report
from hypothesis import given, settings
from hypothesis import strategies as st

from editbench.errors import EditbenchError
from editbench.methods.base import Artifact
from editbench.safety import safe_join
from editbench.testing import tiny_pipeline

HOSTILE = ["../../x", "../x", "..", ".", "/etc/passwd", "/tmp/x", "a/b", "a/../../b", "..\\..\\x", "x\x00y", "",
           "~/x", "//server/share", "C:\\Windows\\x"]


@pytest.fixture(scope="module", autouse=True)
def _figures(request):
    before = set(FIGURES.data)
    yield
    report(request, before)


def _nothing_outside(root: Path, out: Path) -> None:
    """Every file under ``root`` lies inside ``out``."""
    for p in root.rglob("*"):
        if p.is_file() or p.is_symlink():
            assert p.resolve().is_relative_to(out.resolve()) or p.is_symlink(), p


@pytest.mark.parametrize("name", HOSTILE)
def test_safe_join_refuses_escaping_names(name, tmp_path):
    with pytest.raises(EditbenchError):
        safe_join(tmp_path, name)
    FIGURES.add("paths", "safe_join_refused")


def test_safe_join_refuses_symlinks_out_of_the_folder(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "link.safetensors").symlink_to(outside / "target.safetensors")
    with pytest.raises(EditbenchError, match="outside"):
        safe_join(out, "link.safetensors")
    assert safe_join(out, "fine.safetensors") == out / "fine.safetensors"


@settings(max_examples=max(FUZZ_EXAMPLES * 5, 100), deadline=None, database=None, derandomize=True)
@given(name=st.text(min_size=0, max_size=30) | st.sampled_from(HOSTILE))
def test_fuzz_names_stay_inside(name):
    """Any string: safe_join and the suite's safe_name either refuse it or give a path inside the folder."""
    from editbench.eval.spec import safe_name

    out = Path("/nonexistent-editbench-out")
    for fn in (lambda n: safe_join(out, n), lambda n: out / safe_name(n)):
        try:
            p = fn(name)
        except EditbenchError:
            FIGURES.add("paths_fuzz", "refused")
            continue
        FIGURES.add("paths_fuzz", "accepted")
        assert p.parent == out and p.name not in ("", ".", "..") and "/" not in p.name and "\x00" not in p.name


@pytest.mark.parametrize("token", ["../../escaped", "/tmp/editbench-escaped", "a/b", "x/../../y"])
def test_exporter_refuses_tokens_that_are_paths(token, tmp_path):
    """Custom Diffusion's exporter names one file per modifier token (from the artifact's metadata)."""
    from editbench.methods.custom_diffusion import export_diffusers

    art = load("custom_diffusion", trained("custom_diffusion"))
    bad = Artifact(art.method, art.tensors, dict(art.metadata, modifier_tokens=[token]))
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(EditbenchError):
        export_diffusers(bad, tiny_pipeline(), out)
    _nothing_outside(tmp_path, out)
    assert not Path("/tmp/editbench-escaped.safetensors").exists()
    FIGURES.add("paths", "exporter_refused")


def test_dreambooth_exporter_refuses_path_like_components(tmp_path):
    from editbench.methods.dreambooth import export_diffusers

    art = load("dreambooth", trained("dreambooth"))
    tensors = {k.replace("unet.", "../../x.", 1): v for k, v in art.tensors.items()}
    bad = Artifact(art.method, tensors, dict(art.metadata, components=["../../x"]))
    with pytest.raises(EditbenchError):
        export_diffusers(bad, tmp_path / "out")
    _nothing_outside(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("kw", [{"weight_name": "../w.safetensors"}, {"weight_name": "/etc/passwd"},
                                {"tokens": ["../../x"]}, {"tokens": ["/etc/passwd"]}])
def test_importer_refuses_names_outside_the_folder(kw, tmp_path):
    from editbench.methods.custom_diffusion import export_diffusers, load_diffusers

    pipe = tiny_pipeline()
    export_diffusers(load("custom_diffusion", trained("custom_diffusion")), pipe, tmp_path / "cd")
    with pytest.raises(EditbenchError):
        load_diffusers(pipe, tmp_path / "cd", **kw)
    FIGURES.add("paths", "importer_refused")


@pytest.mark.parametrize("where", ["cells", "artifacts", "samples"])
def test_suite_refuses_to_write_through_symlinks(where, tmp_path):
    """A folder of the suite output replaced by a symlink to elsewhere: nothing is written there."""
    from _eval_stubs import FakeClip, FakeEditor, FakePipeline, registered

    from editbench.eval import runner
    from editbench.eval import spec as suite_spec

    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    os.symlink(outside, out / where)
    spec = {"name": "s", "model": "tiny", "concepts": ["zebra"], "seeds": [0], "max_prompts": 1,
            "images_per_prompt": 1, "methods": [{"name": "fake"}]}
    with registered(FakeEditor), pytest.raises(EditbenchError, match="outside"):
        runner.run_suite(suite_spec.load_suite(spec), out, pipeline=FakePipeline(), clip=FakeClip(), progress=False)
    assert not any(outside.iterdir()), f"wrote {sorted(outside.rglob('*'))}"
    FIGURES.add("paths", "suite_symlink_refused")
