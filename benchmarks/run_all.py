"""Run every performance measurement and write ``docs/performance.md`` (and the raw numbers as JSON).

    python benchmarks/run_all.py                       # everything (about an hour on 2 cores)
    python benchmarks/run_all.py --only merge,inference # some sections; the others are kept from the JSON
    python benchmarks/run_all.py --render               # only rewrite the markdown from the JSON

Take final measurements on an otherwise idle machine with ``OMP_NUM_THREADS`` set to the core count. Every
comparison is a ratio against its peer measured in the same run (interleaved rounds, or alternating fresh
processes for peak memory); absolute times are context only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu
import perf_merge
import perf_suite
import perf_training
from perf_common import ROOT, WORK, competing_jobs, in_subprocess, machine, median

SECTIONS = ("storage", "inference", "training", "merge", "covariance", "fixes", "suite")
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "performance.json"
DEFAULT_MD = ROOT / "docs" / "performance.md"


def run(section: str, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    if section == "storage":
        out = {"geometries": {g: in_subprocess("storage", geometry=g) for g in args.geometries}}
    elif section == "inference":
        out = in_subprocess("inference", kind=args.pipeline, rounds=args.rounds, steps=25)
    elif section == "training":
        out = perf_training.measure_training_all(args.pipeline, rounds=args.training_rounds, steps=12, batch_size=4)
    elif section == "merge":
        out = perf_merge.measure_merge((2, 10), rounds=args.rounds)
    elif section == "covariance":
        sizes = (512, 2048)
        out = {"clip-l": [in_subprocess("covariance", encoder="clip-l", n_captions=n) for n in sizes],
               "toy": [in_subprocess("covariance", encoder="toy", n_captions=n) for n in sizes],
               "compare": [in_subprocess("covariance", encoder="clip-l", n_captions=256, variant=v,
                                         save_to=str(WORK / f"cov-{v}.safetensors"))
                           for v in ("before", "after", "after", "before")]}
        from editbench.moments import SecondMoment

        ref = SecondMoment.load(WORK / "cov-before.safetensors").matrix()
        new = SecondMoment.load(WORK / "cov-after.safetensors").matrix()
        for r in out["compare"]:
            r["rel_diff_to_before"] = float((new - ref).norm() / ref.norm())
    elif section == "fixes":  # before/after of the library fixes not covered by the sections above
        out = {}
        for what in ("fingerprint", "save"):
            runs = []
            for r in range(2):
                for v in (("before", "after") if r % 2 == 0 else ("after", "before")):
                    runs.append(in_subprocess(what, variant=v, geometry="sd15"))
            out[what] = runs
    elif section == "suite":
        ok, why = perf_suite.suite_available("toy-quick")
        out = perf_suite.measure_suite("toy-quick") if ok else {"measured": False, "why": why}
    else:
        raise ValueError(section)
    out["section_wall_s"] = round(time.perf_counter() - t0, 1)
    out["machine"] = machine()
    return out


# ----------------------------------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------------------------------

def kb(n: float) -> str:
    if n >= 1 << 30:
        return f"{n / 1e9:.2f} GB"
    if n >= 1 << 20:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e3:.1f} KB"


def mb(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def yes(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def machine_block(m: dict) -> str:
    comp = ", ".join(m["competing_jobs"]) or "none"
    return "\n".join([
        table(["", ""], [["date (UTC)", m["date_utc"]], ["`nproc`", m["nproc"]], ["RAM", m["mem_total"]],
                         ["torch", m["torch"]], ["diffusers / transformers / peft",
                                                 f"{m['diffusers']} / {m['transformers']} / {m['peft']}"],
                         ["python", m["python"]], ["torch threads / OMP_NUM_THREADS",
                                                   f"{m['torch_threads']} / {m['OMP_NUM_THREADS']}"],
                         ["load average at the end", m["loadavg"]], ["git", m["git"]],
                         ["competing training job (`pgrep -f launch_world`)", comp]]),
        "", "`lscpu | head`:", "", "```", m["lscpu_head"], "```"])


def render(results: dict) -> str:
    L: list[str] = []
    add = L.append
    add("# Performance")
    add("")
    add("Generated by `python benchmarks/run_all.py` (raw numbers: `benchmarks/results/performance.json`); the same "
        "measurements run as pytest-benchmark files with `python -m pytest benchmarks --benchmark-only` (not part "
        "of the default `python -m pytest` run). Regenerate the page after any change that can move these numbers.")
    add("")
    add("**How to read it.** Every comparison is a *ratio against its peer measured in the same run*: timings are "
        "interleaved round by round (A B C, C B A, ...) and the ratio is the median over rounds of the per-round "
        "ratio; peak memory is the peak RSS above the loaded model, sampled every 2 ms in a fresh process per run, "
        "methods alternating. The CPU is shared with other developers, so absolute times (given as context) move by "
        "tens of percent between runs; the ratios much less. Goals are checked against the ratios.")
    add("")
    machines = [v["machine"] for v in results.values() if isinstance(v, dict) and "machine" in v]
    if machines:
        add("## Machine")
        add("")
        add(machine_block(machines[-1]))
        add("")
        dates = sorted(m["date_utc"] for m in machines)
        add(f"Sections were measured between {dates[0]} and {dates[-1]} UTC; each section's own machine snapshot "
            "(load, threads, competing jobs) is in the JSON.")
        add("")
    goals: list[list] = []
    body: list[str] = []

    # storage ----------------------------------------------------------------------------------------------------
    st = results.get("storage")
    if st:
        body.append("## 1. Storage per concept")
        body.append("")
        body.append("One concept's artifact file, as `Editor.fit` saves it, built by each method's own training "
                    "session (`prepare_training` + `session.artifact`, plus the metadata `fit` adds) on "
                    "geometry-only models: the real full-size UNet of each geometry with random weights, a 2-layer "
                    "CLIP text encoder of the right width (only widths matter for artifacts), saved with "
                    "`Artifact.save(dtype=...)` and measured on disk. No optimizer step is run: file sizes do not "
                    "depend on the values. Each method at its `Config.reference()` settings (the published ones "
                    "for real Stable Diffusion: LoRA rank 4), not its toy-world defaults. DreamBooth is reported as "
                    "it is (the whole UNet).")
        body.append("")
        for g, res in st["geometries"].items():
            rows = []
            ref = res["methods"]["dreambooth"]["float32"]
            for m, r in res["methods"].items():
                how = r["float32_how"]
                rows.append([m, kb(r["float32"]), kb(r["float16"]), f"{r['float32'] / ref:.2e}", f"{r['floats']:,}",
                             how, r["note"]])
            body.append(f"### {g} (UNet {res['unet_params'] / 1e6:.0f} M parameters, text width {res['text_width']})")
            body.append("")
            body.append(table(["method", "float32", "float16", "float32 / DreamBooth", "floats stored", "how",
                               "what is stored"], rows))
            body.append("")
            if res.get("note"):
                body.append(f"Note: {res['note']}.")
                body.append("")
            errs = [r.get("float32_derived_error") for r in res["methods"].values()
                    if r.get("float32_derived_error") is not None]
            if errs and any("derived" in r["float32_how"] for r in res["methods"].values()):
                body.append(f"The derived size formula differs from the real files of the other methods on this "
                            f"geometry by at most {max(abs(e) for e in errs)} bytes.")
                body.append("")
        sd15 = st["geometries"].get("sd15")
        if sd15:
            p = sd15["methods"]["perfusion"]
            goals.append(["Perfusion artifact on SD 1.5, float32", "<= 110 KB", kb(p["float32"]),
                          yes(p["float32"] <= 110_000)])
            goals.append(["Perfusion artifact on SD 1.5, float16", "<= 60 KB", kb(p["float16"]),
                          yes(p["float16"] <= 60_000)])

    # inference --------------------------------------------------------------------------------------------------
    inf = results.get("inference")
    if inf:
        r = inf["ratios"]
        body.append("## 2. Inference overhead")
        body.append("")
        body.append(f"Sampling one image with the {inf['pipeline']}: {inf['steps']} DDIM steps, classifier-free "
                    f"guidance {inf['guidance_scale']} (UNet batch 2), {inf['size']} px, VAE decode included, "
                    f"{inf['rounds']} interleaved rounds. Each case has its own copy of the pipeline, edited once "
                    "before timing; the prompt holds one concept word (Perfusion's key-locking path runs). "
                    "Perfusion concepts and LoRA adapters come from the methods' artifact builders with random "
                    "values (cost does not depend on values). LoRA is peft's unfused adapters (rank 4, q/k/v/out), "
                    "all adapters active.")
        body.append("")
        rows = []
        for n in (1, 10):
            rows.append([f"Perfusion, {n} concept{'s' * (n > 1)}", f"{r[f'perfusion_{n}/base']:.3f}",
                         f"{r[f'perfusion_{n}/lora_{n}']:.3f}", f"{inf['median_s'][f'perfusion_{n}']:.3f}"])
            rows.append([f"LoRA (peft, unfused), {n} adapter{'s' * (n > 1)}", f"{r[f'lora_{n}/base']:.3f}", "1",
                         f"{inf['median_s'][f'lora_{n}']:.3f}"])
        rows.append(["unedited model", "1", "", f"{inf['median_s']['base']:.3f}"])
        body.append(table(["case", "time / unedited", "time / LoRA with as many adapters", "median s (context)"],
                          rows))
        body.append("")
        if "perfusion_1_nocache/base" in r:
            body.append("Before/after of the per-step output cache (same run, same pipelines; \"before\" switches the "
                        "cache off, which is exactly the previous code path):")
            body.append("")
            body.append(table(["case", "before (no cache) / unedited", "after / unedited"],
                              [[f"Perfusion, {n}", f"{r[f'perfusion_{n}_nocache/base']:.3f}",
                                f"{r[f'perfusion_{n}/base']:.3f}"] for n in (1, 10)]))
            body.append("")
        goals.append(["Perfusion sampling, 1 concept", "<= 1.05 x unedited", f"{r['perfusion_1/base']:.3f}",
                      yes(r["perfusion_1/base"] <= 1.05)])
        goals.append(["Perfusion sampling, 10 concepts", "<= 1.15 x unedited", f"{r['perfusion_10/base']:.3f}",
                      yes(r["perfusion_10/base"] <= 1.15)])

    # training ---------------------------------------------------------------------------------------------------
    tr = results.get("training")
    if tr:
        body.append("## 3. Training step time and peak memory")
        body.append("")
        body.append(f"`Editor.fit` on the {tr['pipeline']}, batch {tr['batch_size']}, gradient accumulation 1, prior "
                    f"preservation off for every method (same batch everywhere), {tr['steps']} steps; step time is "
                    "the median optimizer-step time of steps 3 onwards (setup excluded); peak memory is the peak RSS "
                    "above the loaded pipeline during the whole `fit` (DreamBooth's float32 UNet copy included), in a "
                    f"fresh process per run; {tr['rounds']} rounds, methods alternating, ratios against the "
                    "DreamBooth run of the same round (median).")
        body.append("")
        rows = []
        for m, x in tr["methods"].items():
            rows.append([m, f"{x['time_vs_dreambooth']:.2f}", f"{x['memory_vs_dreambooth']:.2f}",
                         f"{x['step_s'] * 1000:.0f} ms", mb(x["peak_rss_delta"])])
        body.append(table(["method", "step time / DreamBooth", "peak memory / DreamBooth", "step (context)",
                           "peak RSS above the model (context)"], rows))
        body.append("")
        body.append("At this scale (toy UNet 5.2 M parameters) activations dominate memory. What grows with the "
                    "model is the optimizer state: DreamBooth trains every UNet weight in float32 with AdamW "
                    "(weights + gradients + 2 moments = 16 bytes per parameter: 13.8 GB for SD 1.5's 860 M "
                    "parameters, on top of the base model), Perfusion 14,016 floats on SD 1.5 (embedding, i*, "
                    "16 o*_V) plus the activations of a backward pass that needs no weight gradients.")
        body.append("")
        p = tr["methods"].get("perfusion")
        if p:
            goals.append(["Perfusion training step time", "<= 0.8 x DreamBooth", f"{p['time_vs_dreambooth']:.2f}",
                          yes(p["time_vs_dreambooth"] <= 0.8)])
            goals.append(["Perfusion training peak memory", "<= 0.6 x DreamBooth", f"{p['memory_vs_dreambooth']:.2f}",
                          yes(p["memory_vs_dreambooth"] <= 0.6)])

    # merge ------------------------------------------------------------------------------------------------------
    mg = results.get("merge")
    if mg:
        body.append("## 4. Closed-form merge (Custom Diffusion)")
        body.append("")
        body.append("`merge_projections` on SD 1.5 geometry: 32 projections (16 cross-attention layers, K and V, "
                    "output widths 320-1280, input 768), 6 keys per concept, cached regularization statistics "
                    "(`C` given, ridged), float64. \"unfactored\" is the previous code (the solver per projection, "
                    "re-checking and re-factoring `C` every call and adding a transposed update, values built row "
                    "by row), kept in `benchmarks/perf_merge.py` and timed in the same run; both give the same weights "
                    "(difference column).")
        body.append("")
        rows = []
        for n, c in mg["cases"].items():
            rows.append([n, c["keys"], f"{c['factored_s']:.3f} s", f"{c['unfactored_s']:.3f} s",
                         f"{c['factored/unfactored']:.3f}", f"{c['max_abs_weight_diff']:.1e}",
                         f"{c['max_constraint_residual']:.1e}"])
        body.append(table(["concepts", "keys", "factored (now)", "unfactored (before)", "now / before",
                           "max weight difference", "max residual of W K^T = V^T"], rows))
        body.append("")
        two = mg["cases"].get("2") or mg["cases"].get(2)
        if two:
            goals.append(["Merge of 2 concepts on SD 1.5 geometry", "<= 1 s", f"{two['factored_s']:.3f} s",
                          yes(two["factored_s"] <= 1.0)])

    # covariance -------------------------------------------------------------------------------------------------
    cv = results.get("covariance")
    if cv:
        body.append("## 5. Covariance estimation")
        body.append("")
        body.append("`estimate_text_covariance` (batch 64, captions from the default corpus, cycled), in a fresh "
                    "process per run; throughput counts the token vectors accumulated (start token and padding "
                    "dropped). Memory is the peak RSS above the loaded encoder for two corpus sizes: it must not "
                    "grow with the corpus (one float64 d x d sum is kept).")
        body.append("")
        rows = []
        for key in ("clip-l", "toy"):
            for x in cv.get(key, []):
                rows.append([x["encoder"], x["captions"], f"{x['tokens']:,}", f"{x['tokens_per_s']:,.0f}",
                             mb(x["peak_rss_delta"]), kb(x["moment_bytes"])])
        body.append(table(["encoder", "captions", "tokens", "tokens / s", "peak RSS above the encoder",
                           "moment (d x d float64)"], rows))
        body.append("")
        for key in ("clip-l", "toy"):
            runs = cv.get(key, [])
            if len(runs) == 2:
                a, b = runs
                body.append(f"- {a['encoder']}: {b['captions'] / a['captions']:.0f}x the captions -> peak "
                            f"{mb(a['peak_rss_delta'])} vs {mb(b['peak_rss_delta'])} (difference "
                            f"{(b['peak_rss_delta'] - a['peak_rss_delta']) / 2**20:+.0f} MiB; differences of this "
                            "size go either way from run to run (allocator caching), the accumulator is one fixed "
                            "d x d sum).")
        if "compare" in cv:
            before = [r for r in cv["compare"] if r["variant"] == "before"]
            after = [r for r in cv["compare"] if r["variant"] == "after"]
            body.append("- Peak memory also fell with the padding fix below: "
                        f"{mb(median([r['peak_rss_delta'] for r in before]))} "
                        f"(batches padded to 77 tokens) -> {mb(median([r['peak_rss_delta'] for r in after]))} "
                        f"({before[0]['captions']} captions, CLIP ViT-L/14 shape).")
        body.append("")

    # suite ------------------------------------------------------------------------------------------------------
    su = results.get("suite")
    body.append("## 6. `toy-quick` suite wall time")
    body.append("")
    if su and su.get("measured", True) and su.get("returncode") == 0:
        body.append(f"`editbench {su['command']}` (fresh output folder): **{su['seconds'] / 60:.1f} min** "
                    "(absolute, on the machine above).")
    elif su and su.get("measured", True):
        body.append(f"**Not measured successfully**: `editbench {su['command']}` exited with {su['returncode']} "
                    f"after {su['seconds']:.0f} s:\n\n```\n{su['stderr_tail']}\n```")
    else:
        why = su["why"] if su else "the section was not run"
        body.append(f"**NOT MEASURED**: {why}.")
    body.append("")

    # goals first --------------------------------------------------------------------------------------------------
    if goals:
        add("## Goals")
        add("")
        add(table(["goal", "target", "measured", ""], goals))
        add("")
    L.extend(body)
    add(gpu.doc_section())  # benchmarks/gpu.py: how to run it, its format, the last GPU run's table
    add(gpu.cpu_full_section())  # the same command at full size on this CPU, in fresh processes
    add("## Fixes made for these numbers (before / after)")
    add("")
    add(fixes_block(results))
    add("")
    add("## Caveats and what is not measured")
    add("")
    for c in caveats(results):
        add(f"- {c}")
    add("")
    return "\n".join(L).rstrip() + "\n"


def _pair(runs: list[dict], key: str) -> tuple[float, float, float]:
    """Median before, median after, and median of the after/before ratio of alternating runs."""
    before = [r[key] for r in runs if r["variant"] == "before"]
    after = [r[key] for r in runs if r["variant"] == "after"]
    return median(before), median(after), median([a / max(b, 1e-12) for a, b in zip(after, before)])


def fixes_block(results: dict) -> str:
    rows = []
    mg, inf, fx = results.get("merge"), results.get("inference"), results.get("fixes")
    if mg:
        for n, c in mg["cases"].items():
            rows.append([("factor C once and the whitened SVD of the keys once for all projections "
                         "(`solver.Whitener`, `solver.closed_form_edit_many`, used by "
                         "`custom_diffusion/merge.py::merge_projections`, whose values are now built per concept "
                         "instead of per row); the solver's update is formed C-contiguous instead of being added "
                         "to `W0` as a transposed view (`solver._filtered_delta`)"),
                         f"Custom Diffusion merge, {n} concepts, SD 1.5 geometry", f"{c['unfactored_s']:.2f} s",
                         f"{c['factored_s']:.3f} s", f"{c['factored/unfactored']:.3f}"])
    if inf and "perfusion_1_nocache/base" in inf["ratios"]:
        r = inf["ratios"]
        for n in (1, 10):
            rows.append([("Perfusion K/V layers return their cached output when called again with the same, "
                         "unmodified text encoding and unchanged state (`perfusion/layers.py`)"),
                         f"sampling with {n} concept(s) / unedited", f"{r[f'perfusion_{n}_nocache/base']:.3f}",
                         f"{r[f'perfusion_{n}/base']:.3f}",
                         f"{r[f'perfusion_{n}/base'] / r[f'perfusion_{n}_nocache/base']:.3f}"])
    cv = results.get("covariance")
    if cv and "compare" in cv:
        runs = cv["compare"]
        b, a, q = _pair(runs, "tokens_per_s")
        agree = max(r.get("rel_diff_to_before", 0.0) for r in runs)
        rows.append([("`estimate_text_covariance` pads each batch to its longest caption instead of to 77 tokens "
                     "(`text_covariance.py`; the kept tokens' vectors do not depend on padding: same token count, "
                     f"C equal to float32 rounding, largest relative Frobenius difference of C {agree:.0e})"),
                     f"{runs[0]['encoder']}, {runs[0]['captions']} captions: tokens / s", f"{b:,.0f}", f"{a:,.0f}",
                     f"{a / b:.2f} (speed-up)"])
    if fx:
        fp = fx["fingerprint"]
        same = len({r["digest"] for r in fp}) == 1
        b, a, q = _pair(fp, "seconds")
        rows.append([("fingerprints hash tensors through the buffer protocol instead of a bytes copy "
                     f"(`fingerprint.py`; digests {'identical' if same else 'DIFFER'})"),
                     f"fingerprint of SD 1.5 text encoder + UNet ({fp[0]['bytes'] / 1e9:.2f} GB): time",
                     f"{b:.2f} s", f"{a:.2f} s", f"{q:.2f}"])
        b, a, _ = _pair(fp, "peak_rss_delta")
        rows.append(["(same)", "... peak memory above the model", mb(b), mb(a), f"{a / max(b, 1):.3f}"])
        sv = fx["save"]
        same = len({r["file_sha256"] for r in sv}) == 1
        b, a, q = _pair(sv, "peak_rss_delta")
        rows.append([("`write_safetensors` copies only tensors that share memory instead of every tensor "
                     f"(`storage.py`; files {'identical' if same else 'DIFFER'})"),
                     (f"saving a DreamBooth artifact, SD 1.5 ({sv[0]['file_bytes'] / 1e9:.2f} GB): peak memory "
                     "above the artifact"), mb(b), mb(a), f"{a / max(b, 1):.2f}"])
        b, a, q = _pair(sv, "seconds")
        rows.append(["(same)", "... time", f"{b:.1f} s", f"{a:.1f} s", f"{q:.2f}"])
    if not rows:
        return "(not measured in this run)"
    return table(["fix (file)", "measured on", "before", "after", "after / before"], rows)


CAVEATS = [
    ("Inference and training in sections 2-3 are measured on the toy world (a 5.2 M-parameter UNet at 32x32 px, "
    "text width 64), the only trained model on this machine; at SD 1.5 size the K/V projections are a smaller "
    "share of a UNet step and DreamBooth's optimizer state a much larger share of training memory (section 8 "
    "measures full-size random-weight SD 1.5 and SDXL on this CPU)."),
    ("Storage artifacts are built by the methods' own artifact builders without optimizer steps (file sizes do not "
    "depend on values), on SDXL from a pipeline with SDXL's UNet and both of its text encoders (2 layers each: only "
    "widths matter); DreamBooth on SDXL is derived from shapes (the formula matches every written file to the "
    "byte)."),
    ("Peak memory on CPU is resident-set size (sampled every 2 ms), which includes allocator caching; it is compared "
    "only between fresh processes doing the same setup."),
]


def caveats(results: dict) -> list[str]:
    out = list(CAVEATS)
    su = results.get("suite")
    if not su or su.get("measured") is False:
        out.append("The `toy-quick` suite wall time is NOT measured: "
                   + (su["why"] if su else "the section was not run") + ".")
    cpus: dict[str, list[str]] = {}
    for name in SECTIONS:
        lscpu = (results.get(name) or {}).get("machine", {}).get("lscpu_head", "")
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "")
        if model:
            cpus.setdefault(model, []).append(name)
    if len(cpus) > 1:  # sections re-run on another machine: ratios hold within a section, not across
        out.append("Sections were measured on different CPUs: "
                   + "; ".join(f"{m}: {', '.join(names)}" for m, names in cpus.items())
                   + ". Compare ratios within a section only.")
    missing = [s for s in SECTIONS if s not in results]
    if missing:
        out.append(f"Sections not run: {', '.join(missing)}.")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown from the JSON")
    ap.add_argument("--pipeline", default="auto", choices=("auto", "toy", "tiny"))
    ap.add_argument("--geometries", default="sd15,sd21,sdxl")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--training-rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--out", type=Path, default=DEFAULT_MD)
    args = ap.parse_args(argv)
    args.geometries = [g for g in args.geometries.split(",") if g]
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    if not args.render:
        if competing_jobs():
            print(f"warning: competing jobs are running: {competing_jobs()}", file=sys.stderr)
        for section in [s for s in args.only.split(",") if s]:
            if section not in SECTIONS:
                ap.error(f"unknown section {section!r}; choose from {SECTIONS}")
            print(f"[run_all] {section} ...", file=sys.stderr, flush=True)
            new = run(section, args)
            if section == "storage" and "storage" in results:  # --geometries re-measures some; keep the others
                new["geometries"] = {**results["storage"].get("geometries", {}), **new["geometries"]}
            results[section] = new
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1, default=str))
            print(f"[run_all] {section} done in {results[section]['section_wall_s']} s", file=sys.stderr, flush=True)
    args.out.write_text(render(results))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
