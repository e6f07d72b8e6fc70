"""Everything GPU-bound in one command, within a time budget, for the day a GPU is at hand for a few minutes:

    python benchmarks/gpu.py --out DIR [--budget-s 540] [--device cuda] [--tiny | --full]

On random-weight pipelines of full SD 1.5 and SDXL geometry, built offline on the device (no download, no hub):

* training, per registered method: the time of one optimizer step after a warm-up step and the peak memory of
  ``Editor.fit`` (``torch.cuda.max_memory_allocated``; peak RSS above the start on CPU), batch 1, at the model's
  resolution (512 / 1024 px), in float32 and in bf16 autocast + gradient checkpointing;
* sampling time per image (25 steps, classifier-free guidance on, VAE decode included) of the unedited model,
  Perfusion with 1 and 10 concepts and unfused LoRA with 1 and 10 adapters, in float32 and bf16 autocast;
* ``python -m pytest -m cuda`` (the tests that exercise CUDA and fp16/bf16), its result summary.

Measurements run in order of value (the list in :func:`plan`); before each one the budget is checked: once it is
spent the current measurement finishes, the rest are recorded as skipped for budget, and the results are written.
A variant a method does not support (an ``EditbenchError`` other than a training error, e.g. SDXL before the method
supports it) is recorded as ``unsupported: <message>``; out-of-memory as ``oom``; anything else as ``error``.

Writes ``DIR/gpu.json`` (rewritten after every measurement, so a killed run leaves what it had) and ``DIR/gpu.md``,
and prints one table. Without CUDA (or with ``--tiny``) the same plan runs on tiny pipelines of the same two
architectures (16x16 px): that is how the default test suite keeps this script working
(``tests/test_gpu_benchmark.py``). The output format is documented in ``docs/performance.md`` (GPU measurements)
and in :data:`ROW_KEYS` / :data:`TOP_KEYS`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from perf_common import (  # noqa: E402
    METHODS,
    ROOT,
    PeakRSS,
    build_artifact,
    config_overrides,
    machine,
    placeholder_for,
    random_concept,
    rss,
)

SCHEMA = "editbench-gpu/1"
GEOMETRIES = ("sd15", "sdxl")
PRIORITY_METHODS = ("perfusion", "dreambooth")
"""Trained first in every block: Perfusion's step time and memory are compared against DreamBooth's."""
TRAIN_VARIANTS = {"fp32": {"mixed_precision": "no", "gradient_checkpointing": False},
                  "bf16+gc": {"mixed_precision": "bf16", "gradient_checkpointing": True}}
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
    "case": "train: `fp32` or `bf16+gc`; sample: `base`, `perfusion_<n>`, `lora_<n>` (n artifacts applied at "
            "once); pytest: its arguments",
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
    "settings": "batch size, sampling steps, guidance scale, repeats, methods, geometries, sections, pytest args",
    "machine": "host, library versions, CUDA version, GPU memory (benchmarks/perf_common.py `machine()` + CUDA)",
    "pipelines": "per geometry: resolution, parameter counts of UNet / text encoders / VAE, build seconds (or the "
                 "build error)",
    "measurements": "one row per planned measurement, in plan order (keys: the table below)",
    "skipped_for_budget": "ids of the measurements skipped because the budget was spent",
    "ratios": "Perfusion / DreamBooth step time and peak memory per geometry and training variant; every "
              "sampling case / unedited per geometry and precision (from rows with status ok)",
    "pytest": "returncode, summary line, counts (passed, failed, errors, skipped), junit XML path, output tail",
}

clock: Callable[[], float] = time.monotonic
"""The budget's clock (a test replaces it)."""


# ----------------------------------------------------------------------------------------------------------------
# pipelines: full SD 1.5 / SDXL geometry (or tiny), random weights, built on the device
# ----------------------------------------------------------------------------------------------------------------

TEXT = {  # CLIPTextConfig fields: CLIP ViT-L/14 (SD 1.5, SDXL's first encoder) and OpenCLIP ViT-bigG (SDXL's second)
    "clip-l": {"full": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            hidden_act="quick_gelu", projection_dim=768),
               "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            hidden_act="quick_gelu", projection_dim=32)},
    "bigg": {"full": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                          hidden_act="gelu", projection_dim=1280, pad_token_id=0),
             "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          hidden_act="gelu", projection_dim=32, pad_token_id=0)},
}
VAE = {"full": dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32),
       "tiny": dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4)}
VAE_SCALING = {"sd15": 0.18215, "sdxl": 0.13025}


def _text_encoder(kind: str, size: str, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from editbench.models import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE

    fields = {"pad_token_id": 49407, **TEXT[kind][size]}
    cfg = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=49406,
                         eos_token_id=49407, **fields)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def build_pipeline(geometry: str, device: torch.device, *, tiny: bool, seed: int = 0):
    """A ``StableDiffusionPipeline`` (sd15) or ``StableDiffusionXLPipeline`` (sdxl) with random weights, every
    module constructed directly on ``device`` (no float32 CPU copy of a 2.6 B-parameter UNet): the UNet of
    :func:`editbench.testing.unet_config` (full size unless ``tiny``, the configs of the storage table), CLIP
    ViT-L/14 text encoder(s) (+ OpenCLIP ViT-bigG for SDXL), the SD VAE, the real CLIP tokenizer and a DDIM
    scheduler. ``tiny``: the same architectures at 16x16 px (editbench.testing's tiny configs)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, \
        UNet2DConditionModel

    from editbench.models import clip_tokenizer
    from editbench.testing import unet_config

    size = "tiny" if tiny else "full"
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_config(geometry, full=not tiny))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, scaling_factor=VAE_SCALING[geometry],
                            sample_size=unet.config.sample_size * 2 ** (len(VAE[size]["block_out_channels"]) - 1),
                            **VAE[size])
        text = _text_encoder("clip-l", size, projection=False)
        text_2 = _text_encoder("bigg", size, projection=True) if geometry == "sdxl" else None
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    parts = dict(vae=vae.eval(), text_encoder=text.eval(), tokenizer=clip_tokenizer(), unet=unet.eval(),
                 scheduler=scheduler)
    if geometry == "sdxl":
        tok_2 = clip_tokenizer()
        tok_2.pad_token = "!"                                       # OpenCLIP pads with "!" (id 0)
        pipe = StableDiffusionXLPipeline(text_encoder_2=text_2.eval(), tokenizer_2=tok_2, add_watermarker=False,
                                         **parts)
    else:
        pipe = StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                       **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _params(module) -> int | None:
    return None if module is None else int(sum(p.numel() for p in module.parameters()))


# ----------------------------------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------------------------------

def method_order(names: list[str]) -> list[str]:
    """Perfusion and DreamBooth first (the pair the goals compare), then the others in registry order."""
    return [m for m in PRIORITY_METHODS if m in names] + [m for m in names if m not in PRIORITY_METHODS]


def plan(methods: list[str], geometries: list[str], sections: list[str], pytest_args: str) -> list[dict]:
    """The measurements, most valuable first: SD 1.5 training (float32: the goals' setting; then bf16 +
    checkpointing: the practical one), SD 1.5 sampling, the CUDA tests, then SDXL (bf16 + checkpointing first: the
    variant that fits a single GPU) and its sampling; bf16 sampling after float32 sampling."""
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
        variants = ("bf16+gc", "fp32") if geometry == "sdxl" else ("fp32", "bf16+gc")
        for v in variants:
            train(geometry, v)
        for p in SAMPLE_PRECISIONS:
            sample(geometry, p)
        if geometry == geometries[0] and "pytest" in sections:
            add(id="pytest", kind="pytest", case=pytest_args)
    if not geometries and "pytest" in sections:
        add(id="pytest", kind="pytest", case=pytest_args)
    return out


# ----------------------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------------------

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

    def pipeline(self, geometry: str):
        """The pipeline of ``geometry``, built on first use; one geometry is kept at a time (GPU memory)."""
        if geometry in self.pipes:
            return self.pipes[geometry]
        info = self.pipe_info.get(geometry, {})
        if "error" in info:
            raise RuntimeError(f"the {geometry} pipeline could not be built: {info['error']}")
        self.pipes.clear()
        self.fingerprints.clear()
        self.free()
        t = time.perf_counter()
        try:
            pipe = build_pipeline(geometry, self.device, tiny=self.tiny)
        except Exception as err:
            self.pipe_info[geometry] = {"error": f"{type(err).__name__}: {err}"}
            self.free()
            raise
        from editbench.concepts import model_resolution

        self.sync()
        self.pipe_info[geometry] = {
            "resolution": model_resolution(pipe), "unet_params": _params(pipe.unet),
            "text_encoder_params": _params(pipe.text_encoder),
            "text_encoder_2_params": _params(getattr(pipe, "text_encoder_2", None)), "vae_params": _params(pipe.vae),
            "pipeline_class": type(pipe).__name__, "build_s": round(time.perf_counter() - t, 2)}
        self.pipes[geometry] = pipe
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

    # ---- measurements ----
    def train(self, row: dict) -> None:
        from editbench import methods

        pipe = self.pipeline(row["geometry"])
        res = self.pipe_info[row["geometry"]]["resolution"]
        row["resolution"] = res
        repeats = self.args.repeats
        cfg = config_overrides(row["method"], steps=1 + repeats, batch_size=1, grad_accum=1, resolution=res,
                               **TRAIN_VARIANTS[row["case"]])
        editor = methods.get(row["method"])(**cfg)
        self.cached_fingerprint(editor, row["geometry"])
        concept = random_concept(placeholder_for(row["method"]), "dog", size=res, n=2)
        stamps: list[float] = []
        setup_peak = [0]
        prepare = editor.prepare_training

        def timed_prepare(*a, **kw):
            session = prepare(*a, **kw)
            if self.cuda:  # the loop resets CUDA's peak statistics when it starts: keep the setup's peak
                setup_peak[0] = int(torch.cuda.max_memory_allocated(self.device))
            after = session.after_step

            def after_step(step):
                after(step)
                self.sync()
                stamps.append(time.perf_counter())
            session.after_step = after_step
            return session

        editor.prepare_training = timed_prepare
        with self.memory(row):
            art = editor.fit(pipe, concept, progress=False, seed=0)
        row["peak_memory_bytes"] = max(row["peak_memory_bytes"], setup_peak[0])
        steps = [b - a for a, b in zip(stamps, stamps[1:])]          # after the warm-up step
        row["seconds"] = statistics.median(steps)
        training = art.metadata.get("training", {})
        row["loop_peak_memory_bytes"] = training.get("peak_memory_bytes")
        loss = training.get("loss_last")
        if loss is not None and not math.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss}")

    def artifacts(self, method: str, n: int, pipe, geometry: str, res: int) -> list:
        """``n`` artifacts of ``method`` from the method's own builder (no training: sampling cost does not depend
        on the values), perturbed so that they are distinct and change the output (LoRA: non-zero B)."""
        fps = self.fingerprints.setdefault(geometry, {})
        g = torch.Generator().manual_seed(1)
        arts = []
        for i in range(n):
            placeholder = f"<bench-{i}>" if method == "perfusion" else placeholder_for(method)
            art = build_artifact(method, pipe, random_concept(placeholder, "dog", size=res, n=1, seed=i),
                                 fingerprints=fps)
            for k, v in art.tensors.items():
                if not v.is_floating_point() or (method == "lora" and ".lora_B." not in k):
                    continue
                noise = torch.randn(v.shape, generator=g).to(v)
                art.tensors[k] = 0.01 * noise if method == "lora" else v + 0.3 * v.float().std().to(v) * noise
            arts.append(art)
        return arts

    def sample(self, row: dict) -> None:
        from editbench import methods

        geometry = row["geometry"]
        pipe = self.pipeline(geometry)
        res = self.pipe_info[geometry]["resolution"]
        row["resolution"] = res
        handle = None
        word = "dog"
        if row["method"] is not None:
            n = int(row["case"].rsplit("_", 1)[1])
            editor = methods.get(row["method"])()
            self.cached_fingerprint(editor, geometry)
            arts = self.artifacts(row["method"], n, pipe, geometry, res)
            handle = editor.apply(pipe, arts)
            word = "<bench-0> dog" if row["method"] == "perfusion" else f"{placeholder_for(row['method'])} dog"
        dtype = SAMPLE_PRECISIONS[row["precision"]]
        autocast = contextlib.nullcontext if dtype is None else (lambda: torch.autocast(self.device.type, dtype))

        def once() -> float:
            self.sync()
            t = time.perf_counter()
            with torch.no_grad(), autocast():
                images = pipe(f"a photo of a {word}", num_inference_steps=self.args.sample_steps,
                              guidance_scale=self.args.guidance, height=res, width=res,
                              generator=torch.Generator().manual_seed(0), output_type="pt").images
            self.sync()
            if not torch.isfinite(images).all():
                raise RuntimeError("the sampled image has non-finite values")
            return time.perf_counter() - t

        try:
            with self.memory(row):
                once()                                                  # warm-up
                row["seconds"] = statistics.median(once() for _ in range(self.args.repeats))
        finally:
            if handle is not None:
                handle.undo()

    def run_pytest(self, row: dict, out: Path) -> None:
        junit = out / "pytest-cuda.xml"
        cmd = [sys.executable, "-m", "pytest", *shlex.split(row["case"]), "-rfE", "-p", "no:cacheprovider",
               f"--junitxml={junit}"]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True,
                                  timeout=self.args.pytest_timeout_s, check=False)
            code, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            code = None
            text = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        row["seconds"] = time.perf_counter() - t
        counts = junit_counts(junit) if junit.is_file() else None
        lines = [ln for ln in text.splitlines() if ln.strip()]
        summary = next((ln.strip("= ") for ln in reversed(lines) if any(
            w in ln for w in ("passed", "failed", "skipped", "deselected", "no tests ran", "error"))), "")
        if code is None:
            summary = f"timed out after {self.args.pytest_timeout_s} s; {summary}"
        self.pytest = {"command": cmd, "returncode": code, "summary": summary, "counts": counts,
                       "junit": str(junit) if junit.is_file() else None, "tail": "\n".join(lines[-40:])}
        row["detail"] = summary
        row["status"] = "ok" if code in (0, 5) else ("failed" if code == 1 else "error")  # 5: no tests collected


def junit_counts(path: Path) -> dict:
    """passed / failed / errors / skipped of a junit XML file (pytest's ``--junitxml``)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return {"passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"], "failed": n["failures"],
            "errors": n["errors"], "skipped": n["skipped"]}


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


# ----------------------------------------------------------------------------------------------------------------
# output
# ----------------------------------------------------------------------------------------------------------------

def ratios(rows: list[dict]) -> dict[str, float]:
    ok = {r["id"]: r for r in rows if r["status"] == "ok" and r["seconds"]}
    out: dict[str, float] = {}
    for r in ok.values():
        if r["kind"] == "train" and r["method"] == "perfusion":
            ref = ok.get(f"train/{r['geometry']}/dreambooth/{r['case']}")
            if ref:
                out[f"train/{r['geometry']}/{r['case']}/perfusion_vs_dreambooth/time"] = r["seconds"] / ref["seconds"]
                if r["peak_memory_bytes"] and ref["peak_memory_bytes"]:
                    out[f"train/{r['geometry']}/{r['case']}/perfusion_vs_dreambooth/peak_memory"] = \
                        r["peak_memory_bytes"] / ref["peak_memory_bytes"]
        if r["kind"] == "sample" and r["case"] != "base":
            ref = ok.get(f"sample/{r['geometry']}/base/{r['precision']}")
            if ref:
                out[f"sample/{r['geometry']}/{r['precision']}/{r['case']}_vs_base/time"] = r["seconds"] / ref["seconds"]
    return {k: round(v, 4) for k, v in out.items()}


def fmt_s(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s"


def fmt_bytes(x: int | None) -> str:
    if x is None:
        return ""
    return f"{x / 2**30:.2f} GiB" if x >= 2**30 else f"{x / 2**20:.0f} MiB"


TABLE_COLUMN_DOCS = {
    "rank": "`rank`", "kind": "`kind`", "geometry": "`geometry`", "px": "`resolution`", "method": "`method`",
    "case": "`case`", "status": "`status` (`pending` while the run goes on)",
    "time": "`seconds` (ms below 1 s)", "peak memory": "`peak_memory_bytes` (MiB, GiB from 1 GiB)",
    "detail": "`detail` (cut at 90 characters; 60 on standard output)",
}
TABLE_COLUMNS = tuple(TABLE_COLUMN_DOCS)


def table_rows(rows: list[dict], width: int = 90) -> list[list[str]]:
    out = []
    for r in rows:
        detail = (r["detail"] or "").replace("|", "/").replace("\n", " ")
        out.append([str(r["rank"]), r["kind"], r["geometry"] or "", str(r["resolution"] or ""), r["method"] or "",
                    r["case"] or "", r["status"] or "pending", fmt_s(r["seconds"]), fmt_bytes(r["peak_memory_bytes"]),
                    detail if len(detail) <= width else detail[:width - 3] + "..."])
    return out


def md_table(header: list[str] | tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in rows])


def render_md(res: dict, depth: int = 1) -> str:
    """``gpu.md``: the run's summary, the measurement table, ratios, pytest, skipped ids, pipelines. ``depth``: the
    heading level of the title (docs/performance.md embeds it one level down, without the title)."""
    h = "#" * (depth + 1)
    rows = res["measurements"]
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    m = res["machine"]
    L = [] if depth > 1 else ["# GPU measurements", ""]
    L += [f"`{' '.join(res['command'])}` ({SCHEMA}; format: docs/performance.md, GPU measurements)", "",
          md_table(["", ""], [
              ["device", f"{res['device']} ({res['device_name']})"],
              ["pipelines", "tiny (16x16 px, same architectures)" if res["tiny"] else
               "full SD 1.5 / SDXL geometry, random weights"],
              ["started (UTC)", res["started_utc"]], ["wall time", f"{res['wall_s']:.0f} s"],
              ["budget", f"{res['budget_s']:.0f} s" + (" (spent: measurements skipped)" if res["budget_exhausted"]
                                                      else "")],
              ["complete", str(res["complete"]) + (" (interrupted)" if res["interrupted"] else "")],
              ["measurements", ", ".join(f"{n} {s}" for s, n in counts.items() if n)],
              ["torch / CUDA", f"{m.get('torch')} / {m.get('cuda') or 'n/a'}"],
              ["diffusers / transformers / peft", f"{m.get('diffusers')} / {m.get('transformers')} / {m.get('peft')}"],
              ["git", str(m.get("git"))],
          ]), "",
          f"{h} Measurements (plan order: most valuable first)", "",
          "train: one optimizer step after a warm-up step, batch 1, and the peak memory of the whole `Editor.fit`; "
          f"sample: one image, {res['settings']['sample_steps']} steps, guidance "
          f"{res['settings']['guidance_scale']}, VAE decode included. Memory: `torch.cuda.max_memory_allocated` on "
          "CUDA, peak RSS above the start on CPU.", "",
          md_table(TABLE_COLUMNS, table_rows(rows)), ""]
    if res["ratios"]:
        L += [f"{h} Ratios", "",
              md_table(["ratio", "value"], [[f"`{k}`", f"{v:.3f}"] for k, v in res["ratios"].items()]), ""]
    L += [f"{h} pytest", ""]
    py = res["pytest"]
    if py:
        c = py["counts"] or {}
        L += [f"`{' '.join(py['command'][2:])}`: returncode {py['returncode']}, **{py['summary']}**" +
              (f" (junit: {c.get('passed')} passed, {c.get('failed')} failed, {c.get('errors')} errors, "
               f"{c.get('skipped')} skipped)" if c else ""), ""]
    else:
        L += ["not run", ""]
    L += [f"{h} Skipped for budget", ""]
    L += [", ".join(f"`{i}`" for i in res["skipped_for_budget"]) or "none", ""]
    L += [f"{h} Pipelines", ""]
    prow = []
    for g, p in res["pipelines"].items():
        if "error" in p:
            prow.append([g, "", "", "", "", "", f"build failed: {p['error']}"])
        else:
            prow.append([g, p["pipeline_class"], str(p["resolution"]), f"{p['unet_params']:,}",
                         " + ".join(f"{x:,}" for x in (p["text_encoder_params"], p["text_encoder_2_params"]) if x),
                         f"{p['vae_params']:,}", f"{p['build_s']} s"])
    L += [md_table(["geometry", "class", "px", "UNet params", "text encoder params", "VAE params", "build"], prow)
          if prow else "none built", ""]
    return "\n".join(L)


RESULTS = ROOT / "benchmarks" / "results" / "gpu"
"""Where the GPU run's files go to be shown in docs/performance.md (``--out benchmarks/results/gpu``)."""

DOC = """\
One command measures everything GPU-bound within a time budget, for a GPU that is at hand for a few minutes with
nothing downloadable on it: random-weight pipelines of full SD 1.5 and SDXL geometry are built on the device (the
UNet configs of the storage table, `editbench.testing.unet_config(full=True)`; CLIP ViT-L/14, for SDXL also
OpenCLIP ViT-bigG; the SD VAE; the real CLIP tokenizer, built offline). Everything it needs comes with
`pip install -e ".[dev]"`.

```bash
python benchmarks/gpu.py --out benchmarks/results/gpu     # on the GPU machine: 540 s budget by default
python benchmarks/run_all.py --render                     # puts the run's table into this page (below)
```

What it measures, in this order (the most valuable first, so that a short budget drops the least valuable):

1. SD 1.5 training, float32, every method (Perfusion and DreamBooth first: the goals compare them), then in bf16
   autocast + gradient checkpointing (`TrainConfig(mixed_precision="bf16", gradient_checkpointing=True)`): the
   time of one optimizer step after a warm-up step and the peak memory of the whole `Editor.fit`
   (`torch.cuda.max_memory_allocated`), batch 1, 512 px, prior preservation off;
2. SD 1.5 sampling time per image: unedited, Perfusion with 1 and 10 concepts, unfused LoRA with 1 and 10
   adapters (artifacts from the methods' own builders), 25 steps, guidance 7.5 (on), VAE decode included; float32,
   then bf16 autocast;
3. `python -m pytest -m cuda tests` (the `cuda` marker: `tests/test_cuda.py` trains, applies and samples every
   method on the device, in float32, bf16 + checkpointing, fp16 with loss scaling, and on a half-precision
   pipeline; plus the solver's CUDA test and the mixed-precision tests), its summary and junit counts;
4. the same for SDXL at 1024 px (training bf16 + checkpointing first: the variant that fits one GPU).

The budget (`--budget-s`, default 540) is checked before each measurement: once it is spent the running measurement
finishes, every later one is recorded as `skipped` (listed in `skipped_for_budget`) and the files are written.
`gpu.json` is also rewritten after every measurement, so a run killed from outside leaves what it had; Ctrl-C
stops cleanly like a spent budget. A variant a method refuses (an `EditbenchError`, e.g. SDXL before the method
supports it) is recorded as `unsupported: <message>`, out-of-memory as `oom`, anything else as `error` (with the
traceback's tail); the run goes on. Each base-model fingerprint is computed once per pipeline (the weights never
change between measurements).

Options: `--device` (default `cuda` if available, else `cpu`), `--tiny` / `--full` (default: full geometry on
CUDA, tiny pipelines of the same two architectures at 16x16 px otherwise), `--methods`, `--geometries`
(`sd15,sdxl`), `--sections` (`train,sample,pytest`), `--repeats` (timed steps / images after the warm-up, median;
default 1), `--sample-steps` (25), `--guidance` (7.5), `--pytest-args` (`-m cuda tests`), `--pytest-timeout-s`
(300), `--threads` (torch CPU threads; 1 on the tiny pipelines). Without CUDA the tiny run is part of the default
test suite (`tests/test_gpu_benchmark.py`, a few seconds per measurement), so the script cannot rot between GPU
runs.

Output in `--out DIR`: `gpu.json`, `gpu.md` (the same content as the results below), `pytest-cuda.xml` (junit), and
the table printed on standard output.
"""


def doc_section(results: Path = RESULTS, depth: int = 2) -> str:
    """The GPU section of docs/performance.md: how to run it, the output format (every key), and the table of the
    run in ``results`` (``gpu.json``) if there is one."""
    h = "#" * (depth + 1)
    L = ["#" * depth + " 7. GPU measurements (`benchmarks/gpu.py`)", "", DOC.strip(), "",
         f"{h} `gpu.json`", "", md_table(["key", "what"], [[f"`{k}`" if " / " not in k else
                                                           " / ".join(f"`{x}`" for x in k.split(" / ")), v]
                                                          for k, v in TOP_KEYS.items()]), "",
         "Each entry of `measurements` (every key always present; null where it does not apply):", "",
         md_table(["key", "what"], [[f"`{k}`", v] for k, v in ROW_KEYS.items()]), "",
         f"{h} The table (`gpu.md`, standard output)", "",
         md_table(["column", "what"], [[f"`{k}`", v] for k, v in TABLE_COLUMN_DOCS.items()]), "",
         f"{h} Results", ""]
    path = Path(results) / "gpu.json"
    if path.is_file():
        res = json.loads(path.read_text())
        if res.get("tiny"):
            L += ["**The run below is a tiny CPU run (format check), not a GPU measurement.**", ""]
        L += [render_md(res, depth=depth + 1)]
    else:
        L += [f"**Not measured yet**: no GPU has been available. The table of `{path.relative_to(ROOT)}` goes here "
              "(`python benchmarks/gpu.py --out benchmarks/results/gpu`, then `python benchmarks/run_all.py "
              "--render`).", ""]
    return "\n".join(L).rstrip() + "\n"


def print_table(rows: list[dict]) -> None:
    import pandas as pd

    df = pd.DataFrame(table_rows(rows, width=60), columns=list(TABLE_COLUMNS))
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 250,
                           "display.max_colwidth", 60):
        print(df.to_string(index=False))


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------

def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu.json, gpu.md, pytest-cuda.xml")
    ap.add_argument("--budget-s", type=float, default=540.0,
                    help="time budget in seconds (default 540); once spent the current measurement finishes and "
                         "the rest are skipped")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="tiny pipelines (default without CUDA)")
    size.add_argument("--full", action="store_true", help="full geometry even without CUDA")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: all registered)")
    ap.add_argument("--geometries", default=",".join(GEOMETRIES), help="comma-separated, from sd15,sdxl")
    ap.add_argument("--sections", default="train,sample,pytest", help="comma-separated, from train,sample,pytest")
    ap.add_argument("--repeats", type=int, default=1, help="timed steps / images after the warm-up (median)")
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--pytest-args", default=DEFAULT_PYTEST_ARGS, help=f"default {DEFAULT_PYTEST_ARGS!r}")
    ap.add_argument("--pytest-timeout-s", type=float, default=300.0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: 1 with the tiny pipelines, whose ops are too small to share; "
                         "torch's default otherwise)")
    args = ap.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.geometries = [g for g in args.geometries.split(",") if g]
    args.sections = [s for s in args.sections.split(",") if s]
    for name, got, allowed in (("methods", args.methods, METHODS), ("geometries", args.geometries, GEOMETRIES),
                               ("sections", args.sections, ("train", "sample", "pytest"))):
        bad = sorted(set(got) - set(allowed))
        if bad:
            ap.error(f"unknown {name} {bad}; choose from {list(allowed)}")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    t0 = clock()
    args = parse(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = args.tiny or (not args.full and device.type != "cuda")
    threads = args.threads or (1 if tiny else None)
    if threads:
        torch.set_num_threads(threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = plan(args.methods, args.geometries, args.sections, args.pytest_args)
    runner = Runner(args, device, tiny)
    info = machine()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(cuda=torch.version.cuda, gpu=props.name, gpu_memory_bytes=int(props.total_memory),
                    cuda_capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported())
    res = {
        "schema": SCHEMA, "complete": False, "command": ["python", "benchmarks/gpu.py", *(argv or sys.argv[1:])],
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "finished_utc": None, "wall_s": 0.0,
        "budget_s": args.budget_s, "budget_exhausted": False, "interrupted": False, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "tiny": tiny,
        "settings": {"batch_size": 1, "sample_steps": args.sample_steps, "guidance_scale": args.guidance,
                     "repeats": args.repeats, "methods": args.methods, "geometries": args.geometries,
                     "sections": args.sections, "pytest_args": args.pytest_args,
                     "torch_threads": torch.get_num_threads()},
        "machine": info, "pipelines": runner.pipe_info, "measurements": rows, "skipped_for_budget": [],
        "ratios": {}, "pytest": None}

    def write(final: bool = False) -> None:
        res.update(complete=final, wall_s=round(clock() - t0, 2), ratios=ratios(rows), pytest=runner.pytest,
                   finished_utc=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()))
        (out / "gpu.json").write_text(json.dumps(res, indent=1, default=str))
        (out / "gpu.md").write_text(render_md(res))

    stop = None
    for row in rows:
        spent = clock() - t0
        if stop is None and spent >= args.budget_s:
            stop = f"budget spent ({spent:.0f} s of {args.budget_s:.0f} s)"
            res["budget_exhausted"] = True
        if stop is not None:
            row.update(status="skipped", detail=stop)
            if res["budget_exhausted"]:
                res["skipped_for_budget"].append(row["id"])
            continue
        row["started_s"] = round(spent, 2)
        print(f"[gpu] {row['rank']}/{len(rows)} {row['id']} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            if row["kind"] == "train":
                runner.train(row)
            elif row["kind"] == "sample":
                runner.sample(row)
            else:
                runner.run_pytest(row, out)
            row["status"] = row["status"] or "ok"
        except KeyboardInterrupt:
            row.update(status="skipped", detail="interrupted (Ctrl-C)")
            stop, res["interrupted"] = "interrupted (Ctrl-C)", True
        except Exception as err:  # every failure is a result: record it and go on
            row["status"], row["detail"] = classify(err)
            row["seconds"] = row["peak_memory_bytes"] = None
            if row["status"] == "error":
                tb = traceback.format_exc().strip().splitlines()
                row["traceback"] = "\n".join(tb[-12:])
        finally:
            runner.free()
        row["wall_s"] = round(time.perf_counter() - t, 2)
        print(f"[gpu]   {row['status']} {fmt_s(row['seconds'])} {fmt_bytes(row['peak_memory_bytes'])} "
              f"{row['detail'] or ''}", file=sys.stderr, flush=True)
        write()
    runner.pipes.clear()
    write(final=True)
    print_table(rows)
    print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'} ({res['wall_s']:.0f} s)", file=sys.stderr)
    return res


if __name__ == "__main__":
    main()
