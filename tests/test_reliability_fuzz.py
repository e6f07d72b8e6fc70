"""Fuzzed loaders: mutated artifacts of every registered method and corrupt concept folders.

Every case must end in one of two ways: the input is refused with an ``EditbenchError`` (and the pipeline is
bitwise what it was), or it is accepted (and ``undo`` restores the pipeline bitwise). Any other exception fails the
test. Figures (cases, outcomes, exception types) go to the pytest summary and ``$EDITBENCH_RELIABILITY_FIGURES``.

The default run tries ``EDITBENCH_FUZZ_EXAMPLES`` (75) cases per test with a fixed seed; the ``slow`` variants try
``EDITBENCH_FUZZ_SLOW_EXAMPLES`` (1500) random ones.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from _method_helpers import trained
from _reliability import FIGURES, FUZZ_EXAMPLES, FUZZ_SLOW_EXAMPLES, module_figures, pipeline_state, report  # noqa: F401 (autouse fixture)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

from editbench import methods
from editbench.concepts import ConceptData
from editbench.errors import ConceptDataError, EditbenchError
from editbench.methods.base import Artifact, _checksum
from editbench.testing import tiny_pipeline

METHODS = methods.available()
_HC = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large,
       HealthCheck.filter_too_much]
FAST = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True, suppress_health_check=_HC)
SLOW = settings(max_examples=FUZZ_SLOW_EXAMPLES, deadline=None, database=None, suppress_health_check=_HC)


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
PATHLIKE = ["../../x", "/etc/passwd", "..", ".", "a/b", "..\\..\\x", "C:\\x", "x\x00y", "~/x", "/", "//x"]
WORDS = PATHLIKE + ["", " ", "a b", "\n", "sks", "<toy-star>", "dog", "star", "\u202e\u0000", "x" * 300]


def _deep(depth: int):
    x = 0
    for _ in range(depth):
        x = [x]
    return x


HOSTILE = st.one_of(
    st.integers(min_value=-2**80, max_value=2**80),
    st.sampled_from([10**30, -(10**30), -1, 0, 1, 2**31, 2**63, 2**64, -(2**63), 10**6, 10**9]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 5e-324, 0.5, -0.0]),
    st.sampled_from(WORDS),
    st.text(max_size=12),
    st.just("A" * 5000),
    st.none(), st.booleans(),
    st.lists(st.integers(min_value=-5, max_value=2**40), max_size=5),
    st.lists(st.sampled_from(WORDS), max_size=4),
    st.dictionaries(st.sampled_from(["r", "placeholder", "superclass", "x", "lora_alpha"]),
                    st.one_of(st.integers(-3, 10**12), st.sampled_from(WORDS), st.none()), max_size=3),
    st.integers(min_value=1, max_value=60).map(_deep),
)
RAW_HEADERS = ["[" * 100_000, "{" * 50_000, '{"format": NaN}', '{"format": Infinity, "method": "x"}', "not json",
               "", "null", '"text"', "[1, 2]", '{"method": "lora"', "\x00\x01", '{"a": 1e999}', "{}",
               '{"format": "editbench-artifact/1", "method": "../../x", "checksum": "0"}']
DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool]
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
def byte_case(draw, raw: bytes):
    """A damaged copy of the file bytes ``raw``: truncated, bits flipped, bytes inserted or zeroed, a wrong
    header length, or garbage."""
    op = draw(st.sampled_from(["truncate", "flip", "flip_header", "insert", "zero_run", "length", "garbage"]))
    data = bytearray(raw)
    hlen = 8 + int.from_bytes(raw[:8], "little")
    if op == "truncate":
        data = data[: draw(st.integers(0, len(raw) - 1))]
    elif op in ("flip", "flip_header"):
        hi = hlen - 1 if op == "flip_header" else len(raw) - 1
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, hi))
            data[i] ^= draw(st.integers(1, 255))
    elif op == "insert":
        i = draw(st.integers(0, len(raw)))
        data[i:i] = draw(st.binary(min_size=1, max_size=64))
    elif op == "zero_run":
        i = draw(st.integers(0, len(raw) - 1))
        n = draw(st.integers(1, 256))
        data[i:i + n] = bytes(len(data[i:i + n]))
    elif op == "length":
        data[:8] = struct.pack("<Q", draw(st.sampled_from([0, 1, 7, hlen, hlen + 1, 2**40, 2**64 - 1,
                                                             len(raw), len(raw) + 100])))
    else:
        data = bytearray(draw(st.binary(max_size=256)))
    return f"bytes:{op}", bytes(data), None


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


class Case(tuple):
    """(description, file bytes or None, (tensors, header text) or None) with a short repr for hypothesis."""

    def __repr__(self) -> str:
        what, data, structured = self
        if structured is not None:
            return f"Case({what}, tensors={ {k: (tuple(v.shape), str(v.dtype)) for k, v in structured[0].items()} }, " \
                   f"header={structured[1][:2000]!r})"
        return f"Case({what}, {len(data)} bytes)"


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
        "huge_int_seed": {"seed": 10**30}, "nan_number": None, "deep": {"extra": _deep(40)},
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


# ------------------------------------------------------------------------------------------------ checkpoints
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


# ------------------------------------------------------------------------------------------------ images
def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header claims ``width`` x ``height`` pixels (8-bit RGB), with one short IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def _image_bytes(kind: str, w: int, h: int, rng: np.random.Generator) -> bytes:
    import io

    buf = io.BytesIO()
    if kind in ("rgb", "gray", "rgba", "la", "palette", "onebit", "cmyk_jpeg", "gif", "webp", "bmp", "jpeg"):
        arr = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        img = Image.fromarray(arr, "RGBA")
        mode, fmt = {"rgb": ("RGB", "PNG"), "gray": ("L", "PNG"), "rgba": ("RGBA", "PNG"), "la": ("LA", "PNG"),
                     "palette": ("P", "PNG"), "onebit": ("1", "PNG"), "cmyk_jpeg": ("CMYK", "JPEG"),
                     "gif": ("P", "GIF"), "webp": ("RGB", "WEBP"), "bmp": ("RGB", "BMP"),
                     "jpeg": ("RGB", "JPEG")}[kind]
        img.convert(mode).save(buf, format=fmt)
    elif kind == "png16":
        Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16)).save(buf, format="PNG")
    elif kind == "tiff_float":
        Image.fromarray(rng.random((h, w), dtype=np.float32), "F").save(buf, format="TIFF")
    elif kind == "tiff_int32":
        Image.fromarray(rng.integers(-5, 70000, (h, w), dtype=np.int32), "I").save(buf, format="TIFF")
    elif kind == "bomb":
        return bomb_png(100_000, 100_000)
    elif kind == "bomb_mid":
        return bomb_png(10_000, 10_000)  # above editbench's limit, below PIL's hard error
    elif kind == "huge_thin":
        return bomb_png(10**7, 10)
    elif kind == "zero_dim":
        return bomb_png(0, 16)
    elif kind == "truncated_png":
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        return buf.getvalue()[: max(8, len(buf.getvalue()) // 2)]
    elif kind == "garbage":
        return rng.bytes(int(rng.integers(0, 200)))
    elif kind == "empty":
        return b""
    elif kind == "text":
        return b"this is not an image\n"
    return buf.getvalue()


IMAGE_KINDS = ["rgb", "gray", "rgba", "la", "palette", "onebit", "cmyk_jpeg", "gif", "webp", "bmp", "jpeg", "png16",
               "tiff_float", "tiff_int32", "bomb", "bomb_mid", "huge_thin", "zero_dim", "truncated_png", "garbage",
               "empty", "text", "directory", "dangling_symlink"]


@st.composite
def concept_folder(draw):
    files = draw(st.lists(st.tuples(st.sampled_from(IMAGE_KINDS), st.integers(1, 48), st.integers(1, 48),
                                    st.sampled_from([".png", ".jpg", ".webp", ".bmp", ".gif", ".tif", ".txt", ""])),
                          max_size=4))
    masks = draw(st.sampled_from(["none", "same", "gray_1x1", "wrong_count", "cli"]))
    return files, masks, draw(st.integers(0, 2**32 - 1))


def _build_folder(folder: Path, files, seed: int) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (kind, w, h, suffix) in enumerate(files):
        p = folder / f"img{i}{suffix}"
        if kind == "directory":
            p.mkdir()
        elif kind == "dangling_symlink":
            p.symlink_to(folder / "does-not-exist.png")
        else:
            p.write_bytes(_image_bytes(kind, w, h, rng))
        paths.append(p)
    return paths


def _concept_case(test: str, case, tmp: Path) -> None:
    files, mask_mode, seed = case
    folder = tmp / f"c{FIGURES.data[test]['cases']}"
    paths = _build_folder(folder, files, seed)
    FIGURES.add(test, "cases")
    masks = None
    if mask_mode == "same":
        masks = paths
    elif mask_mode == "gray_1x1":
        masks = []
        for i in range(len(paths)):
            Image.new("L", (1, 1), 255).save(folder / f"mask{i}.png")
            masks.append(folder / f"mask{i}.png")
    elif mask_mode == "wrong_count":
        masks = paths[:-1] + paths
    try:
        if mask_mode == "cli":  # the CLI's folder reader (``editbench train --images DIR``): image suffixes only
            from types import SimpleNamespace

            from editbench.commands import _concept

            concept = _concept(SimpleNamespace(concept=None, images=str(folder), superclass="star",
                                               placeholder="<fuzz>"))
            images = concept.images
        else:  # every file of the folder, sorted
            images = sorted(p for p in folder.iterdir() if not p.name.startswith("mask"))
            concept = ConceptData("<fuzz>", "star", images, masks)
        x = concept.load_images(16)
        m = concept.load_masks(16)
    except EditbenchError as err:
        FIGURES.add(test, f"refused:{type(err).__name__}")
        return
    except Exception as err:
        FIGURES.add(test, f"BUG:{type(err).__name__}")
        raise AssertionError(f"{files} masks={mask_mode}: {type(err).__name__}: {str(err)[:400]}") from err
    FIGURES.add(test, "accepted")
    assert x.shape == (len(images), 3, 16, 16) and x.dtype == torch.float32
    assert bool(torch.isfinite(x).all()) and x.min() >= -1 and x.max() <= 1
    if m is not None:
        assert m.shape == (len(images), 1, 16, 16) and m.min() >= 0 and m.max() <= 1


def test_fuzz_concept_folders(tmp_path):
    FAST(given(case=concept_folder())(lambda case: _concept_case("fuzz_concept", case, tmp_path)))()
    assert not any(k.startswith("BUG") for k in FIGURES.data["fuzz_concept"])


@pytest.mark.slow
def test_fuzz_concept_folders_slow(tmp_path):
    SLOW(given(case=concept_folder())(lambda case: _concept_case("fuzz_concept_slow", case, tmp_path)))()


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_every_image_kind_is_read_or_refused(kind, tmp_path):
    """Each kind once, by name: readable kinds give 16x16 RGB in [-1, 1]; the others a ConceptDataError."""
    path = _build_folder(tmp_path, [(kind, 5, 3, ".png")], 0)[0]
    readable = kind in ("rgb", "gray", "rgba", "la", "palette", "onebit", "cmyk_jpeg", "gif", "webp", "bmp", "jpeg",
                        "png16", "tiff_float", "tiff_int32")
    if readable:
        x = ConceptData("<k>", "star", [path]).load_images(16)
        assert x.shape == (1, 3, 16, 16) and bool(torch.isfinite(x).all())
    else:
        with pytest.raises(ConceptDataError):
            ConceptData("<k>", "star", [path])
    FIGURES.add("image_kinds", "read" if readable else "refused")


def test_empty_or_missing_concept_folder_is_refused(tmp_path):
    from types import SimpleNamespace

    from editbench.commands import _concept

    with pytest.raises(ConceptDataError, match="empty"):
        ConceptData("<k>", "star", sorted(tmp_path.iterdir()))
    for folder in (tmp_path, tmp_path / "missing", tmp_path / "file.png"):
        if folder.name == "file.png":
            folder.write_bytes(b"")
        with pytest.raises(EditbenchError):
            _concept(SimpleNamespace(concept=None, images=str(folder), superclass="star", placeholder="<k>"))


def test_sixteen_bit_png_is_scaled_not_saturated(tmp_path):
    """A 16-bit PNG (mid-gray 0x8000) reads as mid-gray, not white (PIL's own conversion clips at 255)."""
    Image.fromarray(np.full((8, 8), 0x8000, dtype=np.uint16)).save(tmp_path / "g16.png")
    x = ConceptData("<k>", "star", [tmp_path / "g16.png"]).load_images(8)      # [-1, 1]
    assert abs(float(x.mean())) < 0.02


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    import resource
    import time

    (tmp_path / "bomb.png").write_bytes(bomb_png(10_000, 10_000))              # 300 MB once decoded
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(ConceptDataError, match="decompression"):
        ConceptData("<k>", "star", [tmp_path / "bomb.png"])
    assert time.perf_counter() - t0 < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 100_000  # kB: nothing was decoded
