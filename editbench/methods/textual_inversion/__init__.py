"""Textual inversion: a new word whose embedding vector(s) are learned; nothing else changes."""

from editbench.methods.textual_inversion.config import TextualInversionConfig
from editbench.methods.textual_inversion.editor import (
    DIFFUSERS_WEIGHT_NAME,
    TextualInversionEditor,
    export_diffusers,
    vector_tokens,
)

__all__ = ["DIFFUSERS_WEIGHT_NAME", "TextualInversionConfig", "TextualInversionEditor", "export_diffusers",
           "vector_tokens"]
