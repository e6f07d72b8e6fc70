"""The ``editbench train`` flags that set the optional training features, and their mistakes as one-line errors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image

@pytest.fixture
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITBENCH_CACHE", str(tmp_path / "cache"))


def test_train_flags_set_the_training_options(tmp_path, capsys, _cache):
    from editbench.cli import main
    from editbench.methods.base import Artifact

    out, ckpt = tmp_path / "ti.safetensors", tmp_path / "ckpt"
    assert main(["train", "--method", "textual_inversion", "--concept", "zebra", "--steps", "2",
                 "--set", "batch_size=1", "--gradient-checkpointing", "--mixed-precision", "bf16",
                 "--resolution", "64", "--lr-scheduler", "linear", "--lr-warmup-steps", "1",
                 "--validation-every", "2", "--validation-prompt", "a {} on the grass",
                 "--validation-prompt", "two {}", "--set", "validation_inference_steps=2",
                 "--checkpoint-dir", str(ckpt), "--out", str(out)]) == 0
    cfg = Artifact.load(out).metadata["config"]
    assert {k: cfg[k] for k in ("gradient_checkpointing", "mixed_precision", "resolution", "lr_scheduler",
                                "lr_warmup_steps", "validation_every", "validation_prompts")} == {
        "gradient_checkpointing": True, "mixed_precision": "bf16", "resolution": 64, "lr_scheduler": "linear",
        "lr_warmup_steps": 1, "validation_every": 2, "validation_prompts": ["a {} on the grass", "two {}"]}
    assert sorted(p.name for p in (ckpt / "validation" / "step_00002").glob("*.png")) == ["00.png", "01.png"]
    assert Image.open(ckpt / "validation" / "step_00002" / "00.png").size == (64, 64)


def test_train_class_image_flags(tmp_path, _cache):
    from editbench.commands import train_overrides
    from editbench.cli import build_parser

    args = build_parser().parse_args(["train", "--method", "dreambooth", "--concept", "zebra", "--out", "x",
                                      "--num-class-images", "3", "--class-resolution", "48",
                                      "--optimizer", "adam", "--log-with", "tensorboard"])
    assert train_overrides(args) == {"num_class_images": 3, "class_resolution": 48, "optimizer": "adam",
                                     "log_with": "tensorboard"}
    assert train_overrides(build_parser().parse_args(["train", "--method", "lora", "--out", "x"])) == {}


def test_train_flag_mistakes_are_one_line_errors(tmp_path, capsys, monkeypatch, _cache):
    from editbench.cli import main

    base = ["train", "--method", "textual_inversion", "--concept", "zebra", "--steps", "1", "--out",
            str(tmp_path / "x.safetensors")]
    assert main([*base, "--class-resolution", "48"]) == 2
    assert "unknown textual_inversion option(s) ['class_resolution']" in capsys.readouterr().err
    assert main([*base, "--resolution", "64", "--set", "resolution=32"]) == 2
    assert "resolution given twice" in capsys.readouterr().err
    assert main([*base, "--lr-scheduler", "cosine_with_whatever"]) == 2
    assert "lr_scheduler must be one of" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert main([*base, "--optimizer", "adamw8bit"]) == 2
    assert "pip install bitsandbytes" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert main([*base, "--log-with", "tensorboard", "--checkpoint-dir", str(tmp_path / "c")]) == 2
    assert "pip install tensorboard" in capsys.readouterr().err
    assert not Path(tmp_path / "x.safetensors").exists()
