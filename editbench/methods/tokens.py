"""New placeholder tokens without touching the base tokenizer or embedding matrix.

:func:`add_tokens` swaps in a *copy* of the pipeline's tokenizer that knows the new words and wraps the text
encoder's token embedding in an :class:`ExtendedEmbedding`, which looks up the new ids in its own ``rows`` and
every other id in the untouched base matrix. Nothing of the base is modified in place, so undoing the
:class:`~editbench.methods.base.EditHandle` puts back the original objects and every base row is bitwise what it
was; during training only ``rows`` receive gradients (no weight decay drift on the other 49,408 rows).
The state-dict keys of the text encoder do not change (the wrapper re-registers the base ``weight``), so
fingerprints of the base model are stable while tokens are added.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from editbench.concepts import vocabulary_id
from editbench.errors import ConceptDataError, EditbenchError

__all__ = ["RARE_WORDS", "EmbeddingNormCap", "ExtendedEmbedding", "add_tokens", "base_tokenizer", "cap_norms_",
           "initial_rows", "n_encoders", "rare_word", "single_token_id", "token_position", "word_norms"]

RARE_WORDS = ("sks", "olis", "bnha", "hta", "ucd", "pll", "rcn", "waj", "httr", "shld", "omd", "adl", "nlwx", "ucn")
"""Rare words used as placeholders by methods that reuse a word (``Editor.new_token = False``)."""


class ExtendedEmbedding(torch.nn.Module):
    """A token embedding with extra rows for new ids; the base embedding is used as is, never modified.

    Args:
        base: the text encoder's current input embedding (``nn.Embedding`` or another ``ExtendedEmbedding``).
        token_ids: the ids of the new tokens.
        rows: ``(k, d)`` their vectors (a float32 ``nn.Parameter`` when training); cast to the base dtype.
    """

    def __init__(self, base: torch.nn.Module, token_ids: Sequence[int], rows: torch.Tensor):
        super().__init__()
        if rows.ndim != 2 or rows.shape[0] != len(token_ids) or rows.shape[1] != base.weight.shape[1]:
            raise EditbenchError(f"rows must be (k={len(token_ids)}, d={base.weight.shape[1]}), got "
                                 f"{tuple(rows.shape)}")
        object.__setattr__(self, "base", base)  # not a submodule: state-dict keys stay those of the base
        self.weight = base.weight                # registered under the base's name ("...token_embedding.weight")
        self.token_ids = [int(t) for t in token_ids]
        object.__setattr__(self, "rows", rows)   # not registered: not part of the text encoder's state dict
        self.num_embeddings, self.embedding_dim = base.weight.shape[0], base.weight.shape[1]
        self.padding_idx = getattr(base, "padding_idx", None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        new = torch.zeros_like(ids, dtype=torch.bool)
        for t in self.token_ids:
            new |= ids == t
        safe = ids.masked_fill(new, 0)
        if isinstance(self.base, torch.nn.Embedding):
            out = F.embedding(safe, self.weight, self.padding_idx)       # (b, n, d)
        else:
            out = self.base(safe)                                         # (b, n, d)
        rows = self.rows.to(out.dtype)
        for j, t in enumerate(self.token_ids):
            out = torch.where((ids == t)[..., None], rows[j], out)
        return out

    def extra_repr(self) -> str:
        return f"base={tuple(self.weight.shape)}, new_ids={self.token_ids}"


def base_tokenizer(tokenizer: Any) -> Any:
    """The tokenizer ``tokenizer`` was copied from by :func:`add_tokens` (itself if it is not such a copy)."""
    return getattr(tokenizer, "_editbench_base_tokenizer", tokenizer)


def single_token_id(tokenizer: Any, word: str) -> int:
    """The id of ``word`` if it is exactly one token; ConceptDataError otherwise."""
    ids = list(tokenizer(word, add_special_tokens=False).input_ids)
    if len(ids) != 1:
        raise ConceptDataError(f"{word!r} is {len(ids)} tokens for this tokenizer; a single-token word is needed")
    return int(ids[0])


def rare_word(tokenizer: Any, index: int = 0) -> str:
    """The ``index``-th (cyclically) of the :data:`RARE_WORDS` that are one token for ``tokenizer``."""
    words = [w for w in RARE_WORDS if len(tokenizer(w, add_special_tokens=False).input_ids) == 1]
    if not words:
        raise ConceptDataError(f"none of the rare words {RARE_WORDS} is one token for this tokenizer; pass a "
                               "single-token placeholder")
    return words[index % len(words)]


def token_position(ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """``(b,)`` index of the first occurrence of ``token_id`` in every row of ``ids`` ``(b, n)``; -1 if absent."""
    hit = ids == token_id                                      # (b, n)
    first = hit.int().argmax(-1)                               # (b,)
    return torch.where(hit.any(-1), first, torch.full_like(first, -1))


def _clone(tok: Any) -> Any:
    """A copy of ``tok`` that can learn new words without touching ``tok``.

    For a ``tokenizers``-backed tokenizer this is a shallow copy of the wrapper around a new backend that shares
    the (read-only) BPE model and pipeline pieces and re-adds the added tokens: microseconds instead of the
    seconds a deep copy of a 49k-word vocabulary takes. Other tokenizers are deep-copied.
    """
    from tokenizers import Tokenizer

    backend = getattr(tok, "_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        return copy.deepcopy(tok)
    new = Tokenizer(backend.model)
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        value = getattr(backend, part)
        if value is not None:
            setattr(new, part, value)
    added = backend.get_added_tokens_decoder()                          # id -> AddedToken
    for i in sorted(added):
        (new.add_special_tokens if added[i].special else new.add_tokens)([added[i]])
    if new.get_added_tokens_decoder().keys() != added.keys() or \
            new.get_vocab_size(True) != backend.get_vocab_size(True):
        return copy.deepcopy(tok)                                       # unusual layout: take the slow, safe path
    clone = copy.copy(tok)
    clone._tokenizer = new
    if hasattr(clone, "_wrap_decode_method_backend_tokenizer"):         # CLIP's decode fix-up lives on the backend
        clone._wrap_decode_method_backend_tokenizer()
    return clone


def _names(encoder: int) -> tuple[str, str]:
    """The (tokenizer, text encoder) attribute names of text encoder ``encoder`` (0: ``tokenizer`` /
    ``text_encoder``; 1: SDXL's ``tokenizer_2`` / ``text_encoder_2``)."""
    from editbench.pipelines import ENCODER_NAMES

    if encoder not in range(len(ENCODER_NAMES)):
        raise EditbenchError(f"encoder must be 0 or 1 (text_encoder, text_encoder_2), got {encoder!r}")
    return ENCODER_NAMES[encoder]


def n_encoders(pipeline: Any) -> int:
    """How many text encoders a pipeline has (1: SD 1.x / 2.x; 2: SDXL, ``text_encoder_2`` set)."""
    return 2 if getattr(pipeline, "text_encoder_2", None) is not None else 1


def add_tokens(handle: Any, pipeline: Any, tokens: Sequence[str], rows: torch.Tensor, *,
               encoder: int = 0) -> list[int]:
    """Make ``tokens`` new single-token words of ``pipeline`` with embedding ``rows`` ``(k, d)``; return their ids.

    ``encoder``: which text encoder and tokenizer learn the words (0: ``text_encoder``/``tokenizer``; 1: SDXL's
    ``text_encoder_2``/``tokenizer_2``, with rows of that encoder's width); SDXL methods call it once per encoder.
    Recorded on ``handle`` (an :class:`~editbench.methods.base.EditHandle`): undo restores the original
    tokenizer object and embedding module. Raises ConceptDataError if a word already is a token.
    """
    tok_name, enc_name = _names(encoder)
    tokens = list(tokens)
    emb = getattr(pipeline, enc_name).get_input_embeddings()
    if rows.untyped_storage().data_ptr() == emb.weight.untyped_storage().data_ptr():
        raise EditbenchError("rows share memory with the base embedding matrix (a view of it), so training them "
                             "would change the base rows; pass a copy: weight[i].detach().clone()")
    tok = _clone(getattr(pipeline, tok_name))
    existing = [t for t in tokens
                if vocabulary_id(tok, t) is not None or len(tok(t, add_special_tokens=False).input_ids) == 1]
    if existing or len(set(tokens)) != len(tokens):
        raise ConceptDataError(f"cannot add {existing or tokens}: already a token of the vocabulary (or repeated); "
                               "pick new placeholder strings")
    if tok.add_tokens(tokens) != len(tokens):
        raise ConceptDataError(f"the tokenizer refused to add {tokens}")
    ids = [int(i) for i in tok.convert_tokens_to_ids(tokens)]
    for word, i in zip(tokens, ids):
        got = tok(f"a photo of a {word}", add_special_tokens=False).input_ids
        if list(got).count(i) != 1:
            raise ConceptDataError(f"placeholder {word!r} is not recognised as one token in a prompt (got ids {got}); "
                                   "use a lower-case string without spaces, such as '<my-teddy>'")
    tok._editbench_base_tokenizer = base_tokenizer(getattr(pipeline, tok_name))
    module = getattr(pipeline, enc_name)
    handle.set_attr(pipeline, tok_name, tok)
    ext = ExtendedEmbedding(emb, ids, rows)
    module.set_input_embeddings(ext)
    handle.on_undo(f"{enc_name} input embedding", lambda: module.set_input_embeddings(emb),
                   check=lambda: None if module.get_input_embeddings() is ext else "replaced by a later edit")
    return ids


def initial_rows(pipeline: Any, words: Sequence[str], *, encoder: int = 0) -> torch.nn.Parameter:
    """Trainable float32 ``(k, d)`` rows for new tokens, row j copied from the embedding of the one-token ``words[j]``
    (in text encoder ``encoder``'s embedding: 0 ``text_encoder``, 1 SDXL's ``text_encoder_2``).

    Pass the result to :func:`add_tokens`: only these rows are then trained (textual inversion's and Custom
    Diffusion's initialisation from a coarse word or a rare token). A word that is not one token but is an entry
    of the vocabulary (Custom Diffusion's "ktn": the word-internal piece, as the reference's
    ``tokenizer.encode([word])`` looks it up) uses that entry. ConceptDataError otherwise.
    """
    tok_name, enc_name = _names(encoder)
    tok = base_tokenizer(getattr(pipeline, tok_name))
    weight = getattr(pipeline, enc_name).get_input_embeddings().weight         # (V, d)
    vocab = tok.get_vocab() if any(len(tok(w, add_special_tokens=False).input_ids) != 1 for w in words) else {}
    ids = [vocab[w] if w in vocab else single_token_id(tok, w) for w in words]
    return torch.nn.Parameter(weight[ids].detach().to(torch.float32).clone())  # (k, d)


# ----------------------------------------------------------------------------------------------- norm cap
def word_norms(pipeline: Any, words: Sequence[str], *, encoder: int = 0) -> torch.Tensor:
    """float32 ``(k,)`` norms of the base embedding rows of the one-token ``words`` (ConceptDataError otherwise) in
    text encoder ``encoder`` (0 ``text_encoder``, 1 SDXL's ``text_encoder_2``)."""
    tok_name, enc_name = _names(encoder)
    tok = base_tokenizer(getattr(pipeline, tok_name))
    weight = getattr(pipeline, enc_name).get_input_embeddings().weight            # (V, d)
    ids = [single_token_id(tok, w) for w in words]
    return weight[ids].detach().float().norm(dim=-1)                              # (k,)


def cap_norms_(rows: torch.Tensor, limits: torch.Tensor | None) -> torch.Tensor:
    """Project every row of ``rows`` ``(k, d)`` whose norm exceeds ``limits[j]`` ``(k,)`` back onto that norm
    (direction kept), in place, without recording gradients; returns ``rows``. Rows within their limit are left
    bitwise unchanged; ``limits=None`` (no cap, :meth:`EmbeddingNormCap.norm_limits`) changes nothing."""
    if limits is None:
        return rows
    with torch.no_grad():
        limits = limits.to(rows.device)
        r = rows.to(torch.promote_types(rows.dtype, torch.float32))   # (k, d); half-precision rows: in float32
        norms = r.norm(dim=-1)                                                     # (k,)
        over = norms > limits
        if bool(over.any()):
            rows[over] = (r[over] * (limits[over] / norms[over])[:, None]).to(rows.dtype)
    return rows


@dataclass
class EmbeddingNormCap:
    """Config field of the methods that learn embedding rows (textual inversion, Perfusion, Custom Diffusion).

    ``embedding_norm_cap``: after every optimizer step each learned row is projected back to norm
    ``<= embedding_norm_cap * |e(superclass)|``, the base embedding of the concept's superclass word (None:
    unconstrained, the papers' recipe). The scale is the base model's own, so the rule carries over between
    text encoders: reference learning rates are Adam step sizes tuned on CLIP-L's embedding scale, and on a text
    encoder whose words sit at another scale the learned row grows to several times a word's norm and its token
    dominates the causal encoder's later tokens (measured on the toy world: docs/methods/textual_inversion.md).
    """

    embedding_norm_cap: float | None = None

    def validate_norm_cap(self) -> None:
        v = self.embedding_norm_cap
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                              or v <= 0):
            raise EditbenchError(f"embedding_norm_cap must be a finite number > 0 or None, got {v!r}")

    def norm_limits(self, pipeline: Any, superclasses: Sequence[str], *, encoder: int = 0) -> torch.Tensor | None:
        """``(k,)`` limits of the learned rows of concepts with these superclass words (None: no cap), in text
        encoder ``encoder``'s embedding scale (SDXL: each encoder's rows are capped by its own word norms)."""
        if self.embedding_norm_cap is None:
            return None
        return float(self.embedding_norm_cap) * word_norms(pipeline, superclasses, encoder=encoder)
