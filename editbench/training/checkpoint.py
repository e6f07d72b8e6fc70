"""Training checkpoints: one safetensors file (parameters, optimizer state, RNG, session state) with its JSON
state in the header (step, losses, wall time, and where used the learning-rate scheduler's and the fp16 loss
scaler's state), written atomically; loading checks format, run signature, checksum and every shape."""

from __future__ import annotations

import json
import math
import warnings
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
                     losses: list[float], wall: float, lr_scheduler: Any = None, grad_scaler: Any = None,
                     any_optimizer_state: bool = False) -> None:
    """Write the checkpoint. ``any_optimizer_state``: the optimizer keeps state other than float tensors of the
    parameter's shape (8-bit Adam: quantised tensors, number scalars), stored as it is."""
    tensors: dict[str, torch.Tensor] = {"rng": generator.get_state()}
    scalars: dict[str, float | int | bool] = {}
    for g in groups:
        for i, p in enumerate(g.params):
            tensors[f"param/{g.name}/{i}"] = p.detach()
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim/{g.name}/{i}/{key}"] = value
                elif any_optimizer_state and isinstance(value, (int, float, bool)) and _finite_number(float(value)):
                    scalars[f"optim/{g.name}/{i}/{key}"] = value
                else:
                    raise TrainingError(f"optimizer state {key!r} is not a tensor; cannot checkpoint it")
    for key, value in session.state_tensors().items():
        tensors[f"session/{key}"] = value
    info = {"format": _CKPT_FORMAT, "signature": signature, "step": step, "losses": losses, "wall_time_s": wall,
            "checksum": _tensor_checksum(tensors)}
    if scalars:
        info["optimizer_scalars"] = scalars
    if lr_scheduler is not None:
        info["lr_scheduler"] = lr_scheduler.state_dict()
    if grad_scaler is not None:
        info["grad_scaler"] = grad_scaler.state_dict()
    write_safetensors(path, tensors, {"editbench_checkpoint": json.dumps(info)})


def _tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    return tensor_checksum(tensors, b"editbench-checkpoint-checksum|")


def kept(ckpt: Path | None) -> str:
    if ckpt is not None and ckpt.exists():
        return f"the last checkpoint ({ckpt}) is kept"
    return "no checkpoint was written"


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _same_layout(saved: dict, fresh: dict) -> bool:
    """Whether a saved scheduler / scaler state has the keys of a fresh one, each a number, null or a list of
    numbers / nulls of the same length (nothing else may reach ``load_state_dict``'s ``__dict__.update``)."""
    def ok(a: Any, b: Any) -> bool:
        if isinstance(b, (list, tuple)):
            return isinstance(a, list) and len(a) == len(b) and all(ok(x, y) for x, y in zip(a, b))
        if b is None:
            return a is None
        if isinstance(b, bool):
            return isinstance(a, bool)
        return _finite_number(a)

    return set(saved) == set(fresh) and all(ok(saved[k], fresh[k]) for k in fresh)


def load_checkpoint(path: Path, *, groups: list[ParamGroup], optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, session: TrainingSession, signature: str,
                     steps: int, lr_scheduler: Any = None, grad_scaler: Any = None,
                     any_optimizer_state: bool = False) -> tuple[int, list[float], float]:
    """Restore a checkpoint into the parameters, optimizer, generator, session and, if given, the learning-rate
    scheduler (a checkpoint without its state, written before schedules existed, gets the scheduler advanced to
    its step: a schedule is a function of the step) and the fp16 loss scaler. Returns (step, losses, wall time)."""
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
    damaged = TrainingError(f"the checkpoint {path} is damaged (its scheduler, loss-scaler or optimizer state "
                            "does not check out); delete it to start over")
    scalars = info.get("optimizer_scalars", {})
    if not isinstance(scalars, dict) or not all(isinstance(k, str) and _finite_number(v) for k, v in scalars.items()):
        raise damaged
    sched_state, scaler_state = info.get("lr_scheduler"), info.get("grad_scaler")
    if (sched_state is not None and not isinstance(sched_state, dict)) or \
            (scaler_state is not None and not isinstance(scaler_state, dict)):
        raise damaged
    if grad_scaler is not None and scaler_state is None:
        raise TrainingError(f"the checkpoint {path} holds no fp16 loss-scaler state; delete it to start over")
    with torch.no_grad():
        for g in groups:
            for i, p in enumerate(g.params):
                saved = tensors.pop(f"param/{g.name}/{i}", None)
                if saved is None or saved.shape != p.shape:
                    raise TrainingError(f"checkpoint {path} does not match parameter {g.name}[{i}] {tuple(p.shape)}")
                p.copy_(saved)
                prefix = f"optim/{g.name}/{i}/"
                state = {k.rsplit("/", 1)[1]: tensors.pop(k).to(p.device)
                         for k in [k for k in tensors if k.startswith(prefix)]}
                if any_optimizer_state:  # quantised states: any dtype and shape; floats finite
                    state.update({k.rsplit("/", 1)[1]: v for k, v in scalars.items() if k.startswith(prefix)})
                    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
                           and not bool(torch.isfinite(v).all())]
                else:
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
    try:
        if lr_scheduler is not None:
            if sched_state is None:
                with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended here
                    warnings.simplefilter("ignore")
                    for _ in range(step):
                        lr_scheduler.step()
            else:
                if not _same_layout(sched_state, lr_scheduler.state_dict()):
                    raise damaged
                lr_scheduler.load_state_dict(sched_state)
            last = lr_scheduler.get_last_lr()
            if len(last) != len(optimizer.param_groups) or not all(_finite_number(x) for x in last):
                raise damaged
            for group, lr in zip(optimizer.param_groups, last):  # load_state_dict leaves the groups' lr as they are
                group["lr"] = lr
        if grad_scaler is not None:
            if not _same_layout(scaler_state, grad_scaler.state_dict()):
                raise damaged
            grad_scaler.load_state_dict(scaler_state)
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise damaged from None
    return step, [float(x) for x in info["losses"]], float(info["wall_time_s"])
