"""Run the committed toy-quick tuning studies round-robin, so every method's budget rises together.

Jobs are (k, method) for k = 1..--trials; each of --workers threads takes the lowest-k job whose method has no job
running and runs ``editbench tune --trials k`` for it in a fresh single-threaded process (``OMP_NUM_THREADS=1``),
with the study in ``benchmarks/tuning/<suite>/<method>/study.db`` and the trial folders under ``--work``. Wherever
the run is stopped (Ctrl-C, or a ``STOP`` file in --work: the workers finish their jobs first), the methods' complete
trial counts differ by at most one, and ``editbench tune --trials N`` with N the smallest count writes each method's
``tuned.json`` from its first N complete trials: the same budget for every method. ``editbench tune`` alone gives
that only at the end of every study; on a 2-core machine whose sessions end, this is what keeps the studies equal.
Re-running resumes: each method's jobs start after the complete trials its study already holds.

    python benchmarks/tuning/run.py --trials 20 --workers 2
    cp runs/tune/<method>/{tuned.json,trials.csv,study.json} benchmarks/tuning/toy-quick/<method>/
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from editbench.eval.tune import complete_trials

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("dreambooth", "custom_diffusion", "lora", "textual_inversion", "perfusion")  # slowest trials first


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="toy-quick")
    ap.add_argument("--trials", type=int, default=20, help="each study's final budget")
    ap.add_argument("--workers", type=int, default=2, help="processes at once (one per core)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "tune", help="--out of each study: work/<method>")
    args = ap.parse_args(argv)
    studies = {m: ROOT / "benchmarks" / "tuning" / args.suite / m / "study.db" for m in args.methods}
    done = {m: complete_trials(f"sqlite:///{studies[m]}", args.suite, m) if studies[m].is_file() else 0
            for m in args.methods}
    jobs = [(k, m) for k in range(1, args.trials + 1) for m in args.methods if k > done[m]]
    busy: set[str] = set()
    lock = threading.Lock()
    args.work.mkdir(parents=True, exist_ok=True)
    stop, log = args.work / "STOP", args.work / "run.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def note(msg: str) -> None:
        with lock, log.open("a") as f:
            f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + msg + "\n")

    def worker() -> None:
        while not stop.exists():
            with lock:
                job = next((j for j in jobs if j[1] not in busy), None)
                if job is None:
                    return
                jobs.remove(job)
                busy.add(job[1])
            k, m = job
            note(f"start {m} k={k}")
            t0 = time.time()
            cmd = [sys.executable, "-m", "editbench.cli", "tune", "--suite", args.suite, "--method", m,
                   "--trials", str(k), "--out", str(args.work / m), "--storage", f"sqlite:///{studies[m]}"]
            with (args.work / f"{m}.log").open("a") as f:
                rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
            note(f"done {m} k={k} rc={rc} {time.time() - t0:.0f} s")
            with lock:
                busy.discard(m)

    threads = [threading.Thread(target=worker) for _ in range(args.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    note("stopped" if stop.exists() else "all jobs done")


if __name__ == "__main__":
    main()
