"""Fuzzed artifacts: mutated artifact files and in-memory artifacts of every registered method, and fixed hostile
headers.

Every case must end in one of two ways: the input is refused with an ``EditbenchError`` (and the pipeline is
bitwise what it was), or it is accepted (and ``undo`` restores the pipeline bitwise). Any other exception fails the
test. Figures (cases, outcomes, exception types) go to the pytest summary and ``$EDITBENCH_RELIABILITY_FIGURES``.

The default run tries ``EDITBENCH_FUZZ_EXAMPLES`` (75) cases per test with a fixed seed; the ``slow`` variants try
``EDITBENCH_FUZZ_SLOW_EXAMPLES`` (1500) random ones. Checkpoints and concept folders:
``test_reliability_fuzz_checkpoints.py``, ``test_reliability_fuzz_concepts.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from _method_helpers import trained
from _reliability import (  # noqa: F401 (module_figures: autouse fixture)
    DTYPES,
    FAST,
    FIGURES,
    HOSTILE,
    PATHLIKE,
    SLOW,
    Case,
    byte_case,
    deep,
    module_figures,
    pipeline_state,
)
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from editbench import methods
from editbench.errors import EditbenchError
from editbench.methods.base import Artifact, _checksum
from editbench.testing import tiny_pipeline

METHODS = methods.available()


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def originals():
    """{method: (raw bytes, tensors, metadata)} of a short real fit of every method."""
    out = {}
    for name in METHODS:
        path = trained(name)
        art = Artifact.load(path)
        out[name] = (path.read_bytes(), {k: v.clone() for k, v in art.tensors.items()}, json.loads(
            __import__("safetensors").safe_open(str(path), "pt").metadata()["editbench"]))
    return out


# ------------------------------------------------------------------------------------------------ strategies
RAW_HEADERS = ["[" * 100_000, "{" * 50_000, '{"format": NaN}', '{"format": Infinity, "method": "x"}', "not json",
               "", "null", '"text"', "[1, 2]", '{"method": "lora"', "\x00\x01", '{"a": 1e999}', "{}",
               '{"format": "editbench-artifact/1", "method": "../../x", "checksum": "0"}']
TENSOR_NAMES = PATHLIKE + ["extra", "embedding", "embeddings", "modifier_embeddings", "i_star", "o_v.fake",
                           "o_v.down_blocks.0.attentions.0.transformer_blocks.0.attn2", "unet.fake.weight",
                           "text_encoder.x", "a.lora_A.weight", "a.lora_B.weight", "x.delta", "x.delta_up"]


def _paths(x, prefix=(), depth=0):
    """Every path (tuple of keys / indices) into a JSON value, up to depth 3."""
    out = [prefix] if prefix else []
    if depth >= 3:
        return out
    if isinstance(x, dict):
        for k, v in x.items():
            out += _paths(v, prefix + (k,), depth + 1)
    elif isinstance(x, list):
        for i, v in enumerate(x[:4]):
            out += _paths(v, prefix + (i,), depth + 1)
    return out


def _set(meta, path, value, delete=False):
    node = meta
    for k in path[:-1]:
        node = node[k]
    if delete:
        if isinstance(node, dict):
            node.pop(path[-1], None)
        else:
            node.pop(path[-1])
    else:
        node[path[-1]] = value


def _stored(meta: dict, tensors: dict, fix: bool) -> str:
    if fix:  # a structurally valid file: bookkeeping entries recomputed for the mutated tensors
        meta["shapes"] = {k: list(v.shape) for k, v in tensors.items()}
        meta["dtypes"] = {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()}
        meta["checksum"] = _checksum(tensors)
    return json.dumps(meta, allow_nan=True)


@st.composite
def artifact_case(draw, raw: bytes, tensors: dict, meta: dict):
    """(description, file bytes or None, (tensors, metadata text) or None)."""
    kind = draw(st.sampled_from(["bytes", "bytes", "tensor", "tensor", "meta", "meta", "meta", "raw_header"]))
    if kind == "bytes":
        return draw(byte_case(raw))
    t = {k: v.clone() for k, v in tensors.items()}
    m = json.loads(json.dumps(meta))
    fix = draw(st.booleans()) or kind == "tensor"
    if kind == "raw_header":
        return "raw_header", None, (t, draw(st.sampled_from(RAW_HEADERS)))
    if kind == "tensor":
        op = draw(st.sampled_from(["drop", "extra", "rename", "dtype", "shape", "values", "empty_all"]))
        name = draw(st.sampled_from(sorted(t)))
        if op == "drop":
            del t[name]
        elif op == "extra":
            t[draw(st.sampled_from(TENSOR_NAMES))] = torch.randn(draw(st.sampled_from([(), (0,), (3,), (32,),
                                                                                       (1, 32), (4, 32)])))
        elif op == "rename":
            t[draw(st.sampled_from(TENSOR_NAMES))] = t.pop(name)
        elif op == "dtype":
            t[name] = t[name].to(draw(st.sampled_from(DTYPES)))
        elif op == "shape":
            v = t[name]
            how = draw(st.sampled_from(["flatten", "unsqueeze", "truncate", "pad", "transpose", "scalar", "zero"]))
            if how == "flatten":
                v = v.reshape(-1)
            elif how == "unsqueeze":
                v = v[None]
            elif how == "truncate" and v.ndim:
                v = v[: draw(st.integers(0, max(v.shape[0] - 1, 0)))]
            elif how == "pad" and v.ndim:
                v = torch.cat([v, v[:1].expand(draw(st.integers(1, 3)), *v.shape[1:])])
            elif how == "transpose" and v.ndim == 2:
                v = v.t()
            elif how == "scalar":
                v = v.reshape(-1)[:1].reshape(())
            else:
                v = v.new_zeros((0,) * max(v.ndim, 1))
            t[name] = v.contiguous()
        elif op == "values" and t[name].is_floating_point() and t[name].numel():
            bad = draw(st.sampled_from([math.nan, math.inf, -math.inf, 3e38, -3e38]))
            v = t[name].clone().reshape(-1)
            v[draw(st.integers(0, v.numel() - 1))] = bad
            t[name] = v.reshape(t[name].shape)
        elif op == "empty_all":
            t = {}
        return f"tensor:{op}", None, (t, _stored(m, t, fix))
    # metadata
    paths = _paths(m)
    op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    if op == "add":
        m[draw(st.sampled_from(["extra", "placeholder", "tokens", "lora", "concept", "config", "components",
                                "phrase", "modifier_tokens", "compression", "seed", "base_fingerprint"]))] = \
            draw(HOSTILE)
    else:
        path = draw(st.sampled_from(paths))
        _set(m, path, draw(HOSTILE), delete=op == "delete")
    return f"meta:{op}", None, (t, _stored(m, t, fix if op != "delete" else draw(st.booleans())))


def _save_raw(path: Path, tensors: dict, header: str) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"editbench": header})


def _attempt(test: str, name: str, pipe, case, tmp: Path, via_memory: bool, waive: bool) -> None:
    what, data, structured = case
    editor = methods.get(name)()
    path = tmp / "case.safetensors"
    path.unlink(missing_ok=True)
    before = pipeline_state(pipe)
    FIGURES.add(test, "cases")
    FIGURES.add(test, f"kind:{what.split(':')[0]}")
    try:
        if via_memory and structured is not None:
            try:
                meta = json.loads(structured[1])
            except (ValueError, RecursionError):
                FIGURES.add(test, "skipped:not_json")
                return
            if not isinstance(meta, dict):
                FIGURES.add(test, "skipped:not_object")
                return
            art = Artifact(name, structured[0], meta)  # as a caller holding a damaged artifact in memory would
        else:
            if data is not None:
                path.write_bytes(data)
            else:
                _save_raw(path, *structured)
            art = editor.load(path)
        handle = editor.apply(pipe, art, allow_fingerprint_mismatch=waive)
    except EditbenchError as err:
        FIGURES.add(test, f"refused:{type(err).__name__}")
        assert pipeline_state(pipe) == before, f"a refused {what} case modified the pipeline"
        return
    except Exception as err:
        FIGURES.add(test, f"BUG:{type(err).__name__}")
        raise AssertionError(f"{what}: {type(err).__name__}: {str(err)[:500]}") from err
    FIGURES.add(test, "accepted")
    handle.undo()
    assert pipeline_state(pipe) == before, f"undo after an accepted {what} case did not restore the pipeline"


def _artifact_fuzz(name, pipe, originals, tmp_path_factory, test):
    raw, tensors, meta = originals[name]
    tmp = tmp_path_factory.mktemp(f"fuzz-{name}")

    @given(case=artifact_case(raw, tensors, meta).map(Case), via_memory=st.booleans(), waive=st.booleans())
    def run(case, via_memory, waive):
        try:
            _attempt(test, name, pipe, case, tmp, via_memory, waive)
        except BaseException as err:  # anything escaping _attempt is counted too (and fails the example)
            FIGURES.add(test, f"escaped:{type(err).__name__}")
            raise

    return run


@pytest.mark.parametrize("name", METHODS)
def test_fuzz_artifacts(name, pipe, originals, tmp_path_factory):
    FAST(_artifact_fuzz(name, pipe, originals, tmp_path_factory, f"fuzz_artifact[{name}]"))()
    assert not any(k.startswith("BUG") for k in FIGURES.data[f"fuzz_artifact[{name}]"])


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_fuzz_artifacts_slow(name, pipe, originals, tmp_path_factory):
    SLOW(_artifact_fuzz(name, pipe, originals, tmp_path_factory, f"fuzz_artifact_slow[{name}]"))()


@pytest.mark.parametrize("name", METHODS)
def test_hostile_metadata_is_refused_before_anything_changes(name, pipe, originals, tmp_path):
    """Fixed hostile headers (no sampling): each is refused with an ArtifactError and the model is untouched."""
    _, tensors, meta = originals[name]
    cases = {
        "huge_int_seed": {"seed": 10**30}, "nan_number": None, "deep": {"extra": deep(40)},
        "long_string": {"extra": "x" * 10_000}, "method_path": {"method": "../../x"},
        "fingerprint_path": {"base_fingerprint": "../../etc/passwd"}, "wrong_type_config": {"config": [1, 2]},
        "placeholder_path": {"concept": {"placeholder": "a b", "superclass": "star"}},
        "shape_mismatch": {"shapes": {k: [10**9] for k in tensors}},
        "dtype_unknown": {"dtypes": {k: "float8_e4m3fn" for k in tensors}},
        "negative_shape": {"shapes": {k: [-1] for k in tensors}},
        "config_field_type": {"config": dict(meta.get("config") or {}, steps="many")},
        "config_unknown_field": {"config": dict(meta.get("config") or {}, evil=1)},
    }
    before = pipeline_state(pipe)
    editor = methods.get(name)()
    for label, patch in cases.items():
        path = tmp_path / f"{label}.safetensors"
        if patch is None:
            header = json.dumps(meta).replace(f'"seed": {meta["seed"]}', '"seed": NaN')
        else:
            header = json.dumps({**meta, **patch})
        _save_raw(path, tensors, header)
        with pytest.raises(EditbenchError) as info:
            editor.apply(pipe, path)
        FIGURES.add(f"hostile_metadata[{name}]", f"refused:{type(info.value).__name__}")
        assert pipeline_state(pipe) == before, label


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_tensor_values_are_refused(name, bad, pipe, originals, tmp_path):
    """Fixed cases (no sampling): one NaN / inf entry in a tensor of a real artifact (first, middle and last tensor
    by name), from a structurally valid file (checksum recomputed) and in memory: refused for that reason, the
    pipeline untouched."""
    _, tensors, meta = originals[name]
    names = sorted(k for k, v in tensors.items() if v.is_floating_point() and v.numel())
    before = pipeline_state(pipe)
    editor = methods.get(name)()
    for key in dict.fromkeys([names[0], names[len(names) // 2], names[-1]]):
        t = dict(tensors)
        v = t[key].clone().reshape(-1)
        v[v.numel() // 2] = bad
        t[key] = v.reshape(tensors[key].shape)
        path = tmp_path / "bad.safetensors"
        _save_raw(path, t, _stored(json.loads(json.dumps(meta)), t, fix=True))
        with pytest.raises(EditbenchError, match="NaN or infinite"):
            editor.load(path)
        with pytest.raises(EditbenchError, match="NaN or infinite"):
            editor.apply(pipe, path)
        with pytest.raises(EditbenchError, match="NaN or infinite"):
            editor.apply(pipe, Artifact(name, t, {**meta, "checksum": _checksum(t)}))
        assert pipeline_state(pipe) == before, key
        FIGURES.add(f"non_finite[{name}]", "refused")
