"""8-bit Adam (``optimizer='adamw8bit'``): bitsandbytes' AdamW8bit (a stand-in where it is not installed), its state
checkpointed and resumed exactly, a clear error without the package.
"""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch
from _method_helpers import concept_for, editor
from _training_helpers import Stop, fit, interrupt_after, pipe_fixture, real_save

from editbench import training
from editbench.errors import EditbenchError
from editbench.storage import read_safetensors
from editbench.training import loop

pipe = pipe_fixture()

def test_adamw8bit_without_bitsandbytes_is_a_clear_error(pipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    ed = editor("textual_inversion", optimizer="adamw8bit")
    with pytest.raises(EditbenchError, match="optimizer='adamw8bit' needs bitsandbytes.*pip install bitsandbytes"):
        ed.fit(pipe, concept_for("textual_inversion"), steps=1, progress=False)


class _FakeAdamW8bit(torch.optim.AdamW):
    """Stands in for bitsandbytes' AdamW8bit where it is not installed: state with an int counter and a uint8
    tensor of another shape, as 8-bit optimizers keep (quantised moments, block maxima, a Python step count)."""

    made: list = []

    def __init__(self, params, **kw):
        type(self).made.append(kw)
        super().__init__(params, **kw)

    def step(self, closure=None):
        out = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                st["count"] = int(st.get("count", 0)) + 1
                st["q"] = torch.full((3,), st["count"], dtype=torch.uint8)
        return out


def test_adamw8bit_is_bitsandbytes_adamw8bit_and_its_state_checkpoints_and_resumes_exactly(pipe, tmp_path,
                                                                                          monkeypatch):
    bnb = types.ModuleType("bitsandbytes")
    bnb.optim = types.SimpleNamespace(AdamW8bit=_FakeAdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", bnb)
    monkeypatch.setattr(_FakeAdamW8bit, "made", [])
    full = fit(pipe, "textual_inversion", steps=4, optimizer="adamw8bit", adam_betas=(0.8, 0.99))
    assert _FakeAdamW8bit.made == [{"betas": (0.8, 0.99), "eps": 1e-8}]
    interrupt_after(monkeypatch, 2)
    with pytest.raises(Stop):
        fit(pipe, "textual_inversion", steps=4, optimizer="adamw8bit", adam_betas=(0.8, 0.99),
            checkpoint_dir=tmp_path, checkpoint_every=1)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    tensors, header = read_safetensors(tmp_path / training.CHECKPOINT_FILE, "checkpoint")
    assert json.loads(header["editbench_checkpoint"])["optimizer_scalars"] == {"optim/embeddings/0/count": 2}
    assert tensors["optim/embeddings/0/q"].dtype == torch.uint8
    resumed = fit(pipe, "textual_inversion", steps=4, optimizer="adamw8bit", adam_betas=(0.8, 0.99),
                  checkpoint_dir=tmp_path, checkpoint_every=1)
    assert resumed.metadata["training"]["resumed_from"] == 2
    assert torch.equal(resumed.tensors["embeddings"], full.tensors["embeddings"])


def test_adamw8bit_with_bitsandbytes(pipe):
    pytest.importorskip("bitsandbytes")
    art = fit(pipe, "textual_inversion", steps=2, optimizer="adamw8bit")
    assert math.isfinite(art.metadata["training"]["loss_last"])
