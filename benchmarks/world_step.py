"""Cost of one toy-world training step (UNet + text encoder) by number of attention heads.

    python benchmarks/world_step.py [--heads 32 4] [--batch 64] [--repeats 5]

The world's own UNet + text-encoder step (`editbench.toyworld.train`: v-prediction, caption dropout,
object-weighted loss, gradient clipping, AdamW) on models built by its `build_unet_and_text` with
`WorldConfig.unet_heads` set to each value (diffusers' ``attention_head_dim`` argument is the number of heads);
random latents, captions and object masks stand in for the rendered scenes (a step's cost does not depend on their
values). The variants are timed interleaved in one process (repeats x 5 steps each, after 3 warm-up steps) and
reported as seconds per step and as a ratio to the first variant (the peer). Numbers in docs/toyworld.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from editbench.models import CLIP_MAX_LENGTH
from editbench.toyworld.config import WorldConfig
from editbench.toyworld.train import _diffusion_step, _noise_scheduler, build_unet_and_text


def make_step(cfg: WorldConfig, n: int = 256):
    torch.manual_seed(0)
    unet, text = build_unet_and_text(cfg)
    opt = torch.optim.AdamW(list(unet.parameters()) + list(text.parameters()), lr=cfg.unet_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    s = cfg.image_size
    data = {"input_ids": torch.randint(0, 49406, (n, CLIP_MAX_LENGTH)),                    # (N, 77)
            "masks": (torch.rand(n, s, s) < 0.2).to(torch.uint8)}                          # (N, h, w)
    latents = torch.randn(n, 4, s // 2, s // 2)                                            # (N, 4, h/2, w/2)
    step_fn = _diffusion_step(cfg, Path("."), data, latents, unet, text, opt, sched, _noise_scheduler())
    gen = torch.Generator().manual_seed(0)
    return lambda: step_fn(0, gen)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, nargs="+", default=[32, 4])
    ap.add_argument("--batch", type=int, default=WorldConfig().unet_batch)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    steps = {h: make_step(WorldConfig().replace(unet_heads=h, unet_batch=args.batch)) for h in args.heads}
    for step in steps.values():
        for _ in range(3):
            step()
    times = {h: [] for h in steps}
    for _ in range(args.repeats):
        for h, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(5):
                step()
            times[h].append((time.perf_counter() - t0) / 5)
    df = pd.DataFrame({"heads": list(times), "s_per_step": [float(pd.Series(v).median()) for v in times.values()]})
    df["ratio_to_peer"] = df.s_per_step / df.s_per_step.iloc[0]
    print(f"torch threads {torch.get_num_threads()}, batch {args.batch}, median of {args.repeats} x 5 steps")
    print(df.to_string(index=False, float_format="%.3f"))
    return df


if __name__ == "__main__":
    main()
