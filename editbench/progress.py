"""Progress of every long loop (training, suites, tuning, sampling, the toy world's training): :func:`progress`.

On a terminal (stderr is a TTY, or a Jupyter kernel) it is tqdm's bar. Anywhere else (a file, a CI log, a SLURM
output file) it is :class:`LineProgress`: one line each time another 10% is done, with the elapsed time and the
ETA, e.g. ``train lora: 30% 60/200 [0:12 elapsed, ETA 0:28] loss=0.1234``; a bar of unknown length prints a line
a minute. Bars made with ``leave=False`` (nested, transient ones, e.g. the batches of one cell) print nothing
there: their outer loop already reports.

Why a tqdm subclass and not tqdm's ``mininterval``/``miniters``: tqdm redraws its bar with ``\\r``, which a log
file keeps, so a log gets one huge line or (where ``\\r`` ends a line) hundreds of them, and ``mininterval``
throttles by time, not by progress; the subclass keeps the tqdm API the loops use (iteration, ``update``,
``set_postfix``, ``n``/``refresh``, context manager) and only replaces how the state is shown.
"""

from __future__ import annotations

import io
import os
import sys
import time
from typing import Any

from tqdm import tqdm as _std_tqdm

__all__ = ["LineProgress", "interactive", "progress", "quiet_loading"]


class _Discard(io.TextIOBase):
    """Where tqdm's own drawing goes in line mode (it writes ``\\r`` and ``\\n`` around its bar)."""

    def write(self, s: str) -> int:
        return len(s)


class LineProgress(_std_tqdm):
    """tqdm that writes one line per 10% of ``total`` (one a minute without a total) to ``file`` (default
    stderr), plus a last line when closed early; nothing when ``leave=False``."""

    every_s = 60.0
    """Seconds between lines of a bar without a total."""

    def __init__(self, *args: Any, **kwargs: Any):
        self._out = kwargs.pop("file", None) or sys.stderr
        self._quiet = kwargs.get("leave", True) is False
        self._printed_n = None
        kwargs.update(file=_Discard(), mininterval=0, miniters=1, dynamic_ncols=False)
        super().__init__(*args, **kwargs)
        self.initial = getattr(self, "initial", 0) or 0  # (a disabled tqdm returns from __init__ before setting it)
        self._next_decile = int(self.initial * 10 // self.total) + 1 if self.total else 1
        self._next_time = time.time() + self.every_s

    def _line(self) -> str:
        d = self.format_dict
        elapsed = d["elapsed"]
        desc = f"{d['prefix']}: " if d.get("prefix") else ""
        postfix = f" {d['postfix']}" if d.get("postfix") else ""
        if not self.total:
            return f"{desc}{self.n} [{self.format_interval(elapsed)} elapsed]{postfix}"
        done = self.n - self.initial
        left = self.total - self.n
        eta = self.format_interval(elapsed * left / done) if done > 0 else "?"
        return (f"{desc}{100 * self.n / self.total:3.0f}% {self.n}/{self.total} "
                f"[{self.format_interval(elapsed)} elapsed, ETA {eta}]{postfix}")

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if self._quiet or self.disable or msg == "" or not hasattr(self, "_next_time"):  # (tqdm's first refresh)
            return True
        if self.total:
            decile = int(self.n * 10 // self.total)
            due = decile >= self._next_decile
            if due:
                self._next_decile = decile + 1
        else:
            due = time.time() >= self._next_time
            if due:
                self._next_time = time.time() + self.every_s
        if due:
            self._print()
        return True

    def _print(self) -> None:
        self._out.write(self._line() + "\n")
        self._out.flush()
        self._printed_n = self.n

    def close(self) -> None:
        # the last line if there was progress since the last one (a loop left early, or a bar without a total)
        if not (self.disable or self._quiet) and self.n not in (self._printed_n, self.initial):
            self._print()
        super().close()


def interactive(stream: Any = None) -> bool:
    """Whether progress is drawn as bars: ``stream`` (default stderr) is a terminal, or this is a Jupyter kernel."""
    stream = sys.stderr if stream is None else stream
    try:
        tty = bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        tty = False
    return tty or "ipykernel" in sys.modules


def progress(iterable: Any = None, **kwargs: Any) -> Any:
    """``tqdm(iterable, **kwargs)`` on a terminal (``tqdm.auto``), :class:`LineProgress` anywhere else. The one
    progress helper of every long loop in editbench."""
    if interactive(kwargs.get("file")):
        from tqdm.auto import tqdm

        return tqdm(iterable, **kwargs)
    return LineProgress(iterable, **kwargs)


def quiet_loading() -> None:
    """In logs (not :func:`interactive`), switch off the loading bars of diffusers ("Loading pipeline
    components...") and transformers / huggingface_hub ("Loading weights", downloads): tqdm bars drawn with ``\r``
    that no editbench loop owns. Called where editbench loads a pipeline; a no-op on a terminal."""
    if interactive():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("diffusers.utils.logging", "transformers.utils.logging"):
        module = sys.modules.get(name)
        if module is not None:
            module.disable_progress_bar()
