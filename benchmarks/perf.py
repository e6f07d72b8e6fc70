"""Measurement code shared by the pytest-benchmark files (``benchmarks/test_bench_*.py``) and ``run_all.py``.

Every comparison is measured side by side in one process (or one series of fresh subprocesses) and reported as a
ratio against its peer: absolute times on a shared CPU move by tens of percent from minute to minute, ratios of
interleaved runs much less. Absolute numbers are kept as context only.

Sections: machine description; timing and memory helpers; models (toy world / tiny pipeline, geometry-only
SD 1.5 / SD 2.1 / SDXL pipelines); artifact building; storage; inference overhead; training step time and
memory; closed-form merge; covariance estimation; the ``toy-quick`` suite.

Run one measurement in a fresh process with ``python benchmarks/perf.py <what> [json args]`` (prints one JSON
line); ``run_all.py`` does this for everything that measures peak memory.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from typing_extensions import Self

from editbench.methods import BUILTIN

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("EDITBENCH_BENCH_WORK") or ROOT / ".benchmarks" / "work")
os.environ.setdefault("EDITBENCH_CACHE", str(WORK / "cache"))  # hermetic caches (text covariance, class images)

METHODS = BUILTIN  # every built-in method of the registry
GEOMETRIES = ("sd15", "sd21", "sdxl")
TEXT_WIDTH = {"sd15": 768, "sd21": 1024, "sdxl": 2048}


# ----------------------------------------------------------------------------------------------------------------
# machine
# ----------------------------------------------------------------------------------------------------------------

def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def competing_jobs() -> list[str]:
    """Command lines of known CPU-heavy jobs that would distort measurements (the toy-world training)."""
    out = _run(["pgrep", "-af", "launch_world"])
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
        "nproc": _run(["nproc"]),
        "lscpu_head": "\n".join(_run(["lscpu"]).splitlines()[:10]),
        "mem_total": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
        "loadavg": _run(["cat", "/proc/loadavg"]),
        "git": _run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]) + (
            " (+ uncommitted changes)" if _run(["git", "-C", str(ROOT), "status", "--porcelain"]) else ""),
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
    """Run ``measure_<what>(**kwargs)`` of this module in a fresh Python process; its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), what, json.dumps(kwargs)]
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

        folder = toy_model_dir()
        if folder is None:
            raise RuntimeError("the toy world's weights are not there yet")
        pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)  # as load_pipeline()
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
    from editbench import methods
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
    """A ``StableDiffusionPipeline`` with the full-size UNet of ``geometry`` (random weights), a 2-layer CLIP text
    encoder of the geometry's text width, the tiny VAE and the real tokenizer. Only widths matter for artifacts.

    SDXL's two text encoders (768 + 1280, concatenated to 2048) are stood in for by ONE 2048-wide encoder: same
    number of floats per token embedding and per text vector, which is what artifacts store.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from editbench.models import clip_tokenizer
    from editbench.testing import tiny_vae

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
    from editbench import methods

    fields = {f.name for f in dataclasses.fields(methods.get(method).Config)}
    base = {"with_prior_preservation": False, "checkpoint_every": 0}
    return {k: v for k, v in {**base, **wanted}.items() if k in fields}


# ----------------------------------------------------------------------------------------------------------------
# artifacts
# ----------------------------------------------------------------------------------------------------------------

def build_artifact(method: str, pipe, concept, *, fingerprints: dict | None = None, **config: Any):
    """The artifact ``Editor.fit`` would save, built by ``Editor.shaped_artifact`` (the method's own training
    session, no optimizer step): tensor shapes and metadata entries are exactly those of a trained artifact, only
    the values differ, and file sizes do not depend on values. ``fingerprints`` caches base fingerprints across
    methods that read the same weights."""
    from editbench import methods

    editor = methods.get(method)(**config_overrides(method, **config))
    key = "default" if type(editor).affected_tensors is methods.Editor.affected_tensors else method
    fingerprints = {} if fingerprints is None else fingerprints
    if key not in fingerprints:
        fingerprints[key] = editor.fingerprint(pipe)
    return editor.shaped_artifact(pipe, concept, base_fingerprint=fingerprints[key])


def safetensors_size(art, dtype: torch.dtype | None) -> int:
    """Size of ``art.save(path, dtype=dtype)`` computed without writing it: 8 bytes + the JSON header (dtype,
    shape and offsets of every tensor + ``__metadata__``, padded to 8 bytes) + the tensor bytes, as safetensors
    lays files out. Used where writing would need several copies of an SDXL UNet in RAM; checked against the
    real files of the other cases in :func:`measure_storage` (``*_derived_error``)."""
    sizes = {}
    for k, v in art.tensors.items():
        dt = dtype if (dtype is not None and v.is_floating_point()) else v.dtype
        sizes[k] = (_ST_NAMES[dt], list(v.shape), v.numel() * torch.empty((), dtype=dt).element_size())
    offset, entries = 0, {}
    for k in sorted(sizes):
        entries[k] = {"dtype": sizes[k][0], "shape": sizes[k][1], "data_offsets": [offset, offset + sizes[k][2]]}
        offset += sizes[k][2]
    head = json.dumps({"__metadata__": _artifact_header(art, sizes), **entries}, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return 8 + len(head) + offset


_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32"}


def _dtype_of(name: str) -> torch.dtype:
    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
            "I64": torch.int64, "I32": torch.int32}[name]


def _artifact_header(art, sizes: dict) -> dict:
    """The ``editbench`` header entry ``Artifact.save`` writes, with a placeholder checksum of the same length."""
    from editbench import __version__
    from editbench.methods.base import _RESERVED, ARTIFACT_FORMAT

    meta = {k: v for k, v in art.metadata.items() if k not in _RESERVED}
    meta.update(format=ARTIFACT_FORMAT, method=art.method, library_version=__version__,
                shapes={k: sizes[k][1] for k in sorted(sizes)},
                dtypes={k: str(_dtype_of(sizes[k][0])).removeprefix("torch.") for k in sorted(sizes)},
                checksum="0" * 16)
    return {"editbench": json.dumps(meta, sort_keys=True)}


# ----------------------------------------------------------------------------------------------------------------
# storage
# ----------------------------------------------------------------------------------------------------------------

STORAGE_NOTES = {  # what the artifact holds, for the storage table
    "perfusion": "embedding + i* + o*_V per layer (o*_K recomputed from the superclass; C cached per base model)",
    "custom_diffusion": "full K/V deltas of every cross-attention layer + modifier embedding (uncompressed)",
    "textual_inversion": "one embedding vector",
    "lora": "peft rank-4 adapters on to_q/to_k/to_v/to_out.0 of every attention layer",
    "dreambooth": "the whole UNet",
}
SDXL_NOTE = ("SDXL: no editbench method trains SDXL end to end yet (Perfusion refuses pipelines with a second text "
             "encoder; the others have no added_cond_kwargs); sizes are from the methods' artifact builders on an "
             "SD-style pipeline with the SDXL UNet and one 2048-wide text encoder (same float count as SDXL's "
             "768 + 1280)")


def measure_storage(geometry: str = "sd15", out: str | None = None, derive_dreambooth: bool | None = None) -> dict:
    """Bytes on disk of one concept's artifact for every method on ``geometry`` (float32 and float16 files).

    DreamBooth on SDXL is derived from shapes (:func:`safetensors_size`) unless ``derive_dreambooth=False``:
    writing it needs about four copies of the UNet in RAM (artifact clone, writer clone, serialised bytes).
    """
    from editbench.methods.base import Artifact

    if derive_dreambooth is None:
        derive_dreambooth = geometry == "sdxl"
    folder = Path(out or tempfile.mkdtemp(prefix=f"editbench-storage-{geometry}-", dir=WORK.parent))
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pipe = geometry_pipeline(geometry, torch.float16 if derive_dreambooth else torch.float32)
    unet_params = sum(p.numel() for p in pipe.unet.parameters())
    build_s = time.perf_counter() - t0
    fps: dict = {}
    rows = {}
    for method in METHODS:
        concept = random_concept(placeholder_for(method), "dog", size=resolution(pipe))
        t = time.perf_counter()
        art = build_artifact(method, pipe, concept, fingerprints=fps)
        row = {"tensors": len(art.tensors), "floats": int(sum(v.numel() for v in art.tensors.values())),
               "build_s": round(time.perf_counter() - t, 2), "note": STORAGE_NOTES.get(method, "")}
        for label, dtype in (("float32", torch.float32), ("float16", torch.float16)):
            derived = safetensors_size(art, dtype)
            if method == "dreambooth" and derive_dreambooth:
                row[label] = derived
                row[f"{label}_how"] = "derived from shapes (not written)"
                continue
            path = folder / f"{method}-{label}.safetensors"
            art.save(path, dtype=dtype)
            row[label] = path.stat().st_size
            row[f"{label}_how"] = "saved file"
            row[f"{label}_derived_error"] = derived - row[label]   # check of safetensors_size
            Artifact.load(path, method=method) if row[label] < 1 << 30 else None  # loadable
            path.unlink()
        rows[method] = row
        del art
        gc.collect()
    return {"geometry": geometry, "unet_params": unet_params, "text_width": TEXT_WIDTH[geometry],
            "pipeline_build_s": round(build_s, 1), "methods": rows, "note": SDXL_NOTE if geometry == "sdxl" else ""}


# ----------------------------------------------------------------------------------------------------------------
# inference overhead
# ----------------------------------------------------------------------------------------------------------------

def perfusion_artifacts(pipe, n: int, superclass: str = "star"):
    """``n`` Perfusion artifacts for ``pipe`` from the method's builder, with distinct placeholders; their tensors
    are perturbed at random so that the concepts are distinct (independent ``i*``) and change the output."""
    fps: dict = {}
    arts = []
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        art = build_artifact("perfusion", pipe, random_concept(f"<bench-{i}>", superclass, size=resolution(pipe),
                                                               seed=i), fingerprints=fps)
        for k, v in art.tensors.items():  # untrained artifacts all start at the superclass: make them distinct
            art.tensors[k] = v + 0.3 * v.std() * torch.randn(v.shape, generator=g)
        arts.append(art)
    return arts


def lora_artifacts(pipe, n: int, superclass: str = "star"):
    """``n`` LoRA artifacts (rank 4, the default targets) with non-zero up-projections."""
    fps: dict = {}
    arts = []
    g = torch.Generator().manual_seed(2)
    for i in range(n):
        art = build_artifact("lora", pipe, random_concept("sks", superclass,
                                                          size=resolution(pipe), seed=i), fingerprints=fps)
        for k, v in art.tensors.items():
            if ".lora_B." in k:
                art.tensors[k] = 0.01 * torch.randn(v.shape, generator=g, dtype=v.dtype)
        arts.append(art)
    return arts


def inference_setup(kind: str = "auto", counts: tuple[int, ...] = (1, 10), steps: int = 25,
                    guidance_scale: float = 3.0, perfusion_cache: bool | None = None) -> dict:
    """One pipeline per case, each edited once: ``base``, ``perfusion_<n>``, ``lora_<n>`` (peft, unfused).

    Returns ``{"cases": {name: callable sampling one image}, "pipeline": name, "prompt": ...}``. The prompt holds
    one concept word (each method's own placeholder) so Perfusion's key-locking path runs. ``perfusion_cache``
    (None: library default) switches Perfusion's per-step output cache, for before/after measurements.
    """
    from editbench.methods.lora import LoRAEditor
    from editbench.methods.perfusion import PerfusionEditor

    base, name = bench_pipeline(kind)
    size = resolution(base)
    superclass = "star"
    cases, handles = {}, []

    def sampler(pipe, prompt):
        def run():
            g = torch.Generator().manual_seed(0)
            return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, height=size, width=size,
                        generator=g, output_type="pt").images
        return run

    cases["base"] = sampler(base, f"a {superclass} in the center")
    for n in counts:
        pipe = copy.deepcopy(base)
        handles.append(PerfusionEditor().apply(pipe, perfusion_artifacts(pipe, n, superclass)))
        if perfusion_cache is not None:
            for layer in handles[-1].info["layers"].values():
                layer.cache_outputs = perfusion_cache
        cases[f"perfusion_{n}"] = sampler(pipe, f"a <bench-0> {superclass} in the center")
    for n in counts:
        pipe = copy.deepcopy(base)
        handles.append(LoRAEditor().apply(pipe, lora_artifacts(pipe, n, superclass)))
        cases[f"lora_{n}"] = sampler(pipe, f"a sks {superclass} in the center")
    return {"cases": cases, "handles": handles, "pipeline": name, "steps": steps, "guidance_scale": guidance_scale,
            "size": size}


def measure_inference(kind: str = "auto", rounds: int = 7, steps: int = 25, counts: tuple[int, ...] = (1, 10),
                      compare_cache: bool = True) -> dict:
    """Sampling time ratios: Perfusion with 1 and 10 concepts and unfused LoRA with 1 and 10 adapters, against
    the unedited model and against each other, interleaved in one process. With ``compare_cache``, Perfusion
    also runs with its per-step output cache switched off (the code path before the fix)."""
    setup = inference_setup(kind, tuple(counts), steps)
    cases = setup["cases"]
    if compare_cache:
        for n in counts:
            key = f"perfusion_{n}"
            pipe_fn = cases[key]
            layers = [h for h in setup["handles"] if "bank" in h.info][list(counts).index(n)].info["layers"]

            def uncached(fn=pipe_fn, layers=layers):
                for layer in layers.values():
                    layer.cache_outputs = False
                try:
                    return fn()
                finally:
                    for layer in layers.values():
                        layer.cache_outputs = True
            cases[f"{key}_nocache"] = uncached
    times = interleaved(cases, rounds=rounds, warmup=1)
    ratios = {}
    for n in counts:
        ratios[f"perfusion_{n}/base"] = ratio(times, f"perfusion_{n}", "base")
        ratios[f"lora_{n}/base"] = ratio(times, f"lora_{n}", "base")
        ratios[f"perfusion_{n}/lora_{n}"] = ratio(times, f"perfusion_{n}", f"lora_{n}")
        if compare_cache:
            ratios[f"perfusion_{n}_nocache/base"] = ratio(times, f"perfusion_{n}_nocache", "base")
    return {"pipeline": setup["pipeline"], "steps": steps, "guidance_scale": setup["guidance_scale"],
            "size": setup["size"], "rounds": rounds, "median_s": {k: median(v) for k, v in times.items()},
            "ratios": ratios}


# ----------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------

def measure_training(method: str, kind: str = "auto", steps: int = 8, batch_size: int = 4, seed: int = 0) -> dict:
    """One method's optimizer-step time (median of steps 3..``steps``) and peak RSS above the loaded pipeline,
    for ``fit`` on ``kind``'s pipeline with ``batch_size`` and no prior preservation (the same batch for every
    method). Run it in a fresh process (:func:`in_subprocess`) so peaks are not hidden by earlier allocations."""
    from editbench import methods

    torch.manual_seed(seed)
    pipe, name = bench_pipeline(kind)
    size = resolution(pipe)
    concept = random_concept(placeholder_for(method), "star", size=size)
    editor = methods.get(method)(**config_overrides(method, steps=steps, batch_size=batch_size, grad_accum=1))
    if method == "perfusion":  # the text second moment is computed once per base model and cached: not per fit
        from editbench.methods.perfusion import text_covariance

        text_covariance(pipe)
    stamps: list[float] = []
    prepare = editor.prepare_training

    def timed_prepare(*args, **kwargs):
        session = prepare(*args, **kwargs)
        after = session.after_step

        def after_step(step):
            after(step)
            stamps.append(time.perf_counter())
        session.after_step = after_step
        return session

    editor.prepare_training = timed_prepare
    with PeakRSS() as mem:
        t = time.perf_counter()
        art = editor.fit(pipe, concept, progress=False, seed=seed)
        fit_s = time.perf_counter() - t
    diffs = [b - a for a, b in itertools.pairwise(stamps)][1:]  # steps 3.. (step 1 has no start stamp, 2 warms up)
    trainable = int(sum(p.numel() for p in _trainable(art)))
    return {"method": method, "pipeline": name, "steps": steps, "batch_size": batch_size,
            "step_s": median(diffs), "step_s_all": diffs, "fit_s": fit_s, "peak_rss_delta": mem.delta,
            "reported_peak": art.metadata["training"]["peak_memory_bytes"], "artifact_floats": trainable}


def _trainable(art) -> list[torch.Tensor]:
    return list(art.tensors.values())


def measure_training_all(kind: str = "auto", rounds: int = 2, steps: int = 8, batch_size: int = 4,
                         method_list: tuple[str, ...] = METHODS) -> dict:
    """:func:`measure_training` of every method in fresh processes, ``rounds`` rounds interleaved; ratios of each
    method to DreamBooth's run of the same round (median over rounds)."""
    runs: dict[str, list[dict]] = {m: [] for m in method_list}
    for r in range(rounds):
        order = list(method_list) if r % 2 == 0 else list(reversed(method_list))
        for m in order:
            runs[m].append(in_subprocess("training", method=m, kind=kind, steps=steps, batch_size=batch_size))
    ref = "dreambooth"
    out = {"pipeline": runs[method_list[0]][0]["pipeline"], "rounds": rounds, "steps": steps,
           "batch_size": batch_size, "methods": {}}
    for m in method_list:
        rows = runs[m]
        out["methods"][m] = {
            "step_s": median([x["step_s"] for x in rows]),
            "peak_rss_delta": median([x["peak_rss_delta"] for x in rows]),
            "reported_peak": median([x["reported_peak"] for x in rows]),
            "time_vs_dreambooth": median([x["step_s"] / y["step_s"] for x, y in zip(rows, runs[ref])]),
            "memory_vs_dreambooth": median([x["peak_rss_delta"] / y["peak_rss_delta"]
                                            for x, y in zip(rows, runs[ref])]),
        }
    return out


# ----------------------------------------------------------------------------------------------------------------
# closed-form merge
# ----------------------------------------------------------------------------------------------------------------

def merge_problem(n_concepts: int, geometry: str = "sd15", rows_per_concept: int = 6, seed: int = 0):
    """Custom Diffusion's merge inputs at full geometry: ``base`` ``{projection: W0}`` (every cross-attention K
    and V: 32 on SD 1.5), per concept tuned weights (float64, as ``CustomDiffusionEditor.merge`` builds them),
    per concept ``rows_per_concept`` keys (``"<new> cat"`` and ``"photo of a <new> cat"`` give 6 on SD 1.5) and the
    cached text second moment ``C`` (ridged, float64)."""
    from diffusers import UNet2DConditionModel

    from editbench.moments import SecondMoment
    from editbench.sites import find_cross_attention_sites
    from editbench.testing import unet_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(geometry, full=True))
    shapes = {}
    for s in find_cross_attention_sites(unet):
        shapes[s.key_name] = tuple(s.key.weight.shape)
        shapes[s.value_name] = tuple(s.value.weight.shape)
    d = TEXT_WIDTH[geometry]
    g = torch.Generator().manual_seed(seed)
    base = {n: 0.02 * torch.randn(shape, generator=g) for n, shape in shapes.items()}
    tuned = [{n: w.double() + 1e-3 * torch.randn(w.shape, generator=g, dtype=torch.float64) for n, w in base.items()}
             for _ in range(n_concepts)]
    keys = [torch.randn(rows_per_concept, d, generator=g, dtype=torch.float64) for _ in range(n_concepts)]
    moment = SecondMoment(d).update(torch.randn(12 * d, d, generator=g) + 0.3 * torch.randn(d, generator=g))
    return base, tuned, keys, moment.matrix(ridge=1e-6)


def _closed_form_edit_before(weight, keys, values, *, cov):
    """``editbench.solver.closed_form_edit`` (hard form) as it was before the fixes: checks and factors ``cov``
    on every call and adds the update to ``W0`` as a transposed view. Same helpers, same float64 algorithm."""
    from scipy.linalg import solve_triangular

    from editbench import solver as S

    w0, k, v = S._f64("weight", weight, 2), S._f64("keys", keys, 2), S._f64("values", values, 2)
    S._check_edit_shapes(w0, k, v)
    low = S._cholesky(S._cov(cov, w0.shape[1]), "cov", "add a ridge")
    k, v = S._drop_duplicates(k, v)
    r = v.T - w0 @ k.T
    u, s, vt = S._whitened_svd(k, low)
    f = S._hard_filter(s, *k.shape)
    p = solve_triangular(low, u, lower=True, trans="T", check_finite=False)
    return S._like(w0 + ((p * f) @ (vt @ r.T)).T, weight)


def merge_unfactored(base, tuned, keys, cov):
    """``merge_projections`` as it was before the fixes (the solver call per projection re-factors ``C`` and adds a
    transposed update; values built row by row): the "before", kept for side-by-side timing."""
    from editbench.methods.custom_diffusion.merge import MergeResult

    closed_form_edit = _closed_form_edit_before

    k_all = torch.cat([k.double() for k in keys])
    owner = torch.cat([torch.full((len(k),), i) for i, k in enumerate(keys)])
    _, first = torch.unique(k_all, dim=0, return_inverse=True)
    seen: set[int] = set()
    keep = [i for i, g in enumerate(first.tolist()) if not (g in seen or seen.add(g))]
    k, owner = k_all[keep], owner[keep]
    weights, values = {}, {}
    for name, w0 in base.items():
        v = torch.stack([tuned[int(j)][name].double() @ k[r] for r, j in enumerate(owner)])
        weights[name] = closed_form_edit(w0.double(), k, v, cov=cov)
        values[name] = v
    return MergeResult(weights, k, values)


def measure_merge(counts: tuple[int, ...] = (2, 10), rounds: int = 5, geometry: str = "sd15") -> dict:
    """Time of Custom Diffusion's ``merge_projections`` (factored solver) against the unfactored code, for 2 and
    10 concepts at full ``geometry``, interleaved; plus the largest difference between their weights."""
    from editbench.methods.custom_diffusion.merge import merge_projections

    out = {"geometry": geometry, "rounds": rounds, "cases": {}}
    for n in counts:
        problem = merge_problem(n, geometry)
        times = interleaved({"factored": lambda p=problem: merge_projections(*p),
                             "unfactored": lambda p=problem: merge_unfactored(*p)}, rounds=rounds, warmup=1)
        new, old = merge_projections(*problem), merge_unfactored(*problem)
        diff = max(float((new.weights[k] - old.weights[k]).abs().max()) for k in new.weights)
        resid = max(float((new.weights[k] @ new.keys.T - new.values[k].T).abs().max()) for k in new.weights)
        out["cases"][n] = {"projections": len(problem[0]), "keys": int(new.keys.shape[0]),
                           "factored_s": median(times["factored"]), "unfactored_s": median(times["unfactored"]),
                           "factored/unfactored": ratio(times, "factored", "unfactored"),
                           "max_abs_weight_diff": diff, "max_constraint_residual": resid}
        del problem
        gc.collect()
    return out


# ----------------------------------------------------------------------------------------------------------------
# covariance estimation
# ----------------------------------------------------------------------------------------------------------------

class _PadTo77:
    """A tokenizer that pads every batch to 77 tokens whatever it is asked: ``estimate_text_covariance`` as it was
    before it padded to the longest caption of the batch (the "before" of that fix)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **{**kwargs, "padding": "max_length", "max_length": 77})


def measure_covariance(encoder: str = "clip-l", n_captions: int = 640, batch_size: int = 64,
                       variant: str = "after", save_to: str | None = None) -> dict:
    """Tokens per second of :func:`editbench.text_covariance.estimate_text_covariance` and its peak RSS above the loaded
    encoder, for ``n_captions`` captions (the default corpus, cycled). ``encoder``: ``clip-l`` (SD 1.x's text
    tower shape: 12 layers, width 768, random weights) or ``toy`` (the toy world's / tiny pipeline's encoder)."""
    from editbench.models import clip_tokenizer
    from editbench.text_covariance import default_captions, estimate_text_covariance

    if encoder == "clip-l":
        model, label = text_encoder(768, full_clip=True), "CLIP ViT-L/14 text shape (12 x 768), random weights"
    else:
        pipe, name = bench_pipeline("auto")
        model, label = pipe.text_encoder, f"text encoder of the {name}"
    tok = clip_tokenizer() if variant == "after" else _PadTo77(clip_tokenizer())
    corpus = default_captions()
    captions = [corpus[i % len(corpus)] for i in range(n_captions)]
    estimate_text_covariance(model, tok, captions[:batch_size], batch_size=batch_size, progress=False)  # warm-up
    with PeakRSS() as mem:
        t = time.perf_counter()
        moment = estimate_text_covariance(model, tok, captions, batch_size=batch_size, progress=False)
        secs = time.perf_counter() - t
    if save_to:
        moment.save(save_to)
    return {"encoder": label, "variant": variant, "captions": n_captions, "tokens": moment.count, "seconds": secs,
            "matrix_sum": float(moment.matrix().sum()), "matrix_abs_sum": float(moment.matrix().abs().sum()),
            "tokens_per_s": moment.count / secs, "captions_per_s": n_captions / secs, "peak_rss_delta": mem.delta,
            "moment_bytes": moment.dim * moment.dim * 8, "batch_size": batch_size}


# ----------------------------------------------------------------------------------------------------------------
# before/after of the library fixes that are not measured elsewhere (fingerprint, artifact writing)
# ----------------------------------------------------------------------------------------------------------------

def _update_with_tensor_copying(digest: Any, name: str, tensor: torch.Tensor) -> None:
    """``editbench.fingerprint.update_with_tensor`` before the fix: hashed a ``bytes`` copy of every tensor."""
    t = tensor.detach()
    digest.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}|".encode())
    if t.numel():
        digest.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _write_safetensors_cloning(path, tensors, metadata):
    """``editbench.storage.write_safetensors`` before the fix: cloned every tensor before writing."""
    from safetensors.torch import save_file

    from editbench.storage import atomic_target

    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_target(path) as tmp:
        save_file(flat, str(tmp), metadata=dict(metadata))
    return Path(path)


def measure_fingerprint(variant: str = "after", geometry: str = "sd15") -> dict:
    """Time and peak RSS of fingerprinting a base model (text encoder + full-size UNet, what DreamBooth, LoRA,
    Custom Diffusion and textual inversion hash in every ``fit``/``apply``), with the current code ("after") or
    the copying one ("before"). Fresh process per call (:func:`in_subprocess`)."""
    import hashlib

    from editbench import fingerprint as F

    update = F.update_with_tensor if variant == "after" else _update_with_tensor_copying
    tensors = {**F.module_tensors(text_encoder(TEXT_WIDTH[geometry]), "text_encoder."),
               **F.module_tensors(full_unet(geometry), "unet.")}

    def run() -> str:
        d = hashlib.sha256(b"editbench-fingerprint/1|")
        for name in sorted(tensors):
            update(d, name, tensors[name])
        return d.hexdigest()[:16]

    with PeakRSS() as mem:
        t = time.perf_counter()
        digest = run()
        secs = time.perf_counter() - t
    t = time.perf_counter()
    run()
    secs2 = time.perf_counter() - t
    nbytes = sum(v.numel() * v.element_size() for v in tensors.values())
    return {"variant": variant, "geometry": geometry, "bytes": nbytes, "seconds": min(secs, secs2),
            "peak_rss_delta": mem.delta, "digest": digest}


def measure_save(variant: str = "after", geometry: str = "sd15") -> dict:
    """Time and peak RSS of ``Artifact.save`` of a DreamBooth artifact (the whole UNet, float32) with the current
    writer ("after") or the cloning one ("before"); fresh process per call."""
    import hashlib

    import editbench.methods.base as B

    if variant == "before":
        B.write_safetensors = _write_safetensors_cloning
    pipe = geometry_pipeline(geometry)
    art = build_artifact("dreambooth", pipe, random_concept("sks", "dog", size=resolution(pipe)))
    path = WORK.parent / f"save-bench-{variant}-{os.getpid()}.safetensors"
    try:
        with PeakRSS() as mem:
            t = time.perf_counter()
            art.save(path)
            secs = time.perf_counter() - t
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
        size = path.stat().st_size
    finally:
        path.unlink(missing_ok=True)
    return {"variant": variant, "geometry": geometry, "seconds": secs, "peak_rss_delta": mem.delta,
            "file_bytes": size, "file_sha256": h.hexdigest()[:16]}


# ----------------------------------------------------------------------------------------------------------------
# the toy-quick suite
# ----------------------------------------------------------------------------------------------------------------

def measure_suite(suite: str = "toy-quick", timeout: float = 3 * 3600) -> dict:
    """Wall time of ``editbench bench --suite <suite> --out <tmp>`` (a fresh output folder: nothing reused)."""
    out = Path(tempfile.mkdtemp(prefix=f"editbench-{suite}-"))
    cmd = [sys.executable, "-m", "editbench.cli", "bench", "--suite", suite, "--out", str(out)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    secs = time.perf_counter() - t
    return {"suite": suite, "command": " ".join(cmd[3:]), "seconds": secs, "returncode": proc.returncode,
            "out": str(out), "stderr_tail": proc.stderr[-2000:] if proc.returncode else ""}


def suite_available(suite: str = "toy-quick") -> tuple[bool, str]:
    """Whether ``editbench bench --suite <suite>`` exists yet, and why not."""
    try:
        from editbench.eval import spec as S
    except Exception as err:  # noqa: BLE001 (any import problem means: not available)
        return False, f"editbench.eval.spec does not import ({err!r})"
    names = {p.stem for p in Path(S.BUNDLED).glob("*.y*ml")} if Path(S.BUNDLED).is_dir() else set()
    if suite not in names:
        return False, f"no bundled suite {suite!r} in {S.BUNDLED} (found {sorted(names)})"
    from editbench.toyworld import WEIGHTS

    missing = [str((WEIGHTS / x).relative_to(ROOT))
               for x in ("model/model_index.json", "evaluator/open_clip_model.safetensors")
               if not (WEIGHTS / x).is_file()]
    if missing:
        return False, (f"the toy world's weights are not in the package yet ({', '.join(missing)} missing; the "
                       "trained world is in runs/world_out until it is committed), and the suite loads them from there")
    help_text = _run([sys.executable, "-m", "editbench.cli", "bench", "--help"])
    if "--suite" not in help_text:
        return False, "`editbench bench` has no --suite option yet"
    return True, ""


# ----------------------------------------------------------------------------------------------------------------

def main(argv: list[str]) -> None:
    what = argv[0]
    kwargs = json.loads(argv[1]) if len(argv) > 1 else {}
    fn = globals()[f"measure_{what}"]
    print(json.dumps(fn(**kwargs), default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
