"""Textual inversion (Gal et al., 2022): learn the embedding of a new word, nothing else.

Artifact tensors: ``embeddings`` ``(n, d)``: the learned vectors of the tokens listed in the metadata entry
``tokens`` (``[placeholder, placeholder_1, ...]``, diffusers' multi-vector naming). SDXL: the word is new in both
tokenizers, with its own learned rows in each encoder: ``embeddings`` ``(n, d_1)`` for ``text_encoder`` (CLIP-L)
and ``embeddings_2`` ``(n, d_2)`` for ``text_encoder_2`` (OpenCLIP-bigG); exported as diffusers' SDXL layout
``{"clip_l": (n, d_1), "clip_g": (n, d_2)}``.
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
from editbench.methods.tokens import add_tokens, cap_norms_, initial_rows, n_encoders
from editbench.pipelines import text_stack
from editbench.safety import word, words
from editbench.storage import write_safetensors
from editbench.training import ParamGroup, TrainingSession, TrainResult, encode_prompts

__all__ = ["DIFFUSERS_WEIGHT_NAME", "SDXL_KEYS", "TextualInversionEditor", "export_diffusers", "vector_tokens"]

DIFFUSERS_WEIGHT_NAME = "learned_embeds.safetensors"
SDXL_KEYS = ("clip_l", "clip_g")
"""Entries of an SDXL textual-inversion file: the rows of ``text_encoder`` and of ``text_encoder_2``."""
KEYS = ("embeddings", "embeddings_2")
"""Artifact tensor of each text encoder's rows."""


def vector_tokens(placeholder: str, n: int) -> list[str]:
    """The token of each vector: ``[placeholder, placeholder_1, ..., placeholder_{n-1}]`` (diffusers' naming)."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, n)]


class _Session(TrainingSession):
    def __init__(self, pipeline: Any, tokens: list[str], rows: list[torch.nn.Parameter],
                 config: TextualInversionConfig, superclass: str):
        self.pipeline, self.tokens, self.rows, self.config = pipeline, tokens, rows, config
        self.phrase = " ".join(tokens)  # the expanded form diffusers' maybe_convert_prompt produces at inference
        self.limits = [config.norm_limits(pipeline, [superclass] * len(tokens), encoder=e)
                       for e in range(len(rows))]                                 # per encoder: (n,) or None

    def after_step(self, step: int) -> None:
        for rows, limits in zip(self.rows, self.limits):
            cap_norms_(rows, limits)

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("embeddings", list(self.rows), self.config.lr, self.config.weight_decay)]

    def encode(self, prompts: list[str]) -> Any:
        return encode_prompts(self.pipeline, prompts)  # (b, n, d) (SDXL: + pooled); gradients reach only self.rows

    def artifact(self, result: TrainResult) -> Artifact:
        return Artifact(TextualInversionEditor.name, {k: r.detach().clone() for k, r in zip(KEYS, self.rows)},
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

    def check_pipeline(self, pipeline: Any) -> None:
        text_stack(pipeline, self.name)  # SD 1.x / 2.x and SDXL; any other pipeline class is refused by name

    def prepare_training(self, pipeline: Any, concept: ConceptData, handle: EditHandle,
                         config: TextualInversionConfig) -> TrainingSession:
        tokens = vector_tokens(concept.placeholder, config.num_vectors)
        words = [config.initializer or concept.superclass] * config.num_vectors
        rows = []
        for e in range(n_encoders(pipeline)):  # SDXL: the word is new in both encoders, each with its own rows
            rows.append(initial_rows(pipeline, words, encoder=e))                 # (n, d_e)
            add_tokens(handle, pipeline, tokens, rows[-1], encoder=e)
        return _Session(pipeline, tokens, rows, config, concept.superclass)

    def check_artifact(self, artifact: Artifact, pipeline: Any = None) -> None:
        t, tokens = artifact.tensors, artifact.metadata.get("tokens")
        emb = t.get("embeddings")
        keys = KEYS[:len(t)] if "embeddings" in t else ()
        if not t or set(t) != set(keys) or any(v.ndim != 2 or not v.is_floating_point() for v in t.values()) \
                or len({v.shape[0] for v in t.values()}) != 1:
            raise ArtifactError(f"a textual_inversion artifact holds one float tensor 'embeddings' (n, d) (SDXL: and "
                                f"'embeddings_2' (n, d_2) for text_encoder_2), got "
                                f"{ {k: tuple(v.shape) for k, v in t.items()} }")
        if not isinstance(tokens, list) or len(tokens) != emb.shape[0] or not all(isinstance(t, str) for t in tokens):
            raise ArtifactError(f"artifact metadata 'tokens' must list one word per embedding row ({emb.shape[0]}), "
                                f"got {tokens!r}")
        if pipeline is not None:
            n = n_encoders(pipeline)
            if len(t) != n:
                raise ArtifactError(f"the artifact holds rows for {len(t)} text encoder(s) but this pipeline has {n}: "
                                    "it was trained for another base model")
            for key, (_, enc) in zip(KEYS, _encoders(pipeline)):
                d = enc.get_input_embeddings().weight.shape[1]
                if t[key].shape[1] != d:
                    raise ArtifactError(f"the artifact's {key} have width {t[key].shape[1]} but this text encoder's "
                                        f"token embeddings have width {d}: it was trained for another base model")

    def install(self, pipeline: Any, artifacts: list[Artifact], handle: EditHandle, settings: Any) -> None:
        tokens = [t for a in artifacts for t in a.metadata["tokens"]]
        for e, (key, (_, enc)) in enumerate(zip(KEYS, _encoders(pipeline))):
            ref = enc.get_input_embeddings().weight
            rows = torch.cat([a.tensors[key] for a in artifacts]).to(ref.device, ref.dtype)  # (n, d_e)
            ids = add_tokens(handle, pipeline, tokens, rows, encoder=e)
            handle.info["token_ids" if e == 0 else "token_ids_2"] = ids

    def export(self, artifact: Artifact, folder: str | os.PathLike, pipeline: Any = None) -> Path:
        """diffusers' textual inversion file ``folder/learned_embeds.safetensors`` (:func:`export_diffusers`)."""
        return export_diffusers(artifact, folder)

    def export_usage(self, artifact: Artifact, folder: str | os.PathLike) -> str:
        token = artifact.metadata["placeholder"]
        if "embeddings_2" in artifact.tensors:
            file = str(Path(folder) / DIFFUSERS_WEIGHT_NAME)
            return ("from safetensors.torch import load_file\n"
                    f"state = load_file({file!r})\n"
                    f"pipe.load_textual_inversion(state['clip_l'], token={token!r}, text_encoder=pipe.text_encoder, "
                    "tokenizer=pipe.tokenizer)\n"
                    f"pipe.load_textual_inversion(state['clip_g'], token={token!r}, text_encoder=pipe.text_encoder_2, "
                    f"tokenizer=pipe.tokenizer_2)  # then prompt with {token!r}")
        return (f"pipe.load_textual_inversion({str(folder)!r}, token={token!r})  # then prompt with {token!r}; "
                "diffusers expands it to the learned vectors")


def _encoders(pipeline: Any) -> list[tuple[Any, Any]]:
    """``[(tokenizer, text encoder)]`` of the pipeline (two for SDXL)."""
    from editbench.pipelines import ENCODER_NAMES

    return [(getattr(pipeline, t), getattr(pipeline, e)) for t, e in ENCODER_NAMES[:n_encoders(pipeline)]]


def export_diffusers(artifact: Artifact, folder: str | os.PathLike) -> Path:
    """Write ``folder/learned_embeds.safetensors`` = ``{placeholder: tensor(n, d)}``; for an SDXL artifact
    ``{"clip_l": tensor(n, d_1), "clip_g": tensor(n, d_2)}`` (the layout of diffusers' SDXL training scripts).

    Load it with ``pipe.load_textual_inversion(folder, token=placeholder)``; diffusers registers the extra
    vectors as ``placeholder_1``, ... and expands ``placeholder`` in prompts, as editbench's ``apply`` does.
    SDXL: diffusers' loader takes one encoder per call, ``pipe.load_textual_inversion(state["clip_l"], token=...,
    text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)`` and the same with ``"clip_g"``,
    ``pipe.text_encoder_2``, ``pipe.tokenizer_2`` (``state = safetensors.torch.load_file(file)``;
    :meth:`TextualInversionEditor.export_usage`). (diffusers writes this file from its training scripts only.)
    """
    TextualInversionEditor().check_artifact(artifact)
    path = Path(folder) / DIFFUSERS_WEIGHT_NAME
    t = artifact.tensors
    entries = {artifact.metadata["placeholder"]: t["embeddings"]} if "embeddings_2" not in t else \
        {SDXL_KEYS[0]: t["embeddings"], SDXL_KEYS[1]: t["embeddings_2"]}
    return write_safetensors(path, entries, {"format": "pt"})
