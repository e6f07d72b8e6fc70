"""The ``editbench`` commands end to end on the toy world, through ``editbench.cli.main(argv)`` (tiny step counts).

``tune`` (and ``bench --tuned``) runs in tests/test_tune.py, ``world train --smoke`` in tests/test_toyworld.py."""

from __future__ import annotations

import dataclasses

import pytest

from editbench.cli import main
from editbench.errors import EditbenchError
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
    assert main(["report", str(out), "--paired", "textual_inversion", "base:default"]) == 0
    printed = capsys.readouterr().out
    assert "textual_inversion:default minus base:default" in printed and "text_alignment" in printed
    assert main(["report", str(out), "--paired", "nope", "base"]) == 2
    assert "label 'nope'" in capsys.readouterr().err


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


# ---------------------------------------------------------------------------------------------------------------
# export: artifacts of the tiny pipeline (tests/_method_helpers.py), checked against a saved copy of it (--model)
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from editbench.testing import tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny") / "model"
    tiny_pipeline().save_pretrained(folder)
    return str(folder)


def _export(capsys, artifact, out, *extra: str) -> tuple[int, str, str]:
    code = main(["export", str(artifact), "--out", str(out), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _same_images(pipe, method: str, art: Artifact, loaded, prompt: str) -> None:
    """``loaded`` (a diffusers pipeline with the export loaded) draws what ``apply`` of ``art`` on ``pipe`` draws."""
    import numpy as np
    from _method_helpers import generate

    with get(method)().apply(pipe, art):
        ours = generate(pipe, prompt)
    assert np.allclose(generate(loaded, prompt), ours, atol=1e-5)
    assert not np.allclose(generate(pipe, prompt), ours, atol=1e-5)  # the edit acts


def test_export_textual_inversion_loads_with_load_textual_inversion(tmp_path, capsys, tiny_model):
    from _method_helpers import load, trained

    from editbench.testing import tiny_pipeline

    path = trained("textual_inversion", num_vectors=2)
    code, out, _ = _export(capsys, path, tmp_path / "ti", "--model", tiny_model)
    assert code == 0
    assert str(tmp_path / "ti" / "learned_embeds.safetensors") in out
    call = f"pipe.load_textual_inversion({str(tmp_path / 'ti')!r}, token='<toy-star>')"
    assert call in out and "then prompt with '<toy-star>'" in out
    pipe = tiny_pipeline()
    pipe.load_textual_inversion(str(tmp_path / "ti"), token="<toy-star>")
    _same_images(tiny_pipeline(), "textual_inversion", load("textual_inversion", path), pipe,
                 "a photo of a <toy-star>")


def test_export_lora_loads_with_load_lora_weights(tmp_path, capsys):
    from _method_helpers import load, trained

    from editbench.testing import tiny_pipeline

    path = trained("lora")
    code, out, _ = _export(capsys, path, tmp_path / "lora")  # no --model: LoRA's format needs no base weights
    assert code == 0 and "pytorch_lora_weights.safetensors" in out
    assert f"pipe.load_lora_weights({str(tmp_path / 'lora')!r}" in out and "prompt with 'sks star'" in out
    pipe = tiny_pipeline()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    art = load("lora", path)
    _same_images(tiny_pipeline(), "lora", art, pipe, f"a photo of a {art.metadata['phrase']}")


def test_export_dreambooth_loads_with_from_pretrained(tmp_path, capsys, tiny_model):
    from _method_helpers import load, trained
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from editbench.testing import tiny_pipeline

    path = trained("dreambooth", with_prior_preservation=False)
    code, out, _ = _export(capsys, path, tmp_path / "db", "--model", tiny_model)
    assert code == 0 and "diffusion_pytorch_model.safetensors" in out and "config.json" in out
    assert f"UNet2DConditionModel.from_pretrained({str(tmp_path / 'db')!r}, subfolder='unet')" in out
    base = tiny_pipeline()
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "db", subfolder="unet")
    pipe = StableDiffusionPipeline(**{**base.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    art = load("dreambooth", path)
    _same_images(tiny_pipeline(), "dreambooth", art, pipe, f"a photo of a {art.metadata['phrase']}")


def test_export_custom_diffusion_needs_the_base_model_and_loads_with_editbench_loader(tmp_path, capsys, tiny_model):
    from _method_helpers import load, trained

    from editbench.methods.custom_diffusion import load_diffusers
    from editbench.testing import tiny_pipeline

    path = trained("custom_diffusion")
    folder = tmp_path / "cd"
    code, out, _ = _export(capsys, path, folder, "--model", tiny_model)
    assert code == 0
    assert "pytorch_custom_diffusion_weights.safetensors" in out and "<toy-star>.safetensors" in out
    assert f"load_diffusers(pipe, {str(folder)!r})" in out and "load_attn_procs leaves the model unedited" in out
    assert "prompt with '<toy-star> star'" in out
    pipe = tiny_pipeline()
    handle = load_diffusers(pipe, folder)
    _same_images(tiny_pipeline(), "custom_diffusion", load("custom_diffusion", path), pipe,
                 "a photo of a <toy-star> star")
    handle.undo()
    with pytest.raises(EditbenchError, match="needs the base pipeline"):
        get("custom_diffusion")().export(load("custom_diffusion", path), tmp_path / "lib")


def test_export_refusals_are_one_line_errors(tmp_path, capsys):
    from _method_helpers import trained

    lora = trained("lora")
    code, _, err = _export(capsys, trained("perfusion"), tmp_path / "p")
    assert code == 2 and "editbench: error: perfusion has no diffusers export format" in err
    assert not (tmp_path / "p").exists()
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(lora.read_bytes()[:-10])
    missing = tmp_path / "missing.safetensors"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("")
    for artifact, out, words in ((corrupt, "c", "corrupt.safetensors"), (missing, "m", "missing.safetensors"),
                                 (lora, "full", "is not empty"), (lora, "file", "is a file")):
        code, _, err = _export(capsys, artifact, tmp_path / out)
        assert code == 2 and err.startswith("editbench: error:") and words in err and err.count("\n") == 1, err
    assert main(["export", str(lora), "--out", str(tmp_path / "full"), "--force"]) == 0
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert (tmp_path / "full" / "pytorch_lora_weights.safetensors").is_file()


def test_export_against_another_base_model_is_refused(tmp_path, capsys, tiny_model):
    from _method_helpers import trained

    path = trained("lora", seed=1)
    other = tmp_path / "other"
    from editbench.testing import tiny_pipeline

    tiny_pipeline(seed=1).save_pretrained(other)
    code, _, err = _export(capsys, path, tmp_path / "x", "--model", str(other))
    assert code == 2 and "was trained on base model" in err and not (tmp_path / "x").exists()
