"""Every file editbench writes or reads back: atomic writes, safetensors + JSON (never pickle), tensor checksums,
dtype names, the cache folder, and optimizer / RNG state flattened into tensors + JSON.

Every write goes to a temporary file in the destination folder, is fsync'ed and then renamed over the target,
so a crash leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from editbench.errors import ArtifactError, EditbenchError
from editbench.fingerprint import update_with_tensor

__all__ = ["atomic_target", "cache_root", "dtype_name", "load_optimizer_state", "load_rng_state",
           "optimizer_state", "parse_dtype", "read_json", "read_safetensors", "read_tensors", "rng_state",
           "tensor_checksum", "write_bytes", "write_csv", "write_json", "write_safetensors"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def cache_root() -> Path:
    """``$EDITBENCH_CACHE`` or ``~/.cache/editbench``: class images, text covariances, the CLIP tokenizer files."""
    return Path(os.environ.get("EDITBENCH_CACHE") or Path.home() / ".cache" / "editbench")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"`` (as stored in headers)."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A ``torch.dtype`` from a name (``float32``/``fp32``, ``float16``/``fp16``, ``bfloat16``/``bf16``,
    ``float64``, with or without ``torch.``); None and dtypes pass through. EditbenchError for anything else."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    d = _DTYPES.get(str(dtype).removeprefix("torch."))
    if d is None:
        raise EditbenchError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return d


def tensor_checksum(tensors: Mapping[str, torch.Tensor], salt: bytes) -> str:
    """SHA-256 (16 hex) over ``salt`` and every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256(salt)
    for name in sorted(tensors):
        update_with_tensor(h, name, tensors[name])
    return h.hexdigest()[:16]


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


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write ``data`` to ``path``."""
    with atomic_target(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any, *, default: Any = None) -> Path:
    """Atomically write ``data`` as indented, key-sorted JSON (``default`` as in ``json.dumps``)."""
    with atomic_target(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=default), encoding="utf-8")
    return Path(path)


def write_csv(path: str | os.PathLike, frame: Any) -> Path:
    """Atomically write a pandas DataFrame as CSV (no index column)."""
    with atomic_target(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``; EditbenchError if it is missing or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError as e:
        raise EditbenchError(f"{path}: file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EditbenchError(f"{path}: not valid JSON ({e}); the file is corrupt, re-create it") from e


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> Path:
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
        save_file(flat, str(tmp), metadata=dict(metadata or {}))
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


def read_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file on ``device``; EditbenchError if it is missing, truncated or corrupt."""
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise EditbenchError(f"{path}: file not found")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises several types on corrupt headers / truncated data
        raise EditbenchError(f"{path}: not a readable safetensors file ({e}); it is truncated or corrupt") from e


# ------------------------------------------------------------------ training state without pickle
def optimizer_state(opt: torch.optim.Optimizer, prefix: str = "opt") -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``opt.state_dict()`` into tensors (per-parameter state) and JSON (hyper-parameters, scalars)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, val in state.items():
            if torch.is_tensor(val):
                tensors[f"{prefix}.{idx}.{key}"] = val
            else:
                scalars[f"{idx}.{key}"] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                         prefix: str = "opt") -> None:
    """Restore what :func:`optimizer_state` split."""
    state: dict[int, dict] = {}
    for name, val in tensors.items():
        if not name.startswith(prefix + "."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = val
    for name, val in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state(generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """torch's global RNG state (and ``generator``'s) as tensors."""
    out = {"rng.torch": torch.get_rng_state()}
    if generator is not None:
        out["rng.generator"] = generator.get_state()
    return out


def load_rng_state(tensors: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> None:
    """Restore what :func:`rng_state` saved."""
    torch.set_rng_state(tensors["rng.torch"])
    if generator is not None and "rng.generator" in tensors:
        generator.set_state(tensors["rng.generator"])
