"""Collecting a suite's results: the finished cells' rows assembled into one long-format table."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from editbench.errors import EditbenchError
from editbench.storage import atomic_target, write_csv

__all__ = ["collect"]


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
    frames = [pd.read_csv(out / "cells" / f"{c}.csv") for c in cells if (out / "cells" / f"{c}.csv").is_file()]
    for f in frames:  # cells written before the 'multi' option existed were all trained separately
        if "multi" not in f.columns and "label" in f.columns:
            f.insert(int(f.columns.get_loc("label")) + 1, "multi", "separate")
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
