"""Custom Diffusion in diffusers' format: export, and a loader that provably applies it.

diffusers' ``train_custom_diffusion.py`` writes ``pytorch_custom_diffusion_weights.safetensors`` (the full
fine-tuned K/V weights as ``<attention>.processor.to_k_custom_diffusion.weight`` /
``...to_v_custom_diffusion.weight``, for ``CustomDiffusionAttnProcessor``) and one ``<token>.safetensors``
(``{token: embedding}``) per modifier token. Its own loader, ``unet.load_attn_procs(folder, weight_name=...)``,
builds the processors but only installs them when the private ``_pipeline`` argument is passed, so the model
silently stays the base model; with ``_pipeline`` it fails on its own safetensors file, which lacks the (empty)
self-attention entries. :func:`load_diffusers` installs the same diffusers processors for the cross-attention
layers and keeps every other processor, so the edit takes effect, and returns an undoable handle.

SDXL (diffusers has no Custom Diffusion script for it): the same processor file, with K/V weights reading the
2048-wide concatenated context, and one ``<token>.safetensors`` per modifier token in the layout of diffusers' SDXL
textual-inversion files, ``{"clip_l": (d_1,), "clip_g": (d_2,)}`` (the token is the file name).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from editbench.errors import ArtifactError
from editbench.methods.base import Artifact, EditHandle
from editbench.methods.custom_diffusion.editor import (
    EMBEDDINGS,
    EMBEDDINGS_2,
    CustomDiffusionEditor,
    _add_modifiers,
    deltas,
    projections,
)
from editbench.safety import load_weights, safe_join
from editbench.storage import write_safetensors

__all__ = ["SDXL_KEYS", "WEIGHT_NAME", "export_diffusers", "load_diffusers"]

SDXL_KEYS = ("clip_l", "clip_g")

WEIGHT_NAME = "pytorch_custom_diffusion_weights.safetensors"
_SUFFIX = {"to_k": "to_k_custom_diffusion.weight", "to_v": "to_v_custom_diffusion.weight"}


def _install(pipeline: Any, handle: EditHandle, weights: dict[str, dict[str, torch.Tensor]], *,
             fill: bool = False) -> None:
    """Give every attention layer named in ``weights`` (``{processor name: {sub key: tensor}}``) a diffusers
    ``CustomDiffusionAttnProcessor`` holding those weights; keep every other processor, or with ``fill`` give it
    a weightless one (the training script's setup, which ``save_attn_procs`` requires). Recorded on ``handle``."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    unet = pipeline.unet
    current = unet.attn_processors
    ref = next(unet.parameters())
    new = {n: CustomDiffusionAttnProcessor(train_kv=False, train_q_out=False) for n in current} if fill else {}
    for name, sub in weights.items():
        if name not in current:
            raise ArtifactError(f"this UNet has no attention processor {name}; the weights are for another base model")
        attn = unet.get_submodule(name[: -len(".processor")])
        k = sub.get("to_k_custom_diffusion.weight")
        if k is None or tuple(k.shape) != tuple(attn.to_k.weight.shape):
            raise ArtifactError(f"{name}: to_k_custom_diffusion.weight is {None if k is None else tuple(k.shape)}, "
                                f"the layer's to_k is {tuple(attn.to_k.weight.shape)}; the weights are for another "
                                "base model")
        proc = CustomDiffusionAttnProcessor(train_kv=True, train_q_out="to_q_custom_diffusion.weight" in sub,
                                            hidden_size=k.shape[0], cross_attention_dim=k.shape[1])
        try:
            proc.load_state_dict(sub)
        except RuntimeError as err:
            raise ArtifactError(f"{name}: {err}") from None
        new[name] = proc.to(ref.device, ref.dtype)
    unet.set_attn_processor({**current, **new})  # diffusers pops from the dict it gets: pass a fresh one
    handle.on_undo("attention processors", lambda: unet.set_attn_processor(dict(current)))


def export_diffusers(artifact: Artifact, pipeline: Any, folder: str | os.PathLike) -> Path:
    """Write ``artifact`` as diffusers' Custom Diffusion output into ``folder``; returns the weights file.

    The diffusers format stores full weights, so the base ``pipeline`` (the one the artifact was trained on)
    supplies ``W0``. The processors are installed on ``pipeline`` for a moment so that diffusers' own
    ``unet.save_attn_procs`` writes the file (then removed again). Modifier tokens go to
    ``folder/<token>.safetensors`` (``{token: (d,)}``, as the diffusers script saves them), loadable with
    ``pipe.load_textual_inversion(folder, weight_name="<token>.safetensors")``.
    """
    CustomDiffusionEditor().check_artifact(artifact, pipeline)
    proj = projections(pipeline.unet)
    weights: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for name, delta in deltas(artifact).items():
        attn, _, which = name.rpartition(".")
        w0 = proj[name].weight.detach()
        weights[f"{attn}.processor"][_SUFFIX[which]] = (w0.float() + delta).to(w0.dtype)
    folder = Path(folder)
    second = artifact.tensors.get(EMBEDDINGS_2)
    for j, (token, row) in enumerate(zip(artifact.metadata["modifier_tokens"], artifact.tensors[EMBEDDINGS])):
        # the token comes from the artifact's metadata: it must not name a path outside ``folder``
        entries = {token: row} if second is None else {SDXL_KEYS[0]: row, SDXL_KEYS[1]: second[j]}
        write_safetensors(safe_join(folder, f"{token}.safetensors", "modifier token file"), entries,
                          {"format": "pt"})
    with EditHandle(pipeline, "custom_diffusion export") as handle:
        _install(pipeline, handle, weights, fill=True)
        pipeline.unet.save_attn_procs(str(folder), weight_name=WEIGHT_NAME, safe_serialization=True)
    return folder / WEIGHT_NAME


def load_diffusers(pipeline: Any, folder: str | os.PathLike, *, weight_name: str = WEIGHT_NAME,
                   tokens: list[str] | None = None, allow_pickle: bool = False) -> EditHandle:
    """Apply a diffusers Custom Diffusion folder to ``pipeline`` with diffusers' ``CustomDiffusionAttnProcessor``.

    Every cross-attention layer named in the file gets a processor holding the stored K/V (and Q/out, if the
    run trained them) weights; all other processors are kept. Modifier tokens: ``tokens`` (default: every
    ``*.safetensors`` file of ``folder`` other than the weights, each ``{token: embedding}``, or for SDXL
    ``{"clip_l": (d_1,), "clip_g": (d_2,)}`` named ``<token>.safetensors``). ArtifactError if
    the file is unreadable, names a layer the UNet does not have, or its shapes do not fit. ``undo()`` on the
    returned handle restores the processors, tokenizer and embedding.

    Pickle files (diffusers' older ``pytorch_custom_diffusion_weights.bin``, ``<token>.bin``) are refused unless
    ``allow_pickle=True``; they are then read with ``torch.load(weights_only=True)``
    (:func:`editbench.safety.load_weights`). File names must stay inside ``folder``.
    """
    folder = Path(folder)
    state = load_weights(safe_join(folder, weight_name, "weight_name"), "Custom Diffusion weights",
                         allow_pickle=allow_pickle)
    grouped: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in state.items():
        proc, sep, sub = key.partition(".processor.")
        if not sep:
            raise ArtifactError(f"{key} is not a Custom Diffusion processor weight (<layer>.processor.<name>)")
        grouped[f"{proc}.processor"][sub] = value
    files = sorted(p for p in folder.glob("*.safetensors") if p.name != weight_name) if tokens is None else \
        [safe_join(folder, f"{t}.safetensors", "token file") for t in tokens]
    encoders = [e for e in ("text_encoder", "text_encoder_2") if getattr(pipeline, e, None) is not None]
    words, rows = [], [[] for _ in encoders]
    for path in files:
        emb = load_weights(path, "modifier token embedding", allow_pickle=allow_pickle)
        sdxl = len(encoders) == 2
        if (sdxl and set(emb) != set(SDXL_KEYS)) or (not sdxl and len(emb) != 1) or \
                any(v.ndim not in (1, 2) for v in emb.values()):
            want = '{"clip_l": (d_1,), "clip_g": (d_2,)}' if sdxl else "exactly one {token: embedding (d,)} entry"
            raise ArtifactError(f"{path} must hold {want} for this pipeline, got "
                                f"{ {k: tuple(v.shape) for k, v in emb.items()} }")
        words.append(path.stem if sdxl else next(iter(emb)))
        for e, vec in enumerate([emb[k] for k in SDXL_KEYS] if sdxl else list(emb.values())):
            rows[e].append(vec.reshape(-1, vec.shape[-1]))                 # (1, d_e)
    for e, enc in enumerate(encoders):
        width = getattr(pipeline, enc).get_input_embeddings().weight.shape[1]
        widths = sorted({r.shape[1] for r in rows[e]} - {width})
        if widths:
            raise ArtifactError(f"modifier embeddings have width {widths[0]}, the {enc} {width}")
    handle = EditHandle(pipeline, "custom_diffusion (diffusers format)")
    try:
        _install(pipeline, handle, grouped)
        if words:
            _add_modifiers(handle, pipeline, words, [torch.cat(r) for r in rows])
    except BaseException:
        handle.undo()
        raise
    return handle
