"""What every benchmark kind shares: the machine description, timing and memory helpers, fresh-process runs, the
models (toy world / tiny pipeline, geometry-only SD 1.5 / SD 2.1 / SDXL pipelines) and artifact building.

Every comparison is measured side by side in one process (or one series of fresh subprocesses) and reported as a
ratio against its peer: absolute times on a shared CPU move by tens of percent from minute to minute, ratios of
interleaved runs much less. Absolute numbers are kept as context only.

The storage and training benchmarks measure every method of the registry (:data:`METHODS`, by registry name) through
what it declares on its ``Editor`` class, so a new method is measured without an edit to them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from typing_extensions import Self

from editbench import methods

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("EDITBENCH_BENCH_WORK") or ROOT / ".benchmarks" / "work")
os.environ.setdefault("EDITBENCH_CACHE", str(WORK / "cache"))  # hermetic caches (text covariance, class images)


def registered_methods() -> tuple[str, ...]:
    """Registry name of every method (:func:`editbench.methods.available`); the built-ins in ``BUILTIN`` order,
    then the others by name."""
    rank = {package: i for i, package in enumerate(methods.BUILTIN)}

    def key(name: str) -> int:
        module = methods.get(name).__module__.split(".")
        return rank.get(module[2], len(rank)) if module[:2] == ["editbench", "methods"] and len(module) > 2 \
            else len(rank)

    return tuple(sorted(methods.available(), key=key))


METHODS = registered_methods()
REFERENCE = "dreambooth"
"""The method storage and training ratios are taken against (its artifact and its training hold the whole UNet)."""
GEOMETRIES = ("sd15", "sd21", "sdxl")
TEXT_WIDTH = {"sd15": 768, "sd21": 1024, "sdxl": 2048}


# ----------------------------------------------------------------------------------------------------------------
# machine
# ----------------------------------------------------------------------------------------------------------------

def command_output(cmd: list[str]) -> str:
    """The stripped standard output of ``cmd`` ("?" if it cannot run)."""
    try:
        return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def competing_jobs() -> list[str]:
    """Command lines of known CPU-heavy jobs that would distort measurements (the toy-world training)."""
    out = command_output(["pgrep", "-af", "launch_world"])
    return [line for line in out.splitlines() if line and "pgrep" not in line]


def machine() -> dict:
    """What the numbers were measured on: ``nproc``, ``lscpu | head``, torch and library versions, threads, load."""
    import diffusers
    import peft
    import transformers

    mem = "?"
    with contextlib.suppress(OSError):
        mem = next(line.split(":", 1)[1].strip() for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "nproc": command_output(["nproc"]),
        "lscpu_head": "\n".join(command_output(["lscpu"]).splitlines()[:10]),
        "mem_total": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        "loadavg": command_output(["cat", "/proc/loadavg"]),
        "git": command_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]) + (
            " (+ uncommitted changes)" if command_output(["git", "-C", str(ROOT), "status", "--porcelain"]) else ""),
        "competing_jobs": competing_jobs(),
    }


# ----------------------------------------------------------------------------------------------------------------
# timing and memory
# ----------------------------------------------------------------------------------------------------------------

def interleaved(cases: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall time of every case, ``rounds`` times, cases interleaved (A B C A B C ...) so that load drifts hit all
    of them alike; ``warmup`` untimed rounds first. Returns ``{case: [seconds per round]}``."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(rounds):
        order = list(cases) if r % 2 == 0 else list(reversed(cases))  # no case always runs first
        for name in order:
            t = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - t)
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of ``time(a) / time(b)`` measured in the same round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every ``interval`` s by a thread (CPU runs)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self.base = interval, 0, 0
        self._stop = threading.Event()

    def __enter__(self) -> Self:
        gc.collect()
        self.base = self.peak = rss()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())

    @property
    def delta(self) -> int:
        return self.peak - self.base


def in_subprocess(what: str, **kwargs: Any) -> dict:
    """Run ``measure_<what>(**kwargs)`` in a fresh Python process (``benchmarks/perf.py``); its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve().with_name("perf.py")), what, json.dumps(kwargs)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=dict(os.environ), cwd=str(ROOT))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------------

def toy_model_dir() -> Path | None:
    """The toy world's diffusers folder: ``$EDITBENCH_TOY_MODEL``, the committed weights, or the training run's
    output (``runs/world_out/model``) before it is committed; None if there is none yet."""
    from editbench.toyworld import WEIGHTS

    for cand in (os.environ.get("EDITBENCH_TOY_MODEL"), WEIGHTS / "model", ROOT / "runs" / "world_out" / "model"):
        if cand and (Path(cand) / "model_index.json").is_file():
            return Path(cand)
    return None


def toy_available() -> bool:
    return toy_model_dir() is not None


def bench_pipeline(kind: str = "auto"):
    """``(pipeline, name)``: the toy world (``kind`` "toy", or "auto" once its weights exist) or
    :func:`editbench.testing.tiny_pipeline` ("tiny")."""
    if kind == "auto":
        kind = "toy" if toy_available() else "tiny"
    if kind == "toy":
        from diffusers import StableDiffusionPipeline

        from editbench.models import dtype_kwargs

        folder = toy_model_dir()
        if folder is None:
            raise RuntimeError("the toy world's weights are not there yet")
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), **dtype_kwargs(torch.float32))  # as load_pipeline()
        pipe.set_progress_bar_config(disable=True)
        return pipe, "toy world (32x32 px, SD architecture)"
    from editbench.testing import tiny_pipeline

    return tiny_pipeline(), "tiny_pipeline (16x16 px, random weights)"


def resolution(pipe) -> int:
    from editbench.concepts import model_resolution

    return model_resolution(pipe)


def random_concept(placeholder: str, superclass: str = "star", *, size: int = 32, n: int = 4, seed: int = 0):
    """A :class:`ConceptData` of ``n`` random images (the pixel values do not matter for cost)."""
    from editbench.concepts import ConceptData

    g = torch.Generator().manual_seed(seed)
    return ConceptData(placeholder, superclass, [torch.rand(3, size, size, generator=g) for _ in range(n)])


def placeholder_for(method: str, i: int = 0) -> str:
    """The ``i``-th benchmark placeholder of the kind ``method`` trains (a new token or a rare word)."""
    from editbench.methods.tokens import RARE_WORDS

    return f"<bench-{i}>" if methods.get(method).new_token else RARE_WORDS[i]


def text_encoder(width: int, layers: int = 2, *, full_clip: bool = False, seed: int = 0):
    """A ``CLIPTextModel`` of text width ``width`` with ``layers`` layers (random weights). ``full_clip``: the
    real CLIP ViT-L/14 text tower shape (12 layers, 12 heads, MLP 3072) for throughput measurements."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from editbench.models import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE

    torch.manual_seed(seed)
    if full_clip:
        cfg = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072,
                             num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=CLIP_MAX_LENGTH,
                             bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    else:
        cfg = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=width, intermediate_size=2 * width,
                             num_hidden_layers=layers, num_attention_heads=8, max_position_embeddings=CLIP_MAX_LENGTH,
                             bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return CLIPTextModel(cfg).eval()


def full_unet(geometry: str, dtype: torch.dtype = torch.float32, *, seed: int = 0):
    """The real-size UNet of ``geometry`` with random weights (N(0, 0.02)), built without a float32 detour.

    ``sample_size`` is set to 8 (it changes no parameter shape) so that a training step on 8x8 latents is possible.
    """
    from diffusers import UNet2DConditionModel

    from editbench.testing import unet_config

    cfg = dict(unet_config(geometry, full=True), sample_size=8)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    unet = unet.to(dtype).to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*unet.parameters(), *unet.buffers()]:
            t.normal_(0.0, 0.02, generator=g) if t.is_floating_point() else t.zero_()
    return unet.eval()


def geometry_pipeline(geometry: str, dtype: torch.dtype = torch.float32):
    """A pipeline with the full-size UNet of ``geometry`` (random weights), 2-layer CLIP text encoders of the
    geometry's text widths, the tiny VAE and the real tokenizer(s). Only widths matter for artifacts.

    ``sdxl``: a ``StableDiffusionXLPipeline`` with SDXL's two encoders (768-wide CLIP-L; 1280-wide OpenCLIP-bigG
    with its 1280-wide pooled projection), so the artifacts are the ones the methods write for SDXL (textual
    inversion's ``clip_l`` / ``clip_g``, both encoders' token rows, Perfusion on the concatenated encoding).
    Otherwise a ``StableDiffusionPipeline``.
    """
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from editbench.models import clip_tokenizer
    from editbench.testing import open_clip_tokenizer, tiny_text_encoder, tiny_vae

    if geometry == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=tiny_vae(scaling_factor=0.13025), text_encoder=tiny_text_encoder(768),
            text_encoder_2=tiny_text_encoder(1280, hidden_act="gelu", projection_dim=1280, pad_token_id=0),
            tokenizer=clip_tokenizer(), tokenizer_2=open_clip_tokenizer(), unet=full_unet(geometry, dtype),
            scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             steps_offset=1, timestep_spacing="leading"),
            add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(
            vae=tiny_vae(), text_encoder=text_encoder(TEXT_WIDTH[geometry]), tokenizer=clip_tokenizer(),
            unet=full_unet(geometry, dtype),
            scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                    steps_offset=1),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def config_overrides(method: str, **wanted: Any) -> dict:
    """``wanted`` restricted to the fields ``method``'s Config has (prior preservation off, checkpoints off)."""
    fields = {f.name for f in dataclasses.fields(methods.get(method).Config)}
    base = {"with_prior_preservation": False, "checkpoint_every": 0}
    return {k: v for k, v in {**base, **wanted}.items() if k in fields}


# ----------------------------------------------------------------------------------------------------------------
# artifacts
# ----------------------------------------------------------------------------------------------------------------

def build_artifact(method: str, pipe, concept, *, fingerprints: dict | None = None, reference: bool = False,
                   **config: Any):
    """The artifact ``Editor.fit`` would save, built by ``Editor.shaped_artifact`` (the method's own training
    session, no optimizer step): tensor shapes and metadata entries are exactly those of a trained artifact, only
    the values differ, and file sizes do not depend on values. ``fingerprints`` caches base fingerprints across
    methods that read the same weights. ``reference``: from the method's ``Config.reference()`` (the published
    settings for real Stable Diffusion, e.g. LoRA rank 4) instead of its toy-world defaults (LoRA rank 2)."""
    cls = methods.get(method)
    editor = cls(cls.Config.reference() if reference else None, **config_overrides(method, **config))
    key = "default" if type(editor).affected_tensors is methods.Editor.affected_tensors else method
    fingerprints = {} if fingerprints is None else fingerprints
    if key not in fingerprints:
        fingerprints[key] = editor.fingerprint(pipe)
    return editor.shaped_artifact(pipe, concept, base_fingerprint=fingerprints[key])
