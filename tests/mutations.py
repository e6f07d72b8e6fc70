"""Mutation check: do the tests fail when the code is wrong?

    python tests/mutations.py                 # every mutant, on a copy of the working tree
    python tests/mutations.py --list          # the mutants and the tests each one runs
    python tests/mutations.py --only NAME ... # some of them
    python tests/mutations.py --ref HEAD      # on a committed tree (git archive) instead of the working tree
    python tests/mutations.py --no-baseline   # skip the run of the unmutated copy

Each mutant is one small deliberate bug (a sign flip, a dropped term, a wrong metric, a deleted check, an ignored
option) written as an exact text replacement in one file of the package. The tree is copied once to a temporary
folder (``editbench/``, ``tests/``, ``docs/``, ``benchmarks/``, ``pyproject.toml``, ``README.md``, ``.ci/``); for
each mutant its file is changed there, the tests it lists (pytest node ids, in the default run: slow tests are
deselected) run in a fresh ``python -m pytest -x`` with that copy first on ``sys.path`` and a fresh
``EDITBENCH_CACHE``, and the file is restored. A mutant is *killed* when a test fails, *survived* when all pass.
First the unmutated copy runs the union of the listed tests (the baseline): if that fails, nothing can be judged.

Prints a pandas table (mutant, file, outcome, the test that failed, seconds) and exits 0 only if every mutant is
killed (1 if one survived or could not be applied, 2 if the baseline fails). A mutant whose text no longer occurs
exactly once in its file is reported as ``stale`` (the code moved on: update the mutant).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("editbench", "tests", "docs", "benchmarks", "pyproject.toml", "README.md", ".ci")
TIMEOUT_S = 900


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str                 # file of the package, relative to the repository root
    old: str                  # exact text, must occur once
    new: str
    tests: tuple[str, ...]    # pytest node ids that must kill it (default run)
    why: str                  # the bug, in words


CD = "tests/test_custom_diffusion.py::"
MERGE = CD + "test_closed_form_merge_constraints_hold_in_float64"
TABLE = "tests/test_methods_table.py::test_training_lowers_the_loss"
WORLD = "tests/test_toyworld.py::test_world_latent_cache_keeps_the_exact_latent_scale"

MUTANTS = [
    # -- Custom Diffusion ---------------------------------------------------------------------------------------
    Mutant("cd_compose_delta_sign", "editbench/methods/custom_diffusion/editor.py",
           "_delta_tensors(name, (w - proj[name].weight.double()).float(), n, None)",
           "_delta_tensors(name, (proj[name].weight.double() - w).float(), n, None)",
           (MERGE,), "compose stores W0 - W instead of W - W0 (sign flip of the merged deltas)"),
    Mutant("cd_merge_identity_metric", "editbench/methods/custom_diffusion/merge.py",
           "white = cov if isinstance(cov, Whitener) else Whitener(cov)",
           "white = Whitener(torch.eye(k.shape[1], dtype=torch.float64))",
           (MERGE,), "the merge ignores the caption covariance (identity metric)"),
    Mutant("cd_default_metric_identity", "editbench/methods/custom_diffusion/editor.py",
           "cov = moment.matrix(ridge=self.config.merge_ridge)",
           "cov = torch.eye(moment.dim, dtype=torch.float64)",
           (MERGE,), "the editor's default metric is the identity, not the estimated caption covariance"),
    Mutant("cd_merge_values_from_base", "editbench/methods/custom_diffusion/merge.py",
           "v[rows] = k[rows] @ tuned[j][name].double().T",
           "v[rows] = k[rows] @ w0.double().T",
           (MERGE,), "the merge's targets are the base weights' outputs (the fine-tuning is dropped)"),
    Mutant("cd_install_sign", "editbench/methods/custom_diffusion/editor.py",
           "old.weight.float() + delta.to(old.weight.device)",
           "old.weight.float() - delta.to(old.weight.device)",
           (CD + "test_diffusers_format_export_and_loader", MERGE), "apply installs W0 - delta"),
    Mutant("cd_compress_ignores_energy", "editbench/methods/custom_diffusion/editor.py",
           "tensors.update(_delta_tensors(name, d, rank, energy))",
           "tensors.update(_delta_tensors(name, d, rank, None))",
           (CD + "test_low_rank_and_compression",), "compress() keeps every singular value (energy ignored)"),
    Mutant("cd_low_rank_drops_singular_values", "editbench/methods/custom_diffusion/layers.py",
           "return (u[:, :r] * s[:r]).to(delta.dtype), vh[:r].to(delta.dtype)",
           "return u[:, :r].to(delta.dtype), vh[:r].to(delta.dtype)",
           (CD + "test_low_rank_and_compression",), "the low-rank factors lose the singular values"),
    Mutant("cd_start_token_trained", "editbench/methods/custom_diffusion/layers.py",
           "return torch.cat([y[:, :1].detach(), y[:, 1:]], dim=1) if y.ndim == 3 else y",
           "return y",
           (CD + "test_start_token_is_detached",), "the start token's K/V output is not detached"),
    Mutant("joint_training_one_phrase", "editbench/training/loop.py",
           "prompts = [concepts[o].templates[j % len(concepts[o].templates)].format(phrases[o])",
           "prompts = [concepts[o].templates[j % len(concepts[o].templates)].format(phrases[0])",
           (CD + "test_joint_training_of_two_concepts",),
           "joint training prompts every image with the first concept's phrase (the second row never learns)"),
    # -- Perfusion ----------------------------------------------------------------------------------------------
    Mutant("perfusion_identity_metric", "editbench/methods/perfusion/layers.py",
           "cinv_u = (cov_inv.to(wide) @ u.T).T",
           "cinv_u = u",
           ("tests/test_perfusion_math.py::test_gated_rank1_matches_a_float64_reference",),
           "the gate's projection ignores C^-1 (identity metric)"),
    Mutant("perfusion_gate_sign", "editbench/methods/perfusion/layers.py",
           "gate = torch.sigmoid((s - beta) / tau)",
           "gate = torch.sigmoid((beta - s) / tau)",
           ("tests/test_perfusion_math.py::test_gated_rank1_matches_a_float64_reference",),
           "the gate opens below beta instead of above"),
    Mutant("perfusion_dropped_lock_term", "editbench/methods/perfusion/layers.py",
           "wu = (u @ weight.to(wide).T).to(x.dtype)",
           "wu = torch.zeros(u.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)",
           ("tests/test_perfusion_math.py::test_gated_rank1_matches_a_float64_reference",),
           "the -(W U) s(x) term is dropped (W x is not locked along i*)"),
    # -- textual inversion, LoRA, DreamBooth ----------------------------------------------------------------------
    Mutant("ti_install_negated", "editbench/methods/textual_inversion/editor.py",
           "rows = torch.cat([a.tensors[key] for a in artifacts]).to(ref.device, ref.dtype)",
           "rows = -torch.cat([a.tensors[key] for a in artifacts]).to(ref.device, ref.dtype)",
           ("tests/test_textual_inversion.py::test_only_the_new_rows_change_under_adamw_weight_decay",),
           "apply installs the negated learned embedding"),
    Mutant("lora_alpha_ignored", "editbench/methods/lora/editor.py",
           "lora_alpha=float(meta[\"lora_alpha\"])",
           "lora_alpha=float(meta[\"r\"])",
           ("tests/test_lora.py::test_applied_layer_computes_w_x_plus_alpha_over_r_b_a_x",),
           "the adapter is scaled by 1 instead of lora_alpha / r (export and apply agree, so only the math "
           "test sees it)"),
    Mutant("prior_weight_dropped", "editbench/methods/prior.py",
           "return self.weight * ctx.diffusion_loss(latents, encode(prompts))",
           "return ctx.diffusion_loss(latents, encode(prompts))",
           ("tests/test_dreambooth.py::test_prior_loss_is_added",),
           "prior preservation ignores prior_loss_weight (DreamBooth, LoRA, Custom Diffusion)"),
    Mutant("prior_sign", "editbench/methods/prior.py",
           "return self.weight * ctx.diffusion_loss(latents, encode(prompts))",
           "return -self.weight * ctx.diffusion_loss(latents, encode(prompts))",
           ("tests/test_dreambooth.py::test_prior_loss_is_added",), "the prior term is subtracted"),
    # -- the shared training loop: every method -------------------------------------------------------------------
    Mutant("loop_gradient_ascent", "editbench/training/loop.py",
           "scaled = loss / config.grad_accum if scaler is None",
           "scaled = -loss / config.grad_accum if scaler is None",
           tuple(f"{TABLE}[{m}]" for m in ("textual_inversion", "perfusion", "custom_diffusion", "dreambooth",
                                            "lora")),
           "training climbs the loss"),
    # -- reading files, writing files -----------------------------------------------------------------------------
    Mutant("safety_non_finite_check_deleted", "editbench/safety.py",
           "if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):",
           "if False:",
           ("tests/test_reliability_fuzz_artifacts.py::test_non_finite_tensor_values_are_refused",),
           "artifacts holding NaN/inf are accepted"),
    Mutant("safety_bomb_guard_deleted", "editbench/safety.py",
           "if w < 1 or h < 1 or w * h > limit:",
           "if w < 1 or h < 1:",
           ("tests/test_reliability_fuzz_concepts.py::test_decompression_bomb_is_refused_before_decoding",),
           "decompression bombs are decoded"),
    Mutant("atomic_write_in_place", "editbench/storage.py",
           "        yield Path(tmp)\n        with open(tmp, \"rb+\") as fh:",
           "        yield path\n        with open(tmp, \"rb+\") as fh:",
           ("tests/test_reliability_crash.py::test_crash_mid_write_leaves_the_old_file",),
           "atomic writers write onto the target itself"),
    # -- toy world, suites, CLI ----------------------------------------------------------------------------------
    Mutant("world_resumed_scale_half", "editbench/toyworld/train.py",
           "return vae, lat[\"latents\"], float(lat[\"scale\"])",
           "return vae, lat[\"latents\"], float(lat[\"scale\"].half())",
           (WORLD,), "a run resumed after the VAE stage divides by a rounded latent scale (the scale is a float32 "
           "value already, so a float32 cast would be an equivalent mutant)"),
    Mutant("world_resumed_scale_not_registered", "editbench/toyworld/train.py",
           "        vae.register_to_config(scaling_factor=float(lat[\"scale\"]))\n",
           "",
           (WORLD,), "a resumed run exports the VAE with the default scaling_factor"),
    Mutant("world_latents_channels_last", "editbench/toyworld/train.py",
           "return (torch.cat(chunks) * scale).contiguous()",
           "return torch.cat(chunks) * scale",
           (WORLD,), "latents kept in the encoder's channels-last layout: a run in one go rounds differently from a "
           "resumed one"),
    Mutant("shard_overlap", "editbench/eval/spec.py",
           "mine = {u for k, u in enumerate(units) if k % n == i}",
           "mine = {u for k, u in enumerate(units) if k % n == i or k == 0}",
           ("tests/test_suite.py::test_sharded_runs_assemble_the_full_table",),
           "every shard also runs the first unit"),
    Mutant("cli_shard_ignored", "editbench/commands.py",
           "run_suite(suite, out, shard=bench_shard(args.shard),",
           "run_suite(suite, out, shard=\"0/1\",",
           ("tests/test_suite.py::test_the_cli_shard_option_runs_that_shards_cells",),
           "editbench bench ignores --shard"),
    # -- provenance -----------------------------------------------------------------------------------------------
    Mutant("tune_study_not_bound_to_base_model", "editbench/eval/tune.py",
           '"base_model": pipeline_fingerprint(pipe, base_tokenizer(pipe.tokenizer))}))',
           '"base_model": "any"}))',
           ("tests/test_tune.py::test_bad_inputs_raise_and_leave_the_stored_study_intact",),
           "a tuning study resumes on other base-model weights (a retrained world) without a word"),
    Mutant("pipeline_fingerprint_dtype", "editbench/fingerprint.py",
           "yield name, (t.float() if t.is_floating_point() else t)",
           "yield name, t",
           ("tests/test_reliability_provenance.py::test_pipeline_fingerprint_is_the_weights_values_not_their_dtype",),
           "the pipeline fingerprint hashes the loaded dtype's bytes (a float16 load is another base model)"),
    Mutant("prior_resume_ignores_changed_folder", "editbench/methods/prior.py",
           "            if now == saved:\n                continue",
           "            if True:\n                continue",
           ("tests/test_prior.py::test_resuming_after_the_class_folder_changed_is_a_clear_error_and_keeps_the_checkpoint",),
           "resuming trains on a class-image folder whose content changed since the checkpoint"),
    Mutant("prior_none_is_a_folder", "editbench/methods/prior.py",
           "if isinstance(d, str) and d.strip().lower() == NONE:",
           "if d is None:",
           ("tests/test_prior.py::test_class_data_dir_none_means_generated_images_not_a_folder_named_none",),
           "class_data_dir 'none' is read as a folder named none"),
]


def copy_tree(dest: Path, ref: str | None) -> None:
    """The files the tests need, from the working tree or (``ref``) from git."""
    if ref:
        archive = subprocess.run(["git", "archive", ref, *COPIED], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        return
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore, symlinks=True)
        elif src.exists():
            shutil.copy2(src, dest / name)


def run_tests(tree: Path, tests: list[str], cache: Path) -> tuple[int, str, float]:
    """``python -m pytest -x`` of ``tests`` in ``tree`` (that copy of editbench first on sys.path)."""
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1", EDITBENCH_CACHE=str(cache),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return -1, out + f"\ntimeout after {TIMEOUT_S} s", time.perf_counter() - t0


def failed_test(output: str) -> str:
    """The node id of the first failing test in pytest's short summary ('' if none)."""
    m = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    return m.group(1).split("tests/", 1)[-1] if m else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    ap.add_argument("--list", action="store_true", help="list the mutants and their tests, run nothing")
    ap.add_argument("--ref", help="mutate a committed tree (git archive REF) instead of the working tree")
    ap.add_argument("--no-baseline", action="store_true", help="skip the run of the unmutated copy")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    args = ap.parse_args(argv)

    import pandas as pd

    pd.set_option("display.width", 200)
    pd.set_option("display.max_colwidth", 70)
    mutants = MUTANTS
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTANTS})
        if unknown:
            ap.error(f"unknown mutants {unknown}; --list shows them")
        mutants = [m for m in MUTANTS if m.name in args.only]
    if args.list:
        for m in mutants:
            print(f"{m.name}  ({m.path}): {m.why}\n    " + "\n    ".join(m.tests))
        return 0

    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="editbench-mutations-"))
    tree = tmp / "tree"
    tree.mkdir()
    try:
        copy_tree(tree, args.ref)
        print(f"copy of the {'tree at ' + args.ref if args.ref else 'working tree'} in {tree}", flush=True)
        if not args.no_baseline:
            tests = list(dict.fromkeys(t for m in mutants for t in m.tests))
            code, out, secs = run_tests(tree, tests, tmp / "cache-baseline")
            print(f"baseline: {len(tests)} test ids, {'pass' if code == 0 else 'FAIL'} ({secs:.0f} s)", flush=True)
            if code != 0:
                print(out[-4000:])
                print("the unmutated copy fails these tests: no mutant can be judged")
                return 2
        rows = []
        for k, m in enumerate(mutants):
            target = tree / m.path
            original = target.read_text()
            count = original.count(m.old)
            if count != 1:
                rows.append({"mutant": m.name, "file": m.path, "outcome": "stale", "failed_test": "",
                             "seconds": 0.0, "note": f"text found {count} times"})
                print(f"[{k + 1}/{len(mutants)}] {m.name}: stale (text found {count} times)", flush=True)
                continue
            mutated = original.replace(m.old, m.new)
            try:
                compile(mutated, str(target), "exec")
            except SyntaxError as err:
                rows.append({"mutant": m.name, "file": m.path, "outcome": "error", "failed_test": "",
                             "seconds": 0.0, "note": f"the mutant does not compile: {err}"})
                continue
            target.write_text(mutated)
            try:
                code, out, secs = run_tests(tree, list(m.tests), tmp / f"cache-{m.name}")
            finally:
                target.write_text(original)
            if code == 0:
                outcome, note = "survived", ""
            elif code == 1:
                outcome, note = "killed", ""
            elif code == -1:
                outcome, note = "killed", "timeout"
            else:  # 2 interrupted (e.g. an import error), 3 internal error, 4 usage, 5 nothing collected
                outcome, note = ("killed", "collection/import error") if code == 2 else ("error", f"pytest exit {code}")
            rows.append({"mutant": m.name, "file": m.path, "outcome": outcome, "failed_test": failed_test(out),
                         "seconds": round(secs, 1), "note": note})
            print(f"[{k + 1}/{len(mutants)}] {m.name}: {outcome} {failed_test(out)} ({secs:.0f} s)", flush=True)
            if outcome != "killed":
                print(out[-3000:], flush=True)
        table = pd.DataFrame(rows)
        print()
        print(table.to_string(index=False))
        bad = table[table.outcome != "killed"]
        total = time.perf_counter() - start
        print(f"\n{len(table) - len(bad)}/{len(table)} mutants killed in {total:.0f} s"
              + (f"; not killed: {', '.join(bad.mutant)}" if len(bad) else ""))
        return 0 if bad.empty else 1
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
