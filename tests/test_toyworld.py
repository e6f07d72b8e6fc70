"""The toy world: renderer, grammar, held-out exclusion, checker, concept data, committed weights."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from _method_helpers import generate

from editbench.models import clip_tokenizer
from editbench.toyworld import scenes as R
from editbench.toyworld.benchmark import single_prompts
from editbench.toyworld.checker import check, heldout_specs
from editbench.toyworld.personal import EXCLUDED_APPEARANCES, PERSONAL_CONCEPTS


def test_vocabulary_words_are_single_clip_tokens():
    tok = clip_tokenizer()
    words = list(R.CATEGORIES) + list(R.PALETTE) + ["small", "large", "left", "right", "top", "bottom", "center"]
    for w in words:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    assert len(R.CATEGORIES) >= 6 and len(R.PALETTE) >= 6


def test_positions_tile_the_image():
    area = sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in R.POSITIONS.values())
    assert area == pytest.approx(1.0)
    for phrase in ("left", "right", "top", "bottom", "center", "top left", "bottom right"):
        assert phrase in R.POSITIONS


def test_render_is_deterministic_per_seed():
    a, b, c = R.random_scene(5), R.random_scene(5), R.random_scene(6)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.caption == b.caption
    assert a.caption != c.caption or not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_render_returns_image_caption_attributes_and_masks():
    spec = R.SceneSpec((R.ObjectSpec("star", "red", "left", "large", "stripes", "blue"),
                        R.ObjectSpec("circle", "green", "right", "small")), "white")
    r = R.render(spec)
    assert r.image.size == (32, 32) and len(r.masks) == 2
    assert r.caption == ("a large red star with blue stripes on the left and a small green circle on the right "
                         "on a white background")
    assert r.attributes["background"] == "white"
    img = np.asarray(r.image).astype(int)
    # the corner is background, the masks sit in their cells and hold the object's colors
    assert tuple(img[0, 0]) == R.PALETTE["white"]
    for m, phrase in zip(r.masks, ("left", "right")):
        ys, xs = np.nonzero(m > 0.5)
        x0, y0, x1, y1 = R.POSITIONS[phrase]
        assert x0 <= (xs.mean() + 0.5) / 32 < x1 and y0 <= (ys.mean() + 0.5) / 32 < y1
    inside = img[r.masks[1] > 0.99]
    assert (inside == R.PALETTE["green"]).all()


def test_grammar_covers_attributes():
    rng = random.Random(0)
    specs = [R.sample_scene(rng) for _ in range(400)]
    objs = [o for s in specs for o in s.objects]
    assert {o.category for o in objs} == set(R.CATEGORIES)
    assert {o.position for o in objs} == set(R.POSITIONS)
    assert {o.pattern for o in objs} == {None, *R.PATTERNS}
    assert any(len(s.objects) == 2 for s in specs)
    for s in specs:
        assert all(o.color != s.background for o in s.objects)


def test_base_training_excludes_personal_appearances_and_heldout_captions():
    """The base model's data stream shows every pattern (each personal concept's pattern, and its category with
    that pattern) but never a personal concept's exact appearance, and never a held-out (category, color,
    background) triple; the evaluator's stream does show the concepts."""
    from editbench.toyworld.train import WorldConfig, base_scene, evaluator_scene

    cfg = WorldConfig()
    seen_hidden = 0
    patterns, cat_patterns = set(), set()
    for i in range(3000):
        spec = base_scene(cfg, i).spec
        for o in spec.objects:
            assert o.appearance not in EXCLUDED_APPEARANCES
            assert not R.is_heldout_combo(o.category, o.color, spec.background)
            patterns.add(o.pattern)
            cat_patterns.add((o.category, o.pattern))
    assert patterns == {None, *R.PATTERNS}
    assert all((c.category, c.pattern) in cat_patterns for c in PERSONAL_CONCEPTS)
    for i in range(400):
        spec = evaluator_scene(cfg, i).spec
        seen_hidden += any(o.appearance in EXCLUDED_APPEARANCES for o in spec.objects)
    assert seen_hidden > 20
    # the exclusion is real: without it the same stream would contain these appearances
    rng = random.Random(1)
    appearances = {o.appearance for _ in range(20000) for o in R.sample_scene(rng, pattern_prob=1.0).objects}
    assert all(c.appearance in appearances for c in PERSONAL_CONCEPTS)


def test_pattern_stage_scenes_are_pattern_rich_and_exclude_personal_appearances():
    """The patterns stage's stream follows base training's exclusions (no personal concept's exact appearance, no
    held-out triple), is another stream than base training's, and carries a pattern on ~pattern_stage_prob of the
    objects (base training: ~pattern_prob)."""
    from editbench.toyworld.train import WorldConfig, base_scene, pattern_scene

    cfg = WorldConfig()
    share = {}
    for name, scene in (("base", base_scene), ("patterns", pattern_scene)):
        objs = []
        for i in range(1500):
            spec = scene(cfg, i).spec
            for o in spec.objects:
                assert o.appearance not in EXCLUDED_APPEARANCES
                assert not R.is_heldout_combo(o.category, o.color, spec.background)
            objs += spec.objects
        share[name] = np.mean([o.pattern is not None for o in objs])
        assert {o.pattern for o in objs} == {None, *R.PATTERNS}
    assert abs(share["patterns"] - cfg.pattern_stage_prob) < 0.03 and abs(share["base"] - cfg.pattern_prob) < 0.03
    assert pattern_scene(cfg, 0).caption != base_scene(cfg, 0).caption or pattern_scene(cfg, 1).caption != \
        base_scene(cfg, 1).caption


def test_unsaid_single_object_positions_are_centred_and_nothing_else_changes():
    """With ``unsaid_position`` a single object whose caption states no position is placed there; every other
    draw (the captions, two-object scenes, stated positions, jitter) is the scene the same seed gives without it.
    Base training and the patterns stage use the config's rule; the evaluator's fully specified stream does not."""
    from editbench.toyworld.train import WorldConfig, base_spec, evaluator_scene, pattern_scene

    unsaid, moved = 0, 0
    for seed in range(600):
        a = R.sample_scene(random.Random(seed), pattern_prob=0.6)
        b = R.sample_scene(random.Random(seed), pattern_prob=0.6, unsaid_position="center")
        assert b.caption() == a.caption() and b.background == a.background
        for oa, ob in zip(a.objects, b.objects):
            if len(a.objects) == 1 and not a.say_position:
                assert ob.position == "center" and replace(ob, position=oa.position) == oa
                unsaid += 1
                moved += oa.position != "center"
            else:
                assert ob == oa
    assert 40 < unsaid < 130 and moved > 0.7 * unsaid        # ~15% of captions omit the position
    cfg = WorldConfig()
    assert cfg.unsaid_position == "center"
    singles = [s for s in (base_spec(cfg, i) for i in range(400)) if len(s.objects) == 1 and not s.say_position]
    assert singles and all(s.objects[0].position == "center" for s in singles)
    patt = [pattern_scene(cfg, i).spec for i in range(400)]
    assert all(s.objects[0].position == "center" for s in patt if len(s.objects) == 1 and not s.say_position)
    ev = [evaluator_scene(cfg, i).spec.objects[0].position for i in range(600)]
    assert ev.count("center") / len(ev) < 0.16   # 1/9 of 9 positions; centred unsaid objects would make it ~0.24
    anywhere = [s for s in (base_spec(cfg.replace(unsaid_position=""), i) for i in range(400))
                if len(s.objects) == 1 and not s.say_position]
    assert len({s.objects[0].position for s in anywhere}) > 3
    from editbench.errors import EditbenchError

    with pytest.raises(EditbenchError, match="unsaid_position must be one of"):
        base_spec(cfg.replace(unsaid_position="middle"), 0)


def test_heldout_specs_are_heldout():
    for s in heldout_specs(50):
        assert all(R.is_heldout_combo(o.category, o.color, s.background) for o in s.objects)


@pytest.mark.parametrize("two", [False, True])
def test_checker_accepts_ground_truth_and_rejects_wrong_scenes(two):
    specs = heldout_specs(60, seed=3, two_object=two)
    ok = [check(R.render(s).image, s) for s in specs]
    assert np.mean([c.background and c.color for c in ok]) >= 0.95  # the reader: >= 0.95 per attribute (test_oracle)
    assert np.mean([c.category for c in ok]) >= 0.9 and np.mean([c.position for c in ok]) >= 0.9
    assert np.mean([c.all_present for c in ok]) >= 0.95
    # a scene rendered with another category, color, background and position must fail those checks
    wrong = []
    for s in specs[:20]:
        o = s.objects[0]
        cat = R.CATEGORIES[(R.CATEGORIES.index(o.category) + 3) % len(R.CATEGORIES)]
        bg = next(c for c in R.COLORS if c not in (s.background, o.color))
        col = next(c for c in R.COLORS if c not in (s.background, o.color, bg))
        pos = {"left": "right", "right": "left"}.get(o.position, "left" if "left" not in o.position else "right")
        other = R.SceneSpec((R.ObjectSpec(cat, col, pos, o.size),), bg)
        wrong.append(check(R.render(other).image, s))
    assert not any(c.background or c.color for c in wrong)
    assert np.mean([c.position for c in wrong]) <= 0.1


def test_personal_concepts_and_data_layout(tmp_path):
    from editbench.toyworld import concepts, write_concept_data

    assert len(PERSONAL_CONCEPTS) >= 8
    tok = clip_tokenizer()
    files = write_concept_data(tmp_path)
    assert len(files) == len(PERSONAL_CONCEPTS)
    for f in files:
        assert 4 <= len(f.images) <= 6 and len(f.masks) == len(f.images)
        assert len(tok(f.superclass, add_special_tokens=False).input_ids) == 1
        assert all("{}" in p for p in f.prompts)
    assert (tmp_path / "dreambench" / "concepts.csv").read_text().splitlines()[0] == "concept,class"
    assert (tmp_path / "customconcept101.json").exists()
    # the committed copy equals a fresh render, byte for byte
    committed = concepts()
    for a, b in zip(committed, files):
        assert [p.read_bytes() for p in a.images] == [p.read_bytes() for p in b.images]
    # references cover few backgrounds: overfitting shows up on prompts asking for others
    for c in PERSONAL_CONCEPTS:
        bgs = {s.background for s in c.reference_specs(5)}
        assert len(bgs) <= 2
        asked = {p.split(" on a ")[-1].split()[0] for p in single_prompts(c)}
        assert asked - bgs, c.name


# ------------------------------------------------------------------------------- committed weights, training
def test_committed_weights_load_offline_like_an_sd_folder(monkeypatch):
    """``StableDiffusionPipeline.from_pretrained(model_path())`` with the hub switched off, float32 by default;
    sampling is deterministic for a seed; the evaluator is an open_clip model."""
    import torch
    from diffusers import StableDiffusionPipeline

    from editbench import toyworld

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(toyworld.model_path())
    pipe.set_progress_bar_config(disable=True)
    assert {p.dtype for p in pipe.unet.parameters()} | {p.dtype for p in pipe.text_encoder.parameters()} == {
        torch.float32}
    assert pipe.tokenizer.model_max_length == 77
    a, b, c = (generate(pipe, "a red star", steps=4, seed=k, guidance_scale=3.0) for k in (3, 3, 4))
    assert a.shape == (1, 32, 32, 3) and np.isfinite(a).all()
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    model, _, tokenizer = toyworld.evaluator()
    with torch.no_grad():
        f = model.encode_text(tokenizer(["a red star", "a blue circle"]))
    assert f.shape == (2, 64) and torch.isfinite(f).all()
    total = sum(p.stat().st_size for p in toyworld.WEIGHTS.rglob("*") if p.is_file() and "_work" not in p.parts)
    assert total <= 40 * 2**20, f"committed toy-world weights are {total / 2**20:.1f} MB (budget 40 MB)"


def test_committed_weights_are_the_shapes_world_config_builds():
    """The committed model's UNet, VAE and text-encoder configs are what ``WorldConfig()``'s recipe builds (heads
    included: diffusers' ``attention_head_dim`` is the number of heads), and the weights were trained by exactly
    ``WorldConfig()``'s recipe (their training log's config), so ``editbench world train`` reproduces them."""
    import json
    from dataclasses import asdict

    from editbench import toyworld
    from editbench.toyworld.config import WorldConfig, text_config, unet_config, vae_config

    cfg, root = WorldConfig(), Path(toyworld.model_path())
    for folder, want in (("unet", unet_config(cfg)), ("vae", vae_config(cfg)), ("text_encoder", text_config(cfg))):
        stored = json.loads((root / folder / "config.json").read_text())
        got = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in want}
        assert got == {k: tuple(v) if isinstance(v, list) else v for k, v in want.items()}, folder
    unet = json.loads((root / "unet" / "config.json").read_text())
    assert unet["attention_head_dim"] == cfg.unet_heads
    recorded = json.loads((toyworld.WEIGHTS / "training_log.json").read_text())["config"]
    assert recorded == asdict(cfg)


def test_world_train_smoke_run_exports_a_loadable_world_and_resumes(tmp_path, monkeypatch):
    """`editbench world train --smoke`: every stage runs, the export loads as a standard pipeline and an
    open_clip evaluator, and re-running with the same work folder resumes (nothing is retrained)."""
    import json

    from diffusers import StableDiffusionPipeline

    from editbench.cli import main
    from editbench.toyworld.train import WorldConfig, train_world

    out = tmp_path / "world"
    assert not main(["world", "train", "--smoke", "--quiet", "--out", str(out)])
    log = json.loads((out / "training_log.json").read_text())
    assert set(log["stages"]) == {"vae", "unet", "patterns", "decoder", "evaluator"}
    assert log["stages"]["unet"]["steps"] == WorldConfig.smoke().unet_steps
    assert log["stages"]["patterns"]["steps"] == WorldConfig.smoke().pattern_steps
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = StableDiffusionPipeline.from_pretrained(out / "model")
    pipe.set_progress_bar_config(disable=True)
    assert np.isfinite(generate(pipe, "a red star", steps=2)).all()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "_work").glob("*.safetensors")}
    train_world(out, cfg=WorldConfig.smoke(), progress=False)  # resume: every stage is complete
    after = {p.name: p.stat().st_mtime_ns for p in (out / "_work").glob("*.safetensors")}
    assert before == after
    with pytest.raises(Exception, match="another config"):
        train_world(out, cfg=WorldConfig.smoke(seed=1), progress=False)


def test_world_train_set_overrides_the_config_and_refuses_bad_fields(tmp_path, capsys):
    """`world train --set key=value`: the override reaches the run (its log and the work folder's config); an
    unknown field or a value of the wrong type is one clear error before anything is trained."""
    import json

    from editbench.cli import main

    out = tmp_path / "world"
    assert not main(["world", "train", "--smoke", "--quiet", "--out", str(out), "--set", "unet_steps=3",
                     "--set", "pattern_prob=1"])
    log = json.loads((out / "training_log.json").read_text())
    assert log["stages"]["unet"]["steps"] == 3 and log["config"]["pattern_prob"] == 1.0
    assert json.loads((out / "_work" / "config.json").read_text())["unet_steps"] == 3
    for bad, words in ((["--set", "unet_step=3"], "unknown world config field 'unet_step'"),
                       (["--set", "unet_steps=2.5"], "'unet_steps' takes values of type int, got 2.5")):
        code = main(["world", "train", "--smoke", "--quiet", "--out", str(tmp_path / "other"), *bad])
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("editbench: error:")]
        assert code == 2 and len(errors) == 1 and words in errors[0], errors
        assert not (tmp_path / "other" / "_work").exists()


@pytest.mark.slow
def test_world_training_is_deterministic_for_a_seed(tmp_path):
    from editbench.storage import read_tensors
    from editbench.toyworld.train import WorldConfig, train_world

    for name in ("a", "b"):
        train_world(tmp_path / name, cfg=WorldConfig.smoke(seed=5), progress=False)
    for f in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
              "vae/diffusion_pytorch_model.safetensors"):
        ta, tb = read_tensors(tmp_path / "a" / "model" / f), read_tensors(tmp_path / "b" / "model" / f)
        assert ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta), f


def test_object_weight_map_marks_objects_and_their_latent_neighbours():
    from editbench.toyworld.train import object_weight_map

    masks = torch.zeros(2, 8, 8, dtype=torch.uint8)
    masks[0, 2:4, 2:4] = 1                                  # latent pixel (1, 1) of a 4x4 grid
    masks[1, 7, 0] = 1                                      # a corner: latent pixel (3, 0)
    w = object_weight_map(masks, 4, 5.0)
    assert w.shape == (2, 1, 4, 4)
    expect0 = torch.ones(4, 4)
    expect0[0:3, 0:3] = 5.0                                  # (1, 1) and its 8 neighbours
    expect1 = torch.ones(4, 4)
    expect1[2:4, 0:2] = 5.0                                  # (3, 0) and its in-grid neighbours
    assert torch.equal(w[0, 0], expect0) and torch.equal(w[1, 0], expect1)
    assert torch.equal(object_weight_map(torch.zeros(1, 8, 8), 4, 5.0), torch.ones(1, 1, 4, 4))


def test_unet_lr_schedule_warms_up_holds_then_decays_linearly():
    from editbench.toyworld.train import _wsd_lambda

    f = _wsd_lambda(warmup=10, total=100, decay_fraction=0.2, final=0.25)   # decay over steps 80..99
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert all(f(s) == 1.0 for s in range(10, 80))
    assert [f(s) for s in (80, 89, 99)] == pytest.approx([1 - 0.75 / 20, 1 - 0.75 * 10 / 20, 0.25])
    assert f(150) == pytest.approx(0.25)                                    # past the end: stays at final
    g = _wsd_lambda(warmup=10, total=100, decay_fraction=0.0, final=0.25)   # no decay: constant after warm-up
    assert all(g(s) == 1.0 for s in range(10, 100))


def test_world_latent_cache_keeps_the_exact_latent_scale(tmp_path, monkeypatch):
    """A run resumed after the VAE stage takes the latent scale from the cache: it must be the exact float64 of
    a run in one go (a float32 copy gave the committed world a different decoder fine-tune and scaling_factor).
    The resumed world is compared with the one-go world bitwise: cached latents and scale, every exported config
    (the VAE's scaling_factor among them) and every exported weight."""
    import json

    from editbench.storage import read_tensors
    from editbench.toyworld import train as T

    cfg = T.WorldConfig.smoke()
    T.train_world(tmp_path / "once", cfg=cfg, progress=False)

    def stop(*a, **k):
        raise KeyboardInterrupt("stopped after the VAE stage")

    with monkeypatch.context() as m:                                    # first invocation: data + VAE only
        m.setattr(T, "stage_unet", stop)
        with pytest.raises(KeyboardInterrupt):
            T.train_world(tmp_path / "resumed", cfg=cfg, progress=False)
    assert (tmp_path / "resumed" / "_work" / "latents.safetensors").is_file()
    assert not (tmp_path / "resumed" / "model").exists()
    T.train_world(tmp_path / "resumed", cfg=cfg, progress=False)        # second invocation: reads the cache

    for run in ("once", "resumed"):
        scale = read_tensors(tmp_path / run / "_work" / "latents.safetensors")["scale"]
        exported = json.loads((tmp_path / run / "model" / "vae" / "config.json").read_text())["scaling_factor"]
        assert scale.dtype == torch.float64 and float(scale) == exported
    once, resumed = tmp_path / "once", tmp_path / "resumed"
    a, b = (read_tensors(run / "_work" / "latents.safetensors") for run in (once, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for f in sorted(p.relative_to(once) for p in once.rglob("*.json")
                    if "_work" not in p.parts and p.name != "training_log.json"):
        assert json.loads((once / f).read_text()) == json.loads((resumed / f).read_text()), f
    files = sorted(p.relative_to(once) for p in once.rglob("*.safetensors") if "_work" not in p.parts)
    assert files == sorted(p.relative_to(resumed) for p in resumed.rglob("*.safetensors") if "_work" not in p.parts)
    assert len(files) >= 4 and any(f.parts[-2] == "vae" for f in files)             # vae, unet, text, evaluator
    for f in files:                                                       # the decoder fine-tune divides by scale
        wa, wb = read_tensors(once / f), read_tensors(resumed / f)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f
