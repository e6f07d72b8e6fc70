"""The output of ``benchmarks/gpu.py``: ratios, the measurement table (``gpu.md``, standard output) and the GPU
section of docs/performance.md (:func:`doc_section`, rendered by ``benchmarks/run_all.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

from perf_common import ROOT

from .plan import ROW_KEYS, SCHEMA, STATUSES, TOP_KEYS


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


GPU_SIZES_GIB = (12, 16, 24, 40)
CUDA_CONTEXT_GIB = 0.5
"""Assumed memory of a CUDA context (driver, cuBLAS / cuDNN workspaces) added to a CPU measurement when deriving
which GPU it would fit; not measured here."""
MEMORY_COLUMNS = ("measurement", "status", "process peak", "runtime at start", "model + training",
                  "fits on (derived)")


def memory_rows(rows: list[dict]) -> list[list[str]]:
    """The fresh-process memory table: per measurement the process's peak resident memory, the runtime's share
    (resident after the imports), their difference (the pipeline's weights, the method's trainable state and
    optimizer, activations: what a GPU would hold), and the GPUs of :data:`GPU_SIZES_GIB` it would fit with a
    :data:`CUDA_CONTEXT_GIB` context added (derived, not measured)."""
    out = []
    for r in rows:
        peak, start = r.get("process_peak_rss_bytes"), r.get("process_start_rss_bytes")
        if not peak:
            continue
        need = (peak - start) if start else None
        if r["status"] == "ok" and need is not None:
            fits = [g for g in GPU_SIZES_GIB if need / 2**30 + CUDA_CONTEXT_GIB <= g]
            verdict = (" / ".join(f"{g} GB" for g in fits) if fits else f"none up to {GPU_SIZES_GIB[-1]} GB")
        elif r["status"] == "oom":
            verdict = f"over the cap: more than {fmt_bytes(peak)} resident"
        else:
            verdict = ""
        out.append([r["id"], r["status"] or "", fmt_bytes(peak), fmt_bytes(start),
                    fmt_bytes(need) if r["status"] == "ok" else "", verdict])
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
    mem = memory_rows(rows)
    if mem:
        L += [f"{h} Memory in fresh processes", "",
              "Each measurement ran in its own process (`--fresh-process`). *process peak*: peak resident memory "
              "of that process (sampled every 20 ms); *runtime at start*: resident after its imports; *model + "
              "training*: the difference (weights, trainable state, optimizer moments, activations). *fits on*: "
              f"the GPUs whose memory holds *model + training* plus {CUDA_CONTEXT_GIB} GiB for a CUDA context "
              "(derived from the CPU measurement, not measured on a GPU; CPU and CUDA kernels may allocate "
              "differently).", "", md_table(MEMORY_COLUMNS, mem), ""]
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


CPU_FULL = ROOT / "benchmarks" / "results" / "cpu-full"
"""Where the full-size CPU runs (``--full --device cpu --fresh-process``) go to be shown in docs/performance.md, one
sub-folder per run (``sd15-train``, ``sd15-sample``, ``sdxl-train``)."""

CPU_FULL_RUNS = {
    "sd15-train": "--geometries sd15 --sections train --variants fp32,bf16+gc",
    "sd15-train-bf16w": "--geometries sd15 --sections train --variants bf16w+gc",
    "sd15-train-bf16w-lora": "--geometries sd15 --sections train --variants bf16w+gc --methods lora",
    "sd15-train-8bit": "--geometries sd15 --sections train --variants bf16w+gc+8bit --methods dreambooth",
    "sd15-train-bf16m": "--geometries sd15 --sections train --variants bf16w+gc+bf16m --budget-s 3600 --threads 1",
    "sd15-train-fused": "--geometries sd15 --sections train --variants bf16w+gc+bf16m+fused --methods dreambooth "
                        "--budget-s 3600 --threads 1",
    "sd15-sample": "--geometries sd15 --sections sample --methods perfusion --sample-steps 3",
    "sdxl-train": "--geometries sdxl --sections train --budget-s 3600",
}


def _model_and_training(r: dict | None) -> int | None:
    if not r or r.get("status") != "ok" or not r.get("process_peak_rss_bytes") or not r.get("process_start_rss_bytes"):
        return None
    return r["process_peak_rss_bytes"] - r["process_start_rss_bytes"]


def cpu_full_targets(rows: list[dict]) -> list[list[str]]:
    """The real-scale targets checked on the full-size CPU rows: ``[target, limit, measured, verdict]``."""
    by = {r["id"]: r for r in rows}
    out = []

    def add(what: str, limit: str, value: float | None, ok: bool | None, fmt: str = "{:.2f}") -> None:
        out.append([what, limit, "not measured" if value is None else fmt.format(value),
                    "" if ok is None else ("**met**" if ok else "**not met**")])

    half = {"bf16+gc": "bf16 + checkpointing", "bf16w+gc": "bf16 weights + checkpointing"}
    for v, words in half.items():
        p, d = (_model_and_training(by.get(f"train/sd15/{m}/{v}")) for m in ("perfusion", "dreambooth"))
        add(f"SD 1.5, {words}: Perfusion's memory / DreamBooth's", "<= 0.35", p / d if p and d else None,
            p / d <= 0.35 if p and d else None)
        add(f"SD 1.5, {words}: Perfusion's memory", "<= 6 GB", p / 1e9 if p else None,
            p / 1e9 <= 6 if p else None, "{:.2f} GB")
    for m in sorted({r["method"] for r in rows if r["kind"] == "train" and r["geometry"] == "sd15"}):
        extra = {v: w for v, w in (("bf16w+gc+bf16m", "bf16 weights + checkpointing + bf16 master weights"),
                                   ("bf16w+gc+bf16m+fused", "bf16 weights + checkpointing + bf16 master weights + "
                                                            "fused backward"),
                                   ("bf16w+gc+8bit", "bf16 weights + checkpointing + 8-bit AdamW"))
                 if f"train/sd15/{m}/{v}" in by}
        for v, words in {**half, **extra}.items():
            a, b = (_model_and_training(by.get(f"train/sd15/{m}/{x}")) for x in (v, "fp32"))
            add(f"SD 1.5: {m}'s memory, {words} / float32", "<= 0.5", a / b if a and b else None,
                a / b <= 0.5 if a and b else None)
    for v in ("fp32", "bf16+gc", "bf16w+gc"):
        p, d = (by.get(f"train/sd15/{m}/{v}") for m in ("perfusion", "dreambooth"))
        ok = p and d and p["status"] == d["status"] == "ok"
        add(f"SD 1.5, {v}: Perfusion's training step / DreamBooth's", "<= 0.6",
            p["seconds"] / d["seconds"] if ok else None, p["seconds"] / d["seconds"] <= 0.6 if ok else None)
    for n, limit in ((1, 1.03), (10, 1.10)):
        for prec in ("fp32", "bf16"):
            s, b = by.get(f"sample/sd15/perfusion_{n}/{prec}"), by.get(f"sample/sd15/base/{prec}")
            ok = s and b and s["status"] == b["status"] == "ok"
            add(f"SD 1.5, {prec}: sampling with {n} Perfusion concept(s) / unedited", f"<= {limit}",
                s["seconds"] / b["seconds"] if ok else None, s["seconds"] / b["seconds"] <= limit if ok else None,
                "{:.3f}")
    return out


def cpu_full_section(results: Path = CPU_FULL, depth: int = 2) -> str:
    """docs/performance.md's section on the full-size runs on this CPU: how they were run, the real-scale targets,
    and each run's tables (memory in fresh processes included)."""
    h = "#" * (depth + 1)
    L = ["#" * depth + " 8. Full SD 1.5 / SDXL size on this CPU (`benchmarks/gpu.py --full --device cpu "
         "--fresh-process`)", "",
         "The GPU command of section 7 run on this 2-core CPU at full size (random-weight SD 1.5 at 512 px and SDXL "
         "at 1024 px, batch 1), every training and sampling measurement in a fresh process "
         "(`--fresh-process`: the memory of one measurement is not the leftover of the one before; a measurement "
         "above `--memory-cap-gb`, default 90% of the machine's memory, is killed and recorded as `oom`). CPU "
         "resident memory stands in for GPU memory: *model + training* (the process's peak minus its resident "
         "memory after the imports) is what a GPU would hold, and the *fits on* column adds an assumed "
         f"{CUDA_CONTEXT_GIB} GiB CUDA context (derived, not measured on a GPU). Step times are this CPU's, "
         "measured one process after another (ratios between rows of one run; the runs used both cores and "
         "nothing else ran). Each method trains at its default config with batch 1, prior preservation off "
         "(learning rates do not change a step's cost; LoRA's default rank is 2 where the published recipe has 4). "
         "Commands (each with `python benchmarks/gpu.py --full --device cpu --fresh-process --out DIR`):", ""]
    L += [f"- `{name}`: `{args}`" for name, args in CPU_FULL_RUNS.items()] + [
        "", "(`sd15-train-bf16w-lora` re-ran LoRA's row after the fix that lets LoRA train on a half-precision "
            "pipeline; where a measurement id appears in two runs, the later run's row is the one the targets "
            "read.)", ""]
    runs = {}
    for name in CPU_FULL_RUNS:
        path = Path(results) / name / "gpu.json"
        if path.is_file():
            runs[name] = json.loads(path.read_text())
    if not runs:
        L += [f"**Not measured yet** (`{Path(results).relative_to(ROOT)}/<run>/gpu.json`).", ""]
        return "\n".join(L).rstrip() + "\n"
    rows = [r for res in runs.values() for r in res["measurements"]]
    L += [f"{h} Targets (real-scale issue)", "", md_table(["target", "limit", "measured", ""],
                                                         cpu_full_targets(rows)), "",
          "How to read them. With float32 weights (`bf16+gc`) the frozen weights dominate every method but "
          "DreamBooth, so only the half-precision weights (`bf16w+gc`) halve memory. DreamBooth's training state (a "
          "float32 trainable UNet, its gradients and two AdamW moments: 16 bytes per parameter, 13.8 GB on SD 1.5) "
          "is untouched by autocast and by half-precision frozen weights; `optimizer=\"adamw8bit\"` shrinks the "
          "moments (`sd15-train-8bit`, run with bitsandbytes 0.50.2 installed in a separate environment: 20.0 -> "
          "12.6 GB, 0.63 of float32), and the float32 UNet copy with its gradients (6.9 GB) stays. bfloat16 master "
          "weights (`master_weights=\"bf16\"`, `sd15-train-bf16m`: the trained UNet, its gradients and both moments "
          "in bfloat16 with stochastically rounded updates) bring DreamBooth to 11.1 GB, **0.55** of float32: the "
          "frozen base UNet kept for the revert (1.7 GB), the trained copy, its gradients (1.7 GB each) and the "
          "moments (3.4 GB) make 8.6 GB, the text encoder, VAE, activations and the optimizer's per-parameter "
          "float32 temporaries the rest. Fusing the step into the backward pass as well (`fused_backward=True`, "
          "`sd15-train-fused`: each gradient freed as soon as its parameter is updated; gradient clipping off, "
          "which needs every gradient at once) removes the UNet-sized gradient: **9.3 GB, 0.46** of float32, "
          "the target met. `sd15-train-bf16m` and `sd15-train-fused` ran single-threaded (`--threads 1`) beside "
          "other jobs, so their step times are not comparable with the other runs'; the DreamBooth step there "
          "(66.5 / 70.6 s) is mostly the optimizer, whose update runs as some twenty elementwise "
          "passes per parameter in a Python loop (4.8 s per 75 M parameters on one core, against 0.36 s for torch's "
          "float32 AdamW; memory-bound passes on a GPU). On SDXL every DreamBooth variant and "
          "every variant with float32 weights except Perfusion / textual inversion / LoRA with checkpointing "
          "exceeded the cap (`oom`), as the 2.6 B-parameter UNet (10.3 GB in float32) predicts. Sampling rows time "
          "one image of 3 steps after a warm-up image, one row after another: differences below about 5% are noise "
          "(the float32 ratios below 1 are that).", ""]
    for name, res in runs.items():
        L += [f"{h} `{name}`", "", render_md(res, depth=depth + 2), ""]
    return "\n".join(L).rstrip() + "\n"
