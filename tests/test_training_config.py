"""The optional training features' fields of ``TrainConfig``: each is validated with a clear error, the valid values
pass, and the defaults keep the run signature (checkpoints written before the fields existed still resume).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from _training_helpers import METHODS

from editbench import methods
from editbench.errors import EditbenchError
from editbench.training.session import TrainConfig

@pytest.mark.parametrize("bad, match", [
    ({"gradient_checkpointing": "yes"}, "gradient_checkpointing"),
    ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
    ({"resolution": 0}, "resolution must be a positive int"),
    ({"resolution": True}, "resolution must be a positive int"),
    ({"lr_scheduler": "step"}, "lr_scheduler must be one of"),
    ({"lr_warmup_steps": -1}, "lr_warmup_steps must be an int >= 0"),
    ({"lr_warmup_steps": 3}, "'constant' has none: use 'constant_with_warmup'"),
    ({"lr_scheduler": "cosine_with_restarts", "lr_num_cycles": 0}, "lr_num_cycles"),
    ({"validation_every": -2}, "validation_every must be an int >= 0"),
    ({"validation_prompts": "a photo of {}"}, "validation_prompts must be a list"),
    ({"validation_prompts": ("",)}, "validation_prompts must be a list"),
    ({"validation_prompts": ("a {name} here",)}, "only '{}'"),
    ({"validation_inference_steps": 0}, "validation_inference_steps"),
    ({"validation_guidance_scale": float("nan")}, "validation_guidance_scale"),
    ({"log_with": "wandb"}, "log_with must be None or 'tensorboard'"),
    ({"optimizer": "sgd"}, "optimizer must be one of"),
    ({"master_weights": "fp16"}, "master_weights must be one of"),
    ({"master_weights": "bf16"}, "set mixed_precision='bf16'"),
    ({"master_weights": "bf16", "mixed_precision": "fp16"}, "set mixed_precision='bf16'"),
    ({"master_weights": "bf16", "mixed_precision": "bf16", "optimizer": "adamw8bit"}, "use 'adamw' or 'adam'"),
    ({"fused_backward": True, "grad_accum": 2}, "grad_accum > 1"),
    ({"fused_backward": True, "max_grad_norm": 1.0}, "max_grad_norm"),
    ({"fused_backward": True, "mixed_precision": "fp16"}, "fp16"),
    ({"fused_backward": True, "optimizer": "adamw8bit"}, "optimizer='adamw8bit'"),
    ({"fused_backward": "yes"}, "fused_backward must be true or false"),
])
def test_feature_fields_are_validated_with_clear_errors(bad, match):
    with pytest.raises(EditbenchError, match=match):
        TrainConfig(**bad).validate()
    with pytest.raises(EditbenchError, match=match):
        methods.get("textual_inversion")(**bad)


def test_valid_feature_values_pass_and_defaults_keep_the_run_signature():
    TrainConfig(gradient_checkpointing=True, mixed_precision="bf16", resolution=512, lr_scheduler="cosine",
                lr_warmup_steps=10, validation_every=5, validation_prompts=("a {} on a table", "a {0} and a {1}"),
                log_with="tensorboard", optimizer="adamw8bit").validate()   # values only: no import needed
    for name in METHODS:
        cfg = methods.get(name).Config()
        new = {"gradient_checkpointing", "mixed_precision", "resolution", "lr_scheduler", "lr_warmup_steps",
               "lr_num_cycles", "validation_every", "validation_prompts", "validation_inference_steps",
               "validation_guidance_scale", "log_with", "class_resolution", "master_weights",
               "fused_backward"}
        # class_data_dir is new too, except where a method's default changed what earlier runs did (Custom
        # Diffusion's real class images): there it is in the signature, so an older checkpoint is not resumed
        new |= {"class_data_dir"} & set(cfg.LATER_FIELDS)
        before = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items()
                  if k not in ("steps", "checkpoint_every") and k not in new}
        assert cfg.run_signature() == before   # checkpoints written before these fields existed still resume
    assert methods.get("custom_diffusion").Config().run_signature()["class_data_dir"] == "auto"
    sig = TrainConfig(resolution=64, lr_scheduler="linear").run_signature()
    assert sig["resolution"] == 64 and sig["lr_scheduler"] == "linear" and sig["steps"] == 400
    assert "validation_every" not in TrainConfig(validation_every=3).run_signature()   # may change on resume
