"""How close DreamBooth with bfloat16 master weights trains to float32 master weights, on the toy world.

    python benchmarks/bf16_master.py [--concept sunny] [--steps N]

Three runs at the tuned toy-world defaults (prior preservation, clipping): float32 seed 0, bfloat16 master weights
(bf16 autocast, stochastically rounded AdamW) seed 0, float32 seed 1 (the seed-to-seed noise floor). Compared: the
UNet updates ``W - W0`` (for the bfloat16 run with the rounding of the base weights to bfloat16 taken out) by cosine
and norm, and the last losses. Numbers in docs/methods/dreambooth.md (Memory).
"""

from __future__ import annotations

import argparse
import dataclasses

import pandas as pd
import torch

from editbench import methods, toyworld


def update(pipe, concept, seed: int, steps: int | None, **kw) -> tuple[torch.Tensor, float]:
    """The flattened UNet update (float32) of one DreamBooth run and its last loss."""
    ed = methods.get("dreambooth")(**kw, **({} if steps is None else {"steps": steps}))
    c = dataclasses.replace(concept, placeholder=ed.placeholder(pipe.tokenizer, concept.placeholder))
    art = ed.fit(pipe, c, seed=seed, progress=True)
    rounded = kw.get("master_weights") == "bf16"
    base = {k: (v.to(torch.bfloat16) if rounded else v).float() for k, v in pipe.unet.state_dict().items()}
    delta = torch.cat([(art.tensors[f"unet.{k}"].float() - v).flatten() for k, v in base.items()])   # (P,)
    return delta, art.metadata["training"]["loss_last"]


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concept", default="sunny")
    ap.add_argument("--steps", type=int, default=None, help="default: the method's tuned steps")
    args = ap.parse_args(argv)
    pipe = toyworld.load_pipeline()
    concept = toyworld.concept_data(args.concept)
    runs = {"float32, seed 0": update(pipe, concept, 0, args.steps),
            "bf16 master, seed 0": update(pipe, concept, 0, args.steps, mixed_precision="bf16", master_weights="bf16"),
            "float32, seed 1": update(pipe, concept, 1, args.steps)}
    runs = {name: (d.double(), loss) for name, (d, loss) in runs.items()}   # sums over ~10 M entries: float64
    ref = runs["float32, seed 0"][0]
    rows = [{"run": name, "update norm": float(d.norm()),
             "cosine with float32 seed 0": float(d @ ref / (d.norm() * ref.norm())), "last loss": loss}
            for name, (d, loss) in runs.items()]
    df = pd.DataFrame(rows)
    print(df.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    return df


if __name__ == "__main__":
    main()
