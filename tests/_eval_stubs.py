"""Test doubles for the evaluation tests: a tiny random open_clip scorer and stub Editors (registered per test)."""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

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


# ---------------------------------------------------------------------------- fakes: no diffusers, no open_clip
class FakeTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[1] if " " not in text else [1, 2])


class FakePipeline:
    """Renders a deterministic 8x8 image from (prompt, generator seed, offset); ``offset`` is what edits change."""

    def __init__(self):
        self.offset = 0.0
        self.tokenizer = FakeTokenizer()
        self.calls = 0

    def __call__(self, prompt, generator, num_images_per_prompt=1, output_type="pil", **kwargs):
        assert len(prompt) == len(generator) and num_images_per_prompt == 1 and output_type == "pil"
        self.calls += 1
        images = []
        for p, g in zip(prompt, generator):
            h = int(hashlib.sha256(p.encode()).hexdigest()[:6], 16)
            noise = torch.rand(8, 8, 3, generator=g).numpy()
            base = np.array([(h % 255), (h // 255) % 255, 128]) / 255.0
            arr = np.clip(0.5 * noise + 0.5 * base + self.offset, 0, 1)
            images.append(Image.fromarray((arr * 255).astype(np.uint8), "RGB"))
        return SimpleNamespace(images=images)


class FakeClip:
    """encode_images: the image's 4x4 thumbnail; encode_texts: a hashed random vector (both 48-d)."""

    name = "fake-clip"

    def encode_images(self, images):
        from editbench.eval.metrics import _pil

        x = torch.stack([torch.from_numpy(np.asarray(_pil(i).resize((4, 4)), dtype=np.float64)).flatten()
                         for i in images]) / 255.0 - 0.3
        return x / x.norm(dim=1, keepdim=True)

    def encode_texts(self, texts):
        out = []
        for t in texts:
            g = torch.Generator().manual_seed(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16))
            out.append(torch.randn(48, generator=g, dtype=torch.float64))
        x = torch.stack(out)
        return x / x.norm(dim=1, keepdim=True)


class FakeEditor(Editor):
    """Test-only: ``fit`` returns an artifact at once (no training loop); ``apply`` shifts the fake pipeline."""

    name = "fake"
    Settings = StubSettings
    new_token = True
    max_artifacts = None
    fits: ClassVar[list] = []

    def check_pipeline(self, pipeline):  # the fake pipeline has no UNet: nothing to check
        pass

    def fit(self, pipeline, concept, *, steps=None, seed=0, progress=True, checkpoint_dir=None):
        FakeEditor.fits.append((self.name, concept.placeholder, seed))
        value = (seed + 1) * 0.01 + len(concept.placeholder) * 0.001
        phrase = concept.placeholder if self.new_token else f"{concept.placeholder} {concept.superclass}"
        return Artifact(self.name, {"delta": torch.tensor([value])},
                        {"base_fingerprint": "fake", "phrase": phrase,
                         "training": {"wall_time_s": 1.5, "peak_memory_bytes": 1000, "memory_kind": "fake",
                                      "steps": steps or 1}})

    def fingerprint(self, pipeline):
        return "fake"

    def check_artifact(self, artifact, pipeline=None):
        pass

    def install(self, pipeline, artifacts, handle, settings):
        handle.set_attr(pipeline, "offset", float(sum(a.tensors["delta"].sum() for a in artifacts)) * settings.scale)


class FakeRareWordEditor(FakeEditor):
    """Reuses a rare word as placeholder and takes one artifact, no merge: multi-concept cells are skipped."""

    name = "fake_single"
    new_token = False
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
