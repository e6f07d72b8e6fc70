"""Atomic, pickle-free persistence: safetensors for tensors, JSON for everything else.

Every write goes to a temporary file in the destination folder, is fsync'ed and then renamed over the target,
so a crash leaves either the old file or the new one, never a torn one. Optimizer and RNG state (which
``torch.save`` would pickle) are flattened into tensors + JSON here.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from editbench.errors import EditbenchError


def _atomic(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | os.PathLike, data: Any) -> Path:
    def w(tmp):
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)

    return _atomic(Path(path), w)


def read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError as e:
        raise EditbenchError(f"{path}: file not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EditbenchError(f"{path}: not valid JSON ({e}); the file is corrupt, re-create it") from e


def write_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> Path:
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return _atomic(Path(path), lambda tmp: save_file(flat, tmp, metadata=metadata))


def read_tensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
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
    out = {"rng.torch": torch.get_rng_state()}
    if generator is not None:
        out["rng.generator"] = generator.get_state()
    return out


def load_rng_state(tensors: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if generator is not None and "rng.generator" in tensors:
        generator.set_state(tensors["rng.generator"])
