"""Learning-rate schedules and warm-up (``lr_scheduler``, ``lr_warmup_steps``, ``lr_num_cycles``): the learning rate
read from the optimizer at every step against its closed form, and the schedule's exact resume from a checkpoint.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from _training_helpers import Stop, fit, interrupt_after, pipe_fixture, real_save, recording_fixture

from editbench import methods, training
from editbench.errors import TrainingError
from editbench.storage import read_safetensors, write_safetensors
from editbench.training import loop
from editbench.training.session import LR_SCHEDULERS

pipe = pipe_fixture()
recording = recording_fixture()

def _closed_form(name: str, k: int, warmup: int, total: int, cycles: int = 1) -> float:
    """The schedule's factor at optimizer step k (1-based): diffusers' lambda at k - 1."""
    s = k - 1
    if name == "constant":
        return 1.0
    if s < warmup:
        return s / max(1, warmup)
    if name == "constant_with_warmup":
        return 1.0
    progress = (s - warmup) / max(1, total - warmup)
    if name == "linear":
        return max(0.0, (total - s) / max(1, total - warmup))
    if name == "cosine":
        return max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))
    return 0.0 if progress >= 1 else max(0.0, 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1.0))))


@pytest.mark.parametrize("schedule", LR_SCHEDULERS)
def test_learning_rate_follows_the_schedule_at_every_step(pipe, schedule, recording):
    steps, warmup = 7, 0 if schedule == "constant" else 3
    cfg = methods.get("perfusion").Config()
    fit(pipe, "perfusion", steps=steps, batch_size=1, lr_scheduler=schedule, lr_warmup_steps=warmup,
        lr_num_cycles=2)
    assert len(recording) == steps
    for k, step in enumerate(recording, start=1):
        f = _closed_form(schedule, k, warmup, steps, cycles=2)
        (lr_values, _), (lr_embedding, _) = step
        assert lr_values == pytest.approx(cfg.lr_values * f, rel=1e-12, abs=1e-18), (schedule, k)
        assert lr_embedding == pytest.approx(cfg.lr_embedding * f, rel=1e-12, abs=1e-18), (schedule, k)
    if schedule == "constant":
        assert all(s[0][0] == cfg.lr_values for s in recording)      # exactly the group's lr, as without schedules


@pytest.mark.parametrize("kw", [
    {"lr_scheduler": "cosine", "lr_warmup_steps": 2},
    {"lr_scheduler": "linear", "lr_warmup_steps": 1, "mixed_precision": "fp16", "gradient_checkpointing": True},
])
def test_resume_with_a_schedule_is_bitwise_exact(pipe, tmp_path, monkeypatch, recording, kw):
    full = fit(pipe, "perfusion", steps=6, checkpoint_every=1, **kw)
    lrs = [s[0][0] for s in recording]
    interrupt_after(monkeypatch, 3)
    with pytest.raises(Stop):
        fit(pipe, "perfusion", steps=6, checkpoint_dir=tmp_path, checkpoint_every=1, **kw)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    _, header = read_safetensors(tmp_path / training.CHECKPOINT_FILE, "checkpoint")
    info = json.loads(header["editbench_checkpoint"])
    assert info["step"] == 3 and info["lr_scheduler"]["last_epoch"] == 3
    assert ("grad_scaler" in info) == (kw.get("mixed_precision") == "fp16")
    del recording[:]
    resumed = fit(pipe, "perfusion", steps=6, checkpoint_dir=tmp_path, checkpoint_every=1, **kw)
    assert resumed.metadata["training"]["resumed_from"] == 3
    assert [s[0][0] for s in recording] == lrs[3:]                  # the schedule continues where it stopped
    for k, v in full.tensors.items():
        assert torch.equal(resumed.tensors[k], v), k


def test_a_checkpoint_without_scheduler_state_resumes_the_schedule_from_its_step(pipe, tmp_path, monkeypatch):
    kw = {"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 4, "checkpoint_every": 1}
    full = fit(pipe, "textual_inversion", steps=5, **kw)
    interrupt_after(monkeypatch, 2)
    with pytest.raises(Stop):
        fit(pipe, "textual_inversion", steps=5, checkpoint_dir=tmp_path, **kw)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    path = tmp_path / training.CHECKPOINT_FILE
    tensors, header = read_safetensors(path, "checkpoint")
    info = json.loads(header["editbench_checkpoint"])
    del info["lr_scheduler"]                                          # as written before schedules existed
    write_safetensors(path, tensors, {"editbench_checkpoint": json.dumps(info)})
    resumed = fit(pipe, "textual_inversion", steps=5, checkpoint_dir=tmp_path, **kw)
    assert resumed.metadata["training"]["resumed_from"] == 2
    assert torch.equal(resumed.tensors["embeddings"], full.tensors["embeddings"])


def test_damaged_scheduler_state_and_a_changed_total_are_refused(pipe, tmp_path):
    kw = {"lr_scheduler": "linear", "checkpoint_every": 1}
    fit(pipe, "textual_inversion", steps=2, checkpoint_dir=tmp_path, **kw)
    with pytest.raises(TrainingError, match="belongs to another run"):   # a linear schedule depends on the total
        fit(pipe, "textual_inversion", steps=4, checkpoint_dir=tmp_path, **kw)
    path = tmp_path / training.CHECKPOINT_FILE
    tensors, header = read_safetensors(path, "checkpoint")
    info = json.loads(header["editbench_checkpoint"])
    info["lr_scheduler"]["optimizer"] = "not a field"
    write_safetensors(path, tensors, {"editbench_checkpoint": json.dumps(info)})
    with pytest.raises(TrainingError, match="damaged"):
        fit(pipe, "textual_inversion", steps=2, checkpoint_dir=tmp_path, **kw)
