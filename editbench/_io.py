"""Crash-safe file writing and checked safetensors reading, shared by artifacts, checkpoints and caches."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from editbench.errors import ArtifactError

__all__ = ["atomic_target", "read_safetensors", "write_safetensors"]


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success fsync it and ``os.replace`` it onto ``path``.

    Readers see either the old file or the complete new one, never a torn one; on error the temporary file is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename durable (POSIX); not possible everywhere
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str]) -> Path:
    """Atomically write ``tensors`` (moved to CPU, made contiguous) and string ``metadata`` as safetensors."""
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    seen: set[int] = set()
    for k, v in flat.items():  # safetensors refuses tensors sharing memory: copy those, and only those (copying
        ptr = v.untyped_storage().data_ptr()  # everything doubled the memory of saving a whole-UNet artifact)
        if ptr in seen and v.numel():
            flat[k] = v.clone()
        seen.add(ptr)
    with atomic_target(path) as tmp:
        save_file(flat, str(tmp), metadata=dict(metadata))
    return Path(path)


def read_safetensors(path: str | os.PathLike, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file on the CPU; ArtifactError naming ``what`` if unreadable."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{what} {path} does not exist; check the path")
    if not path.is_file():
        raise ArtifactError(f"{what} {path} is not a file (editbench stores it as one .safetensors file)")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            metadata = dict(fh.metadata() or {})
            names = fh.keys()
            tensors = {k: fh.get_tensor(k) for k in names}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ArtifactError(f"{what} {path} is truncated or not a safetensors file ({err}); re-create it") from None
    return tensors, metadata
