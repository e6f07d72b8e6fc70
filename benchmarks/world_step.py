"""Cost of one toy-world training step (UNet + text encoder, forward, backward, AdamW) by number of attention heads.

    python benchmarks/world_step.py [--heads 32 4] [--batch 64] [--repeats 5]

The world's `UNet2DConditionModel` is built from `editbench.toyworld.config.unet_config` with
`WorldConfig.unet_heads` set to each value (diffusers' ``attention_head_dim`` argument is the number of heads);
random latents, timesteps and 77-token captions of the training batch size. The variants are timed interleaved in
one process (repeats x 5 steps each, after 3 warm-up steps) and reported as seconds per step and as a ratio to the
first variant (the peer). Numbers in docs/toyworld.md.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from editbench.models import CLIP_MAX_LENGTH
from editbench.toyworld.config import WorldConfig, text_config, unet_config


def make_step(cfg: WorldConfig, batch: int):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet, text = UNet2DConditionModel(**unet_config(cfg)), CLIPTextModel(CLIPTextConfig(**text_config(cfg)))
    opt = torch.optim.AdamW(list(unet.parameters()) + list(text.parameters()), lr=1e-4)
    s = cfg.image_size // 2
    ids = torch.randint(0, 49406, (batch, CLIP_MAX_LENGTH))                         # (b, 77)
    x, t = torch.randn(batch, 4, s, s), torch.randint(0, 1000, (batch,))           # (b, 4, s, s), (b,)

    def step():
        h = text(ids).last_hidden_state                                            # (b, 77, d)
        loss = (unet(x, t, h).sample - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, nargs="+", default=[32, 4])
    ap.add_argument("--batch", type=int, default=WorldConfig().unet_batch)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    steps = {h: make_step(WorldConfig().replace(unet_heads=h), args.batch) for h in args.heads}
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
