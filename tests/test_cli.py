"""The ``editbench`` commands end to end on the toy world, through ``editbench.cli.main(argv)`` (tiny step counts).

``tune`` (and ``bench --tuned``) runs in tests/test_tune.py, ``world train --smoke`` in tests/test_toyworld.py."""

from __future__ import annotations

import dataclasses

import pytest

from editbench.cli import main
from editbench.methods import get
from editbench.methods.base import Artifact
from editbench.methods.tokens import RARE_WORDS

FAST = ["--steps", "2", "--set", "batch_size=1"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITBENCH_CACHE", str(tmp_path / "cache"))


def _train(tmp_path, method: str, concept: str, *extra: str) -> Artifact:
    out = tmp_path / f"{method}-{concept}.safetensors"
    if "with_prior_preservation" in {f.name for f in dataclasses.fields(get(method).Config)}:
        extra = ("--set", "with_prior_preservation=false", *extra)
    assert main(["train", "--method", method, "--concept", concept, *FAST, *extra, "--out", str(out)]) == 0
    return Artifact.load(out)


@pytest.mark.parametrize("method", ["lora", "dreambooth"])
def test_train_a_rare_word_method_on_a_toy_concept_prints_the_phrase(tmp_path, capsys, method):
    art = _train(tmp_path, method, "zebra")
    assert art.metadata["phrase"] == f"{RARE_WORDS[0]} heart" == get(method)().phrase(art)
    assert f"prompt phrase: '{RARE_WORDS[0]} heart'" in capsys.readouterr().out


def test_train_a_new_token_method_keeps_the_concept_placeholder(tmp_path):
    art = _train(tmp_path, "textual_inversion", "zebra")
    assert get("textual_inversion")().phrase(art) == "<zebra>"


def test_compose_merges_custom_diffusion_artifacts(tmp_path, capsys):
    paths = []
    for concept in ("zebra", "sunny"):
        _train(tmp_path, "custom_diffusion", concept)
        paths += ["--artifact", str(tmp_path / f"custom_diffusion-{concept}.safetensors")]
    out = tmp_path / "merged.safetensors"
    assert main(["compose", *paths, "--out", str(out)]) == 0
    merged = get("custom_diffusion")().load(out)
    assert merged.metadata["phrase"] == ["<zebra> heart", "<sunny> star"]
    assert get("custom_diffusion")().phrase(merged, "<sunny>") == "<sunny> star"
    assert "composed 2 custom_diffusion artifacts" in capsys.readouterr().out


def test_compose_of_a_method_without_a_merge_is_a_clear_error(tmp_path, capsys):
    path = _train(tmp_path, "lora", "zebra").path
    assert main(["compose", "--artifact", str(path), "--artifact", str(path), "--out", str(tmp_path / "x")]) == 2
    assert "lora has no merge" in capsys.readouterr().err


def test_generate_with_an_artifact(tmp_path, capsys):
    art = _train(tmp_path, "lora", "zebra")
    out = tmp_path / "images"
    argv = ["generate", "--artifact", str(art.path), "--prompt", f"a photo of a {art.metadata['phrase']}",
            "--n", "2", "--steps", "2", "--set", "scale=0.5", "--out", str(out)]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["p00_00.png", "p00_01.png"]
    assert "wrote 2 images" in capsys.readouterr().out


def test_bench_then_report(tmp_path, capsys):
    import yaml

    suite = tmp_path / "tiny.yaml"
    suite.write_text(yaml.safe_dump({
        "name": "cli", "model": "toyworld", "concepts": ["zebra"], "seeds": [0], "max_prompts": 1,
        "images_per_prompt": 1, "steps": 2, "generation": {"num_inference_steps": 2},
        "methods": ["base", {"name": "textual_inversion", "config": {"batch_size": 1}}]}))
    out = tmp_path / "bench"
    assert main(["bench", "--suite", str(suite), "--out", str(out)]) == 0
    assert "results:" in capsys.readouterr().out and (out / "results.csv").is_file()
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").is_file() and "report written" in capsys.readouterr().out


def test_demo(tmp_path, capsys):
    assert main(["demo", "--concept", "zebra", "--steps", "2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "demo.png").is_file() and (tmp_path / "zebra.perfusion.safetensors").is_file()
    assert "<zebra>" in capsys.readouterr().out


@pytest.mark.slow
def test_world_eval(tmp_path, capsys):
    argv = ["world", "eval", "--out", str(tmp_path), "--n", "2", "--images-per-background", "1", "--steps", "2"]
    assert main(argv) == 0
    assert (tmp_path / "toyworld_eval.json").is_file() and "gate passed" in capsys.readouterr().out
    assert (tmp_path / "describability.png").is_file()


def test_user_mistakes_are_one_line_errors(tmp_path, capsys):
    assert main(["train", "--method", "no_such_method", "--concept", "zebra", "--out", str(tmp_path / "x")]) == 2
    assert main(["bench", "--suite", "toy-quick", "--out", str(tmp_path), "--shard", "3/2"]) == 2
    assert main(["generate", "--artifact", str(tmp_path / "missing.safetensors"), "--prompt", "a star",
                 "--out", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert err.count("editbench: error:") == 3 and "Traceback" not in err
