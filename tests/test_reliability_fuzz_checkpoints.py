"""Fuzzed training checkpoints: a real 2-step Perfusion checkpoint (parameters, Adam state, RNG, the session's
EMA) damaged in its bytes, tensors or header, then resumed from.

Every case must end in one of two ways: resuming is refused with an ``EditbenchError``, or it works (from a
structurally valid checkpoint) and gives a finite artifact that passes the method's checks; the pipeline is bitwise
what it was either way. Any other exception fails the test. Figures go to the pytest summary and
``$EDITBENCH_RELIABILITY_FIGURES``. Each case is a resumed fit, so the default run tries a third of
``EDITBENCH_FUZZ_EXAMPLES`` (at least 10, fixed seed) and the ``slow`` variant a third of
``EDITBENCH_FUZZ_SLOW_EXAMPLES`` (at least 100, random).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _reliability import (  # noqa: F401 (module_figures: autouse fixture)
    DTYPES,
    FAST,
    FIGURES,
    FUZZ_EXAMPLES,
    FUZZ_SLOW_EXAMPLES,
    HOSTILE,
    SLOW,
    Case,
    byte_case,
    module_figures,
    pipeline_state,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from editbench import methods
from editbench.errors import EditbenchError
from editbench.testing import tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def checkpoint(pipe, tmp_path_factory):
    """A real 2-step Perfusion training checkpoint (params, Adam state, RNG, the session's EMA): bytes, tensors,
    header."""
    from _method_helpers import concept_for, editor

    from editbench.storage import read_safetensors

    folder = tmp_path_factory.mktemp("ckpt")
    editor("perfusion", checkpoint_every=1).fit(pipe, concept_for("perfusion"), steps=2, seed=0, progress=False,
                                                 checkpoint_dir=folder)
    path = folder / "checkpoint.safetensors"
    tensors, header = read_safetensors(path, "checkpoint")
    return path.read_bytes(), tensors, json.loads(header["editbench_checkpoint"])


@st.composite
def checkpoint_case(draw, raw: bytes, tensors: dict, info: dict):
    from editbench.training.checkpoint import _tensor_checksum

    kind = draw(st.sampled_from(["bytes", "tensor", "header", "header"]))
    if kind == "bytes":
        return Case(draw(byte_case(raw)))
    t = {k: v.clone() for k, v in tensors.items()}
    m = json.loads(json.dumps(info))
    if kind == "tensor":
        name = draw(st.sampled_from(sorted(t)))
        op = draw(st.sampled_from(["drop", "dtype", "shape", "values", "extra"]))
        if op == "drop":
            del t[name]
        elif op == "dtype":
            t[name] = t[name].to(draw(st.sampled_from(DTYPES)))
        elif op == "shape":
            t[name] = t[name].reshape(-1)[: draw(st.integers(0, max(t[name].numel() - 1, 0)))].contiguous()
        elif op == "values" and t[name].is_floating_point() and t[name].numel():
            t[name] = t[name].clone().reshape(-1).index_fill(0, torch.tensor([0]), draw(st.sampled_from(
                [math.nan, math.inf, 1e30]))).reshape(t[name].shape)
        else:
            t[draw(st.sampled_from(["session/ema_i_star", "optim/values/0/exp_avg", "param/values/9", "rng",
                                    "../../x"]))] = torch.randn(draw(st.sampled_from([(), (3,), (1, 32)])))
        if draw(st.booleans()):
            m["checksum"] = _tensor_checksum(t)
        return Case((f"tensor:{op}", None, (t, json.dumps(m))))
    key = draw(st.sampled_from(["step", "losses", "wall_time_s", "format", "checksum", "signature", "extra"]))
    op = draw(st.sampled_from(["replace", "delete"]))
    if op == "delete":
        m.pop(key, None)
    else:
        m[key] = draw(HOSTILE | st.sampled_from([1, 2, 3, [1.0], [1.0, 2.0], [float("nan")] * 2]))
    return Case((f"header:{key}:{op}", None, (t, json.dumps(m))))


def _checkpoint_attempt(test, pipe, case, folder: Path) -> None:
    from _method_helpers import concept_for, editor

    what, data, structured = case
    path = folder / "checkpoint.safetensors"
    if data is not None:
        path.write_bytes(data)
    else:
        save_file({k: v.contiguous() for k, v in structured[0].items()}, str(path),
                  metadata={"editbench_checkpoint": structured[1]})
    before = pipeline_state(pipe)
    FIGURES.add(test, "cases")
    try:
        art = editor("perfusion", checkpoint_every=1).fit(pipe, concept_for("perfusion"), steps=2, seed=0,
                                                          progress=False, checkpoint_dir=folder)
    except EditbenchError as err:
        FIGURES.add(test, f"refused:{type(err).__name__}")
    except Exception as err:
        FIGURES.add(test, f"BUG:{type(err).__name__}")
        raise AssertionError(f"{what}: {type(err).__name__}: {str(err)[:500]}") from err
    else:
        FIGURES.add(test, "resumed")
        assert all(bool(torch.isfinite(v).all()) for v in art.tensors.values())
        try:  # what a resumed run produces must be a valid artifact for this pipeline
            methods.get("perfusion")().check_artifact(art, pipe)
        except EditbenchError as err:
            FIGURES.add(test, "BUG:bad_artifact_from_accepted_checkpoint")
            raise AssertionError(f"{what}: the resumed run produced a bad artifact: {err}") from err
    assert pipeline_state(pipe) == before, f"a {what} checkpoint left the pipeline modified"


def _checkpoint_fuzz(pipe, checkpoint, tmp_path_factory, test):
    folder = tmp_path_factory.mktemp("ckpt-fuzz")

    @given(case=checkpoint_case(*checkpoint))
    def run(case):
        _checkpoint_attempt(test, pipe, case, folder)

    return run


def test_fuzz_training_checkpoints(pipe, checkpoint, tmp_path_factory):
    """Damaged checkpoints: resuming either works (from a structurally valid one) or raises an EditbenchError."""
    settings(FAST, max_examples=max(FUZZ_EXAMPLES // 3, 10))(_checkpoint_fuzz(pipe, checkpoint, tmp_path_factory,
                                                                             "fuzz_checkpoint"))()
    assert not any(k.startswith("BUG") for k in FIGURES.data["fuzz_checkpoint"])


@pytest.mark.slow
def test_fuzz_training_checkpoints_slow(pipe, checkpoint, tmp_path_factory):
    settings(SLOW, max_examples=max(FUZZ_SLOW_EXAMPLES // 3, 100))(
        _checkpoint_fuzz(pipe, checkpoint, tmp_path_factory, "fuzz_checkpoint_slow"))()
