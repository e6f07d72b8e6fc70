"""Every CLI failure on bad input: exit status 2, one line on stderr starting ``editbench: error:``, no traceback.

One table of bad invocations (``BAD``); each row names the words its message must hold. The paths are relative
to a module-wide folder of bad inputs (a file where a folder belongs, an empty folder, a folder that is not a
diffusers pipeline, broken YAML, a corrupt image, artifacts of the tests' tiny base model)."""

from __future__ import annotations

import pytest

from editbench.cli import main


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    from _method_helpers import trained

    root = tmp_path_factory.mktemp("bad")
    (root / "afile").write_text("x")
    (root / "empty").mkdir()
    (root / "notdiff").mkdir()
    (root / "notdiff" / "config.json").write_text("{}")
    (root / "corrupt").mkdir()
    (root / "corrupt" / "a.png").write_bytes(b"not a png")
    (root / "bad.yaml").write_text("name: s\nconcepts: [zebra\n")
    (root / "unknown_method.yaml").write_text("name: s\nconcepts: [zebra]\nmethods: [no_such_method]\n")
    (root / "lora.safetensors").write_bytes(trained("lora").read_bytes())                  # tiny base model
    (root / "ti.safetensors").write_bytes(trained("textual_inversion").read_bytes())
    (root / "cd.safetensors").write_bytes(trained("custom_diffusion").read_bytes())
    (root / "pf.safetensors").write_bytes(trained("perfusion").read_bytes())
    (root / "truncated.safetensors").write_bytes(trained("lora").read_bytes()[:-7])
    return root


FAST = ["--steps", "1", "--set", "batch_size=1"]
GEN = ["generate", "--prompt", "a star", "--n", "1", "--steps", "1"]
BAD = {  # name: (argv with {d} = the folder of bad inputs, words the message holds)
    # output paths
    "generate --out under a file": (GEN + ["--out", "{d}/afile/sub"], ["cannot create --out", "Not a directory"]),
    "generate --out is a file": (GEN + ["--out", "{d}/afile"], ["--out", "is a file"]),
    "train --out under a file": (["train", "--method", "textual_inversion", "--concept", "zebra", *FAST, "--out",
                                  "{d}/afile/x.safetensors"], ["--out's folder", "is a file"]),
    "train --out is a folder": (["train", "--method", "lora", "--concept", "zebra", *FAST, "--out", "{d}/empty"],
                                ["is a folder"]),
    "bench --out under a file": (["bench", "--suite", "toy-quick", "--out", "{d}/afile/b"], ["cannot create --out"]),
    "bench --out is a file": (["bench", "--suite", "toy-quick", "--out", "{d}/afile"], ["is a file"]),
    "compose --out under a file": (["compose", "--artifact", "{d}/cd.safetensors", "--artifact", "{d}/cd.safetensors",
                                    "--out", "{d}/afile/m.safetensors"], ["is a file"]),
    "export --out is a file": (["export", "{d}/lora.safetensors", "--out", "{d}/afile"], ["is a file"]),
    # models
    "--model missing": (GEN + ["--model", "{d}/missing", "--out", "{d}/g1"], ["is not a diffusers pipeline folder"]),
    "--model not diffusers": (GEN + ["--model", "{d}/notdiff", "--out", "{d}/g2"], ["no model_index.json"]),
    "--model is a file": (["train", "--method", "lora", "--concept", "zebra", *FAST, "--model", "{d}/afile",
                           "--out", "{d}/x.safetensors"], ["is not a diffusers pipeline folder"]),
    "world eval --model missing": (["world", "eval", "--model", "{d}/missing", "--out", "{d}/w"],
                                   ["is not a diffusers pipeline folder"]),
    "--device unknown": (["--device", "abacus", *GEN, "--out", "{d}/g3"], ["is not a torch device"]),
    "--dtype unknown": (["--dtype", "float99", *GEN, "--out", "{d}/g4"], ["unknown dtype"]),
    # artifacts
    "artifact missing": (GEN + ["--artifact", "{d}/missing.safetensors", "--out", "{d}/g5"], ["does not exist"]),
    "artifact not safetensors": (GEN + ["--artifact", "{d}/afile", "--out", "{d}/g6"], ["not a safetensors file"]),
    "artifact truncated": (["export", "{d}/truncated.safetensors", "--out", "{d}/e1"], ["truncated.safetensors"]),
    "artifact of another base model": (GEN + ["--artifact", "{d}/lora.safetensors", "--out", "{d}/g7"],
                                       ["was trained on base model"]),
    "artifacts of two methods": (GEN + ["--artifact", "{d}/lora.safetensors", "--artifact", "{d}/ti.safetensors",
                                        "--out", "{d}/g8"], ["artifacts of several methods"]),
    "merge on another base model": (["compose", "--artifact", "{d}/cd.safetensors", "--artifact",
                                     "{d}/cd.safetensors", "--out", "{d}/m.safetensors"], ["another base model"]),
    "method without a merge": (["compose", "--artifact", "{d}/lora.safetensors", "--artifact", "{d}/lora.safetensors",
                                "--out", "{d}/m2.safetensors"], ["lora has no merge"]),
    "export of a method without a format": (["export", "{d}/pf.safetensors", "--out", "{d}/e2"],
                                            ["perfusion has no diffusers export format"]),
    "export --model not diffusers": (["export", "{d}/lora.safetensors", "--out", "{d}/e3", "--model",
                                      "{d}/notdiff"], ["no model_index.json"]),
    # concept images
    "images missing": (["train", "--method", "lora", "--images", "{d}/missing", "--superclass", "dog",
                        "--placeholder", "sks", "--out", "{d}/x.safetensors"], ["is not a folder"]),
    "images folder empty": (["train", "--method", "lora", "--images", "{d}/empty", "--superclass", "dog",
                             "--placeholder", "sks", "--out", "{d}/x.safetensors"], ["no .png"]),
    "image corrupt": (["train", "--method", "lora", "--images", "{d}/corrupt", "--superclass", "dog", "--placeholder",
                       "sks", *FAST, "--out", "{d}/x.safetensors"], ["unreadable or corrupt"]),
    "no concept given": (["train", "--method", "lora", "--out", "{d}/x.safetensors"], ["give --concept"]),
    "unknown toy concept": (["train", "--method", "lora", "--concept", "unicorn", "--out", "{d}/x.safetensors"],
                            ["unknown toy concept"]),
    "demo of an unknown concept": (["demo", "--concept", "unicorn", "--out", "{d}/demo"], ["unknown toy concept"]),
    # methods, options, values
    "unknown method": (["train", "--method", "no_such_method", "--concept", "zebra", "--out", "{d}/x.safetensors"],
                       ["unknown method"]),
    "unknown --set key": (["train", "--method", "lora", "--concept", "zebra", "--set", "colour=1", "--out",
                           "{d}/x.safetensors"], ["unknown lora option"]),
    "bad --set value": (["train", "--method", "textual_inversion", "--concept", "zebra", "--set", "lr=-1e-4",
                         "--out", "{d}/x.safetensors"], ["lr must be a finite number > 0"]),
    "--set without =": (["train", "--method", "lora", "--concept", "zebra", "--set", "lr", "--out",
                         "{d}/x.safetensors"], ["key=value"]),
    "--steps 0": (["train", "--method", "lora", "--concept", "zebra", "--steps", "0", "--out", "{d}/x.safetensors"],
                  ["steps must be a positive int"]),
    "unknown inference setting": (GEN + ["--artifact", "{d}/ti.safetensors", "--set", "colour=1", "--out", "{d}/g9"],
                                  ["setting"]),
    "generate --n 0": (["generate", "--prompt", "a", "--n", "0", "--out", "{d}/g10"], ["--n must be >= 1"]),
    # suites and runs
    "unknown suite": (["bench", "--suite", "no-such-suite", "--out", "{d}/b1"], ["neither a file nor a bundled"]),
    "suite not YAML": (["bench", "--suite", "{d}/bad.yaml", "--out", "{d}/b2"], ["not valid YAML", "line"]),
    "suite with an unknown method": (["bench", "--suite", "{d}/unknown_method.yaml", "--out", "{d}/b3"],
                                     ["unknown method"]),
    "bad --shard": (["bench", "--suite", "toy-quick", "--out", "{d}/b4", "--shard", "3/2"], ["shard"]),
    "--tuned folder missing": (["bench", "--suite", "toy-quick", "--out", "{d}/b5", "--tuned", "{d}/missing"],
                               ["missing"]),
    "tune an unknown method": (["tune", "--suite", "toy-quick", "--method", "nope", "--trials", "1", "--out",
                                "{d}/t1"], ["unknown method"]),
    "tune 0 trials": (["tune", "--suite", "toy-quick", "--method", "lora", "--trials", "0", "--out", "{d}/t2"],
                      ["--trials must be a positive int"]),
    "report of a missing folder": (["report", "{d}/missing"], ["is not a results folder"]),
    "report of a folder without results": (["report", "{d}/empty"], ["holds no results.csv"]),
    # argparse's own errors, on one line as well
    "missing required option": (["train", "--method", "lora"], ["required: --out", "editbench train --help"]),
    "unknown command": (["paint"], ["invalid choice: 'paint'"]),
    "option not an int": (["generate", "--prompt", "a", "--n", "two", "--out", "{d}/g11"], ["invalid int value"]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_invocation_is_one_line_error_with_status_2(name, bad, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("EDITBENCH_CACHE", str(tmp_path / "cache"))
    argv, words = BAD[name]
    code = main([a.format(d=bad) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("editbench: --shard auto")]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("editbench: error: ") and "Traceback" not in err, err
    for w in words:
        assert w.format(d=bad) in lines[0], (w, lines[0])


def test_help_still_exits_0(capsys):
    assert main(["--help"]) == 0 and "usage: editbench" in capsys.readouterr().out
    assert main(["bench", "--help"]) == 0 and "--shard" in capsys.readouterr().out
