"""The diffusers pipelines editbench edits, read the way the pipelines themselves read them.

* **Stable Diffusion 1.x / 2.x** (``StableDiffusionPipeline`` and the pipelines with its components): one CLIP text
  encoder; the UNet's cross-attention reads its ``last_hidden_state`` (SD 2.x's converted OpenCLIP encoder already
  ends at OpenCLIP's penultimate layer, so the same rule holds). SD 2.x 768 px predicts ``v``: the training loop
  reads the target from the scheduler's ``prediction_type``.
* **SDXL** (``StableDiffusionXLPipeline``): two text encoders, CLIP-L (``text_encoder``, width 768) and
  OpenCLIP-bigG with a projection (``text_encoder_2``, width 1280), each with its own tokenizer. The cross-attention
  context is the concatenation ``[h_1 ; h_2]`` of both encoders' penultimate hidden states (``hidden_states[-2]``,
  width 768 + 1280 = 2048), and the UNet's added conditioning (``addition_embed_type="text_time"``) takes the
  pooled text embedding (the second encoder's projected end-token output, ``text_embeds``, 1280) and six time ids
  ``(original height, original width, crop top, crop left, target height, target width)``.

:func:`text_stack` says which of the two a pipeline is (EditbenchError naming the pipeline class for anything
else); :func:`encode_text` encodes prompts exactly as the pipeline's ``encode_prompt`` does (``clip_skip`` None);
:func:`added_cond_kwargs` builds SDXL's UNet keyword ``added_cond_kwargs`` for a training resolution.

Shape legend: b batch, n tokens (77), d concatenated text width (sum of the encoders' widths), p pooled width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from editbench.errors import EditbenchError

__all__ = ["ENCODER_NAMES", "TextConditioning", "TextEncoderPart", "TextStack", "added_cond_kwargs",
           "encode_text", "encoder_hidden", "text_stack", "tokenize_with"]

ENCODER_NAMES = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
"""The (tokenizer, text encoder) attribute pairs of a pipeline, in the order their outputs are concatenated."""

SUPPORTED = ("Stable Diffusion 1.x / 2.x pipelines (a UNet2DConditionModel conditioned on one CLIP text encoder) "
             "and SDXL pipelines (two CLIP text encoders, the second with a projection: StableDiffusionXLPipeline)")


@dataclass(frozen=True)
class TextEncoderPart:
    """One text encoder of a pipeline and its share of the cross-attention context.

    ``tokenizer``/``encoder``: the pipeline attribute names; ``start``/``stop``: its columns of the concatenated
    context; ``layer``: which hidden state the pipeline hands on (None: ``last_hidden_state``; -2: SDXL's
    ``hidden_states[-2]``).
    """

    tokenizer: str
    encoder: str
    start: int
    stop: int
    layer: int | None

    @property
    def width(self) -> int:
        return self.stop - self.start

    @property
    def columns(self) -> slice:
        return slice(self.start, self.stop)

    def get_tokenizer(self, pipeline: Any) -> Any:
        return getattr(pipeline, self.tokenizer)

    def get_encoder(self, pipeline: Any) -> torch.nn.Module:
        return getattr(pipeline, self.encoder)


@dataclass(frozen=True)
class TextStack:
    """The text side of a supported pipeline: its encoders (:class:`TextEncoderPart`, one for SD 1.x / 2.x, two for
    SDXL), the context width ``width`` and whether the UNet takes SDXL's pooled text embedding and time ids
    (``pooled``)."""

    parts: tuple[TextEncoderPart, ...]
    pooled: bool
    kind: str  # "sd" or "sdxl"

    @property
    def width(self) -> int:
        return self.parts[-1].stop

    @property
    def sdxl(self) -> bool:
        return self.kind == "sdxl"


def _refuse(pipeline: Any, method: str | None, why: str) -> EditbenchError:
    who = f"{method} does not support" if method else "editbench does not support"
    return EditbenchError(f"{who} {type(pipeline).__name__}: {why}. Supported: {SUPPORTED}")


def _width(encoder: Any) -> int | None:
    w = getattr(getattr(encoder, "config", None), "hidden_size", None)
    return w if isinstance(w, int) and not isinstance(w, bool) else None


def text_stack(pipeline: Any, method: str | None = None) -> TextStack:
    """The :class:`TextStack` of ``pipeline``; EditbenchError naming the pipeline class (and ``method``) if it is
    not a Stable Diffusion 1.x / 2.x or SDXL text-to-image pipeline: no UNet (``FluxPipeline``, ``DiTPipeline``,
    ...), no first text encoder (the SDXL refiner), text encoders that are not CLIP-like, or widths that do not add
    up to the UNet's cross-attention width."""
    unet = getattr(pipeline, "unet", None)
    config = getattr(unet, "config", None)
    cross = getattr(config, "cross_attention_dim", None)
    if not isinstance(unet, torch.nn.Module) or config is None:
        raise _refuse(pipeline, method, "it has no UNet (editbench edits the cross-attention of a "
                                        "UNet2DConditionModel)")
    if not isinstance(cross, int) or isinstance(cross, bool):
        raise _refuse(pipeline, method, f"its UNet's cross_attention_dim is {cross!r}, not one width")
    present = [(t, e) for t, e in ENCODER_NAMES if getattr(pipeline, e, None) is not None]
    if not present or present[0][1] != "text_encoder":
        raise _refuse(pipeline, method, "it has no first text encoder (text_encoder is None; the SDXL refiner "
                                        "reads text_encoder_2 only)")
    for tok, enc in present:
        encoder = getattr(pipeline, enc)
        if getattr(pipeline, tok, None) is None:
            raise _refuse(pipeline, method, f"it has a {enc} but no {tok}")
        if not isinstance(encoder, torch.nn.Module) or _width(encoder) is None or \
                not hasattr(encoder, "get_input_embeddings"):
            raise _refuse(pipeline, method, f"its {enc} ({type(encoder).__name__}) is not a CLIP-like text model "
                                            "with config.hidden_size and an input embedding")
    sdxl = len(present) == 2
    pooled = getattr(config, "addition_embed_type", None) == "text_time"
    if getattr(config, "addition_embed_type", None) not in (None, "text_time"):
        raise _refuse(pipeline, method, f"its UNet's addition_embed_type is {config.addition_embed_type!r}")
    if pooled and not sdxl:
        raise _refuse(pipeline, method, "its UNet takes pooled text embeddings (text_time) but it has no "
                                        "text_encoder_2")
    if pooled and not hasattr(pipeline.text_encoder_2, "text_projection"):
        raise _refuse(pipeline, method, f"its text_encoder_2 ({type(pipeline.text_encoder_2).__name__}) has no "
                                        "text_projection for SDXL's pooled text embedding (a "
                                        "CLIPTextModelWithProjection is needed)")
    parts, start = [], 0
    for tok, enc in present:
        w = _width(getattr(pipeline, enc))
        parts.append(TextEncoderPart(tok, enc, start, start + w, -2 if sdxl else None))
        start += w
    if start != cross:
        widths = " + ".join(str(p.width) for p in parts)
        raise _refuse(pipeline, method, f"its text encoders' widths ({widths}) do not add up to the UNet's "
                                        f"cross-attention width {cross}")
    return TextStack(tuple(parts), pooled, "sdxl" if sdxl else "sd")


def encoder_hidden(output: Any, layer: int | None) -> torch.Tensor | None:
    """The hidden states ``(b, n, d)`` a pipeline takes from a text encoder's ``output``: ``last_hidden_state``
    (``layer`` None) or ``hidden_states[layer]`` (None if the call did not return hidden states)."""
    if layer is None:
        last = getattr(output, "last_hidden_state", None)
        return last if last is not None else output[0]
    states = getattr(output, "hidden_states", None)
    return None if states is None else states[layer]


@dataclass
class TextConditioning:
    """What a UNet is conditioned on for a batch of prompts: ``hidden`` ``(b, n, d)`` encoder hidden states (SDXL:
    both encoders' concatenated) and, for SDXL, ``pooled`` ``(b, p)``; ``ids``: the token ids of each encoder."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    ids: tuple[torch.Tensor, ...] = field(default_factory=tuple)


def tokenize_with(tokenizer: Any, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    """Token ids ``(b, n)`` padded to the tokenizer's max length, as the pipelines tokenize."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def encode_text(pipeline: Any, prompts: Sequence[str], stack: TextStack | None = None) -> TextConditioning:
    """Encode ``prompts`` as the pipeline's own ``encode_prompt`` does (SD: ``text_encoder(ids)[0]``; SDXL: each
    encoder on its own tokenizer's ids with ``output_hidden_states=True``, ``hidden_states[-2]`` of both
    concatenated, the pooled embedding from the second encoder's ``text_embeds``). Gradients flow where the
    caller enables them."""
    stack = stack or text_stack(pipeline)
    device = next(pipeline.unet.parameters()).device
    hidden, ids, pooled = [], [], None
    for part in stack.parts:
        encoder = part.get_encoder(pipeline)
        x = tokenize_with(part.get_tokenizer(pipeline), prompts, device)
        if part.layer is None:
            out = encoder(x)
        else:
            out = encoder(x, output_hidden_states=True)
        h = encoder_hidden(out, part.layer)
        hidden.append(h)
        ids.append(x)
        if stack.pooled and pooled is None and getattr(out, "text_embeds", None) is not None:
            pooled = out.text_embeds                                                    # (b, p)
    cat = hidden[0] if len(hidden) == 1 else torch.cat([h.to(hidden[-1].dtype) for h in hidden], dim=-1)
    return TextConditioning(cat, pooled, tuple(ids))


def added_cond_kwargs(pipeline: Any, pooled: torch.Tensor, size: int | tuple[int, int]) -> dict:
    """SDXL's UNet keyword ``added_cond_kwargs`` for a batch: ``text_embeds`` = ``pooled`` ``(b, p)`` and
    ``time_ids`` ``(b, 6)`` = (original size, crop top-left (0, 0), target size), both sizes ``size`` (the training
    resolution: concept images are centre-cropped and resized to it, and sampling at that size passes the same
    ids). EditbenchError if the UNet's added-embedding width does not fit."""
    h, w = (size, size) if isinstance(size, int) else size
    ids = [h, w, 0, 0, h, w]
    unet = pipeline.unet
    want = getattr(getattr(unet, "add_embedding", None), "linear_1", None)
    got = unet.config.addition_time_embed_dim * len(ids) + pooled.shape[-1]
    if want is not None and want.in_features != got:
        raise EditbenchError(f"the UNet's added embedding reads {want.in_features} features but the pooled text "
                             f"embedding ({pooled.shape[-1]}) and 6 time ids give {got}: text_encoder_2 does not "
                             "belong to this UNet")
    time_ids = torch.tensor([ids], dtype=pooled.dtype, device=pooled.device).expand(pooled.shape[0], -1)
    return {"text_embeds": pooled, "time_ids": time_ids}
