"""Training checkpoints: one safetensors file (parameters, optimizer state, RNG, session state) with its JSON
state in the header, written atomically; loading checks format, run signature, checksum and every shape."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from editbench.errors import TrainingError
from editbench.storage import read_safetensors, tensor_checksum, write_safetensors
from editbench.training.session import ParamGroup, TrainingSession

__all__ = ["CHECKPOINT_FILE", "kept", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_FILE = "checkpoint.safetensors"
_CKPT_FORMAT = "editbench-checkpoint/1"


def save_checkpoint(path: Path, *, groups: list[ParamGroup], optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, session: TrainingSession, signature: str, step: int,
                     losses: list[float], wall: float) -> None:
    tensors: dict[str, torch.Tensor] = {"rng": generator.get_state()}
    for g in groups:
        for i, p in enumerate(g.params):
            tensors[f"param/{g.name}/{i}"] = p.detach()
            for key, value in optimizer.state.get(p, {}).items():
                if not isinstance(value, torch.Tensor):
                    raise TrainingError(f"optimizer state {key!r} is not a tensor; cannot checkpoint it")
                tensors[f"optim/{g.name}/{i}/{key}"] = value
    for key, value in session.state_tensors().items():
        tensors[f"session/{key}"] = value
    info = {"format": _CKPT_FORMAT, "signature": signature, "step": step, "losses": losses, "wall_time_s": wall,
            "checksum": _tensor_checksum(tensors)}
    write_safetensors(path, tensors, {"editbench_checkpoint": json.dumps(info)})


def _tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    return tensor_checksum(tensors, b"editbench-checkpoint-checksum|")


def kept(ckpt: Path | None) -> str:
    if ckpt is not None and ckpt.exists():
        return f"the last checkpoint ({ckpt}) is kept"
    return "no checkpoint was written"


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def load_checkpoint(path: Path, *, groups: list[ParamGroup], optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, session: TrainingSession, signature: str,
                     steps: int) -> tuple[int, list[float], float]:
    from editbench.safety import parse_metadata

    tensors, header = read_safetensors(path, "checkpoint")
    try:
        info = parse_metadata(header["editbench_checkpoint"], path)  # bounded, finite JSON object (or ArtifactError)
        ok = info["format"] == _CKPT_FORMAT
    except (KeyError, ValueError, TypeError):
        ok = False
    if not ok:
        raise TrainingError(f"{path} is not an editbench training checkpoint; delete it or pick another "
                            "checkpoint_dir")
    if info.get("signature") != signature:
        raise TrainingError(f"the checkpoint in {path.parent} belongs to another run (different method, config, "
                            "seed, base model or concept); delete it or use another checkpoint_dir")
    step, losses, wall = info.get("step"), info.get("losses"), info.get("wall_time_s")
    if (isinstance(step, bool) or not isinstance(step, int) or step < 0 or not isinstance(losses, list)
            or len(losses) != step or not all(_finite_number(x) for x in losses) or not _finite_number(wall)
            or ("checksum" in info and info["checksum"] != _tensor_checksum(tensors))):
        raise TrainingError(f"the checkpoint {path} is damaged (its step, losses or tensors do not check out); delete "
                            "it to start over")
    if step > steps:
        raise TrainingError(f"the checkpoint in {path.parent} is at step {step}, beyond steps={steps}; raise steps "
                            "or delete the checkpoint")
    with torch.no_grad():
        for g in groups:
            for i, p in enumerate(g.params):
                saved = tensors.pop(f"param/{g.name}/{i}", None)
                if saved is None or saved.shape != p.shape:
                    raise TrainingError(f"checkpoint {path} does not match parameter {g.name}[{i}] {tuple(p.shape)}")
                p.copy_(saved)
                state = {k.rsplit("/", 1)[1]: tensors.pop(k).to(p.device)
                         for k in [k for k in tensors if k.startswith(f"optim/{g.name}/{i}/")]}
                bad = [k for k, v in state.items() if not v.is_floating_point() or v.shape not in (p.shape, ())
                       or not bool(torch.isfinite(v).all())]
                if bad or not bool(torch.isfinite(saved).all()):
                    raise TrainingError(f"checkpoint {path} holds unusable optimizer state {bad} (or non-finite "
                                        f"values) for parameter {g.name}[{i}]; delete it to start over")
                if state:
                    optimizer.state[p] = state
    rng = tensors.pop("rng", None)
    if rng is None or rng.dtype != torch.uint8 or rng.shape != generator.get_state().shape:
        raise TrainingError(f"checkpoint {path} has no usable random-generator state; delete it to start over")
    generator.set_state(rng)
    session.load_state_tensors({k[len("session/"):]: v for k, v in tensors.items() if k.startswith("session/")})
    return step, [float(x) for x in info["losses"]], float(info["wall_time_s"])
