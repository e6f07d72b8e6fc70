"""The ``editbench`` command line.

``editbench world train|eval|data|prior`` builds and measures the toy world; ``train``, ``generate``, ``compose``,
``export``, ``bench``, ``tune``, ``report`` and ``demo`` run methods and suites. A user mistake prints
``editbench: error: ...`` and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from editbench.errors import EditbenchError


# ------------------------------------------------------------------------------------------------ world
def cmd_world_train(args) -> None:
    from editbench.toyworld import WEIGHTS
    from editbench.toyworld.train import WorldConfig, train_world

    from editbench.commands import _kv

    cfg = WorldConfig(seed=args.seed)
    if args.smoke:  # a minutes-long run of every stage, for tests and CI
        cfg = WorldConfig.smoke(seed=args.seed)
    cfg = cfg.replace(**_kv(args.set))  # e.g. --set unet_steps=3000 --set pattern_prob=0.8 (a candidate recipe)
    train_world(Path(args.out or WEIGHTS), work=args.work, cfg=cfg, progress=not args.quiet)


def cmd_world_eval(args) -> None:
    from editbench.storage import parse_dtype, write_json
    from editbench.toyworld import evaluator, load_pipeline
    from editbench.toyworld.quality import describability, evaluator_report, quality_gate, summary_table

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.device, parse_dtype(args.dtype), path=args.model)
    kw = {"steps": args.steps, "guidance_scale": args.guidance}
    df, summary = quality_gate(pipe, n_single=args.n, n_double=args.n // 2, **kw)
    df.to_csv(out / "quality_gate.csv", index=False)
    ddf, described = describability(pipe, images_per_background=args.images_per_background,
                                    grid_path=out / "describability.png", **kw)
    ddf.to_csv(out / "describability.csv", index=False)
    ev = evaluator_report(*evaluator(args.device, path=args.model and Path(args.model).parent / "evaluator"))
    write_json(out / "toyworld_eval.json", {"quality_gate": summary, "describability": described, "evaluator": ev})
    print(summary_table(summary, described))
    print(f"gate passed: {summary['passes']}; describability gate passed: {described['passes']}")
    print(f"evaluator: top-1 retrieval {ev['retrieval_top1']:.3f} (1 of {ev['group_size']}), "
          f"min concept gap {ev['concept_gap_min']:.3f}")


def cmd_world_data(args) -> None:
    from editbench.toyworld import DATA, write_concept_data

    files = write_concept_data(Path(args.out or DATA))
    print(f"wrote {len(files)} concepts to {args.out or DATA}")


def cmd_world_prior(args) -> None:
    from editbench.toyworld.retrieval import write_retrieval

    out = write_retrieval(Path(args.out), args.category, args.n, seed=args.seed)
    print(f"wrote {args.n} {args.category} scenes with their captions to {out} (caption.txt, images.txt, images/); "
          f"train with --set class_data_dir={out}")


# --------------------------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line like editbench's own (argparse prints the usage first); the
    subcommands' parsers are of this class too (add_subparsers uses the parent's class)."""

    def error(self, message: str):
        command = self.prog.removeprefix("editbench").strip()
        self.exit(2, f"editbench: error: {message} (see `editbench {command + ' ' if command else ''}--help`)\n")


def _check_device(device: str | None) -> None:
    """``--device`` names a device torch knows and that is there (EditbenchError otherwise)."""
    if device is None:
        return
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise EditbenchError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if (kind == "cuda" and not torch.cuda.is_available()) or (kind == "mps" and not torch.backends.mps.is_available()):
        raise EditbenchError(f"--device {device}: no {kind} device is available here; use --device cpu")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="editbench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--dtype", default=None, help="float32 (default), float16 or bfloat16")
    sub = p.add_subparsers(dest="command", required=True)

    world = sub.add_parser("world", help="build and measure the toy world")
    wsub = world.add_subparsers(dest="world_command", required=True)
    t = wsub.add_parser("train", help="train the toy world from scratch (resumable)")
    t.add_argument("--out", default=None, help="output folder (default: the package's weights folder)")
    t.add_argument("--work", default=None, help="checkpoint folder (default: OUT/_work)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--smoke", action="store_true", help="a tiny run of every stage (minutes), for testing")
    t.add_argument("--set", action="append",
                   help="WorldConfig override key=value (repeatable; recorded in the work folder's config.json and "
                        "in training_log.json), e.g. --set unet_steps=3000")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_world_train)
    e = wsub.add_parser("eval", help="quality gate of the base model and the evaluator's report")
    e.add_argument("--out", default="runs/world_eval")
    e.add_argument("--images-per-background", type=int, default=4,
                   help="describability gate: images per (concept, unseen background, prompt kind)")
    e.add_argument("--model", default=None, help="a toy-world pipeline folder (default: the committed one; its "
                                                 "evaluator is read from the sibling 'evaluator' folder)")
    e.add_argument("--n", type=int, default=200, help="single-object held-out captions (two-object: n/2)")
    e.add_argument("--steps", type=int, default=25)
    e.add_argument("--guidance", type=float, default=4.0)
    e.set_defaults(func=cmd_world_eval)
    d = wsub.add_parser("data", help="write the personal concepts in DreamBench / CustomConcept101 layouts")
    d.add_argument("--out", default=None)
    d.set_defaults(func=cmd_world_data)
    r = wsub.add_parser("prior", help="real class images of a category with their captions, for prior preservation "
                                      "(diffusers' retrieval layout: caption.txt, images.txt, images/)")
    r.add_argument("--category", required=True, help="a toy-world category (heart, star, ...)")
    r.add_argument("--n", type=int, default=200, help="number of images (default 200, as Custom Diffusion)")
    r.add_argument("--out", required=True, help="a new or empty folder")
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(func=cmd_world_prior)

    _add_method_commands(sub)
    return p


def _add_method_commands(sub) -> None:
    """The method, suite and report commands (they import the heavier modules only when run)."""
    from editbench import commands

    commands.register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error (printed on one line by _Parser) or --help
        return e.code if isinstance(e.code, int) else 2
    try:
        _check_device(args.device)
        args.func(args)
    except EditbenchError as e:
        print(f"editbench: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, always
        return 2
    except OSError as e:  # a path the user gave that cannot be read or written, where no check caught it first
        if e.filename is None:
            raise
        print(f"editbench: error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("editbench: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

