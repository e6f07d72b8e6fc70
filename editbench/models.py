"""Building blocks shared by the toy world and the tests: the CLIP tokenizer, built offline, and small
Stable-Diffusion-architecture components.

Why this is hand-written: no hub download is allowed, and the only copy of CLIP's BPE vocabulary on a fresh
machine is the gzip file open_clip ships. We turn it into the ``vocab.json`` + ``merges.txt`` pair that
transformers' ``CLIPTokenizer`` reads, exactly as OpenAI's tokenizer builds its vocabulary.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
_N_MERGES = 49152 - 256 - 2  # OpenAI CLIP uses the first 48,894 merges of the file


def _bytes_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable-unicode table of GPT-2/CLIP BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer_files(folder: str | os.PathLike) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and a tokenizer config for CLIP's BPE into ``folder``.

    The source is open_clip's bundled ``bpe_simple_vocab_16e6.txt.gz``; the result loads with
    ``transformers.CLIPTokenizer.from_pretrained(folder)`` offline and tokenizes like OpenAI's CLIP
    (vocabulary 49,408, ``<|startoftext|>`` = 49406, ``<|endoftext|>`` = 49407, max length 77).
    """
    import open_clip.tokenizer as oct

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(oct.default_bpe(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = lines[1 : _N_MERGES + 1]
    units = list(_bytes_to_unicode().values())
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "model_max_length": CLIP_MAX_LENGTH,  # without it transformers assumes 1e30 and pipelines overflow
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",  # transformers' CLIP convention: pad id 49407
        "do_lower_case": True,
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=1))
    return folder


def clip_tokenizer(cache_dir: str | os.PathLike | None = None):
    """A ``transformers.CLIPTokenizer`` with the real CLIP vocabulary, built offline (see module doc) into
    ``cache_dir`` (default ``<cache_root>/clip_tokenizer``, :func:`editbench.storage.cache_root`)."""
    from transformers import CLIPTokenizer

    from editbench.storage import cache_root

    folder = Path(cache_dir) if cache_dir else cache_root() / "clip_tokenizer"
    if not (folder / "merges.txt").exists():
        write_clip_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=CLIP_MAX_LENGTH)


def dtype_kwargs(dtype) -> dict:
    """The dtype keyword of diffusers' ``from_pretrained`` for the installed diffusers: ``{"dtype": dtype}`` where
    ``torch_dtype`` is deprecated (diffusers PR #14205, 2026-07: it warns ``FutureWarning: torch_dtype is
    deprecated ... use dtype``; diffusers 0.42 here), ``{"torch_dtype": dtype}`` in older releases, which do not
    know ``dtype`` (pyproject allows diffusers >= 0.30)."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}
