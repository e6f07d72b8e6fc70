"""Logs: progress bars on a terminal, one line per 10% elsewhere (editbench.progress); no deprecation warnings or
library loading bars from our own calls."""

from __future__ import annotations

import io
import re
import warnings

import pytest
import torch

from editbench.progress import LineProgress, interactive, progress, quiet_loading

LINE = re.compile(r"^(?P<desc>.+?): +(?P<pct>\d+)% (?P<n>\d+)/(?P<total>\d+) "
                  r"\[(?P<elapsed>[\d:]+) elapsed, ETA (?P<eta>[\d:?]+)\](?P<post>.*)$")


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def _lines(text: str) -> list[re.Match]:
    assert "\r" not in text
    out = [LINE.match(line) for line in text.splitlines()]
    assert all(out), text
    return out


def test_one_line_per_ten_percent_with_elapsed_time_and_eta():
    log = _Stream(tty=False)
    for _ in progress(range(200), desc="train lora", file=log):
        pass
    lines = _lines(log.getvalue())
    assert [int(m["pct"]) for m in lines] == list(range(10, 101, 10))
    assert [int(m["n"]) for m in lines] == list(range(20, 201, 20)) and {m["total"] for m in lines} == {"200"}
    assert {m["desc"] for m in lines} == {"train lora"} and lines[-1]["eta"] == "00:00"


def test_uneven_totals_resume_postfix_and_early_stop():
    log = _Stream(tty=False)
    with progress(total=7, desc="cells", file=log) as bar:
        for _ in range(7):
            bar.update()
    assert [int(m["n"]) for m in _lines(log.getvalue())] == [1, 2, 3, 4, 5, 6, 7]  # each step crosses a 10% mark

    log = _Stream(tty=False)
    bar = progress(total=100, initial=40, desc="resumed", file=log)  # a resumed fit: nothing for the steps before
    for k in range(60):
        bar.update()
        bar.set_postfix(loss=f"{0.5 / (k + 1):.4f}")
    bar.close()
    lines = _lines(log.getvalue())
    assert [int(m["pct"]) for m in lines] == [50, 60, 70, 80, 90, 100] and "loss=" in lines[-1]["post"]

    log = _Stream(tty=False)
    with progress(total=50, desc="stopped", file=log) as bar:
        bar.update(12)
        bar.update(3)
    assert [int(m["n"]) for m in _lines(log.getvalue())] == [12, 15]  # the last state when closed early


def test_transient_and_open_ended_bars():
    log = _Stream(tty=False)
    for _ in progress(range(50), desc="generating", leave=False, file=log):  # nested bars: their loop reports
        pass
    assert log.getvalue() == ""
    log = _Stream(tty=False)
    for _ in progress(iter(range(5)), desc="captions", file=log):  # no total: a line a minute, and one at the end
        pass
    assert re.fullmatch(r"captions: 5 \[[\d:]+ elapsed\]\n", log.getvalue())
    log = _Stream(tty=False)
    for _ in progress(range(5), desc="off", disable=True, file=log):
        pass
    assert log.getvalue() == ""


def test_bars_on_a_terminal_lines_elsewhere():
    assert isinstance(progress(range(3), file=_Stream(tty=False)), LineProgress)
    tty = _Stream(tty=True)
    bar = progress(range(3), file=tty, desc="x")
    assert not isinstance(bar, LineProgress)
    list(bar)
    assert "\r" in tty.getvalue() and "100%|" in tty.getvalue()   # tqdm's own bar
    assert interactive(_Stream(tty=True)) and not interactive(_Stream(tty=False))


def test_a_training_run_logs_ten_lines(capsys):
    """The training loop uses the helper: with stderr not a terminal (pytest captures it) a fit of 30 steps writes
    ten lines of progress and nothing else to stderr."""
    from _method_helpers import concept_for

    from editbench import methods
    from editbench.testing import tiny_pipeline

    methods.get("textual_inversion")(batch_size=1).fit(tiny_pipeline(), concept_for("textual_inversion"), steps=30,
                                                       progress=True)
    lines = _lines(capsys.readouterr().err)
    assert len(lines) == 10 and lines[-1]["n"] == lines[-1]["total"] == "30"
    assert "training" in lines[0]["desc"] and "loss=" in lines[-1]["post"]


def test_loading_the_toy_world_warns_nothing_and_draws_no_bars(capsys):
    """Our from_pretrained call uses the keyword the installed diffusers wants (dtype, not the deprecated
    torch_dtype), and in logs the libraries' loading bars are off."""
    from editbench.models import dtype_kwargs
    from editbench.toyworld import load_pipeline

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_pipeline()
        pipe(["a star"], num_inference_steps=1, generator=torch.Generator().manual_seed(0))
        half = load_pipeline(dtype=torch.float16)
    bad = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert bad == [] and half.unet.dtype == torch.float16 and pipe.unet.dtype == torch.float32
    err = capsys.readouterr().err
    assert "Loading pipeline components" not in err and "Loading weights" not in err and "\r" not in err
    import diffusers

    assert list(dtype_kwargs(torch.float16)) == (["dtype"] if hasattr(diffusers.utils.deprecation_utils,
                                                                      "_resolve_dtype") else ["torch_dtype"])


def test_quiet_loading_is_a_no_op_on_a_terminal(monkeypatch):
    import diffusers.utils.logging as dlog

    monkeypatch.setattr("sys.stderr", _Stream(tty=True))
    dlog.enable_progress_bar()
    quiet_loading()
    assert dlog.is_progress_bar_enabled()
    monkeypatch.setattr("sys.stderr", _Stream(tty=False))
    quiet_loading()
    assert not dlog.is_progress_bar_enabled()


@pytest.mark.parametrize("kind", ["train", "bench"])
def test_cli_logs_have_no_carriage_returns(kind, tmp_path, capsys, monkeypatch):
    """``editbench train`` and ``bench`` with stderr captured (not a terminal): only whole lines on stderr."""
    import yaml

    from editbench.cli import main

    monkeypatch.setenv("EDITBENCH_CACHE", str(tmp_path / "cache"))
    if kind == "train":
        argv = ["train", "--method", "textual_inversion", "--concept", "zebra", "--steps", "10", "--set",
                "batch_size=1", "--out", str(tmp_path / "ti.safetensors")]
    else:
        suite = tmp_path / "tiny.yaml"
        suite.write_text(yaml.safe_dump({
            "name": "logs", "model": "toyworld", "concepts": ["zebra"], "seeds": [0], "max_prompts": 1,
            "images_per_prompt": 1, "steps": 10, "generation": {"num_inference_steps": 2},
            "methods": ["base", {"name": "textual_inversion", "config": {"batch_size": 1}}]}))
        argv = ["bench", "--suite", str(suite), "--out", str(tmp_path / "bench")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    lines = _lines(err)
    assert 1 <= len(lines) <= 25, err  # ten per bar at most: the fit's, and the suite's cells (2 cells: 2 lines)
