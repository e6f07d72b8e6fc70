"""Fuzzed concept folders: images of every kind, size and format (decompression bombs, truncated and foreign files,
directories, dangling links), with and without masks, read by ``ConceptData`` and by the CLI's folder reader.

Every case must end in one of two ways: the folder is refused with an ``EditbenchError``, or it is read into finite
images (and masks) of the requested size and range. Any other exception fails the test. Figures go to the pytest
summary and ``$EDITBENCH_RELIABILITY_FIGURES``. The default run tries ``EDITBENCH_FUZZ_EXAMPLES`` (75) folders with a
fixed seed; the ``slow`` variant ``EDITBENCH_FUZZ_SLOW_EXAMPLES`` (1500) random ones.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from _reliability import FAST, FIGURES, SLOW, module_figures  # noqa: F401 (module_figures: autouse fixture)
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from editbench.concepts import ConceptData
from editbench.errors import ConceptDataError, EditbenchError


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


def full_bomb_png(width: int, height: int) -> bytes:
    """A valid PNG of ``width`` x ``height`` black pixels (8-bit RGB): a few hundred kB on disk, decoded in full
    by PIL (unlike :func:`bomb_png`, whose pixel data is truncated). Compressed row by row: never held decoded."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    z, row = zlib.compressobj(1), b"\x00" * (1 + 3 * width)                  # filter byte + pixels per row
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


_BOMB_CHILD = """
import resource, sys
from editbench.concepts import ConceptData
from editbench.errors import ConceptDataError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    ConceptData("<k>", "star", [sys.argv[1]])
    outcome = "accepted"
except ConceptDataError as err:
    outcome = "refused" if "decompression" in str(err) else "refused for another reason: " + str(err)
print(outcome)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    """A 10,000 x 10,000 PNG (300 MB once decoded) is refused from its header: PIL's decoder never runs (spied on
    here), and in a fresh interpreter the peak memory of the call stays far below the decoded size. (How long
    the refusal takes is not asserted: that depends on the machine.)"""
    import subprocess
    import sys

    from PIL import ImageFile

    path = tmp_path / "bomb.png"
    path.write_bytes(full_bomb_png(10_000, 10_000))
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    with pytest.raises(ConceptDataError, match="decompression"):
        ConceptData("<k>", "star", [path])
    assert decoded == [], "the bomb's pixels were decoded"
    monkeypatch.undo()
    proc = subprocess.run([sys.executable, "-c", _BOMB_CHILD, str(path)], capture_output=True, text=True,
                          timeout=300, check=True)
    outcome, grown_kb = proc.stdout.split()[:-1], int(proc.stdout.split()[-1])
    assert outcome == ["refused"], proc.stdout
    assert grown_kb < 50_000, f"peak memory grew by {grown_kb} kB while refusing the bomb (decoded: 300,000 kB)"
