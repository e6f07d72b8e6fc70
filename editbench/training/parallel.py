"""Data parallelism through ``accelerate``: several devices, one process each, the same loop in each.

With more than one CUDA device and a multi-process launch (``accelerate launch`` / ``torchrun``), or
``EDITBENCH_ACCELERATE=1``, :func:`editbench.training.train` runs data-parallel (see :func:`use_accelerate`).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch

from editbench.errors import EditbenchError, TrainingError

__all__ = ["ACCELERATE_ENV", "DataParallel", "make_accelerator", "use_accelerate"]

ACCELERATE_ENV = "EDITBENCH_ACCELERATE"
"""Environment flag: ``auto`` (default), ``1``/``on`` or ``0``/``off``; see :func:`use_accelerate`."""

_ON, _OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        return 1


def use_accelerate() -> bool:
    """Whether :func:`train` runs data-parallel through ``accelerate`` instead of the plain loop.

    True only with more than one CUDA device visible (``torch.cuda.device_count() > 1``) AND either a
    multi-process launch (``accelerate launch`` / ``torchrun`` set ``WORLD_SIZE`` > 1) or
    ``EDITBENCH_ACCELERATE=1``; ``EDITBENCH_ACCELERATE=0`` always keeps the plain loop. On CPU or one device it is
    False whatever the flag: the plain loop, bitwise as before (resume included)."""
    flag = os.environ.get(ACCELERATE_ENV, "auto").strip().lower() or "auto"
    if flag not in _ON + _OFF + ("auto",):
        raise EditbenchError(f"{ACCELERATE_ENV} must be auto, 1/on or 0/off, got {flag!r}")
    if flag in _OFF or torch.cuda.device_count() < 2:
        return False
    return flag in _ON or _world_size() > 1


def make_accelerator() -> Any:
    from accelerate import Accelerator

    # the trained parameters are float32 (or bfloat16 master weights) and the loop does its own autocast: no autocast or
    # loss scaling (an fp16 `accelerate config` would otherwise scale the loss behind the clipping's back)
    return Accelerator(mixed_precision="no")


def _index(d: torch.device) -> tuple[str, int | None]:
    """``(type, index)`` with a bare ``cuda`` read as the current CUDA device."""
    return d.type, (torch.cuda.current_device() if d.type == "cuda" and d.index is None else d.index)


class DataParallel:
    """The loop's data-parallel mode. Every process of the launch runs :func:`train` on its own device with its
    own generator (process 0 keeps ``seed``; the others derive theirs), so each draws its own micro-batches, noise
    and timesteps: the effective batch is ``batch_size x grad_accum x processes``. The trained parameters are
    spread over several modules (token rows, swapped-in layers, LoRA), so instead of wrapping one module in DDP
    their gradients are averaged over the processes once per optimizer step, after the ``grad_accum``
    micro-batches (what DDP does with ``no_sync`` during accumulation). The optimizer is ``accelerator.prepare``d,
    the backward pass is ``accelerator.backward``, the step loss is averaged over processes (a non-finite loss on
    any process stops all of them at the same step), only the main process writes checkpoints. A resumed run
    continues from the checkpoint (process 0's generator state; the others re-derive theirs): not bitwise equal to
    an uninterrupted multi-process run."""

    def __init__(self, accelerator: Any, device: torch.device):
        kind = getattr(accelerator, "distributed_type", "NO")
        kind = str(getattr(kind, "value", kind))
        if kind not in ("NO", "MULTI_GPU"):
            raise TrainingError(f"training runs plain data parallelism (accelerate MULTI_GPU), not {kind}; launch "
                                "with `accelerate launch --multi_gpu` (no DeepSpeed/FSDP config)")
        if _index(torch.device(accelerator.device)) != _index(device):
            raise TrainingError(f"under a multi-process launch each process trains on its own device: this one is "
                                f"{accelerator.device} but the pipeline is on {device}; move the pipeline to "
                                "f'cuda:{LOCAL_RANK}' (accelerator.device) before fit")
        self.acc = accelerator
        self.n, self.rank = int(accelerator.num_processes), int(accelerator.process_index)
        self.main = bool(accelerator.is_main_process)

    def seed(self, seed: int, step: int = 0) -> int:
        """Generator seed of this process (process 0 at step 0: ``seed`` itself)."""
        if self.rank == 0 and step == 0:
            return int(seed)
        digest = hashlib.sha256(f"editbench-rank|{seed}|{self.rank}|{step}".encode()).digest()
        return int.from_bytes(digest[:7], "big")

    def sync_params(self, params: list[torch.nn.Parameter]) -> None:
        """Start every process from process 0's parameters."""
        dist = torch.distributed
        if self.n > 1 and dist.is_available() and dist.is_initialized():  # the Accelerator set the group up
            with torch.no_grad():
                for p in params:
                    dist.broadcast(p.data, src=0)

    def mean(self, value: float, device: torch.device) -> float:
        return float(self.acc.reduce(torch.tensor([value], dtype=torch.float64, device=device), reduction="mean"))

    def reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Average the accumulated gradients over the processes; a parameter no process has a gradient for keeps
        ``grad = None`` (the optimizer skips it, as in the plain loop)."""
        have = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
        have = self.acc.reduce(have, reduction="sum")
        # one all-reduce per (device, dtype) bucket instead of one per parameter (what DDP's buckets do)
        buckets: dict[tuple, list[torch.nn.Parameter]] = {}
        for p, h in zip(params, have.tolist()):
            if h:
                buckets.setdefault((p.device, p.dtype), []).append(p)
        for group in buckets.values():
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
            flat = self.acc.reduce(flat, reduction="mean")
            for p, g in zip(group, flat.split([p.numel() for p in group])):
                p.grad = g.view_as(p).clone()
