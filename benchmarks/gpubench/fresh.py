"""``--fresh-process``: every training and sampling measurement in its own Python process, so that its memory
is not the leftover of the measurements before it (freed tensors stay in the allocator's pages: in one process
the second measurement's peak RSS reads low). The parent re-runs this script with ``--only-row ID`` and samples
the child's resident memory every 20 ms (psutil; the child's own threads and subprocesses included); a child
above ``--memory-cap-gb`` is killed and recorded as ``oom``, so that a measurement that cannot fit cannot take
the machine down.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "gpu.py"
OWN_OPTIONS = {"--fresh-process": 0, "--out": 1, "--only-row": 1, "--budget-s": 1, "--memory-cap-gb": 1}
"""The parent's options that the child does not inherit (with the number of values each takes)."""


def child_argv(argv: list[str], row_id: str, out: Path) -> list[str]:
    """The child's command line: the parent's options, without its own (``OWN_OPTIONS``), for one row."""
    keep, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        name = a.split("=", 1)[0]
        if name in OWN_OPTIONS:
            skip = 0 if "=" in a else OWN_OPTIONS[name]
            continue
        keep.append(a)
    return [sys.executable, str(SCRIPT), *keep, "--out", str(out), "--only-row", row_id]


def import_runtime() -> None:
    """Import what the measurements import (diffusers' pipelines and models, transformers' CLIP, peft, every
    editbench method), so that the child's resident memory at start is the runtime's and its difference to the peak
    is the measurement's."""
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401

    from editbench import methods

    for name in methods.available():
        methods.get(name)


def _tree_rss(proc) -> int:
    import psutil

    try:
        total = proc.memory_info().rss
        for c in proc.children(recursive=True):
            try:
                total += c.memory_info().rss
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0


def measure(row: dict, argv: list[str], out: Path, cap_bytes: int | None, interval: float = 0.02) -> dict:
    """Run ``row`` in a child process; its measured row (with ``process_peak_rss_bytes`` from the parent's
    sampling) and the pipeline info the child recorded (``{"row": ..., "pipelines": ...}``)."""
    import psutil

    folder = out / "_rows" / row["id"].replace("/", "__")
    folder.mkdir(parents=True, exist_ok=True)
    cmd = child_argv(argv, row["id"], folder)
    with open(folder / "child.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        ps = psutil.Process(proc.pid)
        peak, killed = 0, False
        while proc.poll() is None:
            peak = max(peak, _tree_rss(ps))
            if cap_bytes and peak > cap_bytes and not killed:
                proc.kill()
                killed = True
            time.sleep(interval)
    got = folder / "gpu.json"
    res = json.loads(got.read_text()) if got.is_file() else {}
    child = next((r for r in res.get("measurements", []) if r["id"] == row["id"]), None)
    if killed or child is None or child.get("status") in (None, "skipped"):
        child = dict(row)
        if killed:
            child.update(status="oom", detail=f"killed above the CPU memory cap of {cap_bytes / 2**30:.1f} GiB "
                                              f"(--memory-cap-gb; resident {peak / 2**30:.1f} GiB)")
        else:
            tail = (folder / "child.log").read_text().strip().splitlines()[-3:]
            child.update(status="error", detail=f"the measuring process exited with {proc.returncode}: "
                                                f"{' / '.join(tail)[:300]}")
    child["process_peak_rss_bytes"] = int(peak)
    return {"row": child, "pipelines": res.get("pipelines", {})}
