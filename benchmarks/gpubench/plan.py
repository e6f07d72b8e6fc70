"""The plan of ``benchmarks/gpu.py``: what is measured, in which order (most valuable first), and the format of
its output (every key of ``gpu.json`` and of its measurement rows, documented in docs/performance.md).
"""

from __future__ import annotations

from typing import Any

import torch


SCHEMA = "editbench-gpu/1"
GEOMETRIES = ("sd15", "sdxl")
PRIORITY_METHODS = ("perfusion", "dreambooth")
"""Trained first in every block: Perfusion's step time and memory are compared against DreamBooth's."""
TRAIN_VARIANTS = {"fp32": {"mixed_precision": "no", "gradient_checkpointing": False},
                  "bf16+gc": {"mixed_precision": "bf16", "gradient_checkpointing": True},
                  "bf16w+gc": {"mixed_precision": "bf16", "gradient_checkpointing": True},
                  "bf16w+gc+bf16m": {"mixed_precision": "bf16", "gradient_checkpointing": True,
                                     "master_weights": "bf16"},
                  "bf16w+gc+bf16m+fused": {"mixed_precision": "bf16", "gradient_checkpointing": True,
                                           "master_weights": "bf16", "fused_backward": True, "max_grad_norm": None},
                  "bf16w+gc+8bit": {"mixed_precision": "bf16", "gradient_checkpointing": True,
                                    "optimizer": "adamw8bit"}}
"""The training config of each variant. ``bf16w+gc`` is ``bf16+gc`` on a pipeline whose weights are bfloat16 (the
frozen weights in half precision, the trainables float32: what diffusers' training scripts do with
``--mixed_precision bf16``); ``bf16w+gc+bf16m`` trains bfloat16 master weights too (``master_weights="bf16"``:
parameters, gradients and AdamW moments in bfloat16, stochastically rounded updates); ``bf16w+gc+bf16m+fused``
also steps inside the backward pass (``fused_backward``: no gradient memory; gradient clipping off, which it
cannot do) and ``bf16w+gc+8bit`` adds bitsandbytes' 8-bit AdamW (both planned only when asked for with
``--variants``; 8-bit AdamW needs bitsandbytes); the others train on a float32 pipeline."""
PIPELINE_DTYPES = {"bf16w+gc": torch.bfloat16, "bf16w+gc+bf16m": torch.bfloat16,
                   "bf16w+gc+bf16m+fused": torch.bfloat16, "bf16w+gc+8bit": torch.bfloat16}
"""The pipeline weights' dtype per training variant (float32 where not listed)."""
SAMPLE_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
SAMPLE_CASES = ("base", "perfusion_1", "perfusion_10", "lora_1", "lora_10")
STATUSES = ("ok", "unsupported", "oom", "error", "failed", "skipped")
DEFAULT_PYTEST_ARGS = "-m cuda tests"

ROW_KEYS = {
    "rank": "position in the plan: 1 is the most valuable measurement and runs first",
    "id": "unique id, `kind/geometry/method-or-case/variant` (`pytest` for the test run)",
    "kind": "`train`, `sample` or `pytest`",
    "geometry": "`sd15` or `sdxl` (null for pytest)",
    "resolution": "image side in pixels (512 / 1024; 16 on the tiny pipelines; null for pytest)",
    "method": "the method trained, or the method whose artifacts are applied while sampling (null: unedited model)",
    "case": "train: `fp32`, `bf16+gc` (bf16 autocast + gradient checkpointing on the float32 pipeline) or "
            "`bf16w+gc` (the same on a pipeline with bfloat16 weights), `bf16w+gc+bf16m` (and bfloat16 master "
            "weights), `bf16w+gc+bf16m+fused` (and the step fused into the backward pass), `bf16w+gc+8bit` (and "
            "8-bit AdamW); "
            "sample: `base`, `perfusion_<n>`, `lora_<n>` (n artifacts applied at once); pytest: its arguments",
    "precision": "`fp32` or `bf16` (autocast; the weights stay float32)",
    "gradient_checkpointing": "train: gradient checkpointing on (null otherwise)",
    "status": "`ok`; `unsupported` (the method refuses this variant: EditbenchError); `oom`; `error` (any other "
              "exception, or a non-finite loss); `failed` (pytest: failing tests); `skipped` (budget spent or "
              "the run interrupted)",
    "detail": "the message of unsupported / oom / error, why it was skipped, or pytest's summary line",
    "seconds": "train: one optimizer step after the warm-up step (median of `--repeats` steps); sample: one image "
               "(median of `--repeats` images after a warm-up image); pytest: its wall time",
    "peak_memory_bytes": "train: peak over the whole `Editor.fit` (setup, warm-up and timed steps); sample: peak "
                         "while sampling (warm-up and timed images). CUDA: `torch.cuda.max_memory_allocated`; "
                         "CPU: peak resident memory above the start of the measurement",
    "memory_kind": "`cuda_max_allocated`, `cpu_rss_peak_delta` or null (not measured)",
    "base_memory_bytes": "CUDA: memory allocated just before the measurement (the pipeline, and for sampling the "
                         "applied edits); null on CPU",
    "loop_peak_memory_bytes": "train: the peak the training loop itself reports in the artifact metadata "
                              "(`training.peak_memory_bytes`; the steps only, without the method's setup)",
    "process_start_rss_bytes": "`--fresh-process`: resident memory of the measuring process after its imports, "
                               "before the pipeline is built (the Python / torch runtime); null otherwise",
    "process_peak_rss_bytes": "`--fresh-process`: peak resident memory of the whole measuring process (sampled "
                              "every 20 ms by the parent); null otherwise",
    "wall_s": "wall time of the whole measurement (artifact building, setup, warm-up and timed part)",
    "started_s": "seconds since the start of the run when the measurement began",
    "traceback": "status `error`: the last lines of the traceback (null otherwise)",
}
TOP_KEYS = {
    "schema": f"`{SCHEMA}`",
    "complete": "false while the run is going on (the file is rewritten after every measurement), true at the end",
    "command": "the command line",
    "started_utc / finished_utc": "UTC times of the start and of the last write",
    "wall_s": "seconds from start to the last write",
    "budget_s": "the time budget (`--budget-s`)",
    "budget_exhausted": "true if measurements were skipped because the budget was spent",
    "interrupted": "true if the run was stopped by Ctrl-C (the rest is recorded as skipped)",
    "device": "the torch device measured",
    "device_name": "`torch.cuda.get_device_name` (or `cpu`)",
    "tiny": "true when the tiny pipelines were measured (`--tiny`, or no CUDA)",
    "settings": "batch size, sampling steps, guidance scale, repeats, methods, geometries, sections, training "
                "variants, pytest args, fresh process, CPU memory cap",
    "machine": "host, library versions, CUDA version, GPU memory (benchmarks/perf_common.py `machine()` + CUDA)",
    "pipelines": "per geometry: resolution, parameter counts of UNet / text encoders / VAE, build seconds (or the "
                 "build error)",
    "measurements": "one row per planned measurement, in plan order (keys: the table below)",
    "skipped_for_budget": "ids of the measurements skipped because the budget was spent",
    "ratios": "Perfusion / DreamBooth step time and peak memory per geometry and training variant; every "
              "sampling case / unedited per geometry and precision (from rows with status ok)",
    "pytest": "returncode, summary line, counts (passed, failed, errors, skipped), junit XML path, output tail",
}


def method_order(names: list[str]) -> list[str]:
    """Perfusion and DreamBooth first (the pair the goals compare), then the others in registry order."""
    return [m for m in PRIORITY_METHODS if m in names] + [m for m in names if m not in PRIORITY_METHODS]


def plan(methods: list[str], geometries: list[str], sections: list[str], pytest_args: str,
         variants: list[str] | None = None) -> list[dict]:
    """The measurements, most valuable first: SD 1.5 training (float32: the goals' setting; then bf16 +
    checkpointing, then the same with bfloat16 weights: the practical ones), SD 1.5 sampling, the CUDA tests, then
    SDXL (the half-precision variants first: they fit a single GPU) and its sampling; bf16 sampling after float32
    sampling. ``variants``: the training variants to plan (default all)."""
    out: list[dict] = []

    def add(**row: Any) -> None:
        row = {k: row.get(k) for k in ROW_KEYS}
        row["rank"] = len(out) + 1
        out.append(row)

    def train(geometry: str, variant: str) -> None:
        if "train" in sections:
            for m in method_order(methods):
                add(id=f"train/{geometry}/{m}/{variant}", kind="train", geometry=geometry, method=m, case=variant,
                    precision="bf16" if TRAIN_VARIANTS[variant]["mixed_precision"] == "bf16" else "fp32",
                    gradient_checkpointing=TRAIN_VARIANTS[variant]["gradient_checkpointing"])

    def sample(geometry: str, precision: str) -> None:
        if "sample" in sections:
            for case in SAMPLE_CASES:
                method = None if case == "base" else case.rsplit("_", 1)[0]
                if method is None or method in methods:
                    add(id=f"sample/{geometry}/{case}/{precision}", kind="sample", geometry=geometry,
                        method=method, case=case, precision=precision)

    for geometry in geometries:
        order = ("bf16w+gc", "bf16w+gc+bf16m", "bf16+gc", "fp32") if geometry == "sdxl" else \
            ("fp32", "bf16+gc", "bf16w+gc", "bf16w+gc+bf16m")
        for v in order + ("bf16w+gc+bf16m+fused", "bf16w+gc+8bit"):
            if (variants is None and v in order) or (variants is not None and v in variants):
                train(geometry, v)
        for p in SAMPLE_PRECISIONS:
            sample(geometry, p)
        if geometry == geometries[0] and "pytest" in sections:
            add(id="pytest", kind="pytest", case=pytest_args)
    if not geometries and "pytest" in sections:
        add(id="pytest", kind="pytest", case=pytest_args)
    return out
