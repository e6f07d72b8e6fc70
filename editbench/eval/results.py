"""Collecting a suite's results: the finished cells' rows assembled into one long-format table."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from editbench.errors import EditbenchError
from editbench.storage import atomic_target, write_csv

__all__ = ["CELL_COLUMNS", "collect"]

CELL_COLUMNS = ("suite", "cell", "method", "label", "multi", "concepts", "n_concepts", "seed", "setting", "settings")
"""The columns every cell's rows start with (:meth:`editbench.eval.runner.Runner.score`)."""


def collect(out: str | os.PathLike, cells: Iterable[str] | None = None) -> pd.DataFrame:
    """Assemble ``results.csv`` (and ``results.parquet`` if pyarrow is installed) from the finished cells of
    the suite recorded in ``out/suite.json`` (or ``cells``); returns the table (empty if nothing finished)."""
    out = Path(out)
    if cells is None:
        manifest = out / "suite.json"
        if not manifest.is_file():
            raise EditbenchError(f"{out} holds no suite.json; run a suite into it first "
                                 "(editbench bench --suite SUITE --out DIR)")
        cells = json.loads(manifest.read_text())["cells"]
    paths = [out / "cells" / f"{c}.csv" for c in cells if (out / "cells" / f"{c}.csv").is_file()]
    frames = [pd.read_csv(p) for p in paths]
    for path, f in zip(paths, frames):
        missing = [k for k in CELL_COLUMNS if k not in f.columns]
        if missing:
            raise EditbenchError(f"{path} has no column(s) {missing}: it was written by an older editbench; run the "
                                 "suite into a new --out folder (editbench bench --suite SUITE --out NEW_DIR)")
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    write_csv(out / "results.csv", df)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        pass
    else:
        with atomic_target(out / "results.parquet") as tmp:
            df.to_parquet(tmp, index=False)
    return df
