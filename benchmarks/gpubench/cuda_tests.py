"""The CUDA tests (``python -m pytest -m cuda tests`` by default) in a subprocess: their summary line and junit
counts (:meth:`gpubench.runner.Runner.run_pytest`).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from perf_common import ROOT


def run(runner, row: dict, out: Path) -> None:
    """Run ``pytest`` with the row's arguments (junit XML into ``out``); its result into ``row`` and
    ``runner.pytest``."""
    junit = out / "pytest-cuda.xml"
    cmd = [sys.executable, "-m", "pytest", *shlex.split(row["case"]), "-rfE", "-p", "no:cacheprovider",
           f"--junitxml={junit}"]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True,
                              timeout=runner.args.pytest_timeout_s, check=False)
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
        summary = f"timed out after {runner.args.pytest_timeout_s} s; {summary}"
    runner.pytest = {"command": cmd, "returncode": code, "summary": summary, "counts": counts,
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
