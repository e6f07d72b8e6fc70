"""Textual inversion (Gal et al., 2022): learn the embedding of a new word, nothing else.

Artifact tensors: ``embeddings`` ``(n, d)``: the learned vectors of the tokens listed in the metadata entry
``tokens`` (``[placeholder, placeholder_1, ...]``, diffusers' multi-vector naming).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import torch

from editbench.concepts import ConceptData
from editbench.errors import ArtifactError
from editbench.methods import register
from editbench.methods.base import Artifact, EditHandle, Editor
from editbench.methods.textual_inversion.config import TextualInversionConfig
from editbench.methods.tokens import add_tokens, cap_norms_, initial_rows
from editbench.safety import word, words
from editbench.storage import write_safetensors
from editbench.training import ParamGroup, TrainingSession, TrainResult, encode_prompts

__all__ = ["DIFFUSERS_WEIGHT_NAME", "TextualInversionEditor", "export_diffusers", "vector_tokens"]

DIFFUSERS_WEIGHT_NAME = "learned_embeds.safetensors"


def vector_tokens(placeholder: str, n: int) -> list[str]:
    """The token of each vector: ``[placeholder, placeholder_1, ..., placeholder_{n-1}]`` (diffusers' naming)."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, n)]


class _Session(TrainingSession):
    def __init__(self, pipeline: Any, tokens: list[str], rows: torch.nn.Parameter, config: TextualInversionConfig,
                 superclass: str):
        self.pipeline, self.tokens, self.rows, self.config = pipeline, tokens, rows, config
        self.phrase = " ".join(tokens)  # the expanded form diffusers' maybe_convert_prompt produces at inference
        self.limits = config.norm_limits(pipeline, [superclass] * len(tokens))  # (n,) or None

    def after_step(self, step: int) -> None:
        cap_norms_(self.rows, self.limits)

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("embeddings", [self.rows], self.config.lr, self.config.weight_decay)]

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return encode_prompts(self.pipeline, prompts)  # (b, n, d); gradients reach only self.rows

    def artifact(self, result: TrainResult) -> Artifact:
        return Artifact(TextualInversionEditor.name, {"embeddings": self.rows.detach().clone()},
                        {"tokens": self.tokens, "placeholder": self.tokens[0]})


@register
class TextualInversionEditor(Editor):
    """Textual inversion. ``apply`` takes any number of artifacts (each adds its own words)."""

    name = "textual_inversion"
    Config = TextualInversionConfig
    new_token = True
    max_artifacts = None
    metadata_schema: ClassVar[dict] = {"tokens": (words, "a non-empty list of words without whitespace"),
                       "placeholder": (word, "a word without whitespace")}

    def prepare_training(self, pipeline: Any, concept: ConceptData, handle: EditHandle,
                         config: TextualInversionConfig) -> TrainingSession:
        tokens = vector_tokens(concept.placeholder, config.num_vectors)
        rows = initial_rows(pipeline, [config.initializer or concept.superclass] * config.num_vectors)  # (n, d)
        add_tokens(handle, pipeline, tokens, rows)
        return _Session(pipeline, tokens, rows, config, concept.superclass)

    def check_artifact(self, artifact: Artifact, pipeline: Any = None) -> None:
        emb, tokens = artifact.tensors.get("embeddings"), artifact.metadata.get("tokens")
        if set(artifact.tensors) != {"embeddings"} or emb is None or emb.ndim != 2 or not emb.is_floating_point():
            raise ArtifactError(f"a textual_inversion artifact holds one float tensor 'embeddings' (n, d), got "
                                f"{ {k: tuple(v.shape) for k, v in artifact.tensors.items()} }")
        if not isinstance(tokens, list) or len(tokens) != emb.shape[0] or not all(isinstance(t, str) for t in tokens):
            raise ArtifactError(f"artifact metadata 'tokens' must list one word per embedding row ({emb.shape[0]}), "
                                f"got {tokens!r}")
        if pipeline is not None:
            d = pipeline.text_encoder.get_input_embeddings().weight.shape[1]
            if emb.shape[1] != d:
                raise ArtifactError(f"the artifact's embeddings have width {emb.shape[1]} but this text encoder's "
                                    f"token embeddings have width {d}: it was trained for another base model")

    def install(self, pipeline: Any, artifacts: list[Artifact], handle: EditHandle, settings: Any) -> None:
        ref = pipeline.text_encoder.get_input_embeddings().weight
        tokens = [t for a in artifacts for t in a.metadata["tokens"]]
        rows = torch.cat([a.tensors["embeddings"] for a in artifacts]).to(ref.device, ref.dtype)  # (n, d)
        handle.info["token_ids"] = add_tokens(handle, pipeline, tokens, rows)

    def export(self, artifact: Artifact, folder: str | os.PathLike, pipeline: Any = None) -> Path:
        """diffusers' textual inversion file ``folder/learned_embeds.safetensors`` (:func:`export_diffusers`)."""
        return export_diffusers(artifact, folder)

    def export_usage(self, artifact: Artifact, folder: str | os.PathLike) -> str:
        token = artifact.metadata["placeholder"]
        return (f"pipe.load_textual_inversion({str(folder)!r}, token={token!r})  # then prompt with {token!r}; "
                "diffusers expands it to the learned vectors")


def export_diffusers(artifact: Artifact, folder: str | os.PathLike) -> Path:
    """Write ``folder/learned_embeds.safetensors`` = ``{placeholder: tensor(n, d)}``.

    Load it with ``pipe.load_textual_inversion(folder, token=placeholder)``; diffusers registers the extra
    vectors as ``placeholder_1``, ... and expands ``placeholder`` in prompts, as editbench's ``apply`` does.
    (diffusers writes this file from its training script only; the format is one safetensors entry.)
    """
    TextualInversionEditor().check_artifact(artifact)
    path = Path(folder) / DIFFUSERS_WEIGHT_NAME
    return write_safetensors(path, {artifact.metadata["placeholder"]: artifact.tensors["embeddings"]},
                             {"format": "pt"})
