"""Crash safety: kill -9 during training and during a suite run, torn writes, non-finite losses, the solver.

Training: a child process (``os.fork`` of the test process, or a fresh interpreter in the slow variant) runs
``Editor.fit`` with a ``checkpoint_dir`` on the tiny pipeline and is killed with SIGKILL after a random delay;
resuming from its checkpoint must give the artifact of an uninterrupted run with the same seed, bitwise. Suites:
a child runs ``run_suite`` and is killed; re-running must give the uninterrupted table, with no duplicate and no
missing row. Writes: a crash after the temporary file is complete (or while writing it) leaves the old file intact.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _method_helpers import concept_for, editor
from _reliability import FIGURES, KILLS_SLOW, module_figures, report  # noqa: F401 (autouse fixture)

from editbench import methods
from editbench.errors import EditbenchError, TrainingError
from editbench.methods.base import Artifact
from editbench.testing import tiny_pipeline

METHODS = methods.available()
SEED = int(os.environ.get("EDITBENCH_CRASH_SEED", "20251122"))


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


# ------------------------------------------------------------------------------------------------ processes
def fork(fn) -> int:
    """Run ``fn()`` in a forked child; returns its pid. The child never returns into pytest."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            fn()
        except BaseException:  # noqa: BLE001 - the child reports any failure through its exit code
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


def kill_after(pid: int, delay: float) -> str:
    """SIGKILL ``pid`` after ``delay`` s unless it exits first: "killed", "finished" or "failed"."""
    end = time.monotonic() + delay
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "finished" if os.waitstatus_to_exitcode(status) == 0 else "failed"
        time.sleep(0.002)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "killed"
    return "finished" if os.waitstatus_to_exitcode(status) == 0 else "failed"


def kill_when(pid: int, ready, extra: float, timeout: float = 300) -> str:
    """Wait until ``ready()`` (or the child exits), then :func:`kill_after` ``extra`` s: the kill lands at a random
    moment after a chosen point of progress (mid-step, mid-checkpoint-write, ...)."""
    end = time.monotonic() + timeout
    while not ready():
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return "finished" if os.waitstatus_to_exitcode(status) == 0 else "failed"
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("the child made no progress")
        time.sleep(0.002)
    return kill_after(pid, extra)


def _header_step(path: Path) -> int:
    """Step recorded in a checkpoint's header (cheap: reads the JSON header only); 0 if there is none."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            meta = json.loads(fh.read(n))["__metadata__"]
        return int(json.loads(meta["editbench_checkpoint"])["step"])
    except (OSError, ValueError, KeyError):
        return 0


def checkpoint_step(folder: Path) -> int:
    """Step of the checkpoint in ``folder`` (0 if none); also proves it is fully readable."""
    from editbench.storage import read_safetensors

    path = folder / "checkpoint.safetensors"
    if not path.exists():
        return 0
    _, header = read_safetensors(path, "checkpoint")
    return int(json.loads(header["editbench_checkpoint"])["step"])


def same_artifact(a: Artifact, b: Artifact) -> None:
    assert a.tensors.keys() == b.tensors.keys()
    for k in a.tensors:
        assert a.tensors[k].dtype == b.tensors[k].dtype and torch.equal(a.tensors[k], b.tensors[k]), k
    ta, tb = a.metadata["training"], b.metadata["training"]
    assert (ta["loss_first"], ta["loss_last"], ta["steps"]) == (tb["loss_first"], tb["loss_last"], tb["steps"])


# ------------------------------------------------------------------------------------------------ training kills
def _train_kills(name: str, pipe, tmp: Path, kills: int, steps: int, rng: random.Random, test: str,
                 min_step: int = 0, max_chain: int = 3) -> None:
    """``kills`` SIGKILLs at random points of fits of ``name``, in chains of 1..``max_chain`` kills on one
    checkpoint folder (each run resumes the previous one); each chain is then finished by a resumed fit in this
    process, which must equal the uninterrupted run bitwise.

    Each kill waits for a random checkpoint step in ``[max(current, min_step), steps - 1]`` and then a random
    delay of up to 1.5 step durations, so it lands before, during or after a step or a checkpoint write."""
    concept = concept_for(name)
    ed = editor(name, checkpoint_every=1)
    t0 = time.perf_counter()
    reference = ed.fit(pipe, concept, steps=steps, seed=3, progress=False)  # warms caches (class images, C)
    t_full = time.perf_counter() - t0
    FIGURES.put(test, "reference_fit_s", round(t_full, 2))
    done = chain = 0
    while done < kills:
        folder = tmp / f"chain{chain}"
        chain += 1
        n = min(rng.randint(1, max_chain), kills - done)
        while n:
            pid = fork(lambda d=folder: ed.fit(pipe, concept, steps=steps, seed=3, progress=False, checkpoint_dir=d))
            target = rng.randint(min(max(checkpoint_step(folder), min_step), steps - 1), steps - 1)
            ckpt = folder / "checkpoint.safetensors"
            outcome = kill_when(pid, lambda c=ckpt, t=target: _header_step(c) >= t,
                                rng.uniform(0, 1.5) * t_full / steps)
            FIGURES.add(test, f"child_{outcome}")
            assert outcome != "failed", "the training child raised"
            if outcome != "killed":
                break
            n -= 1
            done += 1
            step = checkpoint_step(folder)  # a kill during a checkpoint write leaves the previous one readable
            FIGURES.add(test, "kills")
            FIGURES.add(test, f"kill_at_checkpoint_step_{step}")
            if list(folder.glob(".*.tmp")):
                FIGURES.add(test, "kills_during_checkpoint_write")
                for tmpfile in folder.glob(".*.tmp"):
                    tmpfile.unlink()
        start = checkpoint_step(folder)
        resumed = ed.fit(pipe, concept, steps=steps, seed=3, progress=False, checkpoint_dir=folder)
        assert resumed.metadata["training"]["resumed_from"] == start
        same_artifact(reference, resumed)
        FIGURES.add(test, "resumed_bitwise_equal")


def test_kill_training_once_then_resume_is_bitwise_identical(pipe, tmp_path):
    _train_kills("perfusion", pipe, tmp_path, kills=1, steps=6, rng=random.Random(SEED), test="kill_train[perfusion]",
                 min_step=1, max_chain=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_kill_training_many_times(name, pipe, tmp_path):
    _train_kills(name, pipe, tmp_path, kills=max(KILLS_SLOW, 10), steps=12, rng=random.Random(SEED + hash(name) % 997),
                 test=f"kill_train_slow[{name}]")


_CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from _method_helpers import concept_for, editor
    from editbench.testing import tiny_pipeline
    pipe, concept = tiny_pipeline(), concept_for({name!r})
    ed = editor({name!r}, checkpoint_every=1)
    print("ready", flush=True)
    art = ed.fit(pipe, concept, steps={steps}, seed=3, progress=False, checkpoint_dir={folder!r})
    art.save({out!r})
""")


@pytest.mark.slow
def test_kill_training_in_fresh_interpreters(pipe, tmp_path):
    """The same with ``subprocess`` children (a new interpreter per run): checkpoints written by other processes
    resume exactly too."""
    name, steps, test = "textual_inversion", 12, "kill_train_fresh_process[textual_inversion]"
    rng = random.Random(SEED)
    ed = editor(name, checkpoint_every=1)
    t0 = time.perf_counter()
    reference = ed.fit(pipe, concept_for(name), steps=steps, seed=3, progress=False)
    t_full = time.perf_counter() - t0
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    kills = chain = 0
    while kills < max(KILLS_SLOW, 10):
        folder = tmp_path / f"chain{chain}"
        chain += 1
        code = _CHILD.format(tests=str(Path(__file__).parent), name=name, steps=steps, folder=str(folder),
                             out=str(tmp_path / "unused.safetensors"))
        for _ in range(rng.randint(1, 3)):
            proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, env=env, text=True)
            assert proc.stdout.readline().strip() == "ready"
            target = rng.randint(min(checkpoint_step(folder), steps - 1), steps - 1)
            while _header_step(folder / "checkpoint.safetensors") < target and proc.poll() is None:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, 1.5) * t_full / steps)
            if proc.poll() is not None:
                FIGURES.add(test, "child_finished")
                break
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            FIGURES.add(test, "kills")
            FIGURES.add(test, f"kill_at_checkpoint_step_{checkpoint_step(folder)}")
        start = checkpoint_step(folder)
        resumed = ed.fit(pipe, concept_for(name), steps=steps, seed=3, progress=False, checkpoint_dir=folder)
        assert resumed.metadata["training"]["resumed_from"] == start
        same_artifact(reference, resumed)
        FIGURES.add(test, "resumed_bitwise_equal")


# ------------------------------------------------------------------------------------------------ suite kills
SUITE = {"name": "crash", "model": "tiny", "concepts": ["zebra", "sunny", "target"], "pairs": [["zebra", "sunny"]],
         "seeds": [0, 1], "max_prompts": 2, "images_per_prompt": 2, "steps": 3,
         "methods": ["base", {"name": "fake", "sweep": {"scale": [0.5, 1.0]}}, "fake_single"]}
KEY = ["label", "concepts", "seed", "setting", "prompt_index", "image_index"]


def _suite_kills(tmp: Path, kills: int, rng: random.Random, test: str, min_cells: int = 0,
                 max_chain: int = 3) -> None:
    from _eval_stubs import FakeClip, FakeEditor, FakePipeline, FakeRareWordEditor, registered

    from editbench.eval import runner
    from editbench.eval import spec as suite_spec

    class SlowPipeline(FakePipeline):  # ~10 ms per batch: a run lasts long enough to be killed anywhere
        def __call__(self, *a, **kw):
            time.sleep(0.01)
            return super().__call__(*a, **kw)

    def run(out):
        return runner.run_suite(suite_spec.load_suite(SUITE), out, pipeline=SlowPipeline(), clip=FakeClip(),
                                progress=False)

    with registered(FakeEditor, FakeRareWordEditor):
        t0 = time.perf_counter()
        reference = run(tmp / "reference")
        t_full = time.perf_counter() - t0
        n_cells = len(suite_spec.load_suite(SUITE).cells())
        cols = [c for c in reference.columns if not c.endswith("time_s")]
        done = chain = 0
        while done < kills:  # chains of 1..3 kills on one output folder, then a re-run that must finish it
            out = tmp / f"out{chain}"
            chain += 1

            def finished(out=out) -> int:
                cells = out / "cells"
                return len(list(cells.glob("*.csv")) + list(cells.glob("*.skip.json"))) if cells.is_dir() else 0

            for _ in range(min(rng.randint(1, max_chain), kills - done)):
                # wait for a random number of finished cells, then up to 1.5 cell durations more
                target = rng.randint(min(max(finished(), min_cells), n_cells - 1), n_cells - 1)
                outcome = kill_when(fork(lambda out=out: run(out)), lambda t=target, f=finished: f() >= t,
                                    rng.uniform(0, 1.5) * t_full / n_cells)
                FIGURES.add(test, f"child_{outcome}")
                assert outcome != "failed"
                if outcome != "killed":
                    break
                done += 1
                FIGURES.add(test, "kills")
                FIGURES.add(test, f"cells_done_at_kill_{finished()}")
            df = run(out)
            FIGURES.add(test, "reruns_compared")
            FIGURES.add(test, "leftover_tmp_files", len(list(out.rglob(".*.tmp"))))
            assert not df.duplicated(KEY).any(), "duplicate rows after resuming"
            a = reference[cols].sort_values(KEY).reset_index(drop=True)
            b = df[cols].sort_values(KEY).reset_index(drop=True)
            pd.testing.assert_frame_equal(a, b)  # nothing missing, nothing extra, same values
            assert len(pd.read_csv(out / "results.csv")) == len(reference)
            FIGURES.add(test, "tables_equal")


def test_kill_suite_once_then_rerun_has_no_duplicate_or_missing_rows(tmp_path):
    _suite_kills(tmp_path, 1, random.Random(SEED), "kill_suite", min_cells=1, max_chain=1)


@pytest.mark.slow
def test_kill_suite_many_times(tmp_path):
    _suite_kills(tmp_path, max(KILLS_SLOW, 10), random.Random(SEED + 1), "kill_suite_slow")


# ------------------------------------------------------------------------------------------------ torn writes
def _writers(tmp: Path):
    """(label, path, write(version) -> None, read(path) -> value, expect(version) -> the value ``write`` stored) for
    every atomic writer of the package."""
    from editbench.moments import SecondMoment
    from editbench.storage import (
        read_json,
        read_safetensors,
        read_tensors,
        write_csv,
        write_json,
        write_safetensors,
    )

    def artifact(v):
        art = Artifact("textual_inversion", {"embeddings": torch.full((2, 8), float(v))}, {"v": v})
        art.save(tmp / "a.safetensors")

    def moment(v):
        m = SecondMoment(4, metadata={"v": v})
        m.update(torch.full((3, 4), float(v + 1)))
        m.save(tmp / "m.safetensors")

    return [
        ("Artifact.save", tmp / "a.safetensors", artifact,
         lambda p: (Artifact.load(p).metadata["v"], Artifact.load(p).tensors["embeddings"].tolist()),
         lambda v: (v, [[float(v)] * 8] * 2)),
        ("storage.write_safetensors", tmp / "w.safetensors",
         lambda v: write_safetensors(tmp / "w.safetensors", {"x": torch.full((3,), float(v))}, {"v": str(v)}),
         lambda p: (read_safetensors(p, "x")[1]["v"], read_tensors(p)["x"].tolist()),
         lambda v: (str(v), [float(v)] * 3)),
        ("storage.write_json", tmp / "j.json", lambda v: write_json(tmp / "j.json", {"v": v}),
         lambda p: read_json(p), lambda v: {"v": v}),
        ("storage.write_safetensors (no metadata)", tmp / "t.safetensors",
         lambda v: write_safetensors(tmp / "t.safetensors", {"x": torch.full((3,), float(v))}),
         lambda p: read_tensors(p)["x"].tolist(), lambda v: [float(v)] * 3),
        ("storage.write_csv", tmp / "c.csv", lambda v: write_csv(tmp / "c.csv", pd.DataFrame({"v": [v] * 3})),
         lambda p: pd.read_csv(p)["v"].tolist(), lambda v: [v] * 3),
        ("storage.write_json (default=str)", tmp / "s.json",
         lambda v: write_json(tmp / "s.json", {"v": v}, default=str), lambda p: json.loads(p.read_text()),
         lambda v: {"v": v}),
        ("SecondMoment.save", tmp / "m.safetensors", moment,
         lambda p: (SecondMoment.load(p).metadata["v"], SecondMoment.load(p).matrix().tolist()),
         lambda v: (v, [[float(v + 1) ** 2] * 4] * 4)),
    ]


def assert_read(got, expected, label: str) -> None:
    """``got == expected`` with the same types all the way down (1 is not 1.0, "1" is not 1)."""
    def shape(x):
        return (type(x).__name__, [shape(y) for y in x] if isinstance(x, (list, tuple)) else
                {k: shape(y) for k, y in x.items()} if isinstance(x, dict) else None)
    assert got == expected and shape(got) == shape(expected), f"{label}: read {got!r}, wrote {expected!r}"


@pytest.mark.parametrize("failure", ["rename", "write"])
def test_crash_mid_write_leaves_the_old_file(tmp_path, monkeypatch, failure):
    """The writer dies after the temporary file is complete (os.replace raises) or while writing it (the first
    write/fsync raises): the old file is intact and no temporary file is left behind."""
    import safetensors.torch

    for label, path, write, read, expect in _writers(tmp_path):
        write(1)
        old = path.read_bytes()
        with monkeypatch.context() as m:
            if failure == "rename":
                def boom(*a, **k):
                    raise OSError("simulated crash after the temporary file was written")
                m.setattr(os, "replace", boom)
            else:
                def boom_fsync(fd):
                    raise OSError("simulated crash while writing")
                m.setattr(os, "fsync", boom_fsync)
                m.setattr(safetensors.torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("crash")))
            with pytest.raises(OSError):
                write(2)
        assert path.read_bytes() == old, label
        assert_read(read(path), expect(1), label)                   # exactly the old version, nothing else
        assert not list(tmp_path.glob(".*.tmp")), f"{label} left a temporary file"
        write(3)
        assert_read(read(path), expect(3), label)
        FIGURES.add(f"torn_write[{failure}]", "writers_checked")


def _kill_writes(tmp: Path, kills: int, rng: random.Random, test: str) -> None:
    """A child saves two large artifacts alternately to one path in a loop; kill it at random moments: the file
    always loads and is bitwise one of the two."""
    versions = {v: Artifact("textual_inversion", {"embeddings": torch.full((2048, 1024), float(v))},
                            {"tokens": [f"<v{v}>"] * 2048}) for v in (1, 2)}
    path = tmp / "art.safetensors"
    versions[1].save(path)
    t0 = time.perf_counter()
    versions[2].save(tmp / "probe.safetensors")
    t_save = time.perf_counter() - t0

    def loop():
        i = 0
        while True:
            versions[1 + i % 2].save(path)
            i += 1

    for _ in range(kills):
        assert kill_after(fork(loop), rng.uniform(0.5, 6.0) * t_save) == "killed"
        art = Artifact.load(path)  # never torn
        v = int(art.tensors["embeddings"][0, 0])
        assert torch.equal(art.tensors["embeddings"], versions[v].tensors["embeddings"])
        FIGURES.add(test, "kills")
        FIGURES.add(test, "file_intact")
        if list(tmp.glob(".art.safetensors.*.tmp")):
            FIGURES.add(test, "kills_during_write")
            for f in tmp.glob(".art.safetensors.*.tmp"):
                f.unlink()


def test_kill_during_artifact_writes(tmp_path):
    _kill_writes(tmp_path, 5, random.Random(SEED), "kill_write")


@pytest.mark.slow
def test_kill_during_artifact_writes_many(tmp_path):
    _kill_writes(tmp_path, 100, random.Random(SEED + 2), "kill_write_slow")


# ------------------------------------------------------------------------------------------------ numerics
def _poisoned_fit(name, pipe, tmp: Path, monkeypatch, poison_after: int):
    """A fit whose loss becomes NaN right after the checkpoint of step ``poison_after`` was written."""
    from editbench.training import loop

    state = {"poison": False, "bytes": None}
    real_save, real_mse = loop.save_checkpoint, loop.masked_mse

    def save(path, **kw):
        real_save(path, **kw)
        if kw["step"] == poison_after:
            state["bytes"] = Path(path).read_bytes()
            state["poison"] = True

    def mse(*a, **k):
        loss = real_mse(*a, **k)
        return loss * float("nan") if state["poison"] else loss

    monkeypatch.setattr(loop, "save_checkpoint", save)
    monkeypatch.setattr(loop, "masked_mse", mse)
    ed = editor(name, checkpoint_every=1)
    with pytest.raises(TrainingError) as info:
        ed.fit(pipe, concept_for(name), steps=poison_after + 2, seed=5, progress=False, checkpoint_dir=tmp)
    monkeypatch.undo()
    return ed, info.value, state["bytes"]


@pytest.mark.parametrize("name", ["textual_inversion", "perfusion", "lora"])
def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(name, pipe, tmp_path, monkeypatch):
    from _reliability import pipeline_state

    before = pipeline_state(pipe)
    ed, err, good = _poisoned_fit(name, pipe, tmp_path, monkeypatch, poison_after=2)
    assert "step 3" in str(err) and "nan" in str(err).lower() and "checkpoint" in str(err)
    ckpt = tmp_path / "checkpoint.safetensors"
    assert ckpt.read_bytes() == good and checkpoint_step(tmp_path) == 2   # the last good checkpoint, untouched
    assert pipeline_state(pipe) == before                                   # the failed fit left no trace
    # the kept checkpoint is usable: resuming (without the fault) equals an uninterrupted run
    resumed = ed.fit(pipe, concept_for(name), steps=4, seed=5, progress=False, checkpoint_dir=tmp_path)
    assert resumed.metadata["training"]["resumed_from"] == 2
    same_artifact(ed.fit(pipe, concept_for(name), steps=4, seed=5, progress=False), resumed)
    FIGURES.add("nan_guard", f"{name}:stopped_at_step_3_kept_step_2_resumed_bitwise")


def test_infinite_loss_is_caught_too(pipe, tmp_path, monkeypatch):
    from editbench.training import loop

    real = loop.masked_mse
    monkeypatch.setattr(loop, "masked_mse", lambda *a, **k: real(*a, **k) * float("inf"))
    with pytest.raises(TrainingError, match="step 1"):
        editor("textual_inversion").fit(pipe, concept_for("textual_inversion"), steps=2, progress=False,
                                        checkpoint_dir=tmp_path)
    assert not (tmp_path / "checkpoint.safetensors").exists()


def test_solver_refuses_ill_conditioned_systems_and_suggests_lam():
    from editbench.solver import closed_form_edit

    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 8, generator=g, dtype=torch.float64)
    k1 = torch.randn(8, generator=g, dtype=torch.float64)
    e = torch.randn(8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 6, generator=g, dtype=torch.float64)
    cases = {"nearly dependent": torch.stack([k1, k1 + 1e-9 * e]), "dependent": torch.stack([k1, 2 * k1]),
             "too many": torch.randn(9, 8, generator=g, dtype=torch.float64)}
    for label, keys in cases.items():
        values = v if len(keys) == 2 else torch.randn(len(keys), 6, generator=g, dtype=torch.float64)
        with pytest.raises(EditbenchError, match="lam") as info:
            closed_form_edit(w, keys, values)
        assert "dependent" in str(info.value), label
        out = closed_form_edit(w, keys, values, lam=1e-3)  # the suggested fix works
        assert torch.isfinite(out).all()
        FIGURES.add("solver", "ill_conditioned_refused_with_lam_hint")
    bad_cov = torch.diag(torch.tensor([1.0] + [1e-20] * 7, dtype=torch.float64))
    with pytest.raises(EditbenchError, match="ridge|positive definite|ill-conditioned"):
        closed_form_edit(w, k1[None], v[:1], cov=bad_cov)
    FIGURES.add("solver", "ill_conditioned_cov_refused")
    assert np.isfinite(closed_form_edit(w, k1[None], v[:1]).numpy()).all()
