"""Second moment of the token vectors a text encoder hands to cross-attention, over a caption corpus.

Tokenization follows CLIP (``tokenizer(batch, padding="longest", max_length=77)``, start token dropped); the
statistics are a :class:`~editbench.moments.SecondMoment`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from editbench.errors import EditbenchError
from editbench.moments import SecondMoment

__all__ = ["PADDING_POLICY", "default_captions", "estimate_pipeline_covariance", "estimate_text_covariance"]

PADDING_POLICY = "start token dropped, end token kept, padding dropped"
"""Which token vectors :func:`estimate_text_covariance` accumulates (Custom Diffusion's choice)."""


def default_captions() -> list[str]:
    """The generic caption corpus shipped with editbench (``editbench/data/captions.txt``, one per line).

    Generated from templates by ``editbench/data/make_captions.py``: objects, animals, people, colors, materials,
    scenes and styles; no concept or placeholder words.
    """
    from importlib.resources import files

    text = files("editbench").joinpath("data", "captions.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _batches(captions: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for caption in captions:
        if not isinstance(caption, str):
            raise EditbenchError(f"captions must be strings, got {type(caption).__name__}: {caption!r}")
        batch.append(caption)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def estimate_text_covariance(text_encoder: torch.nn.Module | Sequence[torch.nn.Module],
                             tokenizer: Any | Sequence[Any], captions: Iterable[str], *,
                             batch_size: int = 64, progress: bool = True, keep_start_token: bool = False,
                             corpus: str | None = None, layer: int | None = None) -> SecondMoment:
    """Second moment ``C`` of the token vectors a text encoder hands to cross-attention, over ``captions``.

    Several encoders (SDXL: ``[text_encoder, text_encoder_2]`` with ``[tokenizer, tokenizer_2]`` and
    ``layer=-2``): each encodes the captions with its own tokenizer and ``C`` is the second moment of the
    concatenated token vectors ``[h_1 ; h_2]``, width ``d_1 + d_2``: the context SDXL's cross-attention reads.
    ``layer``: None for ``last_hidden_state``, else ``hidden_states[layer]`` (SDXL's penultimate layer: -2).

    Each batch is tokenized (truncated to 77, padded to its longest caption), encoded under ``torch.no_grad``
    with ``text_encoder(input_ids, attention_mask=...).last_hidden_state`` on the encoder's device and dtype, and
    accumulated in float64, streaming (memory independent of the corpus size). Token policy (stored in the
    metadata as ``padding_policy``): the start token is dropped (it is the same vector in every caption of a
    causal encoder and would dominate ``C``; pass ``keep_start_token=True`` to keep it), the end token is kept
    and padding is dropped, as in Custom Diffusion. The encoder's train/eval mode is restored afterwards.

    ``corpus`` is a label stored in the metadata, with ``n_captions`` and
    ``corpus_sha256 = sha256(("\\n".join(captions) + "\\n").encode())`` (callers use it to validate caches).
    """
    if isinstance(captions, (str, bytes)):
        raise EditbenchError("captions must be an iterable of strings, not a single string; wrap it in a list")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EditbenchError(f"batch_size must be a positive int, got {batch_size!r}")
    encoders = list(text_encoder) if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    tokenizers = list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer]
    if len(encoders) != len(tokenizers) or not encoders:
        raise EditbenchError(f"give one tokenizer per text encoder, got {len(encoders)} encoder(s) and "
                             f"{len(tokenizers)} tokenizer(s)")
    dims = [getattr(getattr(e, "config", None), "hidden_size", None) for e in encoders]
    if not all(isinstance(e, torch.nn.Module) for e in encoders) or not all(isinstance(d, int) for d in dims):
        raise EditbenchError("text_encoder must be a transformers text model with config.hidden_size "
                             "(e.g. CLIPTextModel)")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
        raise EditbenchError(f"layer must be None (last_hidden_state) or an int index of hidden_states, got {layer!r}")
    from editbench.progress import progress as progress_bar

    from editbench.models import CLIP_MAX_LENGTH

    device = next(encoders[0].parameters()).device
    bos = getattr(tokenizers[0], "bos_token_id", None)
    policy = PADDING_POLICY if not keep_start_token else "start token kept, end token kept, padding dropped"
    moment = SecondMoment(sum(dims), device="cpu" if device.type == "mps" else device, metadata={
        "text_encoder": " + ".join(f"{type(e).__name__}:{getattr(e.config, '_name_or_path', '') or '?'}:hidden{d}"
                                   for e, d in zip(encoders, dims)),
        "tokenizer": " + ".join(f"{type(t).__name__}:max_length{CLIP_MAX_LENGTH}" for t in tokenizers),
        "output": "last_hidden_state" if layer is None else f"hidden_states[{layer}]",
        "padding_policy": policy,
        "corpus": corpus or "unnamed",
    })
    digest, n_captions = hashlib.sha256(), 0
    modes = [e.training for e in encoders]
    for e in encoders:
        e.eval()
    try:
        with torch.no_grad(), progress_bar(total=len(captions) if hasattr(captions, "__len__") else None,
                                           disable=not progress, desc="text covariance", unit="caption") as bar:
            for batch in _batches(captions, batch_size):
                # padded to the batch's longest caption, not to 77: the kept tokens' vectors do not depend on the
                # padding (causal encoder, attention mask passed), and computing 77 positions for ~10 real tokens
                # made the estimate several times slower
                hiddens, keep = [], None
                for enc, tokz in zip(encoders, tokenizers):
                    tok = tokz(batch, padding="longest", max_length=CLIP_MAX_LENGTH, truncation=True,
                               return_tensors="pt")
                    ids_e, att = tok["input_ids"].to(device), tok["attention_mask"].to(device)  # (b, t)
                    out = enc(ids_e, attention_mask=att, output_hidden_states=layer is not None)
                    hiddens.append(out.last_hidden_state if layer is None else out.hidden_states[layer])  # (b, t, d_e)
                    if keep is None:
                        ids, keep = ids_e, att.bool()                                     # (b, t) no padding
                    elif not torch.equal(att.bool(), keep):
                        raise EditbenchError("the tokenizers split a caption into different numbers of tokens; "
                                             "their token vectors cannot be concatenated")
                hidden = hiddens[0] if len(hiddens) == 1 else torch.cat([h.double() for h in hiddens], -1)
                if not keep_start_token and bos is not None:
                    keep[:, 0] &= ids[:, 0] != bos
                moment.update(hidden, keep)
                digest.update("\n".join(batch).encode() + b"\n")
                n_captions += len(batch)
                bar.update(len(batch))
    finally:
        for e, mode in zip(encoders, modes):
            e.train(mode)
    if n_captions == 0:
        raise EditbenchError("captions is empty; pass a caption corpus, e.g. default_captions()")
    moment.metadata.update(n_captions=n_captions, corpus_sha256=digest.hexdigest())
    return moment


def estimate_pipeline_covariance(pipeline: Any, captions: Iterable[str], **kwargs: Any) -> SecondMoment:
    """:func:`estimate_text_covariance` of the context ``pipeline``'s cross-attention reads: its text encoder's
    ``last_hidden_state`` (SD 1.x / 2.x), or SDXL's concatenated penultimate states of both encoders (width
    ``d_1 + d_2``), with the base tokenizers (not a copy that learned placeholder words)."""
    from editbench.methods.tokens import base_tokenizer
    from editbench.pipelines import text_stack

    stack = text_stack(pipeline)
    encoders = [p.get_encoder(pipeline) for p in stack.parts]
    tokenizers = [base_tokenizer(p.get_tokenizer(pipeline)) for p in stack.parts]
    if len(encoders) == 1:
        return estimate_text_covariance(encoders[0], tokenizers[0], captions, **kwargs)
    return estimate_text_covariance(encoders, tokenizers, captions, layer=stack.parts[0].layer, **kwargs)
