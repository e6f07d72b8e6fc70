"""TensorBoard logs (``log_with='tensorboard'``): loss, learning rates and validation images through a stand-in
writer, real event files where tensorboard is installed, a clear error where it is not.
"""

from __future__ import annotations

import math
import sys
import types

import pytest
from _method_helpers import concept_for, editor
from _training_helpers import fit, pipe_fixture

from editbench import methods, training
from editbench.errors import EditbenchError

pipe = pipe_fixture()

def test_tensorboard_missing_is_a_clear_error_naming_the_package(pipe, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # as if tensorboard were not installed
    ed = editor("textual_inversion", log_with="tensorboard")            # the config itself is fine
    with pytest.raises(EditbenchError, match="needs the tensorboard package: pip install tensorboard"):
        ed.fit(pipe, concept_for("textual_inversion"), steps=1, progress=False, checkpoint_dir=tmp_path)
    assert not (tmp_path / training.CHECKPOINT_FILE).exists()


def test_tensorboard_logs_loss_learning_rates_and_validation_images(pipe, tmp_path, monkeypatch):
    events = []

    class Writer:
        def __init__(self, log_dir):
            events.append(("open", log_dir))

        def add_scalar(self, tag, value, step):
            events.append((tag, value, step))

        def add_image(self, tag, image, step, dataformats):
            events.append((tag, image.shape, step, dataformats))

        def flush(self):
            events.append(("flush",))

        def close(self):
            events.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    fit(pipe, "textual_inversion", steps=2, checkpoint_dir=tmp_path, log_with="tensorboard",
        lr_scheduler="constant_with_warmup", lr_warmup_steps=2, validation_every=2, validation_inference_steps=2,
        checkpoint_every=1)
    cfg = methods.get("textual_inversion").Config()
    assert events[0] == ("open", str(tmp_path / "logs")) and events[-1] == ("close",)
    assert [e[2] for e in events if e[0] == "train/loss"] == [1, 2]
    assert all(math.isfinite(e[1]) for e in events if e[0] == "train/loss")
    assert [(e[1], e[2]) for e in events if e[0] == "train/lr/embeddings"] == [(0.0, 1), (cfg.lr / 2, 2)]
    assert [e[1:] for e in events if e[0] == "validation/00"] == [((16, 16, 3), 2, "HWC")]
    assert events.count(("flush",)) == 2


def test_tensorboard_writes_event_files(pipe, tmp_path):
    pytest.importorskip("tensorboard")
    fit(pipe, "textual_inversion", steps=2, checkpoint_dir=tmp_path, log_with="tensorboard")
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))
