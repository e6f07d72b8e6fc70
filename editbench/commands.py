"""The method, suite and report commands of the ``editbench`` CLI (see :mod:`editbench.cli`)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from editbench.errors import EditbenchError


def _kv(items: list[str] | None) -> dict:
    """``["beta=0.7", "lr=1e-4"]`` -> ``{"beta": 0.7, "lr": 0.0001}``: values parsed like suite YAML files
    (:func:`editbench.values.parse_value`, which reads ``1e-4`` as a number)."""
    from editbench.values import parse_value

    out = {}
    for item in items or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise EditbenchError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_value(v)
    return out


def out_dir(path, flag: str = "--out") -> Path:
    """Create the output folder ``path`` up front (before any training), or EditbenchError naming ``flag``: a file
    in the way, a parent that is a file, no permission."""
    import os

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise EditbenchError(f"{flag} {p} is a file; give a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EditbenchError(f"cannot create {flag} {p}: {err.strerror or err}") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise EditbenchError(f"{flag} {p} is not writable; give a folder you can write to")
    return p


def out_file(path, flag: str = "--out") -> Path:
    """Check that the file ``path`` can be written (its folder is created), before the work that produces it."""
    p = Path(path)
    if p.is_dir():
        raise EditbenchError(f"{flag} {p} is a folder; give a file path such as {p / 'concept.safetensors'}")
    out_dir(p.parent, f"{flag}'s folder")
    return p


def _pipeline(args):
    import json

    import torch
    from diffusers import DiffusionPipeline

    from editbench.models import dtype_kwargs
    from editbench.progress import quiet_loading
    from editbench.storage import parse_dtype

    quiet_loading()
    if args.model is None:
        from editbench.toyworld import load_pipeline

        return load_pipeline(args.device, parse_dtype(args.dtype))
    if not Path(args.model, "model_index.json").exists():
        raise EditbenchError(f"--model {args.model!r} is not a diffusers pipeline folder (no model_index.json)")
    # the folder's own pipeline class (StableDiffusionPipeline, StableDiffusionXLPipeline, ...); the methods refuse
    # the classes they cannot edit, by name (editbench.pipelines.text_stack)
    has_checker = "safety_checker" in json.loads(Path(args.model, "model_index.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(args.model, **dtype_kwargs(parse_dtype(args.dtype) or torch.float32),
                                             **({"safety_checker": None, "requires_safety_checker": False}
                                                if has_checker else {}))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(args.device or "cpu")


def _concept(args):
    from editbench.concepts import ConceptData

    if args.concept:
        from editbench.toyworld import concept_data

        return concept_data(args.concept)
    if not (args.images and args.superclass and args.placeholder):
        raise EditbenchError("give --concept NAME (a toy-world concept) or --images DIR --superclass WORD "
                             "--placeholder TOKEN")
    folder = Path(args.images)
    if not folder.is_dir():
        raise EditbenchError(f"--images {folder} is not a folder; give the folder holding the concept's images")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if not images:
        raise EditbenchError(f"no .png/.jpg/.jpeg/.webp images in {folder}")
    return ConceptData(args.placeholder, args.superclass, images)


TRAIN_FLAGS = {"gradient_checkpointing": "--gradient-checkpointing", "mixed_precision": "--mixed-precision",
               "resolution": "--resolution", "lr_scheduler": "--lr-scheduler", "lr_warmup_steps": "--lr-warmup-steps",
               "validation_every": "--validation-every", "validation_prompts": "--validation-prompt",
               "log_with": "--log-with", "optimizer": "--optimizer", "num_class_images": "--num-class-images",
               "class_resolution": "--class-resolution", "master_weights": "--master-weights",
               "fused_backward": "--fused-backward"}
"""The training options ``editbench train`` has a flag for (config field -> flag); any other field: ``--set``."""


def train_overrides(args) -> dict:
    """The config overrides of ``editbench train``: ``--set key=value`` items and the training-option flags
    (:data:`TRAIN_FLAGS`); EditbenchError if an option is given both ways."""
    out = _kv(args.set)
    for name, flag in TRAIN_FLAGS.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if name in out:
            raise EditbenchError(f"{name} given twice (--set {name}=... and {flag}); give it once")
        out[name] = tuple(value) if name == "validation_prompts" else value
    return out


def cmd_train(args) -> None:
    from editbench import methods

    editor = methods.get(args.method)(**train_overrides(args))
    out_file(args.out)
    pipe = _pipeline(args)
    concept = _concept(args)
    if args.concept:  # a toy concept gets the placeholder kind the method trains (a new token or a rare word)
        concept = dataclasses.replace(concept, placeholder=editor.placeholder(pipe.tokenizer, concept.placeholder))
    art = editor.fit(pipe, concept, steps=args.steps, seed=args.seed, checkpoint_dir=args.checkpoint_dir)
    path = art.save(args.out)
    print(f"{args.method} artifact written to {path} ({art.nbytes:,} bytes)")
    print(f"prompt phrase: {editor.phrase(art)!r} (e.g. \"a photo of {editor.phrase(art)}\")")


def _editor_for(paths: list[str]):
    from editbench import methods
    from editbench.methods.base import Artifact

    arts = [Artifact.load(p) for p in paths]
    names = {a.method for a in arts}
    if len(names) != 1:
        raise EditbenchError(f"artifacts of several methods given ({sorted(names)}); pass one method's artifacts")
    return methods.get(names.pop())(), arts


def cmd_generate(args) -> None:
    import torch

    for flag, value in (("--n", args.n), ("--steps", args.steps)):
        if value < 1:
            raise EditbenchError(f"{flag} must be >= 1, got {value}")
    out = out_dir(args.out)
    pipe = _pipeline(args)
    handle = None
    if args.artifact:
        editor, arts = _editor_for(args.artifact)
        handle = editor.apply(pipe, arts, **_kv(args.set))
    try:
        for i, prompt in enumerate(args.prompt):
            gen = torch.Generator(pipe.device).manual_seed(args.seed + i)
            images = pipe([prompt] * args.n, num_inference_steps=args.steps, guidance_scale=args.guidance,
                          generator=gen).images
            for j, im in enumerate(images):
                im.save(out / f"p{i:02d}_{j:02d}.png")
    finally:
        if handle is not None:
            handle.undo()
    print(f"wrote {len(args.prompt) * args.n} images to {out}")


def cmd_compose(args) -> None:
    editor, arts = _editor_for(args.artifact)
    if not editor.can_compose():
        editor.compose(arts)  # raises the method's "no merge" error before a pipeline is loaded
    out_file(args.out)
    merged = editor.compose(arts, _pipeline(args))
    path = merged.save(args.out)
    print(f"composed {len(arts)} {editor.name} artifacts into {path} ({merged.nbytes:,} bytes)")


def _files(folder: Path) -> dict[Path, tuple[int, int]]:
    return {f: (f.stat().st_mtime_ns, f.stat().st_size) for f in folder.rglob("*") if f.is_file()}


def cmd_export(args) -> None:
    from editbench import methods
    from editbench.methods.base import Artifact
    from editbench.safety import check_artifact_for

    art = Artifact.load(args.artifact)
    editor = methods.get(art.method)()
    check_artifact_for(editor, art)
    editor.check_artifact(art)
    if not editor.can_export():
        editor.export(art, args.out)  # raises the method's "no diffusers export format" error
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise EditbenchError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise EditbenchError(f"--out {out} is not empty; give a new folder or pass --force to write into it")
    pipe = None
    if editor.export_needs_pipeline or args.model is not None:  # the base model: for its weights or to check fit
        pipe = _pipeline(args)
        base_fp = editor.fingerprint(pipe)
        if art.base_fingerprint != base_fp:
            raise EditbenchError(f"artifact {args.artifact} was trained on base model {art.base_fingerprint} but "
                                 f"the model is {base_fp}; give the base model it was trained on with --model")
        editor.check_artifact(art, pipe)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise EditbenchError(f"cannot create --out {out}: {err.strerror or err}") from None
    before = _files(out)
    editor.export(art, out, pipe)
    written = sorted(f for f, stat in _files(out).items() if before.get(f) != stat)
    print(f"{editor.name} artifact exported to {out} in diffusers' format:")
    print("\n".join(f"  {f} ({f.stat().st_size:,} bytes)" for f in written))
    print("load it into a diffusers pipeline `pipe` with:")
    print("\n".join(f"  {line}" for line in editor.export_usage(art, out).splitlines()))


def bench_shard(shard: str) -> str:
    """``--shard`` as given, or for ``auto`` the ``i/N`` read from the launcher's environment
    (:func:`editbench.eval.spec.shard_from_env`), said on stderr. Under torchrun / ``accelerate launch`` the
    processes then run different cells, so none may wait for the others in a data-parallel fit: training keeps
    the plain loop (``EDITBENCH_ACCELERATE=0``; EditbenchError if it was set on)."""
    import os
    import sys

    from editbench.eval.spec import shard_from_env
    from editbench.training.parallel import ACCELERATE_ENV

    if shard.strip().lower() != "auto":
        return shard
    i, n, how = shard_from_env()
    if n > 1 and any(v in os.environ for v in ("RANK", "LOCAL_RANK")):
        if os.environ.get(ACCELERATE_ENV, "auto").strip().lower() in ("1", "on", "true", "yes"):
            raise EditbenchError(f"--shard auto splits the suite over the launched processes, so they cannot "
                                 f"also train data-parallel ({ACCELERATE_ENV}=1): unset {ACCELERATE_ENV} or give "
                                 "--shard 0/1")
        os.environ[ACCELERATE_ENV] = "0"
    print(f"editbench: --shard auto: shard {i}/{n} ({how})", file=sys.stderr)
    return f"{i}/{n}"


def cmd_bench(args) -> None:
    from editbench.eval.report import console_table, summary_table, write_report
    from editbench.eval.runner import run_suite
    from editbench.storage import parse_dtype

    out = out_dir(args.out)
    suite = args.suite
    if args.tuned:  # each method's tuned config / settings / steps over its entries (recorded in suite.json)
        from editbench.eval.tune import apply_tuned

        suite = apply_tuned(suite, args.tuned)
    df = run_suite(suite, out, shard=bench_shard(args.shard), device=args.device, dtype=parse_dtype(args.dtype))
    report = write_report(out)
    print(console_table(summary_table(df)))
    print(f"\nresults: {out / 'results.csv'}\nreport:  {report}\n         {report.with_suffix('.html')} (one page, "
          "opens offline)")


def cmd_tune(args) -> None:
    import optuna

    from editbench.eval.tune import tune
    from editbench.storage import parse_dtype

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar says what the per-trial logs would
    out_dir(args.out)
    r = tune(args.suite, args.method, args.trials, Path(args.out), storage=args.storage, device=args.device,
             dtype=parse_dtype(args.dtype))
    scores = ", ".join(f"{k} {v:.3f}" for k, v in r["values"].items())
    print(f"{r['method']} on {r['suite']} (validation {', '.join(r['validation'])}): {r['trials_used']} of "
          f"{r['budget']} trials, chosen trial {r['trial']}: {scores}")
    print(f"config {r['config']}, settings {r['settings']}, steps {r['steps']}")
    print(f"tuned settings: {Path(args.out) / 'tuned.json'} (editbench bench --suite SUITE --tuned {args.out})")


def cmd_report(args) -> None:
    from editbench.eval.report import write_report

    if args.paired:
        return _print_paired(Path(args.out), *args.paired, multi=args.multi)
    path = write_report(Path(args.out))
    print(f"report written to {path} and {path.with_suffix('.html')}")


def _print_paired(out: Path, a: str, b: str, *, multi: bool) -> None:
    """Row ``a`` minus row ``b`` (``LABEL[:SETTING]``) on every score the run has, paired over shared clusters."""
    from editbench.eval.report import paired_table
    from editbench.eval.results import collect

    rows = [tuple(x.split(":", 1)) if ":" in x else (x, "default") for x in (a, b)]
    table = paired_table(collect(out), rows[0], rows[1], single=not multi)
    print(f"{rows[0][0]}:{rows[0][1]} minus {rows[1][0]}:{rows[1][1]} "
          f"({'multi' if multi else 'single'}-concept cells; paired 95% cluster-bootstrap intervals)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:+.3f}"))


def cmd_demo(args) -> None:
    """Perfusion on one toy concept: train, then sample the concept in new contexts, beside the base model."""
    import torch
    from PIL import Image

    from editbench import methods
    from editbench.storage import parse_dtype
    from editbench.toyworld import concept_data, load_pipeline

    concept = concept_data(args.concept)
    out = out_dir(args.out)
    pipe = load_pipeline(args.device, parse_dtype(args.dtype))
    editor = methods.get("perfusion")()
    art = editor.fit(pipe, concept, steps=args.steps, seed=0)
    art.save(out / f"{args.concept}.perfusion.safetensors")
    from editbench.toyworld import single_prompts
    from editbench.toyworld.personal import PERSONAL_CONCEPTS

    c = next(c for c in PERSONAL_CONCEPTS if c.name == args.concept)
    prompts = single_prompts(c)[:4]
    rows = []
    for phrase, handle in ((c.category, None), (c.placeholder, editor.apply(pipe, art))):
        gen = torch.Generator(pipe.device).manual_seed(0)
        rows.append(pipe([p.format(phrase) for p in prompts], num_inference_steps=25, generator=gen).images)
        if handle is not None:
            handle.undo()
    size = rows[0][0].size[0]
    grid = Image.new("RGB", (size * len(prompts), size * 2))
    for r, images in enumerate(rows):
        for i, im in enumerate(images):
            grid.paste(im, (i * size, r * size))
    grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST).save(out / "demo.png")
    print(f"top row: base model with the superclass; bottom row: Perfusion {c.placeholder}; prompts:")
    print("\n".join(p.format(c.placeholder) for p in prompts))
    print(f"grid written to {out / 'demo.png'}")


def register(sub: argparse._SubParsersAction) -> None:
    def model_args(p):
        p.add_argument("--model", default=None, help="a local diffusers pipeline folder (default: the toy world)")

    t = sub.add_parser("train", help="train one method on one concept into an artifact")
    t.add_argument("--method", required=True)
    t.add_argument("--concept", help="a toy-world concept name (see `editbench.toyworld.concepts()`)")
    t.add_argument("--images", help="folder of the concept's images")
    t.add_argument("--superclass")
    t.add_argument("--placeholder")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--set", action="append", help="config override key=value (repeatable)")
    t.add_argument("--checkpoint-dir", default=None,
                   help="checkpoints (resume by re-running), validation images and logs go here")
    f = t.add_argument_group("training options (config fields; docs/architecture.md, Training)")
    f.add_argument("--gradient-checkpointing", action="store_true", default=None,
                   help="recompute activations in the backward pass (UNet, and the text encoder where trained "
                        "through): less memory, more time")
    f.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], default=None,
                   help="autocast the forward passes (trained parameters stay float32 unless --master-weights bf16; "
                        "fp16 scales the loss)")
    f.add_argument("--resolution", type=int, default=None, metavar="PX",
                   help="resize the concept images to PX before encoding (default: the model's resolution)")
    f.add_argument("--lr-scheduler", default=None, metavar="NAME",
                   help="constant (default), constant_with_warmup, linear, cosine, cosine_with_restarts")
    f.add_argument("--lr-warmup-steps", type=int, default=None, metavar="N")
    f.add_argument("--validation-every", type=int, default=None, metavar="N",
                   help="sample the validation prompts every N steps into CHECKPOINT_DIR/validation/step_XXXXX/")
    f.add_argument("--validation-prompt", dest="validation_prompts", action="append", default=None,
                   metavar="PROMPT", help="a validation prompt, '{}' for the concept (repeatable; default: the "
                                          "concept's first template)")
    f.add_argument("--log-with", choices=["tensorboard"], default=None,
                   help="log loss, learning rates and validation images to CHECKPOINT_DIR/logs")
    f.add_argument("--optimizer", default=None, metavar="NAME", help="adamw (default), adam, adamw8bit "
                                                                      "(needs bitsandbytes)")
    f.add_argument("--master-weights", choices=["float32", "bf16"], default=None,
                   help="dtype of the trained weights, gradients and optimizer moments (bf16: half the memory, "
                        "stochastically rounded AdamW; needs --mixed-precision bf16)")
    f.add_argument("--fused-backward", action="store_true", default=None,
                   help="step each parameter inside the backward pass and free its gradient (no gradient memory; "
                        "grad_accum 1, no clipping, not fp16)")
    f.add_argument("--num-class-images", type=int, default=None, metavar="N",
                   help="prior preservation: class images per concept")
    f.add_argument("--class-resolution", type=int, default=None, metavar="PX",
                   help="prior preservation: generate the class images at PX (default: the training resolution)")
    t.add_argument("--out", required=True, help="artifact path (.safetensors)")
    model_args(t)
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="generate images for prompts, with artifacts applied")
    g.add_argument("--artifact", action="append", help="artifact path (repeatable)")
    g.add_argument("--prompt", action="append", required=True)
    g.add_argument("--n", type=int, default=4, help="images per prompt")
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--guidance", type=float, default=4.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--set", action="append", help="inference setting key=value (repeatable), e.g. beta=0.6")
    g.add_argument("--out", required=True)
    model_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("compose", help="merge several artifacts of one method (where it has a merge)")
    c.add_argument("--artifact", action="append", required=True)
    c.add_argument("--out", required=True)
    model_args(c)
    c.set_defaults(func=cmd_compose)

    x = sub.add_parser("export", help="write an artifact in diffusers' format (methods that have one)")
    x.add_argument("artifact", help="artifact path (.safetensors)")
    x.add_argument("--format", choices=["diffusers"], default="diffusers", help="output format (default: diffusers)")
    x.add_argument("--out", required=True, help="output folder (new or empty)")
    x.add_argument("--force", action="store_true", help="write into a non-empty --out (files of the same name are "
                                                         "replaced, others kept)")
    x.add_argument("--model", default=None,
                   help="the base model the artifact was trained on, a local diffusers pipeline folder (default: the "
                        "toy world); loaded when the format needs its weights (custom_diffusion) or to check the "
                        "artifact fits it when given")
    x.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", help="run a benchmark suite (bundled name or YAML file)")
    b.add_argument("--suite", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--shard", default="0/1",
                   help="run slice i of N (e.g. 0/4), or 'auto': i and N from the launcher's environment (SLURM job "
                        "array, torchrun / accelerate launch, srun)")
    b.add_argument("--tuned", action="append", metavar="DIR",
                   help="a folder written by `editbench tune` (repeatable, one per method): its tuned config, "
                        "settings and steps replace the defaults of that method's entries")
    b.set_defaults(func=cmd_bench)

    u = sub.add_parser("tune", help="tune one method's hyperparameters on a suite's validation concepts (Optuna)")
    u.add_argument("--suite", required=True, help="a bundled suite or a YAML file with 'validation:' concepts")
    u.add_argument("--method", required=True)
    u.add_argument("--trials", type=int, required=True,
                   help="the study's total budget of complete trials (re-running resumes up to it)")
    u.add_argument("--out", required=True, help="output folder: tuned.json, trials.csv, trials/<n>/")
    u.add_argument("--storage", default=None, help="Optuna database URL (default sqlite:///OUT/study.db); "
                                                   "processes given the same URL share one study")
    u.set_defaults(func=cmd_tune)

    r = sub.add_parser("report", help="write report.md, report.html and plots for a suite output folder")
    r.add_argument("out")
    r.add_argument("--paired", nargs=2, metavar=("A", "B"), default=None,
                   help="instead: print row A minus row B (each LABEL or LABEL:SETTING, as in report.md) on every "
                        "score, paired over the (concept(s), seed, prompt) clusters both have")
    r.add_argument("--multi", action="store_true", help="with --paired: compare the multi-concept cells")
    r.set_defaults(func=cmd_report)

    d = sub.add_parser("demo", help="Perfusion on one toy concept, beside the base model")
    d.add_argument("--concept", default="zebra")
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--out", default="runs/demo")
    d.set_defaults(func=cmd_demo)
