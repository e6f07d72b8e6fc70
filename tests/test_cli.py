"""The ``editbench`` commands end to end on the toy world, through ``editbench.cli.main(argv)`` (tiny step counts)."""

from __future__ import annotations

import pytest

from editbench.cli import main
from editbench.methods import get
from editbench.methods.base import Artifact
from editbench.methods.tokens import RARE_WORDS

FAST = ["--steps", "2", "--set", "batch_size=1", "--set", "with_prior_preservation=false"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITBENCH_CACHE", str(tmp_path / "cache"))


def _train(tmp_path, method: str, concept: str, *extra: str) -> Artifact:
    out = tmp_path / f"{method}-{concept}.safetensors"
    assert main(["train", "--method", method, "--concept", concept, *FAST, *extra, "--out", str(out)]) == 0
    return Artifact.load(out)


def test_train_lora_on_a_toy_concept_takes_a_rare_word_and_prints_the_phrase(tmp_path, capsys):
    art = _train(tmp_path, "lora", "zebra")
    assert art.metadata["phrase"] == f"{RARE_WORDS[0]} heart" == get("lora")().phrase(art)
    assert f"prompt phrase: '{RARE_WORDS[0]} heart'" in capsys.readouterr().out


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
