"""Second moment of the token vectors a text encoder hands to cross-attention, over a caption corpus.

Tokenization follows CLIP (``tokenizer(batch, padding="longest", max_length=77)``, start token dropped); the
statistics are a :class:`~editbench.moments.SecondMoment`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from editbench.errors import EditbenchError
from editbench.moments import SecondMoment

__all__ = ["PADDING_POLICY", "default_captions", "estimate_text_covariance"]

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


def estimate_text_covariance(text_encoder: torch.nn.Module, tokenizer: Any, captions: Iterable[str], *,
                             batch_size: int = 64, progress: bool = True, keep_start_token: bool = False,
                             corpus: str | None = None) -> SecondMoment:
    """Second moment ``C`` of the token vectors a text encoder hands to cross-attention, over ``captions``.

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
    dim = getattr(getattr(text_encoder, "config", None), "hidden_size", None)
    if not isinstance(text_encoder, torch.nn.Module) or not isinstance(dim, int):
        raise EditbenchError("text_encoder must be a transformers text model with config.hidden_size "
                             "(e.g. CLIPTextModel)")
    from editbench.progress import progress as progress_bar

    from editbench.models import CLIP_MAX_LENGTH

    device = next(text_encoder.parameters()).device
    bos = getattr(tokenizer, "bos_token_id", None)
    policy = PADDING_POLICY if not keep_start_token else "start token kept, end token kept, padding dropped"
    moment = SecondMoment(dim, device="cpu" if device.type == "mps" else device, metadata={
        "text_encoder": f"{type(text_encoder).__name__}:{getattr(text_encoder.config, '_name_or_path', '') or '?'}"
                        f":hidden{dim}",
        "tokenizer": f"{type(tokenizer).__name__}:max_length{CLIP_MAX_LENGTH}",
        "output": "last_hidden_state",
        "padding_policy": policy,
        "corpus": corpus or "unnamed",
    })
    digest, n_captions = hashlib.sha256(), 0
    was_training = text_encoder.training
    text_encoder.eval()
    try:
        with torch.no_grad(), progress_bar(total=len(captions) if hasattr(captions, "__len__") else None,
                                           disable=not progress, desc="text covariance", unit="caption") as bar:
            for batch in _batches(captions, batch_size):
                # padded to the batch's longest caption, not to 77: the kept tokens' vectors do not depend on the
                # padding (causal encoder, attention mask passed), and computing 77 positions for ~10 real tokens
                # made the estimate several times slower
                tok = tokenizer(batch, padding="longest", max_length=CLIP_MAX_LENGTH, truncation=True,
                                return_tensors="pt")
                ids, att = tok["input_ids"].to(device), tok["attention_mask"].to(device)  # (b, t)
                hidden = text_encoder(ids, attention_mask=att).last_hidden_state          # (b, t, d)
                keep = att.bool()                                                         # (b, t) no padding
                if not keep_start_token and bos is not None:
                    keep[:, 0] &= ids[:, 0] != bos
                moment.update(hidden, keep)
                digest.update("\n".join(batch).encode() + b"\n")
                n_captions += len(batch)
                bar.update(len(batch))
    finally:
        text_encoder.train(was_training)
    if n_captions == 0:
        raise EditbenchError("captions is empty; pass a caption corpus, e.g. default_captions()")
    moment.metadata.update(n_captions=n_captions, corpus_sha256=digest.hexdigest())
    return moment
