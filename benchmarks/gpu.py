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

This file is the command (its options and the loop over the plan within the budget); the jobs are in the package
``benchmarks/gpubench``: ``plan`` (the measurements in order, the output format), ``pipelines`` (random-weight
SD 1.5 / SDXL), ``runner`` (state shared by the measurements, peak memory, failure classes), ``training`` (step
time and peak memory of ``Editor.fit``), ``sampling`` (time per image, unedited and with 1 / 10 artifacts),
``cuda_tests`` (the ``-m cuda`` pytest run), ``report`` (ratios, tables, ``gpu.md``, the docs section). Their
public names are importable from here too (``gpu.plan``, ``gpu.Runner``, ``gpu.doc_section``, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from gpubench import fresh  # noqa: E402
from gpubench.cuda_tests import junit_counts  # noqa: E402
from gpubench.pipelines import build_pipeline  # noqa: E402
from gpubench.plan import (  # noqa: E402
    DEFAULT_PYTEST_ARGS,
    GEOMETRIES,
    PRIORITY_METHODS,
    ROW_KEYS,
    SAMPLE_CASES,
    SAMPLE_PRECISIONS,
    SCHEMA,
    STATUSES,
    TOP_KEYS,
    PIPELINE_DTYPES,
    TRAIN_VARIANTS,
    method_order,
    plan,
)
from gpubench.report import (  # noqa: E402
    CPU_FULL,
    DOC,
    RESULTS,
    TABLE_COLUMN_DOCS,
    TABLE_COLUMNS,
    cpu_full_section,
    cpu_full_targets,
    doc_section,
    fmt_bytes,
    fmt_s,
    md_table,
    print_table,
    ratios,
    render_md,
    table_rows,
)
from gpubench.runner import PeakRSSAbove, Runner, classify  # noqa: E402
from perf_common import METHODS, machine, rss  # noqa: E402

__all__ = ["CPU_FULL", "DEFAULT_PYTEST_ARGS", "DOC", "GEOMETRIES", "PIPELINE_DTYPES", "PRIORITY_METHODS", "RESULTS",
           "ROW_KEYS", "SAMPLE_CASES", "SAMPLE_PRECISIONS", "SCHEMA", "STATUSES", "TABLE_COLUMNS", "TABLE_COLUMN_DOCS",
           "TOP_KEYS", "TRAIN_VARIANTS", "PeakRSSAbove", "Runner", "build_pipeline", "classify", "clock",
           "cpu_full_section", "cpu_full_targets", "doc_section", "fmt_bytes", "fmt_s", "junit_counts", "main",
           "md_table", "method_order", "parse", "plan", "print_table", "ratios", "render_md", "table_rows"]

clock: Callable[[], float] = time.monotonic
"""The budget's clock (a test replaces it)."""


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
    ap.add_argument("--variants", default=None,
                    help=f"training variants, comma-separated, from {','.join(TRAIN_VARIANTS)} (default: all but "
                         "bf16w+gc+8bit, which needs bitsandbytes)")
    ap.add_argument("--repeats", type=int, default=1, help="timed steps / images after the warm-up (median)")
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--pytest-args", default=DEFAULT_PYTEST_ARGS, help=f"default {DEFAULT_PYTEST_ARGS!r}")
    ap.add_argument("--pytest-timeout-s", type=float, default=300.0)
    ap.add_argument("--fresh-process", action="store_true",
                    help="each training / sampling measurement in its own process (memory not left over from the "
                         "previous one; the way to measure CPU memory)")
    ap.add_argument("--memory-cap-gb", type=float, default=None,
                    help="--fresh-process: kill a measurement above this resident memory and record it as oom "
                         "(default: 90%% of the machine's memory)")
    ap.add_argument("--only-row", default=None, help=argparse.SUPPRESS)  # the child of --fresh-process
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: 1 with the tiny pipelines, whose ops are too small to share; "
                         "torch's default otherwise)")
    args = ap.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    args.geometries = [g for g in args.geometries.split(",") if g]
    args.sections = [s for s in args.sections.split(",") if s]
    args.variants = None if args.variants is None else [v for v in args.variants.split(",") if v]
    for name, got, allowed in (("methods", args.methods, METHODS), ("geometries", args.geometries, GEOMETRIES),
                               ("sections", args.sections, ("train", "sample", "pytest")),
                               ("variants", args.variants or [], tuple(TRAIN_VARIANTS))):
        bad = sorted(set(got) - set(allowed))
        if bad:
            ap.error(f"unknown {name} {bad}; choose from {list(allowed)}")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    t0 = clock()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.only_row is not None:  # the runtime's memory: everything a measurement imports, imported now
        fresh.import_runtime()
    start_rss = rss()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = args.tiny or (not args.full and device.type != "cuda")
    threads = args.threads or (1 if tiny else None)
    if threads:
        torch.set_num_threads(threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = plan(args.methods, args.geometries, args.sections, args.pytest_args, args.variants)
    if args.only_row is not None:
        rows = [r for r in rows if r["id"] == args.only_row]
        if not rows:
            raise SystemExit(f"--only-row {args.only_row}: not in the plan")
        rows[0]["process_start_rss_bytes"] = start_rss
    cap = None
    if args.fresh_process:
        import psutil

        cap = int((args.memory_cap_gb or 0.9 * psutil.virtual_memory().total / 2**30) * 2**30)
    runner = Runner(args, device, tiny)
    info = machine()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(cuda=torch.version.cuda, gpu=props.name, gpu_memory_bytes=int(props.total_memory),
                    cuda_capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported())
    res = {
        "schema": SCHEMA, "complete": False, "command": ["python", "benchmarks/gpu.py", *argv],
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "finished_utc": None, "wall_s": 0.0,
        "budget_s": args.budget_s, "budget_exhausted": False, "interrupted": False, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "tiny": tiny,
        "settings": {"batch_size": 1, "sample_steps": args.sample_steps, "guidance_scale": args.guidance,
                     "repeats": args.repeats, "methods": args.methods, "geometries": args.geometries,
                     "sections": args.sections, "variants": args.variants, "pytest_args": args.pytest_args,
                     "torch_threads": torch.get_num_threads(), "fresh_process": args.fresh_process,
                     "memory_cap_bytes": cap},
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
            if args.fresh_process and row["kind"] in ("train", "sample"):
                got = fresh.measure(row, argv, out, cap)
                row.update(got["row"], rank=row["rank"], started_s=row["started_s"])
                runner.pipe_info.update(got["pipelines"])
            elif row["kind"] == "train":
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
