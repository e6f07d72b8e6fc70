"""The state shared by the measurements of one run (the pipeline of the current geometry, cached base fingerprints,
the CUDA test result), peak-memory measuring, and the classification of a failed measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time
from pathlib import Path
from typing import Any

import torch
from perf_common import PeakRSS, rss

from . import cuda_tests, sampling, training
from .pipelines import build_pipeline, param_count


class PeakRSSAbove(PeakRSS):
    """:class:`perf_common.PeakRSS` without its ``gc.collect()`` at entry (seconds per call with diffusers,
    transformers and peft imported, on a busy CPU; the tiny runs measure dozens of blocks)."""

    def __enter__(self) -> PeakRSSAbove:
        import threading

        self.base = self.peak = rss()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self


class Runner:
    def __init__(self, args: argparse.Namespace, device: torch.device, tiny: bool):
        self.args, self.device, self.tiny = args, device, tiny
        self.cuda = device.type == "cuda"
        self.pipes: dict[str, Any] = {}
        self.pipe_info: dict[str, dict] = {}
        self.fingerprints: dict[str, dict] = {}
        self.pytest: dict | None = None

    # ---- helpers ----
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        """Release the memory of the last measurement (not on the tiny pipelines: a ``gc.collect()`` costs more
        than they hold)."""
        if not self.tiny:
            gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def pipeline(self, geometry: str, dtype: torch.dtype = torch.float32):
        """The pipeline of ``geometry`` with weights in ``dtype``, built on first use; one pipeline is kept at a
        time (GPU memory)."""
        key = geometry if dtype == torch.float32 else f"{geometry}/{str(dtype).removeprefix('torch.')}"
        if key in self.pipes:
            return self.pipes[key]
        info = self.pipe_info.get(geometry, {})
        if "error" in info:
            raise RuntimeError(f"the {geometry} pipeline could not be built: {info['error']}")
        self.pipes.clear()
        self.fingerprints.clear()
        self.free()
        t = time.perf_counter()
        try:
            pipe = build_pipeline(geometry, self.device, tiny=self.tiny, dtype=dtype)
        except Exception as err:
            self.pipe_info[geometry] = {"error": f"{type(err).__name__}: {err}"}
            self.free()
            raise
        from editbench.concepts import model_resolution

        self.sync()
        self.pipe_info[geometry] = {
            "resolution": model_resolution(pipe), "unet_params": param_count(pipe.unet),
            "text_encoder_params": param_count(pipe.text_encoder),
            "text_encoder_2_params": param_count(getattr(pipe, "text_encoder_2", None)),
            "vae_params": param_count(pipe.vae),
            "pipeline_class": type(pipe).__name__, "build_s": round(time.perf_counter() - t, 2)}
        self.pipes[key] = pipe
        return pipe

    def cached_fingerprint(self, editor, geometry: str) -> None:
        """Make ``editor.fingerprint`` compute each base fingerprint once per pipeline (the weights never change
        between measurements; hashing a 10 GB UNet on every fit would eat the budget). The same cache is used by
        :func:`perf_common.build_artifact`."""
        from editbench import methods

        key = "default" if type(editor).affected_tensors is methods.Editor.affected_tensors else editor.name
        cache = self.fingerprints.setdefault(geometry, {})
        compute = editor.fingerprint

        def fingerprint(pipe):
            if key not in cache:
                cache[key] = compute(pipe)
            return cache[key]

        editor.fingerprint = fingerprint

    @contextlib.contextmanager
    def memory(self, row: dict):
        """Peak memory of the block into ``row`` (CUDA: max_memory_allocated; CPU: peak RSS above the start)."""
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)
            row["base_memory_bytes"] = int(torch.cuda.memory_allocated(self.device))
            yield
            self.sync()
            row["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
            row["memory_kind"] = "cuda_max_allocated"
        else:
            with PeakRSSAbove(interval=0.01) as mem:
                yield
            row["peak_memory_bytes"] = int(mem.delta)
            row["memory_kind"] = "cpu_rss_peak_delta"


    # ---- measurements (one module each) ----
    def train(self, row: dict) -> None:
        training.measure(self, row)

    def artifacts(self, method: str, n: int, pipe, geometry: str, res: int) -> list:
        return sampling.artifacts(self, method, n, pipe, geometry, res)

    def sample(self, row: dict) -> None:
        sampling.measure(self, row)

    def run_pytest(self, row: dict, out: Path) -> None:
        cuda_tests.run(self, row, out)


def classify(err: BaseException) -> tuple[str, str]:
    """``(status, detail)`` of a failed measurement."""
    from editbench.errors import EditbenchError, TrainingError

    msg = f"{err}".strip().splitlines()
    first = (msg[0] if msg else "")[:400]
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in first.lower():
        return "oom", f"{type(err).__name__}: {first}"
    if isinstance(err, EditbenchError) and not isinstance(err, TrainingError):
        return "unsupported", f"unsupported: {first}"
    return "error", f"{type(err).__name__}: {first}"
