"""Every method on the tiny SDXL and SD 2.x pipelines: fit 2 steps, apply, generate, undo, export and load the
export with diffusers' own loaders; SDXL's prompt encoding and added conditioning; pipeline classes no method
supports are refused by name."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from _method_helpers import _TMP, concept_for, editor, generate, small_corpus_fixture
from safetensors.torch import load_file

from editbench import methods
from editbench.errors import EditbenchError, TrainingError
from editbench.methods.base import Artifact
from editbench.pipelines import encode_text, text_stack
from editbench.testing import SDXL_TEXT_WIDTHS, tiny_pipeline, tiny_sd2_pipeline, tiny_sdxl_pipeline
from editbench.training import TrainingSession, encode_prompts

BUILDERS = {"sdxl": tiny_sdxl_pipeline, "sd2": tiny_sd2_pipeline}
METHODS = methods.available()
ENCODERS = ("text_encoder", "text_encoder_2")


small_corpus = small_corpus_fixture(400)  # Perfusion's covariance over 400 captions, cached per module


def snapshot(pipe) -> dict:
    """Every UNet / text-encoder tensor, both tokenizers' lengths and both input-embedding modules."""
    parts = [n for n in ("unet", *ENCODERS) if getattr(pipe, n, None) is not None]
    tensors = {f"{c}.{k}": v.detach().clone() for c in parts for k, v in getattr(pipe, c).state_dict().items()}
    return {"tensors": tensors,
            "tokenizers": [len(getattr(pipe, t)) for t in ("tokenizer", "tokenizer_2") if getattr(pipe, t, None)],
            "embeddings": [getattr(pipe, e).get_input_embeddings() for e in ENCODERS if getattr(pipe, e, None)],
            "modules": [(n, type(m)) for n, m in pipe.unet.named_modules()]}


def assert_same(before: dict, after: dict) -> None:
    assert after["tokenizers"] == before["tokenizers"] and after["modules"] == before["modules"]
    assert all(a is b for a, b in zip(after["embeddings"], before["embeddings"]))
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), f"{k} changed"


def prompt_for(name: str) -> str:
    c = concept_for(name)
    return f"a photo of a {c.placeholder} {c.superclass}"


@functools.cache
def fitted(kind: str, name: str, **overrides) -> Artifact:
    """2 steps of ``name`` on the tiny ``kind`` pipeline (cached); the pipeline must come out bitwise untouched."""
    pipe = BUILDERS[kind]()
    before = snapshot(pipe)
    art = editor(name, **overrides).fit(pipe, concept_for(name), steps=2, progress=False)
    assert_same(before, snapshot(pipe))
    path = art.save(_TMP / "pipelines" / f"{kind}-{name}-{abs(hash(tuple(sorted(overrides.items()))))}.safetensors")
    return methods.get(name)().load(path)


# ---------------------------------------------------------------------------------------------------- the table

@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("name", METHODS)
def test_fit_apply_generate_undo(kind, name):
    pipe = BUILDERS[kind]()
    before, base_img = snapshot(pipe), generate(pipe, prompt_for(name))
    art = fitted(kind, name)
    assert art.metadata["training"]["steps"] == 2 and art.base_fingerprint == methods.get(name)().fingerprint(pipe)
    handle = methods.get(name)().apply(pipe, art)
    edited = generate(pipe, prompt_for(name))
    assert edited.shape == base_img.shape == (1, 16, 16, 3) and np.isfinite(edited).all()
    assert not np.array_equal(edited, base_img), "applying the artifact did not change the output"
    handle.undo()
    assert_same(before, snapshot(pipe))
    assert np.array_equal(generate(pipe, prompt_for(name)), base_img)


@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("name", [m for m in METHODS if methods.get(m).can_export()])
def test_export_loads_with_diffusers(kind, name, tmp_path):
    """The export, loaded into a fresh pipeline with diffusers' own loader (Custom Diffusion: editbench's
    load_diffusers of diffusers' processors), generates what editbench's apply generates."""
    from diffusers import UNet2DConditionModel

    art, ed, prompt = fitted(kind, name), methods.get(name)(), prompt_for(name)
    ours = BUILDERS[kind]()
    base_img = generate(ours, prompt)
    with ed.apply(ours, art):
        expected = generate(ours, prompt)
    ed.export(art, tmp_path, ours)
    theirs = BUILDERS[kind]()
    sdxl = kind == "sdxl"
    if name == "textual_inversion":
        state = load_file(tmp_path / "learned_embeds.safetensors")
        token = art.metadata["placeholder"]
        if sdxl:
            assert set(state) == {"clip_l", "clip_g"}
            assert [tuple(state[k].shape) for k in ("clip_l", "clip_g")] == [(1, w) for w in SDXL_TEXT_WIDTHS]
            theirs.load_textual_inversion(state["clip_l"], token=token, text_encoder=theirs.text_encoder,
                                          tokenizer=theirs.tokenizer)
            theirs.load_textual_inversion(state["clip_g"], token=token, text_encoder=theirs.text_encoder_2,
                                          tokenizer=theirs.tokenizer_2)
            assert "state['clip_g']" in ed.export_usage(art, tmp_path)
        else:
            assert list(state) == [token]
            theirs.load_textual_inversion(str(tmp_path), token=token)
        got = generate(theirs, prompt)
    elif name == "lora":
        theirs.load_lora_weights(str(tmp_path), adapter_name="concept")
        got = generate(theirs, prompt)
    elif name == "dreambooth":
        unet = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
        theirs = type(theirs)(**{**theirs.components, "unet": unet})
        theirs.set_progress_bar_config(disable=True)
        got = generate(theirs, prompt)
        assert ("StableDiffusionXLPipeline" in ed.export_usage(art, tmp_path)) == sdxl
    elif name == "custom_diffusion":
        from editbench.methods.custom_diffusion import load_diffusers

        if sdxl:
            assert set(load_file(tmp_path / "<toy-star>.safetensors")) == {"clip_l", "clip_g"}
        with load_diffusers(theirs, tmp_path):
            got = generate(theirs, prompt)
    else:
        pytest.skip(f"no diffusers loader check written for {name}")
    assert np.abs(got - base_img).max() > 1e-4                     # the loaded export really acts
    assert np.allclose(got, expected, atol=1e-5), np.abs(got - expected).max()


@pytest.mark.parametrize("name", METHODS)
def test_sdxl_shaped_artifact_has_the_layout_of_a_trained_one(name):
    """``Editor.shaped_artifact`` (the storage benchmarks) builds, without training, what ``fit`` saves on SDXL."""
    pipe = tiny_sdxl_pipeline()
    before = snapshot(pipe)
    shaped = editor(name).shaped_artifact(pipe, concept_for(name))
    assert_same(before, snapshot(pipe))
    real = fitted("sdxl", name)
    shapes = {k: tuple(v.shape) for k, v in shaped.tensors.items()}
    assert shapes == {k: tuple(v.shape) for k, v in real.tensors.items()}


def test_prior_class_images_are_keyed_by_both_text_encoders():
    from editbench.methods.prior import _cache_key

    a, b = tiny_sdxl_pipeline(), tiny_sdxl_pipeline()
    key = _cache_key(a, "a photo of a star", 2, 16, 2, 3.0, 0)
    assert _cache_key(b, "a photo of a star", 2, 16, 2, 3.0, 0) == key
    with torch.no_grad():
        b.text_encoder_2.text_model.final_layer_norm.weight.add_(1.0)
    assert _cache_key(b, "a photo of a star", 2, 16, 2, 3.0, 0) != key


# ---------------------------------------------------------------------------------------- SDXL's conditioning

def test_sdxl_encoding_is_the_pipelines_own():
    pipe = tiny_sdxl_pipeline()
    prompts = ["a photo of a star", "a star on the grass"]
    ours = encode_prompts(pipe, prompts)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert torch.equal(ours.hidden, embeds) and torch.equal(ours.pooled, pooled)
    assert ours.hidden.shape == (2, 77, sum(SDXL_TEXT_WIDTHS)) and ours.pooled.shape == (2, 32)
    stack = text_stack(pipe)
    assert [(p.encoder, p.start, p.stop, p.layer) for p in stack.parts] == [
        ("text_encoder", 0, 24, -2), ("text_encoder_2", 24, 64, -2)] and stack.pooled and stack.sdxl
    # SD 1.x / 2.x: a plain tensor, the last hidden state, as before
    for pipe in (tiny_pipeline(), tiny_sd2_pipeline()):
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert torch.equal(encode_prompts(pipe, prompts), pipe.text_encoder(ids)[0])
        assert encode_text(pipe, prompts).pooled is None


def test_sdxl_training_passes_pooled_embeddings_and_time_ids():
    """The UNet gets added_cond_kwargs: the pooled embeddings and (H, W, 0, 0, H, W) at the training resolution;
    a session that returns hidden states only on SDXL is a TrainingError that says what to return."""
    seen = []
    pipe = tiny_sdxl_pipeline()
    hook = pipe.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("added_cond_kwargs")),
                                               with_kwargs=True)
    editor("textual_inversion").fit(pipe, concept_for("textual_inversion"), steps=1, progress=False)
    hook.remove()
    (added,) = seen
    assert added["text_embeds"].shape == (2, 32)
    assert added["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]] * 2

    from editbench.training import ParamGroup, TrainConfig, train

    class HiddenOnly(TrainingSession):
        def __init__(self):
            self.p = torch.nn.Parameter(torch.zeros(1))

        def param_groups(self):
            return [ParamGroup("p", [self.p], 1e-3)]

        def encode(self, prompts):
            return encode_prompts(pipe, prompts).hidden + self.p

    with pytest.raises(TrainingError, match="pooled"):
        train(pipe, concept_for("textual_inversion"), HiddenOnly(), TrainConfig(steps=1, batch_size=1),
              progress=False)


def test_sdxl_textual_inversion_trains_one_row_per_encoder():
    art = fitted("sdxl", "textual_inversion")
    assert {k: tuple(v.shape) for k, v in art.tensors.items()} == {"embeddings": (1, 24), "embeddings_2": (1, 40)}
    pipe = tiny_sdxl_pipeline()
    star = [getattr(pipe, e).get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("star</w>")]
            for e in ENCODERS]
    assert all(not torch.equal(art.tensors[k][0], s) for k, s in zip(("embeddings", "embeddings_2"), star))
    with methods.get("textual_inversion")().apply(pipe, art) as handle:
        for e, key in zip(ENCODERS, ("embeddings", "embeddings_2")):
            new_id = handle.info["token_ids" if e == "text_encoder" else "token_ids_2"][0]
            row = getattr(pipe, e).get_input_embeddings()(torch.tensor([[new_id]]))[0, 0]
            assert torch.equal(row, art.tensors[key][0])
    with pytest.raises(EditbenchError, match="text encoder"):  # an SDXL artifact on a one-encoder pipeline
        methods.get("textual_inversion")().check_artifact(art, tiny_pipeline())


def test_sdxl_dreambooth_with_both_text_encoders(tmp_path):
    from transformers import CLIPTextModelWithProjection

    art = fitted("sdxl", "dreambooth", train_text_encoder=True)
    assert art.metadata["components"] == ["unet", "text_encoder", "text_encoder_2"]
    pipe = tiny_sdxl_pipeline()
    base = {k: v.clone() for k, v in pipe.text_encoder_2.state_dict().items()}
    ed = methods.get("dreambooth")()
    with ed.apply(pipe, art):
        assert any(not torch.equal(v, base[k]) for k, v in pipe.text_encoder_2.state_dict().items())
        expected = generate(pipe, prompt_for("dreambooth"))
    ed.export(art, tmp_path)
    te2 = CLIPTextModelWithProjection.from_pretrained(tmp_path, subfolder="text_encoder_2")
    assert all(torch.equal(v, art.tensors[f"text_encoder_2.{k}"]) for k, v in te2.state_dict().items())
    assert "text_encoder_2=text_encoder_2" in ed.export_usage(art, tmp_path)
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    theirs = type(pipe)(**{**pipe.components, "unet": UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet"),
                           "text_encoder": CLIPTextModel.from_pretrained(tmp_path, subfolder="text_encoder"),
                           "text_encoder_2": te2})
    theirs.set_progress_bar_config(disable=True)
    assert np.allclose(generate(theirs, prompt_for("dreambooth")), expected, atol=1e-6)


def test_sdxl_custom_diffusion_edits_the_2048_style_context_and_merges():
    """K/V of every cross-attention layer read the concatenated context (24 + 40 = 64 wide); the modifier token
    has a row in each encoder; the closed-form merge runs on the concatenated keys and meets its constraints."""
    from editbench.methods.custom_diffusion import deltas

    art = fitted("sdxl", "custom_diffusion")
    d = deltas(art)
    assert len(d) == 16 and all(v.shape[1] == 64 for v in d.values())  # 8 layers x (K, V)
    assert art.tensors["modifier_embeddings"].shape == (1, 24)
    assert art.tensors["modifier_embeddings_2"].shape == (1, 40)
    pipe = tiny_sdxl_pipeline()
    ed = editor("custom_diffusion")
    result = ed.merge(pipe, [art])
    assert result.keys.shape[1] == 64
    for name, w in result.weights.items():
        v = result.values[name]
        assert (w @ result.keys.T - v.T).abs().max() <= 1e-10 * v.abs().max()


# ----------------------------------------------------------------------------------------------- SD 2.x shape

def test_sd2_pipeline_is_shaped_like_sd2():
    pipe = tiny_sd2_pipeline()
    cfg = pipe.text_encoder.config
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert cfg.hidden_act == "gelu" and cfg.hidden_size == pipe.unet.config.cross_attention_dim == 48
    assert pipe.tokenizer.pad_token == "!" and pipe.unet.config.use_linear_projection
    assert not text_stack(pipe).sdxl and text_stack(pipe).parts[0].layer is None


# ---------------------------------------------------------------------------------- unsupported pipeline classes

def _dit_pipeline():
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    from editbench.testing import tiny_vae

    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=8)
    return DiTPipeline(transformer=dit, vae=tiny_vae(), scheduler=DDIMScheduler())


def _sdxl_refiner():
    from diffusers import StableDiffusionXLImg2ImgPipeline

    base = tiny_sdxl_pipeline()
    return StableDiffusionXLImg2ImgPipeline(vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2,
                                            tokenizer=None, tokenizer_2=base.tokenizer_2, unet=base.unet,
                                            scheduler=base.scheduler, requires_aesthetics_score=False)


@pytest.mark.parametrize("build,cls", [(_dit_pipeline, "DiTPipeline"),
                                       (_sdxl_refiner, "StableDiffusionXLImg2ImgPipeline")])
@pytest.mark.parametrize("name", METHODS)
def test_unsupported_pipeline_classes_are_refused_by_name(name, build, cls):
    pipe, ed = build(), methods.get(name)()
    with pytest.raises(EditbenchError, match=f"{name} does not support {cls}"):
        ed.fit(pipe, concept_for(name), steps=1, progress=False)
    with pytest.raises(EditbenchError, match=f"{name} does not support {cls}"):
        ed.apply(pipe, fitted("sdxl", name), allow_fingerprint_mismatch=True)
    with pytest.raises(EditbenchError, match=f"{name} does not support {cls}"):
        ed.fingerprint(pipe)
    if ed.export_needs_pipeline:
        with pytest.raises(EditbenchError, match=cls):
            ed.export(fitted("sdxl", name), _TMP / "refused", pipe)


def test_pipelines_with_foreign_parts_are_refused_by_name():
    from editbench.testing import tiny_text_encoder

    pipe = tiny_sdxl_pipeline()
    pipe.text_encoder_2 = tiny_text_encoder(40)                      # no projection: no pooled embedding
    with pytest.raises(EditbenchError, match="lora does not support StableDiffusionXLPipeline: .*text_projection"):
        methods.get("lora")().fit(pipe, concept_for("lora"), steps=1, progress=False)
    pipe = tiny_sdxl_pipeline()
    pipe.text_encoder_2 = tiny_text_encoder(48, projection_dim=32)   # 24 + 48 != 64
    with pytest.raises(EditbenchError, match=r"widths \(24 \+ 48\) do not add up .* 64"):
        methods.get("perfusion")().fingerprint(pipe)


def test_sdxl_artifacts_do_not_fit_sd_pipelines_and_back():
    for name in METHODS:
        ed = methods.get(name)()
        with pytest.raises(EditbenchError):
            ed.apply(tiny_pipeline(), fitted("sdxl", name), allow_fingerprint_mismatch=True)
        with pytest.raises(EditbenchError):
            ed.apply(tiny_sdxl_pipeline(), fitted("sd2", name), allow_fingerprint_mismatch=True)


def test_cli_export_on_an_sdxl_model_folder(tmp_path, capsys):
    """``editbench export --model FOLDER`` loads the folder's own pipeline class (here StableDiffusionXLPipeline),
    checks the artifact against it and prints SDXL's two-call loading code."""
    from editbench.cli import main

    folder = tmp_path / "sdxl"
    tiny_sdxl_pipeline().save_pretrained(folder)
    art = tmp_path / "ti.safetensors"
    fitted("sdxl", "textual_inversion").save(art)
    capsys.readouterr()
    assert main(["export", str(art), "--out", str(tmp_path / "out"), "--model", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2" in out
    assert set(load_file(tmp_path / "out" / "learned_embeds.safetensors")) == {"clip_l", "clip_g"}
    other = tmp_path / "sd"
    tiny_pipeline().save_pretrained(other)
    assert main(["export", str(art), "--out", str(tmp_path / "out2"), "--model", str(other)]) == 2  # SDXL vs SD 1.x
    assert "base model" in capsys.readouterr().err
