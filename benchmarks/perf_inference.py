"""Inference overhead: sampling time with Perfusion (1 and 10 concepts) and unfused peft LoRA (1 and 10 adapters)
against the unedited model and against each other, interleaved in one process."""

from __future__ import annotations

import copy

import torch
from perf_common import bench_pipeline, build_artifact, interleaved, median, random_concept, ratio, resolution


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


def uncached_case(setup: dict, n: int, counts: tuple[int, ...] = (1, 10)):
    """The ``perfusion_<n>`` case of :func:`inference_setup` (built for ``counts``) with Perfusion's per-step output
    cache switched off while it runs: the code path before the cache."""
    layers = [h for h in setup["handles"] if "bank" in h.info][list(counts).index(n)].info["layers"]
    run = setup["cases"][f"perfusion_{n}"]

    def uncached():
        for layer in layers.values():
            layer.cache_outputs = False
        try:
            return run()
        finally:
            for layer in layers.values():
                layer.cache_outputs = True
    return uncached


def measure_inference(kind: str = "auto", rounds: int = 7, steps: int = 25, counts: tuple[int, ...] = (1, 10),
                      compare_cache: bool = True) -> dict:
    """Sampling time ratios: Perfusion with 1 and 10 concepts and unfused LoRA with 1 and 10 adapters, against
    the unedited model and against each other, interleaved in one process. With ``compare_cache``, Perfusion
    also runs with its per-step output cache switched off (the code path before the fix)."""
    setup = inference_setup(kind, tuple(counts), steps)
    cases = setup["cases"]
    if compare_cache:
        for n in counts:
            cases[f"perfusion_{n}_nocache"] = uncached_case(setup, n, counts)
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
