"""``benchmarks/gpu.py`` (the one command that measures everything GPU-bound within a budget) on the CPU with its
tiny pipelines, so that it keeps working between the rare runs on a GPU: the output files and their documented
format, the plan order, and a clean stop when the budget is spent. No timing is asserted.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """The script as a module, with the editbench caches in a temporary folder."""
    monkeypatch.setenv("EDITBENCH_CACHE", str(tmp_path / "cache"))
    spec = importlib.util.spec_from_file_location("editbench_gpu_benchmark", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _read(out: Path) -> tuple[dict, str]:
    return json.loads((out / "gpu.json").read_text()), (out / "gpu.md").read_text()


def _check_format(gpu, res: dict, md: str) -> None:
    assert res["schema"] == gpu.SCHEMA and res["complete"] is True
    top = {k for key in gpu.TOP_KEYS for k in key.split(" / ")}
    assert set(res) == top
    for row in res["measurements"]:
        assert set(row) == set(gpu.ROW_KEYS), row["id"]
        assert row["status"] in gpu.STATUSES
        assert row["kind"] in ("train", "sample", "pytest")
    assert [r["rank"] for r in res["measurements"]] == list(range(1, len(res["measurements"]) + 1))
    assert len({r["id"] for r in res["measurements"]}) == len(res["measurements"])
    assert md.startswith("# GPU measurements")
    for section in ("## Measurements", "## pytest", "## Skipped for budget", "## Pipelines"):
        assert section in md
    header = "| " + " | ".join(gpu.TABLE_COLUMNS) + " |"
    table = md.split(header, 1)[1].split("\n\n", 1)[0].strip().splitlines()
    assert len(table) == 1 + len(res["measurements"])                  # separator + one line per measurement


def test_every_output_key_is_documented(gpu):
    doc = (ROOT / "docs" / "performance.md").read_text()
    assert "benchmarks/gpu.py" in doc
    for key in [*gpu.ROW_KEYS, *(k for key in gpu.TOP_KEYS for k in key.split(" / "))]:
        assert f"`{key}`" in doc, f"{key} is not documented in docs/performance.md"
    for column in gpu.TABLE_COLUMNS:
        assert f"`{column}`" in doc, f"table column {column} is not documented"


def test_the_plan_puts_the_most_valuable_measurements_first(gpu):
    rows = gpu.plan(["lora", "textual_inversion", "dreambooth", "perfusion"], ["sd15", "sdxl"],
                    ["train", "sample", "pytest"], "-m cuda")
    ids = [r["id"] for r in rows]
    assert ids[:4] == ["train/sd15/perfusion/fp32", "train/sd15/dreambooth/fp32", "train/sd15/lora/fp32",
                       "train/sd15/textual_inversion/fp32"]
    assert ids.index("pytest") < ids.index("train/sdxl/perfusion/bf16+gc") < ids.index("train/sdxl/perfusion/fp32")
    assert max(i for i, r in enumerate(rows) if r["geometry"] == "sd15") < ids.index("train/sdxl/perfusion/bf16+gc")
    assert {r["case"] for r in rows if r["kind"] == "sample"} == set(gpu.SAMPLE_CASES)


def test_failures_are_classified(gpu):
    from editbench.errors import EditbenchError, TrainingError

    assert gpu.classify(EditbenchError("no SDXL here\nmore")) == ("unsupported", "unsupported: no SDXL here")
    assert gpu.classify(TrainingError("loss is nan at step 2"))[0] == "error"     # a failed run, not a refusal
    assert gpu.classify(torch.cuda.OutOfMemoryError("CUDA out of memory"))[0] == "oom"
    assert gpu.classify(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED out of memory"))[0] == "oom"
    assert gpu.classify(ValueError("added_cond_kwargs missing")) == ("error", "ValueError: added_cond_kwargs missing")


def test_a_spent_budget_writes_every_measurement_as_skipped(gpu, tmp_path, capsys):
    out = tmp_path / "out"
    returned = gpu.main(["--out", str(out), "--budget-s", "0", "--device", "cpu"])
    res, md = _read(out)
    assert returned["measurements"] == res["measurements"]
    _check_format(gpu, res, md)
    rows = res["measurements"]
    assert rows and all(r["status"] == "skipped" and r["detail"].startswith("budget spent") for r in rows)
    assert res["budget_exhausted"] is True and res["skipped_for_budget"] == [r["id"] for r in rows]
    assert res["tiny"] is True and res["pipelines"] == {} and res["pytest"] is None
    for r in rows:
        assert f"`{r['id']}`" in md.split("## Skipped for budget", 1)[1]
    printed = capsys.readouterr().out
    assert all(col in printed.splitlines()[0] for col in ("rank", "status", "peak memory"))
    assert len(printed.strip().splitlines()) == 1 + len(rows)


def test_the_budget_stops_after_the_measurement_it_was_spent_in(gpu, tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(gpu, "clock", lambda: now[0])
    train = gpu.Runner.train

    def slow_train(self, row):
        train(self, row)
        now[0] += 1000.0                          # this measurement spends the whole budget

    monkeypatch.setattr(gpu.Runner, "train", slow_train)
    out = tmp_path / "out"
    gpu.main(["--out", str(out), "--budget-s", "100", "--device", "cpu", "--methods", "textual_inversion",
              "--geometries", "sd15", "--sections", "train,pytest"])
    res, md = _read(out)
    _check_format(gpu, res, md)
    first, *rest = res["measurements"]
    assert first["id"] == "train/sd15/textual_inversion/fp32" and first["status"] == "ok"   # finished, recorded
    assert first["seconds"] > 0 and first["memory_kind"] == "cpu_rss_peak_delta" and first["resolution"] == 16
    assert [r["id"] for r in rest] == ["train/sd15/textual_inversion/bf16+gc", "train/sd15/textual_inversion/bf16w+gc",
                                       "train/sd15/textual_inversion/bf16w+gc+bf16m", "pytest"]
    assert all(r["status"] == "skipped" and "1000 s of 100 s" in r["detail"] for r in rest)
    assert res["skipped_for_budget"] == [r["id"] for r in rest] and res["budget_exhausted"] is True


def test_a_tiny_run_measures_training_sampling_and_the_cuda_tests(gpu, tmp_path):
    out = tmp_path / "out"
    gpu.main(["--out", str(out), "--device", "cpu", "--methods", "perfusion,dreambooth", "--sample-steps", "2",
              "--pytest-args", "-m cuda tests/test_solver.py"])
    res, md = _read(out)
    _check_format(gpu, res, md)
    rows = {r["id"]: r for r in res["measurements"]}
    assert res["tiny"] and not res["budget_exhausted"] and res["skipped_for_budget"] == []
    assert set(res["pipelines"]) == {"sd15", "sdxl"}
    assert res["pipelines"]["sdxl"]["pipeline_class"] == "StableDiffusionXLPipeline"
    assert res["pipelines"]["sdxl"]["text_encoder_2_params"] > 0
    for geometry in ("sd15", "sdxl"):
        for method in ("perfusion", "dreambooth"):
            for variant in ("fp32", "bf16+gc", "bf16w+gc", "bf16w+gc+bf16m"):   # 8-bit AdamW only when asked
                row = rows[f"train/{geometry}/{method}/{variant}"]
                # a method without SDXL support is recorded as such; anything else must measure
                assert row["status"] == "ok" or (geometry == "sdxl" and row["status"] == "unsupported"), row
        for precision in gpu.SAMPLE_PRECISIONS:
            assert rows[f"sample/{geometry}/base/{precision}"]["status"] == "ok"
    for row in rows.values():
        if row["status"] == "ok" and row["kind"] != "pytest":
            assert row["seconds"] > 0 and row["peak_memory_bytes"] >= 0 and row["resolution"] == 16
            assert row["memory_kind"] == "cpu_rss_peak_delta" and row["base_memory_bytes"] is None
        if row["status"] == "unsupported":
            assert row["detail"].startswith("unsupported: ")
    assert rows["train/sd15/perfusion/fp32"]["loop_peak_memory_bytes"] is not None
    assert "train/sd15/fp32/perfusion_vs_dreambooth/time" in res["ratios"]
    assert "sample/sd15/fp32/perfusion_10_vs_base/time" in res["ratios"]
    py = res["pytest"]
    assert rows["pytest"]["status"] == "ok" and py["returncode"] == 0
    assert py["counts"]["failed"] == 0 and sum(py["counts"].values()) >= 1   # the solver's CUDA test
    assert re.search(r"\d+ (passed|skipped)", py["summary"]) and py["summary"] in md


@pytest.mark.slow
def test_the_whole_tiny_plan_through_the_command_line(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--device", "cpu"], cwd=str(ROOT),
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "gpu.json").read_text())
    assert res["complete"] and not res["budget_exhausted"]
    bad = [(r["id"], r["detail"]) for r in res["measurements"] if r["status"] not in ("ok", "unsupported")]
    assert not bad
    assert "rank" in proc.stdout.splitlines()[0]


def test_fresh_process_measures_each_row_in_its_own_process(gpu, tmp_path):
    """``--fresh-process``: the rows come back from child processes with the process's start and peak resident
    memory, the memory table and its derived GPU column are written; the child gets the parent's options
    without the parent's own."""
    argv = ["--out", str(tmp_path / "out"), "--device", "cpu", "--tiny", "--fresh-process", "--methods",
            "perfusion", "--geometries", "sd15", "--sections", "train", "--variants", "fp32,bf16w+gc", "--budget-s=100"]
    cmd = gpu.fresh.child_argv(argv, "train/sd15/perfusion/fp32", tmp_path / "child")
    assert cmd[2:] == ["--device", "cpu", "--tiny", "--methods", "perfusion", "--geometries", "sd15", "--sections",
                       "train", "--variants", "fp32,bf16w+gc", "--out", str(tmp_path / "child"), "--only-row",
                       "train/sd15/perfusion/fp32"]
    half = gpu.build_pipeline("sdxl", "cpu", tiny=True, dtype=gpu.PIPELINE_DTYPES["bf16w+gc"])   # built in bf16
    assert {p.dtype for m in (half.unet, half.vae, half.text_encoder, half.text_encoder_2)
            for p in m.parameters()} == {torch.bfloat16} and torch.get_default_dtype() == torch.float32
    res = gpu.main(argv)
    rows = res["measurements"]
    assert [r["id"] for r in rows] == ["train/sd15/perfusion/fp32", "train/sd15/perfusion/bf16w+gc"]
    assert not any(r["id"].endswith("+8bit") for r in res["measurements"])
    assert all(r["status"] == "ok" and r["seconds"] > 0 for r in rows), [r["detail"] for r in rows]
    assert all(0 < r["process_start_rss_bytes"] < r["process_peak_rss_bytes"] for r in rows)
    assert res["settings"]["fresh_process"] and res["settings"]["memory_cap_bytes"] > 0
    assert res["pipelines"]["sd15"]["unet_params"] > 0                         # reported by the children
    md = (tmp_path / "out" / "gpu.md").read_text()
    assert "Memory in fresh processes" in md and "12 GB / 16 GB / 24 GB / 40 GB" in md


def test_fresh_process_kills_a_measurement_above_the_memory_cap(gpu, tmp_path):
    res = gpu.main(["--out", str(tmp_path / "out"), "--device", "cpu", "--tiny", "--fresh-process", "--methods",
                    "perfusion", "--geometries", "sd15", "--sections", "train", "--variants", "fp32,bf16+gc",
                    "--memory-cap-gb", "0.2"])
    assert [r["status"] for r in res["measurements"]] == ["oom", "oom"]
    assert all("memory cap of 0.2 GiB" in r["detail"] for r in res["measurements"])
    assert "over the cap" in (tmp_path / "out" / "gpu.md").read_text()


def test_cpu_full_targets_read_the_fresh_process_rows(gpu):
    """The real-scale targets from rows: memory is the process's peak minus its start, steps and sampling are
    ratios between rows of the run; a missing or failed row is 'not measured', never a verdict."""
    def row(id_, seconds, peak_gb, kind="train"):
        _, geometry, method, case = id_.split("/")
        return {"id": id_, "kind": kind, "geometry": geometry, "method": method, "case": case, "status": "ok",
                "seconds": seconds, "process_start_rss_bytes": int(1e9), "process_peak_rss_bytes": int(peak_gb * 1e9)}

    rows = [row("train/sd15/perfusion/fp32", 10.0, 9.0), row("train/sd15/dreambooth/fp32", 20.0, 21.0),
            row("train/sd15/perfusion/bf16+gc", 8.0, 5.0), row("train/sd15/dreambooth/bf16+gc", 16.0, 13.0),
            row("sample/sd15/base/fp32", 10.0, 5.0, "sample"), row("sample/sd15/perfusion_1/fp32", 10.2, 5.0, "sample"),
            row("sample/sd15/perfusion_10/fp32", 11.5, 5.0, "sample"),
            row("train/sd15/dreambooth/bf16w+gc+bf16m", 18.0, 10.0)]
    got = {t[0]: t[2:] for t in gpu.cpu_full_targets(rows)}
    assert got["SD 1.5: dreambooth's memory, bf16 weights + checkpointing + bf16 master weights / float32"] == \
        ["0.45", "**met**"]                                                                          # 9 / 20
    assert not any("master weights" in k for k in got if "perfusion's" in k)    # only variants that were run
    assert got["SD 1.5, bf16 + checkpointing: Perfusion's memory / DreamBooth's"] == ["0.33", "**met**"]   # 4 / 12
    assert got["SD 1.5, bf16 + checkpointing: Perfusion's memory"] == ["4.00 GB", "**met**"]
    assert got["SD 1.5: perfusion's memory, bf16 + checkpointing / float32"] == ["0.50", "**met**"]
    assert got["SD 1.5: dreambooth's memory, bf16 + checkpointing / float32"] == ["0.60", "**not met**"]
    assert got["SD 1.5: dreambooth's memory, bf16 weights + checkpointing / float32"] == ["not measured", ""]
    assert got["SD 1.5, fp32: Perfusion's training step / DreamBooth's"] == ["0.50", "**met**"]
    assert got["SD 1.5, fp32: sampling with 1 Perfusion concept(s) / unedited"] == ["1.020", "**met**"]
    assert got["SD 1.5, fp32: sampling with 10 Perfusion concept(s) / unedited"] == ["1.150", "**not met**"]
    assert got["SD 1.5, bf16: sampling with 1 Perfusion concept(s) / unedited"] == ["not measured", ""]
    rows[3]["status"] = "oom"
    got = {t[0]: t[2:] for t in gpu.cpu_full_targets(rows)}
    assert got["SD 1.5, bf16 + checkpointing: Perfusion's memory / DreamBooth's"] == ["not measured", ""]
    assert got["SD 1.5, bf16+gc: Perfusion's training step / DreamBooth's"] == ["not measured", ""]
