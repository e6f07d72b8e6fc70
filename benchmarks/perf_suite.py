"""The ``toy-quick`` suite: wall time of ``editbench bench`` into a fresh output folder."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from perf_common import ROOT, command_output


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
    help_text = command_output([sys.executable, "-m", "editbench.cli", "bench", "--help"])
    if "--suite" not in help_text:
        return False, "`editbench bench` has no --suite option yet"
    return True, ""
