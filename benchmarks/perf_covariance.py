"""Covariance estimation: tokens per second of ``estimate_text_covariance`` and its peak memory above the loaded
encoder, with the current batching ("after") or batches padded to 77 tokens ("before")."""

from __future__ import annotations

import time

from perf_common import PeakRSS, bench_pipeline, text_encoder


class _PadTo77:
    """A tokenizer that pads every batch to 77 tokens whatever it is asked: ``estimate_text_covariance`` as it was
    before it padded to the longest caption of the batch (the "before" of that fix)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **{**kwargs, "padding": "max_length", "max_length": 77})


def measure_covariance(encoder: str = "clip-l", n_captions: int = 640, batch_size: int = 64,
                       variant: str = "after", save_to: str | None = None) -> dict:
    """Tokens per second of :func:`editbench.text_covariance.estimate_text_covariance` and its peak RSS above the loaded
    encoder, for ``n_captions`` captions (the default corpus, cycled). ``encoder``: ``clip-l`` (SD 1.x's text
    tower shape: 12 layers, width 768, random weights) or ``toy`` (the toy world's / tiny pipeline's encoder)."""
    from editbench.models import clip_tokenizer
    from editbench.text_covariance import default_captions, estimate_text_covariance

    if encoder == "clip-l":
        model, label = text_encoder(768, full_clip=True), "CLIP ViT-L/14 text shape (12 x 768), random weights"
    else:
        pipe, name = bench_pipeline("auto")
        model, label = pipe.text_encoder, f"text encoder of the {name}"
    tok = clip_tokenizer() if variant == "after" else _PadTo77(clip_tokenizer())
    corpus = default_captions()
    captions = [corpus[i % len(corpus)] for i in range(n_captions)]
    estimate_text_covariance(model, tok, captions[:batch_size], batch_size=batch_size, progress=False)  # warm-up
    with PeakRSS() as mem:
        t = time.perf_counter()
        moment = estimate_text_covariance(model, tok, captions, batch_size=batch_size, progress=False)
        secs = time.perf_counter() - t
    if save_to:
        moment.save(save_to)
    return {"encoder": label, "variant": variant, "captions": n_captions, "tokens": moment.count, "seconds": secs,
            "matrix_sum": float(moment.matrix().sum()), "matrix_abs_sum": float(moment.matrix().abs().sum()),
            "tokens_per_s": moment.count / secs, "captions_per_s": n_captions / secs, "peak_rss_delta": mem.delta,
            "moment_bytes": moment.dim * moment.dim * 8, "batch_size": batch_size}
