"""Prior preservation with real class images: folder layouts, per-image captions in the prior loss, the toy world's
retrieval (never a personal concept's appearance), bad folders and the cache."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _method_helpers import concept_for, editor
from PIL import Image

from editbench.errors import ClassDataError, EditbenchError
from editbench.methods.custom_diffusion import CustomDiffusionConfig
from editbench.methods.dreambooth.config import DreamBoothConfig
from editbench.methods.prior import (AUTO, TOYWORLD, ClassSource, PriorPreservation, class_data_folder,
                                     load_class_folder, make_prior, parse_class_folder)
from editbench.testing import tiny_pipeline
from editbench.toyworld import scenes as R
from editbench.toyworld.personal import EXCLUDED_APPEARANCES, PERSONAL_CONCEPTS
from editbench.toyworld.retrieval import retrieval_key, retrieve_specs, write_retrieval

COLORS = [(220, 30, 30), (30, 180, 40), (40, 60, 220), (240, 220, 30)]
CAPTIONS = ["a red star", "a green star on the left", "a large blue star", "a yellow star at the top"]


def _png(path: Path, color, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


def retrieval_folder(root: Path, captions=CAPTIONS, listed=None) -> Path:
    """diffusers' retrieval layout: images/, images.txt and caption.txt paired by line."""
    for i, c in enumerate(COLORS[:len(captions)]):
        _png(root / "images" / f"{i}.png", c)
    listed = listed if listed is not None else [f"images/{i}.png" for i in range(len(captions))]
    (root / "images.txt").write_text("".join(f"{x}\n" for x in listed))
    (root / "caption.txt").write_text("".join(f"{x}\n" for x in captions))
    return root


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


# ------------------------------------------------------------------------------------------------ layouts
def test_retrieval_layout_pairs_images_and_captions_by_line(tmp_path):
    # diffusers' retrieve.py writes paths prefixed with the folder as it was given then: they resolve to images/
    listed = ["images/0.png", str(tmp_path / "r" / "images" / "1.png"), "old/place/images/2.png", "images/3.png"]
    folder = retrieval_folder(tmp_path / "r", listed=listed)
    data = parse_class_folder(folder, "a photo of a star")
    assert data.layout == "retrieval"
    assert [p.name for p in data.images] == ["0.png", "1.png", "2.png", "3.png"]
    assert list(data.captions) == CAPTIONS
    images, captions, _ = load_class_folder(data, 8, n=3)               # the first n, resized like concept images
    assert images.shape == (3, 3, 8, 8) and captions == CAPTIONS[:3]
    red = torch.tensor(COLORS[0]) / 127.5 - 1
    assert torch.allclose(images[0, :, 4, 4], red, atol=1e-6)


def test_plain_folder_uses_one_prompt_for_every_image(tmp_path):
    for i, c in enumerate(COLORS[:3]):
        _png(tmp_path / f"b{i}.jpg" if i == 1 else tmp_path / f"a{i}.png", c)
    (tmp_path / "notes.md").write_text("not an image")
    data = parse_class_folder(tmp_path, "a photo of a star")
    assert data.layout == "plain"
    assert [p.name for p in data.images] == ["a0.png", "a2.png", "b1.jpg"]
    assert data.captions == ("a photo of a star",) * 3


def test_class_data_dir_source(tmp_path, pipe):
    cfg = DreamBoothConfig(class_data_dir=str(tmp_path / "reg" / "{}"), class_cache_dir=str(tmp_path / "cache"),
                           num_class_images=3)
    assert class_data_folder(cfg, "star", pipe) == ClassSource("folder", tmp_path / "reg" / "star")
    assert class_data_folder(dataclasses.replace(cfg, class_data_dir=None), "star", pipe).kind == "generated"
    auto = dataclasses.replace(cfg, class_data_dir=AUTO)
    assert class_data_folder(auto, "dog", pipe).kind == "generated"        # not a toy-world category
    toy = class_data_folder(auto, "star", pipe)
    assert toy.kind == TOYWORLD and toy.folder.parent == tmp_path / "cache"
    assert parse_class_folder(toy.folder, "x").layout == "retrieval"
    strict = dataclasses.replace(cfg, class_data_dir=TOYWORLD)
    with pytest.raises(ClassDataError, match="no category 'dog'.*class_data_dir=None"):
        class_data_folder(strict, "dog", pipe)
    sd = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=64)), vae_scale_factor=8)
    with pytest.raises(ClassDataError, match="512 px"):
        class_data_folder(strict, "star", sd)
    assert class_data_folder(auto, "star", sd).kind == "generated"           # Stable Diffusion: generated


def test_config_field_defaults_and_validation():
    assert CustomDiffusionConfig().class_data_dir == AUTO                    # real images, as published
    assert CustomDiffusionConfig.reference().class_data_dir == AUTO
    assert DreamBoothConfig().class_data_dir is None                         # DreamBooth generates
    for bad in ("", "  ", "a\nb", "{}/{}", 3):
        with pytest.raises(EditbenchError, match="class_data_dir"):
            DreamBoothConfig(class_data_dir=bad).validate()
    # a CD checkpoint from before real images (no class_data_dir in its signature) must not resume with them
    assert "class_data_dir" in CustomDiffusionConfig().run_signature()
    assert "class_data_dir" not in DreamBoothConfig().run_signature()


# ------------------------------------------------------------------------------------------------ bad input
def _corrupt(folder: Path) -> Path:
    (folder / "images" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder / "images" / "2.png"


@pytest.mark.parametrize("case, match", [
    ("count", r"caption\.txt has 3 captions but .*images\.txt lists 4 images"),
    ("missing_image", r"images\.txt line 2 lists image 'images/gone\.png', which does not exist"),
    ("no_captions", r"caption\.txt is missing"),
    ("no_listing", r"images\.txt is missing"),
    ("blank_line", r"caption\.txt line 2 is empty"),
    ("empty_listing", r"images\.txt lists no images"),
    ("empty_folder", r"holds no images"),
    ("no_folder", r"does not exist or is not a folder"),
    ("corrupt", r"images/2\.png is unreadable or corrupt"),
])
def test_bad_folders_raise_one_clear_error_naming_the_file(tmp_path, case, match):
    folder = retrieval_folder(tmp_path / "r")
    if case == "count":
        (folder / "caption.txt").write_text("".join(f"{x}\n" for x in CAPTIONS[:3]))
    elif case == "missing_image":
        (folder / "images.txt").write_text("images/0.png\nimages/gone.png\nimages/2.png\nimages/3.png\n")
    elif case == "no_captions":
        (folder / "caption.txt").unlink()
    elif case == "no_listing":
        (folder / "images.txt").unlink()
    elif case == "blank_line":
        (folder / "caption.txt").write_text("a\n\nb\nc\n")
    elif case == "empty_listing":
        (folder / "images.txt").write_text("\n")
        (folder / "caption.txt").write_text("")
    elif case == "empty_folder":
        shutil.rmtree(folder)
        folder.mkdir()
    elif case == "no_folder":
        folder = tmp_path / "nowhere"
    elif case == "corrupt":
        _corrupt(folder)
    with pytest.raises(ClassDataError, match=match):
        data = parse_class_folder(folder, "a photo of a star")
        load_class_folder(data, 8)


def test_a_bad_folder_fails_the_fit_before_training_and_changes_nothing(tmp_path, pipe):
    folder = retrieval_folder(tmp_path / "r")
    bad = _corrupt(folder)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    ed = editor("custom_diffusion", class_data_dir=str(folder), class_cache_dir=str(tmp_path / "cache"),
                num_class_images=4)
    with pytest.raises(ClassDataError, match=str(bad)):
        ed.fit(pipe, concept_for("custom_diffusion"), steps=1, progress=False)
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "cache").exists()                                 # nothing cached from a bad folder


# ------------------------------------------------------------------------------------------------ the loss
def test_the_prior_loss_prompts_each_class_image_with_its_own_caption(tmp_path, pipe):
    from editbench.training.loop import scale_latents

    cfg = DreamBoothConfig(num_class_images=4, class_data_dir=str(retrieval_folder(tmp_path / "r")))
    prior = make_prior(pipe, concept_for("dreambooth"), cfg)
    assert prior.captions == [CAPTIONS]
    mean, std = prior.stats[0]
    prior.stats[0] = (torch.arange(4.0)[:, None, None, None].expand_as(mean).clone(), torch.zeros_like(std))
    seen = {}

    def diffusion_loss(latents, states):
        seen["latents"] = latents
        return latents.sum() * 0

    def encode(prompts):
        seen["prompts"] = prompts
        return torch.zeros(len(prompts), 4, 32)

    b = 12
    ctx = SimpleNamespace(indices=torch.arange(b), generator=torch.Generator().manual_seed(0), pipeline=pipe,
                          latents=torch.zeros(b, *mean.shape[1:]), diffusion_loss=diffusion_loss)
    prior.loss(ctx, encode)
    unit = scale_latents(pipe, torch.ones(1)).item() - scale_latents(pipe, torch.zeros(1)).item()
    offset = scale_latents(pipe, torch.zeros(1)).item()
    drawn = [round((x - offset) / unit) for x in seen["latents"].flatten(1)[:, 0].tolist()]
    assert len(set(drawn)) > 1                                               # several images in one batch ...
    assert seen["prompts"] == [CAPTIONS[i] for i in drawn]                   # ... each with its own caption


def test_swapping_captions_changes_the_prior_loss_and_one_caption_equals_a_plain_folder(tmp_path, pipe):
    concept = concept_for("dreambooth")

    def first_loss(folder, **kw):
        ed = editor("dreambooth", class_data_dir=str(folder), num_class_images=4, **kw)
        return ed.fit(pipe, concept, steps=1, progress=False).metadata

    own = first_loss(retrieval_folder(tmp_path / "own"))
    swapped = first_loss(retrieval_folder(tmp_path / "swapped", captions=CAPTIONS[::-1]))
    assert own["training"]["loss_first"] != swapped["training"]["loss_first"]
    assert own["prior"]["fingerprint"] != swapped["prior"]["fingerprint"]
    # every caption the class prompt: the same loss as a plain folder of the same images with that prompt
    same = first_loss(retrieval_folder(tmp_path / "same", captions=["a photo of a star"] * 4))
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(4):
        shutil.copy(tmp_path / "same" / "images" / f"{i}.png", plain / f"{i}.png")
    flat = first_loss(plain, class_prompt="a photo of a {}")
    assert same["training"]["loss_first"] == flat["training"]["loss_first"]
    assert flat["prior"]["layout"] == "plain" and own["prior"]["layout"] == "retrieval"


def test_the_artifact_records_a_fingerprint_of_the_folder(tmp_path, pipe):
    folder = retrieval_folder(tmp_path / "r")
    ed = editor("custom_diffusion", class_data_dir=str(folder), num_class_images=4)
    meta = ed.fit(pipe, concept_for("custom_diffusion"), steps=1, progress=False).metadata
    assert meta["prior"] == {"source": "folder", "layout": "retrieval", "images": 4, "path": str(folder),
                             "fingerprint": meta["prior"]["fingerprint"]}
    fp = meta["prior"]["fingerprint"]
    moved = shutil.copytree(folder, tmp_path / "moved")                      # same content elsewhere: same print
    assert load_class_folder(parse_class_folder(moved, ""), 8)[2] == fp
    _png(moved / "images" / "1.png", (0, 0, 0))                              # one image changed: another print
    assert load_class_folder(parse_class_folder(moved, ""), 8)[2] != fp
    assert json.loads(json.dumps(meta["prior"])) == meta["prior"]
    generated = editor("dreambooth").fit(pipe, concept_for("dreambooth"), steps=1, progress=False).metadata
    assert generated["prior"] == {"source": "generated", "images": 2, "prompt": "a photo of a star"}


def test_joint_training_takes_each_concepts_own_folder(tmp_path, pipe):
    retrieval_folder(tmp_path / "star")
    retrieval_folder(tmp_path / "circle", captions=["a red circle", "a green circle"])
    cfg = CustomDiffusionConfig(class_data_dir=str(tmp_path / "{}"), num_class_images=4)
    prior = make_prior(pipe, [concept_for("custom_diffusion"),
                              concept_for("custom_diffusion", "<other>", "circle")], cfg)
    assert prior.captions == [CAPTIONS, ["a red circle", "a green circle"]]
    assert [s["images"] for s in prior.metadata()] == [4, 2]


# ------------------------------------------------------------------------------------------------ toy world
@pytest.mark.parametrize("category", R.CATEGORIES)
def test_toy_retrieval_shows_the_category_and_never_a_personal_concept(category):
    specs = retrieve_specs(category, 150, seed=3)
    for spec in specs:
        assert any(o.category == category for o in spec.objects)
        assert not {o.appearance for o in spec.objects} & EXCLUDED_APPEARANCES
        assert not any(R.is_heldout_combo(o.category, o.color, spec.background) for o in spec.objects)
    assert len({s.caption() for s in specs}) > 100                           # varied, not one scene repeated
    assert specs == retrieve_specs(category, 150, seed=3)                    # deterministic per seed
    assert specs != retrieve_specs(category, 150, seed=4)


def test_toy_retrieval_checks_for_personal_appearances(monkeypatch):
    # the guard is live: a base scene showing a personal concept's exact appearance stops the retrieval
    import editbench.toyworld.train as T

    zebra = PERSONAL_CONCEPTS[0]
    monkeypatch.setattr(T, "base_spec", lambda cfg, i: R.SceneSpec((zebra.object(),), "red"))
    with pytest.raises(AssertionError, match="personal concept"):
        retrieve_specs(zebra.category, 1)


def test_written_retrieval_captions_describe_no_personal_concept(tmp_path):
    out = write_retrieval(tmp_path / "heart", "heart", 60)
    data = parse_class_folder(out, "unused")
    assert len(data.images) == 60 and all(p.parent.name == "images" for p in data.images)
    forbidden = [R.describe(c.object(), say_position=False, say_size=False).removeprefix("a ")
                 for c in PERSONAL_CONCEPTS]                                 # "white heart with black diagonal ..."
    assert all("heart" in cap and not any(f in cap for f in forbidden) for cap in data.captions)
    specs = retrieve_specs("heart", 60)
    assert list(data.captions) == [s.caption() for s in specs]               # the training captions
    first = np.asarray(Image.open(data.images[0]).convert("RGB"))
    assert np.array_equal(first, np.asarray(R.render(specs[0], 32).image))
    with pytest.raises(EditbenchError, match="not an empty folder"):
        write_retrieval(out, "heart", 2)


def test_cli_world_prior(tmp_path, capsys):
    from editbench.cli import main

    assert main(["world", "prior", "--category", "star", "--n", "3", "--out", str(tmp_path / "s")]) == 0
    assert "class_data_dir=" in capsys.readouterr().out
    assert parse_class_folder(tmp_path / "s", "").captions == tuple(s.caption() for s in retrieve_specs("star", 3))
    assert main(["world", "prior", "--category", "dog", "--n", "3", "--out", str(tmp_path / "d")]) == 2
    assert "no category 'dog'" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_toy_cache_is_written_whole_or_not_at_all(tmp_path, pipe, monkeypatch):
    import editbench.toyworld.retrieval as RT

    cfg = CustomDiffusionConfig(class_data_dir=TOYWORLD, num_class_images=4, class_cache_dir=str(tmp_path))
    real, calls = RT.atomic_target, []

    def crashing(path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(path)

    monkeypatch.setattr(RT, "atomic_target", crashing)
    with pytest.raises(OSError, match="disk full"):
        class_data_folder(cfg, "star", pipe)
    assert list(tmp_path.iterdir()) == []                                    # no half-written entry, no temp folder
    monkeypatch.setattr(RT, "atomic_target", real)
    source = class_data_folder(cfg, "star", pipe)
    assert source.folder.name == f"toyworld-star-{retrieval_key('star', 4, 0)}"
    prior = PriorPreservation(pipe, ["a photo of a star"], cfg, [source])
    fp = prior.sources[0]["fingerprint"]
    (source.folder / "images" / "000001.png").unlink()                       # damaged from outside: written again
    again = PriorPreservation(pipe, ["a photo of a star"], cfg, [class_data_folder(cfg, "star", pipe)])
    assert again.sources[0]["fingerprint"] == fp and again.captions == prior.captions


# ------------------------------------------------------------------------------------------------ resume, "none"
def _checkpoint_fingerprints(ckpt: Path) -> dict:
    from editbench.storage import read_safetensors

    tensors, _ = read_safetensors(ckpt / "checkpoint.safetensors", "checkpoint")
    return {k: bytes(v.tolist()).decode() for k, v in tensors.items() if "class_data_fingerprint" in k}


def test_resuming_after_the_class_folder_changed_is_a_clear_error_and_keeps_the_checkpoint(tmp_path, pipe):
    from _method_helpers import assert_same, snapshot

    folder = retrieval_folder(tmp_path / "r")
    ckpt = tmp_path / "ckpt"
    ed = editor("dreambooth", class_data_dir=str(folder), num_class_images=4, checkpoint_every=1)
    concept = concept_for("dreambooth")
    first = ed.fit(pipe, concept, steps=1, progress=False, checkpoint_dir=ckpt)        # a checkpoint at step 1
    fp = first.metadata["prior"]["fingerprint"]
    assert _checkpoint_fingerprints(ckpt) == {"session/prior/class_data_fingerprint/0": fp}   # recorded at start
    written = {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()}
    _png(folder / "images" / "1.png", (0, 0, 0))                                       # the folder changes
    new_fp = load_class_folder(parse_class_folder(folder, ""), 8, 4)[2]
    assert new_fp != fp
    before = snapshot(pipe)
    with pytest.raises(ClassDataError, match=rf"class_data_dir {folder} changed since this training started: .*"
                                             rf"fingerprint {fp} when the checkpoint was written and have {new_fp} "
                                             r"now; the checkpoint is kept"):
        ed.fit(pipe, concept, steps=2, progress=False, checkpoint_dir=ckpt)
    assert {p: p.read_bytes() for p in ckpt.rglob("*") if p.is_file()} == written      # nothing written is lost
    assert_same(before, snapshot(pipe))
    _png(folder / "images" / "1.png", COLORS[1])                                       # restored: it resumes
    resumed = ed.fit(pipe, concept, steps=2, progress=False, checkpoint_dir=ckpt)
    assert resumed.metadata["training"]["resumed_from"] == 1
    straight = ed.fit(pipe, concept, steps=2, progress=False)
    for k, v in straight.tensors.items():
        assert torch.equal(resumed.tensors[k], v), k


def test_checkpoint_fingerprints_of_generated_images_old_and_damaged_checkpoints(tmp_path, pipe):
    from editbench.errors import TrainingError

    real = make_prior(pipe, concept_for("dreambooth"), DreamBoothConfig(
        num_class_images=4, class_data_dir=str(retrieval_folder(tmp_path / "r"))))
    state = real.state_tensors()
    assert list(state) == ["prior/class_data_fingerprint/0"] and state[next(iter(state))].dtype == torch.uint8
    rest = {**state, "other": torch.zeros(1)}
    real.check_state_tensors(rest)                                   # the same images: passes, pops its key
    assert list(rest) == ["other"]
    real.check_state_tensors({})                                     # a checkpoint from before: not checked
    generated = make_prior(pipe, concept_for("dreambooth"), DreamBoothConfig(
        num_class_images=2, class_inference_steps=2, class_cache_dir=str(tmp_path / "cache")))
    assert generated.state_tensors() == {}                           # nothing to check for generated images
    with pytest.raises(ClassDataError, match="now; the checkpoint is kept"):
        generated.check_state_tensors(dict(state))
    for bad in (torch.zeros(16, dtype=torch.uint8), torch.tensor(list(b"0123"), dtype=torch.uint8),
                torch.zeros(16)):
        with pytest.raises(TrainingError, match="class-image fingerprint .* is damaged"):
            real.check_state_tensors({"prior/class_data_fingerprint/0": bad})


@pytest.mark.parametrize("value", ["none", "None", " NONE ", None])
def test_class_data_dir_none_means_generated_images_not_a_folder_named_none(value, pipe):
    for cls in (DreamBoothConfig, CustomDiffusionConfig):
        cfg = cls(class_data_dir=value)
        assert cfg.class_data_dir is None
        assert dataclasses.replace(cls(), class_data_dir=value).class_data_dir is None
        assert cfg.run_signature() == cls(class_data_dir=None).run_signature()
        assert class_data_folder(cfg, "star", pipe) == ClassSource("generated")
    assert DreamBoothConfig(class_data_dir="./none").class_data_dir == "./none"      # a folder of that name


def test_set_class_data_dir_none_on_the_command_line_and_in_a_suite(tmp_path, pipe, monkeypatch):
    from editbench import methods
    from editbench.cli import build_parser
    from editbench.commands import train_overrides
    from editbench.eval.spec import load_suite

    monkeypatch.chdir(tmp_path)                                      # no folder named "none" here
    args = build_parser().parse_args(["train", "--method", "custom_diffusion", "--concept", "zebra", "--out", "x",
                                      "--set", "class_data_dir=none"])
    overrides = train_overrides(args)
    assert overrides == {"class_data_dir": "none"}                   # YAML reads none as a string ...
    ed = methods.get("custom_diffusion")(**overrides)
    assert ed.config.class_data_dir is None                          # ... the config as None: generated images
    art = editor("custom_diffusion", **overrides, class_cache_dir=str(tmp_path / "cache")).fit(
        pipe, concept_for("custom_diffusion"), steps=1, progress=False)
    assert art.metadata["prior"]["source"] == "generated" and art.metadata["config"]["class_data_dir"] is None
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: t\nmodel: tiny\nconcepts: [zebra]\nsteps: 1\nmethods:\n"
                     "  - {name: custom_diffusion, label: cd_none, config: {class_data_dir: none}}\n"
                     "  - {name: custom_diffusion, label: cd_null, config: {class_data_dir: null}}\n"
                     "  - {name: dreambooth, config: {class_data_dir: None}}\n")
    spec = load_suite(suite)
    assert [methods.get(m.name)(**m.config).config.class_data_dir for m in spec.methods] == [None, None, None]
