"""``editbench bench --shard auto``: the shard read from the launcher's environment (SLURM arrays, torchrun, srun)."""

from __future__ import annotations

import pytest

from editbench.commands import bench_shard
from editbench.errors import EditbenchError
from editbench.eval.spec import parse_shard, shard_from_env
from editbench.training.parallel import ACCELERATE_ENV

LAUNCH_VARS = ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP",
               "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", ACCELERATE_ENV)


@pytest.fixture
def env(monkeypatch):
    """A clean launcher environment; returns a setter of variables."""
    for name in LAUNCH_VARS:  # set, then deleted: monkeypatch restores each one (bench_shard writes the flag)
        monkeypatch.setenv(name, "0")
        monkeypatch.delenv(name)

    def put(**variables):
        for k, v in variables.items():
            monkeypatch.setenv(k, str(v))

    return put


@pytest.mark.parametrize("variables, shard", [
    ({}, (0, 1)),
    ({"SLURM_ARRAY_TASK_ID": 3, "SLURM_ARRAY_TASK_COUNT": 8}, (3, 8)),
    ({"SLURM_ARRAY_TASK_ID": 4, "SLURM_ARRAY_TASK_COUNT": 4, "SLURM_ARRAY_TASK_MIN": 1}, (3, 4)),   # --array=1-4
    ({"SLURM_ARRAY_TASK_ID": 6, "SLURM_ARRAY_TASK_COUNT": 4, "SLURM_ARRAY_TASK_MIN": 0,
      "SLURM_ARRAY_TASK_STEP": 2}, (3, 4)),                                                        # --array=0-6:2
    ({"RANK": 5, "LOCAL_RANK": 1, "WORLD_SIZE": 8}, (5, 8)),                                       # torchrun, 2 nodes
    ({"LOCAL_RANK": 2, "WORLD_SIZE": 4}, (2, 4)),
    ({"SLURM_PROCID": 1, "SLURM_NTASKS": 3}, (1, 3)),                                              # srun --ntasks 3
    ({"SLURM_PROCID": 0, "SLURM_NTASKS": 1}, (0, 1)),                                              # a plain sbatch job
    # a 3-task array with 4 GPU processes in each: task 2, rank 1 -> shard 2 * 4 + 1 of 12
    ({"SLURM_ARRAY_TASK_ID": 2, "SLURM_ARRAY_TASK_COUNT": 3, "RANK": 1, "LOCAL_RANK": 1, "WORLD_SIZE": 4,
      "SLURM_PROCID": 0, "SLURM_NTASKS": 1}, (9, 12)),
])
def test_shard_from_the_launcher_environment(env, variables, shard):
    env(**variables)
    i, n, how = shard_from_env()
    assert (i, n) == shard and parse_shard(f"{i}/{n}") == shard
    for name in variables:
        if name in ("SLURM_ARRAY_TASK_ID", "RANK") or (name == "LOCAL_RANK" and "RANK" not in variables) or \
                (name == "SLURM_PROCID" and not {"RANK", "LOCAL_RANK"} & set(variables)):
            assert name in how, how


def test_every_array_task_and_rank_gets_its_own_shard(env):
    seen = set()
    for task in range(3):
        for rank in range(4):
            seen.add(shard_from_env({"SLURM_ARRAY_TASK_ID": task, "SLURM_ARRAY_TASK_COUNT": 3, "RANK": rank,
                                     "WORLD_SIZE": 4})[:2])
    assert seen == {(i, 12) for i in range(12)}


@pytest.mark.parametrize("variables, words", [
    ({"SLURM_ARRAY_TASK_ID": 3}, "SLURM_ARRAY_TASK_COUNT"),
    ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": 2}, "is not an integer"),
    ({"SLURM_ARRAY_TASK_ID": 5, "SLURM_ARRAY_TASK_COUNT": 2}, "not a shard"),
    ({"SLURM_ARRAY_TASK_ID": 3, "SLURM_ARRAY_TASK_COUNT": 2, "SLURM_ARRAY_TASK_STEP": 2}, "grid"),
    ({"RANK": 4, "WORLD_SIZE": 4}, "not a shard"),
    ({"RANK": 0, "WORLD_SIZE": 0}, "not a shard"),
])
def test_bad_launcher_values_are_clear_errors(env, variables, words):
    env(**variables)
    with pytest.raises(EditbenchError, match=words):
        shard_from_env()


def test_bench_shard_auto(env, capsys):
    import os

    assert bench_shard("1/4") == "1/4" and bench_shard("auto") == "0/1"
    env(SLURM_ARRAY_TASK_ID=2, SLURM_ARRAY_TASK_COUNT=5)
    assert bench_shard("auto") == "2/5" and ACCELERATE_ENV not in os.environ  # array tasks train as they would
    assert "shard 2/5 (SLURM_ARRAY_TASK_ID=2 of SLURM_ARRAY_TASK_COUNT=5)" in capsys.readouterr().err
    env(RANK=1, LOCAL_RANK=1, WORLD_SIZE=2)
    assert bench_shard("AUTO") == "5/10"
    assert os.environ[ACCELERATE_ENV] == "0"  # torchrun processes run different cells: no data-parallel fit
    env(**{ACCELERATE_ENV: "1"})
    with pytest.raises(EditbenchError, match="data-parallel"):
        bench_shard("auto")


def test_the_cli_passes_the_auto_shard_to_the_runner(env, monkeypatch, tmp_path):
    from editbench.cli import main
    from editbench.eval import report, runner

    seen = []
    monkeypatch.setattr(runner, "run_suite", lambda suite, out, **kw: seen.append(kw["shard"]) or None)
    monkeypatch.setattr(report, "write_report", lambda out: tmp_path / "report.md")
    monkeypatch.setattr(report, "summary_table", lambda df: None)
    monkeypatch.setattr(report, "console_table", lambda t: "")
    env(SLURM_ARRAY_TASK_ID=1, SLURM_ARRAY_TASK_COUNT=3)
    assert main(["bench", "--suite", "toy-quick", "--out", str(tmp_path / "o"), "--shard", "auto"]) == 0
    assert seen == ["1/3"]
