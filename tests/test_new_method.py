"""A method defined in this file alone, registered and run through fit, apply, compose, a suite and the report
without touching library code: the Editor contract (editbench/methods/INTERFACE.md) is all a method needs."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from _eval_stubs import FakeClip, StubConfig, StubSettings, registered
from _method_helpers import star_images

from editbench.concepts import ConceptData
from editbench.errors import ArtifactError
from editbench.eval import runner, spec
from editbench.eval.report import write_report
from editbench.methods.base import Artifact, Editor, artifact_phrases
from editbench.methods.tokens import RARE_WORDS
from editbench.safety import is_number
from editbench.testing import tiny_pipeline
from editbench.training import ParamGroup, TrainingSession, encode_prompts


class _Session(TrainingSession):
    """One vector added to every text-encoder output, prompted "<rare word> <superclass>"."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.delta = torch.nn.Parameter(torch.zeros(pipeline.text_encoder.config.hidden_size))

    def phrase_for(self, concept):
        return f"{concept.placeholder} {concept.superclass}"

    def param_groups(self):
        return [ParamGroup("delta", [self.delta], 0.05)]

    def encode(self, prompts):
        return encode_prompts(self.pipeline, prompts) + self.delta

    def artifact(self, result):
        delta = self.delta.detach().clone()
        return Artifact(NudgeEditor.name, {"delta": delta}, {"nudge_norm": float(delta.norm())})


class NudgeEditor(Editor):
    name = "nudge"
    Config = StubConfig      # steps=2, batch_size=1, no checkpoints
    Settings = StubSettings  # scale
    new_token = False
    max_artifacts = 1
    metadata_schema: ClassVar[dict] = {"nudge_norm": (is_number, "a finite number")}
    transform_settings = ("shrink",)

    def prepare_training(self, pipeline, concept, handle, config):
        return _Session(pipeline)

    def check_artifact(self, artifact, pipeline=None):
        delta = artifact.tensors.get("delta")
        if set(artifact.tensors) != {"delta"} or delta is None or delta.ndim != 1:
            raise ArtifactError("a nudge artifact holds one 1-D tensor 'delta'")
        if pipeline is not None and delta.shape[0] != pipeline.text_encoder.config.hidden_size:
            raise ArtifactError("the delta does not fit this text encoder")

    def install(self, pipeline, artifacts, handle, settings):
        delta = artifacts[0].tensors["delta"] * settings.scale

        def hook(module, args, output):
            return (output[0] + delta.to(output[0]),) + tuple(output[1:])

        handle.add_hook(pipeline.text_encoder.register_forward_hook(hook))

    def compose(self, artifacts, pipeline=None):
        arts = list(artifacts)
        delta = sum(a.tensors["delta"] for a in arts)
        meta = {"base_fingerprint": arts[0].base_fingerprint, "nudge_norm": float(delta.norm()),
                "phrase": [p for a in arts for p in artifact_phrases(a)]}
        return Artifact(self.name, {"delta": delta}, meta)

    def transform(self, artifact, *, shrink):
        return Artifact(self.name, {"delta": artifact.tensors["delta"] * shrink},
                        dict(artifact.metadata, nudge_norm=float(artifact.tensors["delta"].norm() * shrink)))


@pytest.fixture
def nudge():
    with registered(NudgeEditor):
        yield NudgeEditor


def _encode(pipe, text="a photo of a star"):
    with torch.no_grad():
        return encode_prompts(pipe, [text])


def test_fit_apply_load_and_compose(nudge, tmp_path):
    pipe, editor = tiny_pipeline(), nudge()
    word = editor.placeholder(pipe.tokenizer, "<toy>")
    assert word == RARE_WORDS[0]
    concept = ConceptData(word, "star", star_images(tmp_path / "star"))
    art = editor.fit(pipe, concept, progress=False)
    assert editor.phrase(art) == f"{word} star" and art.metadata["training"]["steps"] == 2
    before = _encode(pipe)
    with editor.apply(pipe, art):
        assert not torch.equal(_encode(pipe), before)
    assert torch.equal(_encode(pipe), before)
    loaded = editor.load(art.save(tmp_path / "a.safetensors"))
    assert torch.equal(loaded.tensors["delta"], art.tensors["delta"])
    loaded.metadata["nudge_norm"] = "big"  # the method's own schema is checked before anything changes
    with pytest.raises(ArtifactError, match="nudge_norm"):
        editor.apply(pipe, loaded)
    merged = editor.compose([art, art], pipe)
    assert editor.phrase(merged, word) == f"{word} star"


def test_suite_and_report(nudge, tmp_path):
    suite = spec.load_suite({
        "model": "tiny", "concepts": ["zebra", "sunny"], "pairs": [["zebra", "sunny"]], "seeds": [0],
        "max_prompts": 1, "images_per_prompt": 1, "steps": 2,
        "generation": {"num_inference_steps": 2, "guidance_scale": 2.0},
        "methods": [{"name": "nudge", "sweep": {"shrink": [0.5, 1.0]}}]})
    df = runner.run_suite(suite, tmp_path, pipeline=tiny_pipeline(), clip=FakeClip(), progress=False)
    assert len(df) == 3 * 2 and set(df["method"]) == {"nudge"}
    assert all(any(f"{w} " in p for w in RARE_WORDS[:2]) for p in df["prompt"])  # the phrases reached the prompts
    assert len(list((tmp_path / "artifacts" / "nudge").rglob("*.safetensors"))) == 2  # the pair was composed
    report = write_report(tmp_path).read_text()
    assert "nudge" in report
