"""Defensive checks for everything editbench reads from disk: artifact metadata, weight files, images, paths.

* :func:`parse_metadata` / :func:`check_metadata`: the artifact header is JSON of bounded size and depth, with
  finite numbers, bounded strings and the documented types (``method`` an identifier, ``shapes`` lists of small
  non-negative ints that match the stored tensors, ``dtypes`` from a short list, ``base_fingerprint`` a short
  token, concept words without whitespace, ...). :func:`check_artifact_for` adds the checks that need the
  method: its own entries (``Editor.metadata_schema``, built from the predicates here); its ``config`` has the
  method's fields with values of the right types and passes ``Config.validate()``.
  Every problem is an :class:`~editbench.errors.ArtifactError`, raised before anything is modified.
* :func:`load_weights`: safetensors only; a pickle (``torch.save``: ``.bin``, ``.pt``, ``.pth``, ``.ckpt``) is
  refused unless the caller passes ``allow_pickle=True``, and is then read with ``torch.load(weights_only=True)``.
* :func:`open_image`: the decompression-bomb guard (:data:`MAX_IMAGE_PIXELS`, checked from the header before any
  pixel is decoded) and exact conversion of 16-bit / 32-bit images to 8-bit RGB or L.
* :func:`safe_join`: a file name coming from metadata or a suite file cannot leave its folder (``../``, absolute
  paths, path separators, symlinks pointing outside).

Nothing here unpickles, executes or imports anything named by a file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from editbench.errors import ArtifactError, EditbenchError

__all__ = ["ALLOWED_DTYPES", "MAX_DIM", "MAX_HEADER_BYTES", "MAX_IMAGE_PIXELS", "check_artifact_for",
           "check_metadata", "identifier", "is_int", "is_number", "is_pickle", "load_weights", "open_image",
           "parse_metadata", "safe_join", "token", "word", "words"]

# ------------------------------------------------------------------------------------------------ limits
MAX_HEADER_BYTES = 16 * 2**20
"""Largest accepted JSON metadata (an SD-1.5 DreamBooth artifact's header is about 150 kB)."""
MAX_DEPTH = 16
"""Deepest accepted nesting of JSON containers."""
MAX_STRING = 4096
"""Longest accepted string value anywhere in the metadata (a path in ``config`` is the longest legitimate one)."""
MAX_ITEMS = 100_000
"""Most entries of one JSON list or object."""
MAX_INT = 2**64
"""Integers must lie in ``(-MAX_INT, MAX_INT)`` (a seed may use all 64 bits)."""
MAX_NDIM = 8
MAX_DIM = 2**24
"""A tensor has at most :data:`MAX_NDIM` dimensions, each at most :data:`MAX_DIM` (vocabularies are ~50k-250k)."""
MAX_TENSOR_NAME = 512
MAX_WORD = 256
ALLOWED_DTYPES = ("float16", "bfloat16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")
MAX_IMAGE_PIXELS = 89_478_485
"""Largest accepted image (pixels), PIL's default warning threshold; larger files are refused before decoding
(a small PNG can claim 100k x 100k pixels and take 30 GB once decoded). Raise it deliberately if you must."""

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_TOKEN = re.compile(r"^[A-Za-z0-9._:+!-]{1,64}$")
_HEX16 = re.compile(r"^[0-9a-f]{16}$")
_WORD = re.compile(r"^[^\s\x00-\x1f\x7f]+$")


def _fail(where: Any, msg: str) -> ArtifactError:
    return ArtifactError(f"{where}: {msg}; the file is damaged or was not written by editbench (re-create it)")


# ------------------------------------------------------------------------------------------------ JSON
def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


def parse_metadata(text: Any, where: Any = "artifact") -> dict:
    """The JSON object in ``text``; ArtifactError if it is not a bounded, finite JSON object (never RecursionError,
    MemoryError or another surprise)."""
    if not isinstance(text, str):
        raise _fail(where, f"the metadata is a {type(text).__name__}, not JSON text")
    if len(text) > MAX_HEADER_BYTES:
        raise _fail(where, f"the metadata is {len(text):,} characters (more than {MAX_HEADER_BYTES:,})")
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:  # depth check before json.loads, which recurses (RecursionError on "[[[[...")
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                raise _fail(where, f"the metadata is nested deeper than {MAX_DEPTH} levels")
        elif ch in "]}":
            depth -= 1
    try:
        meta = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:
        raise _fail(where, f"the metadata is not valid JSON ({str(err)[:200]})") from None
    if not isinstance(meta, dict):
        raise _fail(where, f"the metadata is a JSON {type(meta).__name__}, not an object")
    _check_json(meta, where, "metadata", 0)
    return meta


def _check_json(x: Any, where: Any, path: str, depth: int) -> None:
    """Generic bounds on any JSON value: depth, container sizes, string lengths, finite bounded numbers."""
    if depth > MAX_DEPTH:
        raise _fail(where, f"{path} is nested deeper than {MAX_DEPTH} levels")
    if isinstance(x, bool) or x is None:
        return
    if isinstance(x, int):
        if not -MAX_INT < x < MAX_INT:
            raise _fail(where, f"{path} is the integer {str(x)[:40]}..., out of range")
    elif isinstance(x, float):
        if not math.isfinite(x):
            raise _fail(where, f"{path} is {x}, not a finite number")
    elif isinstance(x, str):
        if len(x) > MAX_STRING:
            raise _fail(where, f"{path} is a string of {len(x):,} characters (more than {MAX_STRING})")
    elif isinstance(x, list):
        if len(x) > MAX_ITEMS:
            raise _fail(where, f"{path} has {len(x):,} entries (more than {MAX_ITEMS:,})")
        for i, v in enumerate(x):
            _check_json(v, where, f"{path}[{i}]", depth + 1)
    elif isinstance(x, dict):
        if len(x) > MAX_ITEMS:
            raise _fail(where, f"{path} has {len(x):,} entries (more than {MAX_ITEMS:,})")
        for k, v in x.items():
            if not isinstance(k, str) or len(k) > MAX_STRING:
                raise _fail(where, f"{path} has a bad key {str(k)[:60]!r}")
            _check_json(v, where, f"{path}.{k[:60]}", depth + 1)
    else:
        raise _fail(where, f"{path} has the non-JSON type {type(x).__name__}")


# ------------------------------------------------------------------------------------------------ schema
def identifier(x: Any) -> bool:
    """A Python identifier of at most 64 characters."""
    return isinstance(x, str) and bool(_IDENT.match(x))


def token(x: Any) -> bool:
    """A short token: at most 64 letters, digits and ``._:+!-``."""
    return isinstance(x, str) and bool(_TOKEN.match(x))


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def word(x: Any) -> bool:
    """A non-empty string of at most 256 characters without whitespace or control characters."""
    return isinstance(x, str) and 0 < len(x) <= MAX_WORD and bool(_WORD.match(x))


def words(x: Any) -> bool:
    """A non-empty list of :func:`word` s."""
    return isinstance(x, list) and 0 < len(x) <= 4096 and all(word(w) for w in x)


def _concept_entry(x: Any) -> bool:
    return (isinstance(x, dict) and word(x.get("placeholder")) and word(x.get("superclass"))
            and (x.get("images") is None or (is_int(x["images"]) and 0 <= x["images"] <= 10**7))
            and all(isinstance(v, (str, int, float, bool)) or v is None for v in x.values()))


def _concept(x: Any) -> bool:
    return _concept_entry(x) or (isinstance(x, list) and 0 < len(x) <= 4096 and all(_concept_entry(c) for c in x))


def _one_phrase(x: Any) -> bool:
    return isinstance(x, str) and 0 < len(x) <= MAX_STRING and bool(x.split()) and "\n" not in x


def _phrase(x: Any) -> bool:
    return _one_phrase(x) or (isinstance(x, list) and 0 < len(x) <= 4096 and all(_one_phrase(p) for p in x))


def _prior_entry(x: Any) -> bool:
    return (isinstance(x, dict) and x.get("source") in ("generated", "folder", "toyworld")
            and is_int(x.get("images")) and 0 <= x["images"] <= 10**7
            and all(isinstance(v, (str, int, float, bool)) or v is None for v in x.values()))


def _prior(x: Any) -> bool:
    return _prior_entry(x) or (isinstance(x, list) and 0 < len(x) <= 4096 and all(_prior_entry(c) for c in x))


_SCHEMA: dict[str, tuple[Any, str]] = {
    # common entries (editbench.methods.base)
    "method": (identifier, "an identifier of at most 64 characters"),
    "library_version": (token, "a version string"),
    "base_fingerprint": (lambda x: x is None or token(x),
                         "a fingerprint (hex digits) or null"),
    "checksum": (lambda x: isinstance(x, str) and bool(_HEX16.match(x)), "16 hex digits"),
    "config": (lambda x: isinstance(x, dict), "an object"),
    "seed": (is_int, "an integer"),
    "training": (lambda x: isinstance(x, dict), "an object"),
    "concept": (_concept, "{placeholder, superclass[, images]} (or a list of them) with one-word strings"),
    "phrase": (_phrase, "the words to type in a prompt (a string, or a list of them, one per concept)"),
    "prior": (_prior, "{source: generated|folder|toyworld, images: int, ...} (or a list of them, one per concept)"),
    # a method's own entries: its Editor.metadata_schema (checked by check_artifact_for)
}


def check_metadata(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], where: Any = "artifact",
                   schema: Mapping[str, tuple[Any, str]] | None = None) -> None:
    """ArtifactError unless ``meta`` (a parsed artifact header) follows the schema and describes ``tensors``.

    Checks the documented entries' types and ranges (see the module docstring), tensor names (bounded, no control
    characters), that ``shapes`` and ``dtypes`` list exactly the stored tensors with their real shapes and
    dtypes, that every shape is a list of at most 8 ints in ``[0, 2**24]``, that dtypes are among
    :data:`ALLOWED_DTYPES`, and that floating-point tensors are finite."""
    if not isinstance(meta, Mapping):
        raise _fail(where, "the metadata is not a JSON object")
    _check_json(dict(meta), where, "metadata", 0)
    for key, (ok, what) in {**_SCHEMA, **(schema or {})}.items():
        if key in meta and not ok(meta[key]):
            raise _fail(where, f"metadata {key!r} must be {what}, got {_short(meta[key])}")
    for key in ("method", "checksum"):
        if key not in meta:
            raise _fail(where, f"metadata lacks {key!r}")
    shapes, dtypes = meta.get("shapes"), meta.get("dtypes")
    if not isinstance(shapes, dict) or not isinstance(dtypes, dict):
        raise _fail(where, "metadata 'shapes' and 'dtypes' must be objects {tensor name: ...}")
    if set(shapes) != set(tensors) or set(dtypes) != set(tensors):
        extra = sorted((set(shapes) | set(dtypes)) ^ set(tensors))[:3]
        raise _fail(where, f"metadata 'shapes'/'dtypes' do not list exactly the stored tensors (e.g. {extra})")
    for name, t in tensors.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_TENSOR_NAME or not _WORD.match(name):
            raise _fail(where, f"bad tensor name {_short(name)}")
        shape, dtype = shapes[name], dtypes[name]
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(is_int(s) and 0 <= s <= MAX_DIM for s in shape)):
            raise _fail(where, f"shape of {name!r} must be a list of at most {MAX_NDIM} ints in [0, {MAX_DIM}], "
                               f"got {_short(shape)}")
        if dtype not in ALLOWED_DTYPES:
            raise _fail(where, f"dtype of {name!r} must be one of {ALLOWED_DTYPES}, got {_short(dtype)}")
        if list(t.shape) != shape or str(t.dtype).removeprefix("torch.") != dtype:
            raise _fail(where, f"tensor {name!r} is {tuple(t.shape)} {t.dtype} but the metadata says {tuple(shape)} "
                               f"{dtype}")
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise _fail(where, f"tensor {name!r} holds NaN or infinite values")


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 80 else text[:77] + "..."


def _field_ok(default: Any, value: Any) -> bool:
    """Whether JSON ``value`` has the type family of a Config field whose default is ``default``."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return is_int(value)
    if isinstance(default, float):
        return is_number(value)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (tuple, list)):
        return isinstance(value, list) and all(isinstance(v, (str, int, float, bool)) or v is None for v in value)
    # default None (optional field) or anything else: a scalar, null or a flat list
    return value is None or isinstance(value, (str, int, float, bool)) or (
        isinstance(value, list) and all(isinstance(v, (str, int, float, bool)) or v is None for v in value))


def check_artifact_for(editor: Any, artifact: Any) -> None:
    """ArtifactError unless ``artifact``'s metadata follows the schema for ``editor``'s method.

    On top of :func:`check_metadata`: the method's own entries (``editor.metadata_schema``); ``config`` (if
    present) holds only fields of the method's ``Config``, each of the right type, and the resulting config passes
    ``Config.validate()``."""
    where = artifact.path or "artifact"
    meta = artifact.metadata
    # the bookkeeping entries of an in-memory artifact may be stale (they are recomputed on save; a loaded file's
    # were checked against its tensors by Artifact.load): check the tensors as they are now
    check_metadata({**meta, "method": artifact.method,
                    "shapes": {k: list(v.shape) for k, v in artifact.tensors.items()},
                    "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in artifact.tensors.items()},
                    "checksum": "0" * 16}, artifact.tensors, where, editor.metadata_schema)
    config = meta.get("config")
    if config is None:
        return
    cls = editor.Config
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - set(fields))
    if unknown:
        raise _fail(where, f"metadata 'config' has fields {unknown[:5]} that {editor.name}'s config does not have")
    values = {}
    for name, value in config.items():
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        optional = value is None and "None" in str(f.type)  # e.g. "float | None" with a non-None default
        if not optional and not _field_ok(default, value):
            raise _fail(where, f"metadata config.{name} = {_short(value)} has the wrong type for {editor.name}")
        values[name] = tuple(value) if isinstance(value, list) and isinstance(default, tuple) else value
    try:
        cls(**values).validate()
    except EditbenchError as err:
        raise _fail(where, f"metadata 'config' is not a valid {editor.name} config ({err})") from None
    except (TypeError, ValueError, ArithmeticError) as err:  # a validate() that compares mismatched types
        raise _fail(where, f"metadata 'config' is not a valid {editor.name} config ({err!r})") from None


# ------------------------------------------------------------------------------------------------ weights files
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def is_pickle(path: str | os.PathLike) -> bool:
    """True if ``path`` looks like a ``torch.save`` / pickle file (zip archive or pickle opcode, or a pickle
    suffix), i.e. something that can run code when loaded."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return path.suffix.lower() in _PICKLE_SUFFIXES
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return True
    if len(head) == 8 and head[:1] != b"\x80":
        n = int.from_bytes(head, "little")          # safetensors: u64 header length, then '{'
        if 2 <= n <= 100 * 2**20:
            return False
    return path.suffix.lower() in _PICKLE_SUFFIXES


def load_weights(path: str | os.PathLike, what: str = "weights", *, allow_pickle: bool = False
                 ) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of a weights file on the CPU.

    safetensors files are read as data. Pickle files (``torch.save``: ``.bin``, ``.pt``, ``.pth``, ``.ckpt``)
    are refused with an ArtifactError unless ``allow_pickle=True``; then they are read with
    ``torch.load(weights_only=True)``, which refuses arbitrary Python objects. Never ``pickle.load``."""
    from editbench.storage import read_safetensors

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{what} {path} does not exist or is not a file")
    if not is_pickle(path):
        tensors, _ = read_safetensors(path, what)
        return tensors
    if not allow_pickle:
        raise ArtifactError(f"{what} {path} is a pickle (torch.save) file, which can run code when loaded; "
                            "convert it to .safetensors, or pass allow_pickle=True if you trust its source (it is "
                            "then read with torch.load(weights_only=True))")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...: all mean "refused"
        raise ArtifactError(f"{what} {path} could not be read as plain tensors with torch.load(weights_only=True) "
                            f"({str(err)[:200]}); convert it to .safetensors") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ArtifactError(f"{what} {path} does not hold a flat {{name: tensor}} dict")
    return dict(state)


# ------------------------------------------------------------------------------------------------ images
def _to_8bit(img: Any) -> Any:
    """16-bit and 32-bit integer / float images as 8-bit ``L`` (PIL's own conversion clips at 255: a 16-bit PNG
    would come out white)."""
    import numpy as np
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img).astype(np.float64)
        scale = 257.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 1.0
        return Image.fromarray(np.clip(np.round(arr / scale), 0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    return img


def convert_image(img: Any, mode: str) -> Any:
    """``img`` (a PIL image) in ``mode`` ("RGB" or "L"), with 16/32-bit images scaled, not clipped."""
    return _to_8bit(img).convert(mode)


def open_image(path: str | os.PathLike, mode: str, *, max_pixels: int | None = None) -> Any:
    """Decode the image file at ``path`` into a PIL image in ``mode``.

    Raises ``ValueError`` (with the reason) for images above ``max_pixels`` (default :data:`MAX_IMAGE_PIXELS`),
    checked from the header before decoding; PIL's own errors (``OSError``, ``SyntaxError``, ...) propagate for
    the caller to wrap."""
    from PIL import Image

    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():  # PIL warns above its own limit; we refuse below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as err:
        raise ValueError(f"image too large ({err})") from None
    with img:
        w, h = img.size
        if w < 1 or h < 1 or w * h > limit:
            raise ValueError(f"image is {w}x{h} px ({w * h:,} pixels), more than editbench.safety.MAX_IMAGE_PIXELS "
                             f"= {limit:,} (decompression-bomb guard); downscale it")
        img.load()  # decodes every byte: truncated or corrupt files fail here
        return convert_image(img, mode)


# ------------------------------------------------------------------------------------------------ paths
def safe_join(folder: str | os.PathLike, name: Any, what: str = "file name") -> Path:
    """``folder / name`` for a single file name ``name`` that cannot leave ``folder``.

    EditbenchError if ``name`` is empty, absolute, contains a path separator, NUL or a ``..`` / ``.`` component,
    or if the result (symlinks resolved) lies outside ``folder``."""
    if not isinstance(name, str) or not name or name in (".", "..") or "\x00" in name \
            or "/" in name or "\\" in name or os.path.isabs(name) or len(name) > 255:
        raise EditbenchError(f"{what} {_short(name)} is not a plain file name (no '/', '\\', '..', absolute paths); "
                             "it would be written outside its folder")
    folder = Path(folder)
    path = folder / name
    if not path.resolve().is_relative_to(folder.resolve()):
        raise EditbenchError(f"refusing {path}: it resolves outside {folder} (a symlink?)")
    return path
