"""Text covariance estimation (``estimate_text_covariance``): tokens per second with SD 1.x's text-tower shape,
and peak memory for two corpus sizes (fresh processes) to show it does not grow with the corpus."""

from __future__ import annotations

from perf_common import in_subprocess, text_encoder

from editbench.models import clip_tokenizer
from editbench.text_covariance import default_captions, estimate_text_covariance


def test_covariance_throughput(benchmark):
    model, tok = text_encoder(768, full_clip=True), clip_tokenizer()
    captions = default_captions()[:256]
    small = in_subprocess("covariance", encoder="clip-l", n_captions=256)
    large = in_subprocess("covariance", encoder="clip-l", n_captions=1024)
    result = benchmark.pedantic(estimate_text_covariance, args=(model, tok, captions),
                                kwargs={"progress": False}, rounds=2, iterations=1, warmup_rounds=1)
    benchmark.group = "covariance"
    benchmark.extra_info.update(tokens=result.count, tokens_per_s=result.count / benchmark.stats.stats.median,
                                peak_rss_delta_256=small["peak_rss_delta"], peak_rss_delta_1024=large["peak_rss_delta"],
                                memory_ratio_1024_vs_256=large["peak_rss_delta"] / max(1, small["peak_rss_delta"]))
