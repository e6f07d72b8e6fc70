"""Test doubles for the evaluation tests: a tiny random open_clip scorer and stub Editors (registered per test)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from editbench import methods
from editbench.eval.metrics import ClipScorer
from editbench.methods.base import Artifact, Editor
from editbench.training import ParamGroup, TrainConfig, TrainingSession, encode_prompts

TINY_CLIP = "editbench-test-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def tiny_clip(seed: int = 0) -> ClipScorer:
    """A randomly initialised open_clip model registered under a custom config (no download)."""
    import open_clip
    from open_clip.factory import _MODEL_CONFIGS

    _MODEL_CONFIGS.setdefault(TINY_CLIP, TINY_CLIP_CONFIG)
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP)
    return ClipScorer(model.eval(), preprocess, open_clip.get_tokenizer(TINY_CLIP), name=TINY_CLIP)


@dataclass
class StubConfig(TrainConfig):
    steps: int = 2
    batch_size: int = 1
    checkpoint_every: int = 0
    lr: float = 0.01


@dataclass
class StubSettings:
    scale: float = 1.0

    def validate(self, n_artifacts: int) -> None:
        from editbench.errors import EditbenchError

        if not self.scale >= 0:
            raise EditbenchError(f"scale must be >= 0, got {self.scale}")


class _Session(TrainingSession):
    def __init__(self, pipeline, method: str):
        self.pipeline, self.method = pipeline, method
        self.delta = torch.nn.Parameter(torch.zeros(pipeline.text_encoder.config.hidden_size))

    def param_groups(self):
        return [ParamGroup("delta", [self.delta], 0.01)]

    def encode(self, prompts):
        return encode_prompts(self.pipeline, prompts) + self.delta

    def artifact(self, result):
        return Artifact(self.method, {"delta": self.delta.detach().clone()})


class StubEditor(Editor):
    """Learns one vector added to every text-encoder output; reuses a rare word (new_token = False)."""

    name = "stub"
    Config = StubConfig
    Settings = StubSettings
    new_token = False
    max_artifacts = None
    fits = 0

    def prepare_training(self, pipeline, concept, handle, config):
        StubEditor.fits += 1
        return _Session(pipeline, self.name)

    def check_artifact(self, artifact, pipeline=None):
        pass

    def install(self, pipeline, artifacts, handle, settings):
        delta = sum(a.tensors["delta"] for a in artifacts) * settings.scale

        def hook(module, args, output):
            return (output[0] + delta.to(output[0]),) + tuple(output[1:])

        handle.add_hook(pipeline.text_encoder.register_forward_hook(hook))


class SingleStubEditor(StubEditor):
    """Like StubEditor but one artifact at a time and no merge: multi-concept cells are skipped."""

    name = "stub_single"
    max_artifacts = 1


@contextlib.contextmanager
def registered(*classes):
    """Register editor classes for the duration of a test only."""
    for cls in classes:
        methods.register(cls)
    try:
        yield
    finally:
        for cls in classes:
            methods._REGISTRY.pop(cls.name, None)
