"""Custom Diffusion in diffusers' format: export, and a loader that provably applies it.

diffusers' ``train_custom_diffusion.py`` writes ``pytorch_custom_diffusion_weights.safetensors`` (the full
fine-tuned K/V weights as ``<attention>.processor.to_k_custom_diffusion.weight`` /
``...to_v_custom_diffusion.weight``, for ``CustomDiffusionAttnProcessor``) and one ``<token>.safetensors``
(``{token: embedding}``) per modifier token. Its own loader, ``unet.load_attn_procs(folder, weight_name=...)``,
builds the processors but only installs them when the private ``_pipeline`` argument is passed, so the model
silently stays the base model; with ``_pipeline`` it fails on its own safetensors file, which lacks the (empty)
self-attention entries. :func:`load_diffusers` installs the same diffusers processors for the cross-attention
layers and keeps every other processor, so the edit takes effect, and returns an undoable handle.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from editbench._io import read_safetensors, write_safetensors
from editbench.errors import ArtifactError
from editbench.methods.base import Artifact, EditHandle
from editbench.methods.custom_diffusion.editor import EMBEDDINGS, CustomDiffusionEditor, deltas, projections
from editbench.methods.tokens import add_tokens

__all__ = ["WEIGHT_NAME", "export_diffusers", "load_diffusers"]

WEIGHT_NAME = "pytorch_custom_diffusion_weights.safetensors"
_SUFFIX = {"to_k": "to_k_custom_diffusion.weight", "to_v": "to_v_custom_diffusion.weight"}


def export_diffusers(artifact: Artifact, pipeline: Any, folder: str | os.PathLike) -> Path:
    """Write ``artifact`` as diffusers' Custom Diffusion output into ``folder``; returns the weights file.

    The diffusers format stores full weights, so the base ``pipeline`` (the one the artifact was trained on)
    supplies ``W0``. Modifier tokens go to ``folder/<token>.safetensors`` (``{token: (d,)}``), loadable with
    ``pipe.load_textual_inversion(folder, weight_name="<token>.safetensors")``.
    """
    editor = CustomDiffusionEditor()
    editor.check_artifact(artifact, pipeline)
    proj = projections(pipeline.unet)
    state = {}
    for name, delta in deltas(artifact).items():
        attn, _, which = name.rpartition(".")
        w0 = proj[name].weight.detach()
        state[f"{attn}.processor.{_SUFFIX[which]}"] = (w0.float() + delta).to(w0.dtype)
    folder = Path(folder)
    for token, row in zip(artifact.metadata["modifier_tokens"], artifact.tensors[EMBEDDINGS]):
        write_safetensors(folder / f"{token}.safetensors", {token: row}, {"format": "pt"})
    return write_safetensors(folder / WEIGHT_NAME, state, {"format": "pt"})


def load_diffusers(pipeline: Any, folder: str | os.PathLike, *, weight_name: str = WEIGHT_NAME,
                   tokens: list[str] | None = None) -> EditHandle:
    """Apply a diffusers Custom Diffusion folder to ``pipeline`` with diffusers' ``CustomDiffusionAttnProcessor``.

    Every cross-attention layer named in the file gets a processor holding the stored K/V (and Q/out, if the
    run trained them) weights; all other processors are kept. Modifier tokens: ``tokens`` (default: every
    ``*.safetensors`` file of ``folder`` other than the weights, each ``{token: embedding}``). ArtifactError if
    the file is unreadable, names a layer the UNet does not have, or its shapes do not fit. ``undo()`` on the
    returned handle restores the processors, tokenizer and embedding.
    """
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    folder = Path(folder)
    state, _ = read_safetensors(folder / weight_name, "Custom Diffusion weights")
    unet = pipeline.unet
    current = unet.attn_processors
    grouped: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in state.items():
        proc, sep, sub = key.partition(".processor.")
        if not sep or f"{proc}.processor" not in current:
            raise ArtifactError(f"{key}: this UNet has no attention processor {proc}.processor; the weights are for "
                                "another base model")
        grouped[f"{proc}.processor"][sub] = value
    new = {}
    ref = next(unet.parameters())
    for name, sub in grouped.items():
        attn = unet.get_submodule(name[: -len(".processor")])
        k = sub.get("to_k_custom_diffusion.weight")
        if k is None or tuple(k.shape) != tuple(attn.to_k.weight.shape):
            raise ArtifactError(f"{name}: to_k_custom_diffusion.weight is "
                                f"{None if k is None else tuple(k.shape)}, the layer's to_k is "
                                f"{tuple(attn.to_k.weight.shape)}; the weights are for another base model")
        proc = CustomDiffusionAttnProcessor(train_kv=True, train_q_out="to_q_custom_diffusion.weight" in sub,
                                            hidden_size=k.shape[0], cross_attention_dim=k.shape[1])
        try:
            proc.load_state_dict(sub)
        except RuntimeError as err:
            raise ArtifactError(f"{name}: {err}") from None
        new[name] = proc.to(ref.device, ref.dtype)
    handle = EditHandle(pipeline, "custom_diffusion (diffusers format)")
    unet.set_attn_processor({**current, **new})  # diffusers pops from the dict it gets: pass a fresh one
    handle.on_undo("attention processors", lambda: unet.set_attn_processor(dict(current)))
    files = sorted(p for p in folder.glob("*.safetensors") if p.name != weight_name) if tokens is None else \
        [folder / f"{t}.safetensors" for t in tokens]
    words, rows = [], []
    for path in files:
        emb, _ = read_safetensors(path, "modifier token embedding")
        if len(emb) != 1:
            raise ArtifactError(f"{path} must hold exactly one {{token: embedding}} entry, got {sorted(emb)}")
        (word, row), = emb.items()
        words.append(word)
        rows.append(row.reshape(-1, row.shape[-1]))
    if words:
        emb_w = pipeline.text_encoder.get_input_embeddings().weight
        rows_t = torch.cat(rows)
        if rows_t.shape[1] != emb_w.shape[1]:
            handle.undo()
            raise ArtifactError(f"modifier embeddings have width {rows_t.shape[1]}, the text encoder "
                                f"{emb_w.shape[1]}")
        try:
            handle.info["token_ids"] = add_tokens(handle, pipeline, words, rows_t.to(emb_w.device, emb_w.dtype))
        except BaseException:
            handle.undo()
            raise
    return handle
