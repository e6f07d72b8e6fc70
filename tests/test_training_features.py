"""The optional training features of ``TrainConfig`` on the tiny pipeline: gradient checkpointing, mixed precision,
the training resolution, learning-rate schedules (and their exact resume), validation images, TensorBoard logs,
8-bit Adam, class-image controls, and the ``editbench train`` flags that set them.

Every feature is off by default; the defaults train bitwise as before (the method and resume tests elsewhere hold
them to that). Here each feature is checked to do what it says: the recomputation counted, the autocast dtype seen
by a hook, the learning rate read from the optimizer at every step against its closed form, the latent size seen
by the UNet, the validation images against an image sampled from the trained artifact.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from _method_helpers import assert_same, concept_for, editor, snapshot
from PIL import Image

from editbench import methods, training
from editbench.errors import EditbenchError, TrainingError
from editbench.methods.dreambooth.config import DreamBoothConfig
from editbench.methods.prior import make_prior
from editbench.methods.tokens import initial_rows
from editbench.storage import read_safetensors, write_safetensors
from editbench.testing import tiny_pipeline
from editbench.training import loop
from editbench.training.session import LR_SCHEDULERS, TrainConfig

METHODS = ("textual_inversion", "perfusion", "custom_diffusion", "dreambooth", "lora")
TEXT_ENCODER_IN_GRAPH = {"textual_inversion": True, "perfusion": True, "custom_diffusion": True,
                         "dreambooth": True, "lora": False}   # dreambooth here with train_text_encoder=True
NO_PRIOR = {"with_prior_preservation": False}


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def _kw(name: str, **kw) -> dict:
    """Fast settings: no class images, and for DreamBooth the text encoder trained too (so it is in the graph)."""
    out = dict(kw)
    if name == "dreambooth":
        out.setdefault("train_text_encoder", True)
    fields = {f.name for f in dataclasses.fields(methods.get(name).Config)}
    out.update({k: v for k, v in NO_PRIOR.items() if k in fields and k not in out})
    return out


def _fit(pipe, name: str, steps: int = 2, checkpoint_dir=None, seed: int = 0, **kw):
    return editor(name, **_kw(name, **kw)).fit(pipe, concept_for(name), steps=steps, seed=seed, progress=False,
                                               checkpoint_dir=checkpoint_dir)


class _Counter:
    """Forward calls of a module while gradients are on (class images and validation run without them). The hook
    is a plain function, so that a deep copy of the module (DreamBooth trains one) counts here too."""

    def __init__(self, module: torch.nn.Module):
        self.n = 0

        def hook(module, args, out):
            self.n += torch.is_grad_enabled()

        self.handle = module.register_forward_hook(hook)

    def remove(self):
        self.handle.remove()


def _unet_q(pipe):
    # early in a transformer block diffusers checkpoints, on every method's gradient path (backward reaches the
    # text through its attention; checkpointing recomputes only the blocks the backward pass goes through)
    return pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q


def _text_q(pipe):
    # the first projection of a layer the text encoder checkpoints (a recomputation stops early, once it has what
    # the backward pass needs: a hook on a module it leaves unfinished would not fire)
    enc = pipe.text_encoder
    enc = getattr(enc, "text_model", enc)                           # transformers < 5 nests the model
    return enc.encoder.layers[0].self_attn.q_proj


# ---------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    ({"gradient_checkpointing": "yes"}, "gradient_checkpointing"),
    ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
    ({"resolution": 0}, "resolution must be a positive int"),
    ({"resolution": True}, "resolution must be a positive int"),
    ({"lr_scheduler": "step"}, "lr_scheduler must be one of"),
    ({"lr_warmup_steps": -1}, "lr_warmup_steps must be an int >= 0"),
    ({"lr_warmup_steps": 3}, "'constant' has none: use 'constant_with_warmup'"),
    ({"lr_scheduler": "cosine_with_restarts", "lr_num_cycles": 0}, "lr_num_cycles"),
    ({"validation_every": -2}, "validation_every must be an int >= 0"),
    ({"validation_prompts": "a photo of {}"}, "validation_prompts must be a list"),
    ({"validation_prompts": ("",)}, "validation_prompts must be a list"),
    ({"validation_prompts": ("a {name} here",)}, "only '{}'"),
    ({"validation_inference_steps": 0}, "validation_inference_steps"),
    ({"validation_guidance_scale": float("nan")}, "validation_guidance_scale"),
    ({"log_with": "wandb"}, "log_with must be None or 'tensorboard'"),
    ({"optimizer": "sgd"}, "optimizer must be one of"),
])
def test_feature_fields_are_validated_with_clear_errors(bad, match):
    with pytest.raises(EditbenchError, match=match):
        TrainConfig(**bad).validate()
    with pytest.raises(EditbenchError, match=match):
        methods.get("textual_inversion")(**bad)


def test_class_image_controls_are_validated():
    for bad in ({"class_resolution": 0}, {"class_resolution": 1.5}, {"num_class_images": 0}):
        with pytest.raises(EditbenchError, match=next(iter(bad))):
            DreamBoothConfig(**bad).validate()
    DreamBoothConfig(class_resolution=24, num_class_images=3).validate()


def test_valid_feature_values_pass_and_defaults_keep_the_run_signature():
    TrainConfig(gradient_checkpointing=True, mixed_precision="bf16", resolution=512, lr_scheduler="cosine",
                lr_warmup_steps=10, validation_every=5, validation_prompts=("a {} on a table", "a {0} and a {1}"),
                log_with="tensorboard", optimizer="adamw8bit").validate()   # values only: no import needed
    for name in METHODS:
        cfg = methods.get(name).Config()
        new = {"gradient_checkpointing", "mixed_precision", "resolution", "lr_scheduler", "lr_warmup_steps",
               "lr_num_cycles", "validation_every", "validation_prompts", "validation_inference_steps",
               "validation_guidance_scale", "log_with", "class_resolution"}
        # class_data_dir is new too, except where a method's default changed what earlier runs did (Custom
        # Diffusion's real class images): there it is in the signature, so an older checkpoint is not resumed
        new |= {"class_data_dir"} & set(cfg.LATER_FIELDS)
        before = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(cfg))).items()
                  if k not in ("steps", "checkpoint_every") and k not in new}
        assert cfg.run_signature() == before   # checkpoints written before these fields existed still resume
    assert methods.get("custom_diffusion").Config().run_signature()["class_data_dir"] == "auto"
    sig = TrainConfig(resolution=64, lr_scheduler="linear").run_signature()
    assert sig["resolution"] == 64 and sig["lr_scheduler"] == "linear" and sig["steps"] == 400
    assert "validation_every" not in TrainConfig(validation_every=3).run_signature()   # may change on resume


# ---------------------------------------------------------------------------------------------------------------
# gradient checkpointing
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", METHODS)
def test_gradient_checkpointing_recomputes_gives_the_same_training_and_is_switched_off_after(pipe, name):
    before, switches = snapshot(pipe), _switches(pipe)
    counts = {}
    for gc in (False, True):
        unet, text = _Counter(_unet_q(pipe)), _Counter(_text_q(pipe))
        flags = []
        probe = pipe.unet.register_forward_pre_hook(lambda m, a: flags.append(m.is_gradient_checkpointing))
        try:
            art = _fit(pipe, name, gradient_checkpointing=gc)
        finally:
            unet.remove(), text.remove(), probe.remove()
        counts[gc] = (unet.n, text.n, art)
        assert flags and set(flags) == {gc}     # (DreamBooth: on its UNet copy, which carries the hook)
    (u0, t0, a0), (u1, t1, a1) = counts[False], counts[True]
    assert u0 > 0 and u1 == 2 * u0                                  # every UNet block forward ran again in backward
    assert t1 == (2 * t0 if TEXT_ENCODER_IN_GRAPH[name] else t0)    # the text encoder: only where trained through
    assert a0.tensors.keys() == a1.tensors.keys()
    for k, v in a0.tensors.items():
        torch.testing.assert_close(a1.tensors[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert a1.metadata["training"]["loss_first"] == pytest.approx(a0.metadata["training"]["loss_first"], rel=1e-6)
    assert not pipe.unet.is_gradient_checkpointing
    assert _switches(pipe) == switches                                   # every attribute as it was
    assert_same(before, snapshot(pipe))


def _switches(pipe) -> list:
    """The checkpointing attributes of every UNet and text-encoder module (absent: a marker)."""
    return [(c, n, a, vars(m).get(a, "absent")) for c in ("unet", "text_encoder")
            for n, m in getattr(pipe, c).named_modules()
            for a in ("gradient_checkpointing", "_gradient_checkpointing_func", "forward")]


def test_gradient_checkpointing_the_user_enabled_stays_enabled(pipe):
    def func(module, *args):
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    switches = _switches(pipe)
    pipe.unet.enable_gradient_checkpointing(func)
    try:
        enabled = _switches(pipe)
        _fit(pipe, "textual_inversion", gradient_checkpointing=True)
        assert _switches(pipe) == enabled and pipe.unet.is_gradient_checkpointing
    finally:
        for c, n, attr, value in switches:                 # back to the module fixture's state
            m = getattr(pipe, c).get_submodule(n)
            if value == "absent":
                vars(m).pop(attr, None)
            else:
                setattr(m, attr, value)
    assert _switches(pipe) == switches


def test_gradient_checkpointing_of_an_unsupported_unet_is_a_clear_error(pipe, monkeypatch):
    monkeypatch.setattr(type(pipe.unet), "_supports_gradient_checkpointing", False)
    with pytest.raises(EditbenchError, match="does not support it.*gradient_checkpointing=False"):
        _fit(pipe, "textual_inversion", gradient_checkpointing=True)


# ---------------------------------------------------------------------------------------------------------------
# mixed precision
# ---------------------------------------------------------------------------------------------------------------

class _Recording(torch.optim.AdamW):
    """AdamW that records, at every step, each group's lr and the dtypes of its parameters and gradients."""

    log: list = []

    def step(self, closure=None):
        type(self).log.append([(g["lr"], [(p.dtype, None if p.grad is None else p.grad.dtype) for p in g["params"]])
                               for g in self.param_groups])
        return super().step(closure)


@pytest.fixture
def recording(monkeypatch):
    monkeypatch.setattr(_Recording, "log", [])
    monkeypatch.setitem(loop.OPTIMIZERS, "adamw", _Recording)
    return _Recording.log


def _dtype_probe(pipe):
    seen = {"unet": set(), "text": set()}
    hooks = [pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_q.register_forward_hook(
                 lambda m, a, out: seen["unet"].add(out.dtype) if torch.is_grad_enabled() else None),
             _text_q(pipe).register_forward_hook(
                 lambda m, a, out: seen["text"].add(out.dtype) if torch.is_grad_enabled() else None)]
    return seen, hooks


@pytest.mark.cuda
@pytest.mark.parametrize("name", METHODS)
def test_bf16_autocast_runs_the_forward_in_bf16_and_keeps_trained_parameters_float32(pipe, name, recording):
    before = snapshot(pipe)
    seen, hooks = _dtype_probe(pipe)
    try:
        art = _fit(pipe, name, mixed_precision="bf16")
    finally:
        for h in hooks:
            h.remove()
    assert seen["unet"] == {torch.bfloat16} and seen["text"] == {torch.bfloat16}
    assert recording and all(p == torch.float32 and g == torch.float32
                             for step in recording for _, ps in step for p, g in ps if g is not None)
    assert math.isfinite(art.metadata["training"]["loss_last"])
    assert "fp16_skipped_steps" not in art.metadata["training"]
    assert_same(before, snapshot(pipe))


def test_no_mixed_precision_runs_float32(pipe):
    seen, hooks = _dtype_probe(pipe)
    try:
        _fit(pipe, "textual_inversion")
    finally:
        for h in hooks:
            h.remove()
    assert seen == {"unet": {torch.float32}, "text": {torch.float32}}


@pytest.mark.cuda
def test_fp16_scales_the_loss_and_unscales_before_the_step(pipe, monkeypatch):
    calls = []

    class Spy(torch.amp.GradScaler):
        def scale(self, outputs):
            calls.append("scale")
            return super().scale(outputs)

        def unscale_(self, optimizer):
            calls.append("unscale")
            return super().unscale_(optimizer)

        def step(self, optimizer, *a, **kw):
            calls.append("step")
            return super().step(optimizer, *a, **kw)

    monkeypatch.setattr(torch.amp, "GradScaler", Spy)
    seen, hooks = _dtype_probe(pipe)
    try:
        art = _fit(pipe, "perfusion", steps=2, grad_accum=2, mixed_precision="fp16")
    finally:
        for h in hooks:
            h.remove()
    assert calls == ["scale", "scale", "unscale", "step"] * 2     # per micro-batch, then per optimizer step
    assert seen["unet"] == {torch.float16}
    assert art.metadata["training"]["fp16_skipped_steps"] == 0


@pytest.mark.cuda
def test_fp16_skips_the_steps_whose_gradients_overflow(pipe, monkeypatch):
    class Huge(torch.amp.GradScaler):
        def __init__(self, device="cuda", init_scale=2.0 ** 16, *a, **kw):
            super().__init__(device, 2.0 ** 120, *a, **kw)       # scaled fp16 gradients overflow

    monkeypatch.setattr(torch.amp, "GradScaler", Huge)
    art = _fit(pipe, "textual_inversion", steps=2, mixed_precision="fp16", embedding_norm_cap=None)
    assert art.metadata["training"]["fp16_skipped_steps"] == 2
    assert torch.equal(art.tensors["embeddings"], initial_rows(pipe, ["star"]))   # no step was taken


@pytest.mark.cuda
def test_mixed_precision_the_device_cannot_run_is_a_clear_error(pipe, monkeypatch):
    monkeypatch.setattr(torch.amp, "is_autocast_available", lambda device_type: False)
    with pytest.raises(EditbenchError, match=r"mixed_precision='fp16' cannot run on cpu.*no autocast"):
        _fit(pipe, "textual_inversion", mixed_precision="fp16")
    monkeypatch.undo()

    class Ignored:  # an autocast that silently does nothing (as torch does for a dtype a device lacks)
        def __init__(self, *a, **kw):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch, "autocast", Ignored)
    with pytest.raises(EditbenchError, match=r"mixed_precision='bf16'.*ran in torch.float32"):
        _fit(pipe, "textual_inversion", mixed_precision="bf16")


# ---------------------------------------------------------------------------------------------------------------
# resolution and class images
# ---------------------------------------------------------------------------------------------------------------

def _latent_sizes(pipe):
    sizes = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, args: sizes.append(tuple(args[0].shape[-2:])) if torch.is_grad_enabled() else None)
    return sizes, hook


@pytest.mark.parametrize("name", ["perfusion", "custom_diffusion"])
def test_resolution_override_changes_the_latent_size_the_unet_sees(pipe, name):
    factor = pipe.vae_scale_factor
    for resolution, want in ((None, pipe.unet.config.sample_size), (32, 32 // factor)):
        sizes, hook = _latent_sizes(pipe)
        try:
            _fit(pipe, name, resolution=resolution, augment=False)
        finally:
            hook.remove()
        assert sizes and set(sizes) == {(want, want)}


def test_resolution_not_a_multiple_of_the_vae_factor_is_a_clear_error(pipe):
    with pytest.raises(EditbenchError, match=r"resolution=33 is not a multiple of this VAE's scale factor 2"):
        _fit(pipe, "lora", resolution=33)


def test_class_images_are_generated_at_class_resolution_cached_by_it_and_encoded_at_the_training_size(pipe, tmp_path):
    concept = concept_for("dreambooth")
    kw = {"num_class_images": 3, "class_inference_steps": 2, "class_cache_dir": str(tmp_path)}
    folders: dict[int, Path] = {}                   # generation size -> cache entry
    for class_resolution, resolution in ((None, None), (24, None), (None, 32), (24, 32)):
        prior = make_prior(pipe, concept, DreamBoothConfig(**kw, class_resolution=class_resolution,
                                                           resolution=resolution))
        train_px = resolution or 16
        made_px = class_resolution or train_px
        assert prior.stats[0][0].shape == (3, 4, train_px // 2, train_px // 2)       # latents at training size
        new = set(tmp_path.iterdir()) - set(folders.values())
        if made_px in folders:
            assert not new                                                           # a cache hit
        else:
            assert len(new) == 1                                                     # a cache entry of its own
            folders[made_px] = new.pop()
        pngs = sorted(folders[made_px].glob("*.png"))
        assert len(pngs) == 3 and {Image.open(p).size for p in pngs} == {(made_px, made_px)}
    assert sorted(folders) == [16, 24, 32]


def test_training_with_class_resolution_sees_instance_and_class_latents_at_the_training_size(pipe, tmp_path):
    sizes, hook = _latent_sizes(pipe)
    try:
        editor("dreambooth", class_resolution=24, resolution=32, class_cache_dir=str(tmp_path)).fit(
            pipe, concept_for("dreambooth"), steps=1, progress=False)
    finally:
        hook.remove()
    assert sizes == [(16, 16), (16, 16)]                             # instance loss, then prior loss
    assert {Image.open(p).size for p in tmp_path.rglob("*.png")} == {(24, 24)}


# ---------------------------------------------------------------------------------------------------------------
# learning-rate schedules
# ---------------------------------------------------------------------------------------------------------------

def _closed_form(name: str, k: int, warmup: int, total: int, cycles: int = 1) -> float:
    """The schedule's factor at optimizer step k (1-based): diffusers' lambda at k - 1."""
    s = k - 1
    if name == "constant":
        return 1.0
    if s < warmup:
        return s / max(1, warmup)
    if name == "constant_with_warmup":
        return 1.0
    progress = (s - warmup) / max(1, total - warmup)
    if name == "linear":
        return max(0.0, (total - s) / max(1, total - warmup))
    if name == "cosine":
        return max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))
    return 0.0 if progress >= 1 else max(0.0, 0.5 * (1 + math.cos(math.pi * ((cycles * progress) % 1.0))))


@pytest.mark.parametrize("schedule", LR_SCHEDULERS)
def test_learning_rate_follows_the_schedule_at_every_step(pipe, schedule, recording):
    steps, warmup = 7, 0 if schedule == "constant" else 3
    cfg = methods.get("perfusion").Config()
    _fit(pipe, "perfusion", steps=steps, batch_size=1, lr_scheduler=schedule, lr_warmup_steps=warmup,
         lr_num_cycles=2)
    assert len(recording) == steps
    for k, step in enumerate(recording, start=1):
        f = _closed_form(schedule, k, warmup, steps, cycles=2)
        (lr_values, _), (lr_embedding, _) = step
        assert lr_values == pytest.approx(cfg.lr_values * f, rel=1e-12, abs=1e-18), (schedule, k)
        assert lr_embedding == pytest.approx(cfg.lr_embedding * f, rel=1e-12, abs=1e-18), (schedule, k)
    if schedule == "constant":
        assert all(s[0][0] == cfg.lr_values for s in recording)      # exactly the group's lr, as without schedules


class _Stop(Exception):
    pass


_real_save = loop.save_checkpoint


def _interrupt_after(monkeypatch, at: int):
    """Make the run stop right after writing its checkpoint of step ``at`` (an interruption)."""
    real = loop.save_checkpoint

    def save(path, **kw):
        real(path, **kw)
        if kw["step"] == at:
            raise _Stop

    monkeypatch.setattr(loop, "save_checkpoint", save)


@pytest.mark.parametrize("kw", [
    {"lr_scheduler": "cosine", "lr_warmup_steps": 2},
    {"lr_scheduler": "linear", "lr_warmup_steps": 1, "mixed_precision": "fp16", "gradient_checkpointing": True},
])
def test_resume_with_a_schedule_is_bitwise_exact(pipe, tmp_path, monkeypatch, recording, kw):
    full = _fit(pipe, "perfusion", steps=6, checkpoint_every=1, **kw)
    lrs = [s[0][0] for s in recording]
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(_Stop):
        _fit(pipe, "perfusion", steps=6, checkpoint_dir=tmp_path, checkpoint_every=1, **kw)
    monkeypatch.setattr(loop, "save_checkpoint", _real_save)
    _, header = read_safetensors(tmp_path / training.CHECKPOINT_FILE, "checkpoint")
    info = json.loads(header["editbench_checkpoint"])
    assert info["step"] == 3 and info["lr_scheduler"]["last_epoch"] == 3
    assert ("grad_scaler" in info) == (kw.get("mixed_precision") == "fp16")
    del recording[:]
    resumed = _fit(pipe, "perfusion", steps=6, checkpoint_dir=tmp_path, checkpoint_every=1, **kw)
    assert resumed.metadata["training"]["resumed_from"] == 3
    assert [s[0][0] for s in recording] == lrs[3:]                  # the schedule continues where it stopped
    for k, v in full.tensors.items():
        assert torch.equal(resumed.tensors[k], v), k


def test_a_checkpoint_without_scheduler_state_resumes_the_schedule_from_its_step(pipe, tmp_path, monkeypatch):
    kw = {"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 4, "checkpoint_every": 1}
    full = _fit(pipe, "textual_inversion", steps=5, **kw)
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(_Stop):
        _fit(pipe, "textual_inversion", steps=5, checkpoint_dir=tmp_path, **kw)
    monkeypatch.setattr(loop, "save_checkpoint", _real_save)
    path = tmp_path / training.CHECKPOINT_FILE
    tensors, header = read_safetensors(path, "checkpoint")
    info = json.loads(header["editbench_checkpoint"])
    del info["lr_scheduler"]                                          # as written before schedules existed
    write_safetensors(path, tensors, {"editbench_checkpoint": json.dumps(info)})
    resumed = _fit(pipe, "textual_inversion", steps=5, checkpoint_dir=tmp_path, **kw)
    assert resumed.metadata["training"]["resumed_from"] == 2
    assert torch.equal(resumed.tensors["embeddings"], full.tensors["embeddings"])


def test_damaged_scheduler_state_and_a_changed_total_are_refused(pipe, tmp_path):
    kw = {"lr_scheduler": "linear", "checkpoint_every": 1}
    _fit(pipe, "textual_inversion", steps=2, checkpoint_dir=tmp_path, **kw)
    with pytest.raises(TrainingError, match="belongs to another run"):   # a linear schedule depends on the total
        _fit(pipe, "textual_inversion", steps=4, checkpoint_dir=tmp_path, **kw)
    path = tmp_path / training.CHECKPOINT_FILE
    tensors, header = read_safetensors(path, "checkpoint")
    info = json.loads(header["editbench_checkpoint"])
    info["lr_scheduler"]["optimizer"] = "not a field"
    write_safetensors(path, tensors, {"editbench_checkpoint": json.dumps(info)})
    with pytest.raises(TrainingError, match="damaged"):
        _fit(pipe, "textual_inversion", steps=2, checkpoint_dir=tmp_path, **kw)


# ---------------------------------------------------------------------------------------------------------------
# validation images
# ---------------------------------------------------------------------------------------------------------------

def test_validation_images_appear_at_their_steps_from_the_trained_state_and_leave_training_unchanged(pipe,
                                                                                                     tmp_path):
    before, attrs = snapshot(pipe), dict(vars(pipe))
    scheduler_state = dict(vars(pipe.scheduler))
    prompts = ("a photo of {}", "{} on a table")
    art = _fit(pipe, "textual_inversion", steps=4, checkpoint_dir=tmp_path, validation_every=2,
               validation_prompts=prompts, validation_inference_steps=2)
    folder = tmp_path / "validation"
    assert sorted(p.name for p in folder.iterdir()) == ["step_00002", "step_00004"]
    for step in ("step_00002", "step_00004"):
        assert sorted(p.name for p in (folder / step).iterdir()) == ["00.png", "01.png", "prompts.json"]
        assert json.loads((folder / step / "prompts.json").read_text()) == {
            "00.png": "a photo of <toy-star>", "01.png": "<toy-star> on a table"}
    assert_same(before, snapshot(pipe))
    assert vars(pipe).keys() == attrs.keys()            # sampling set no attribute of the pipeline (it used a copy)
    assert all(vars(pipe)[k] is v for k, v in attrs.items() if k != "_internal_dict")   # (the config: re-made equal
    assert vars(pipe)["_internal_dict"] == attrs["_internal_dict"]                      # by any EditHandle undo)
    assert vars(pipe.scheduler).keys() == scheduler_state.keys()
    assert all(vars(pipe.scheduler)[k] is v for k, v in scheduler_state.items())    # sampled on a copy
    plain = _fit(pipe, "textual_inversion", steps=4)
    assert torch.equal(art.tensors["embeddings"], plain.tensors["embeddings"])    # sampling took no randomness
    # the step-2 image is what the step-2 artifact samples (same prompt, sampler and seed)
    at2 = _fit(pipe, "textual_inversion", steps=2)
    ed = methods.get("textual_inversion")()
    handle = ed.apply(pipe, at2)
    try:
        for i, prompt in enumerate(["a photo of <toy-star>", "<toy-star> on a table"]):
            want = pipe(prompt, num_inference_steps=2, guidance_scale=7.5, height=16, width=16,
                        generator=torch.Generator().manual_seed(i)).images[0]
            got = Image.open(folder / "step_00002" / f"{i:02d}.png")
            assert np.array_equal(np.asarray(got), np.asarray(want))
    finally:
        handle.undo()
    assert not np.array_equal(np.asarray(Image.open(folder / "step_00002" / "00.png")),
                              np.asarray(Image.open(folder / "step_00004" / "00.png")))   # it kept training


@pytest.mark.parametrize("name", ["perfusion", "custom_diffusion", "dreambooth", "lora"])
def test_validation_images_for_every_method(pipe, tmp_path, name):
    before = snapshot(pipe)
    art = _fit(pipe, name, steps=2, checkpoint_dir=tmp_path, validation_every=1, validation_inference_steps=2)
    imgs = sorted(tmp_path.glob("validation/step_*/*.png"))
    assert [p.parent.name for p in imgs] == ["step_00001", "step_00002"]
    phrase = methods.get(name)().phrase(art)
    assert phrase in json.loads((tmp_path / "validation/step_00001/prompts.json").read_text())["00.png"]
    assert_same(before, snapshot(pipe))


def test_validation_and_logs_need_a_checkpoint_dir(pipe):
    with pytest.raises(EditbenchError, match="validation images are written beside the checkpoint"):
        _fit(pipe, "textual_inversion", validation_every=1)


# ---------------------------------------------------------------------------------------------------------------
# TensorBoard
# ---------------------------------------------------------------------------------------------------------------

def test_tensorboard_missing_is_a_clear_error_naming_the_package(pipe, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # as if tensorboard were not installed
    ed = editor("textual_inversion", log_with="tensorboard")            # the config itself is fine
    with pytest.raises(EditbenchError, match="needs the tensorboard package: pip install tensorboard"):
        ed.fit(pipe, concept_for("textual_inversion"), steps=1, progress=False, checkpoint_dir=tmp_path)
    assert not (tmp_path / training.CHECKPOINT_FILE).exists()


def test_tensorboard_logs_loss_learning_rates_and_validation_images(pipe, tmp_path, monkeypatch):
    events = []

    class Writer:
        def __init__(self, log_dir):
            events.append(("open", log_dir))

        def add_scalar(self, tag, value, step):
            events.append((tag, value, step))

        def add_image(self, tag, image, step, dataformats):
            events.append((tag, image.shape, step, dataformats))

        def flush(self):
            events.append(("flush",))

        def close(self):
            events.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    _fit(pipe, "textual_inversion", steps=2, checkpoint_dir=tmp_path, log_with="tensorboard",
         lr_scheduler="constant_with_warmup", lr_warmup_steps=2, validation_every=2, validation_inference_steps=2,
         checkpoint_every=1)
    cfg = methods.get("textual_inversion").Config()
    assert events[0] == ("open", str(tmp_path / "logs")) and events[-1] == ("close",)
    assert [e[2] for e in events if e[0] == "train/loss"] == [1, 2]
    assert all(math.isfinite(e[1]) for e in events if e[0] == "train/loss")
    assert [(e[1], e[2]) for e in events if e[0] == "train/lr/embeddings"] == [(0.0, 1), (cfg.lr / 2, 2)]
    assert [e[1:] for e in events if e[0] == "validation/00"] == [((16, 16, 3), 2, "HWC")]
    assert events.count(("flush",)) == 2


def test_tensorboard_writes_event_files(pipe, tmp_path):
    pytest.importorskip("tensorboard")
    _fit(pipe, "textual_inversion", steps=2, checkpoint_dir=tmp_path, log_with="tensorboard")
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------------------------------------------
# 8-bit Adam
# ---------------------------------------------------------------------------------------------------------------

def test_adamw8bit_without_bitsandbytes_is_a_clear_error(pipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    ed = editor("textual_inversion", optimizer="adamw8bit")
    with pytest.raises(EditbenchError, match="optimizer='adamw8bit' needs bitsandbytes.*pip install bitsandbytes"):
        ed.fit(pipe, concept_for("textual_inversion"), steps=1, progress=False)


class _FakeAdamW8bit(torch.optim.AdamW):
    """Stands in for bitsandbytes' AdamW8bit where it is not installed: state with an int counter and a uint8
    tensor of another shape, as 8-bit optimizers keep (quantised moments, block maxima, a Python step count)."""

    made: list = []

    def __init__(self, params, **kw):
        type(self).made.append(kw)
        super().__init__(params, **kw)

    def step(self, closure=None):
        out = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                st["count"] = int(st.get("count", 0)) + 1
                st["q"] = torch.full((3,), st["count"], dtype=torch.uint8)
        return out


def test_adamw8bit_is_bitsandbytes_adamw8bit_and_its_state_checkpoints_and_resumes_exactly(pipe, tmp_path,
                                                                                          monkeypatch):
    bnb = types.ModuleType("bitsandbytes")
    bnb.optim = types.SimpleNamespace(AdamW8bit=_FakeAdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", bnb)
    monkeypatch.setattr(_FakeAdamW8bit, "made", [])
    full = _fit(pipe, "textual_inversion", steps=4, optimizer="adamw8bit", adam_betas=(0.8, 0.99))
    assert _FakeAdamW8bit.made == [{"betas": (0.8, 0.99), "eps": 1e-8}]
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(_Stop):
        _fit(pipe, "textual_inversion", steps=4, optimizer="adamw8bit", adam_betas=(0.8, 0.99),
             checkpoint_dir=tmp_path, checkpoint_every=1)
    monkeypatch.setattr(loop, "save_checkpoint", _real_save)
    tensors, header = read_safetensors(tmp_path / training.CHECKPOINT_FILE, "checkpoint")
    assert json.loads(header["editbench_checkpoint"])["optimizer_scalars"] == {"optim/embeddings/0/count": 2}
    assert tensors["optim/embeddings/0/q"].dtype == torch.uint8
    resumed = _fit(pipe, "textual_inversion", steps=4, optimizer="adamw8bit", adam_betas=(0.8, 0.99),
                   checkpoint_dir=tmp_path, checkpoint_every=1)
    assert resumed.metadata["training"]["resumed_from"] == 2
    assert torch.equal(resumed.tensors["embeddings"], full.tensors["embeddings"])


def test_adamw8bit_with_bitsandbytes(pipe):
    pytest.importorskip("bitsandbytes")
    art = _fit(pipe, "textual_inversion", steps=2, optimizer="adamw8bit")
    assert math.isfinite(art.metadata["training"]["loss_last"])


# ---------------------------------------------------------------------------------------------------------------
# editbench train
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDITBENCH_CACHE", str(tmp_path / "cache"))


def test_train_flags_set_the_training_options(tmp_path, capsys, _cache):
    from editbench.cli import main
    from editbench.methods.base import Artifact

    out, ckpt = tmp_path / "ti.safetensors", tmp_path / "ckpt"
    assert main(["train", "--method", "textual_inversion", "--concept", "zebra", "--steps", "2",
                 "--set", "batch_size=1", "--gradient-checkpointing", "--mixed-precision", "bf16",
                 "--resolution", "64", "--lr-scheduler", "linear", "--lr-warmup-steps", "1",
                 "--validation-every", "2", "--validation-prompt", "a {} on the grass",
                 "--validation-prompt", "two {}", "--set", "validation_inference_steps=2",
                 "--checkpoint-dir", str(ckpt), "--out", str(out)]) == 0
    cfg = Artifact.load(out).metadata["config"]
    assert {k: cfg[k] for k in ("gradient_checkpointing", "mixed_precision", "resolution", "lr_scheduler",
                                "lr_warmup_steps", "validation_every", "validation_prompts")} == {
        "gradient_checkpointing": True, "mixed_precision": "bf16", "resolution": 64, "lr_scheduler": "linear",
        "lr_warmup_steps": 1, "validation_every": 2, "validation_prompts": ["a {} on the grass", "two {}"]}
    assert sorted(p.name for p in (ckpt / "validation" / "step_00002").glob("*.png")) == ["00.png", "01.png"]
    assert Image.open(ckpt / "validation" / "step_00002" / "00.png").size == (64, 64)


def test_train_class_image_flags(tmp_path, _cache):
    from editbench.commands import train_overrides
    from editbench.cli import build_parser

    args = build_parser().parse_args(["train", "--method", "dreambooth", "--concept", "zebra", "--out", "x",
                                      "--num-class-images", "3", "--class-resolution", "48",
                                      "--optimizer", "adam", "--log-with", "tensorboard"])
    assert train_overrides(args) == {"num_class_images": 3, "class_resolution": 48, "optimizer": "adam",
                                     "log_with": "tensorboard"}
    assert train_overrides(build_parser().parse_args(["train", "--method", "lora", "--out", "x"])) == {}


def test_train_flag_mistakes_are_one_line_errors(tmp_path, capsys, monkeypatch, _cache):
    from editbench.cli import main

    base = ["train", "--method", "textual_inversion", "--concept", "zebra", "--steps", "1", "--out",
            str(tmp_path / "x.safetensors")]
    assert main([*base, "--class-resolution", "48"]) == 2
    assert "unknown textual_inversion option(s) ['class_resolution']" in capsys.readouterr().err
    assert main([*base, "--resolution", "64", "--set", "resolution=32"]) == 2
    assert "resolution given twice" in capsys.readouterr().err
    assert main([*base, "--lr-scheduler", "cosine_with_whatever"]) == 2
    assert "lr_scheduler must be one of" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    assert main([*base, "--optimizer", "adamw8bit"]) == 2
    assert "pip install bitsandbytes" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert main([*base, "--log-with", "tensorboard", "--checkpoint-dir", str(tmp_path / "c")]) == 2
    assert "pip install tensorboard" in capsys.readouterr().err
    assert not Path(tmp_path / "x.safetensors").exists()
