"""Interface-level tests: registry, ConceptData validation, Artifact I/O, EditHandle, the shared training loop.

The training-loop tests use a minimal method defined here (one new token embedding row), so they do not depend
on any real method.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from editbench import methods
from editbench.concepts import ConceptData, model_resolution
from editbench.errors import ArtifactError, ConceptDataError, EditbenchError, TrainingError
from editbench.methods.base import Artifact, EditHandle, Editor
from editbench.methods.tokens import ExtendedEmbedding, add_tokens, single_token_id
from editbench.testing import tiny_pipeline
from editbench.training import (
    CHECKPOINT_FILE,
    ParamGroup,
    TrainConfig,
    TrainingSession,
    encode_prompts,
    masked_mse,
)


def write_images(folder: Path, n: int, size=(20, 24), seed: int = 0, mode: str = "RGB") -> list[Path]:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        arr = (torch.rand(shape, generator=g) * 255).byte().numpy()
        paths.append(folder / f"{mode}{i}.png")
        Image.fromarray(arr, mode).save(paths[-1])
    return paths


# ---------------------------------------------------------------------------------------------------------------
# a minimal method: trains one new token row (textual-inversion-like); `fail_at` injects a NaN loss
# ---------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class DummyConfig(TrainConfig):
    lr: float = 0.05
    fail_at: int = 0


class DummySession(TrainingSession):
    def __init__(self, pipe, concept, handle, config):
        self.pipe, self.config = pipe, config
        sup = single_token_id(pipe.tokenizer, concept.superclass)
        self.row = torch.nn.Parameter(pipe.text_encoder.get_input_embeddings().weight[sup].detach().clone()[None])
        add_tokens(handle, pipe, [concept.placeholder], self.row)

    def param_groups(self):
        return [ParamGroup("embedding", [self.row], self.config.lr)]

    def encode(self, prompts):
        return encode_prompts(self.pipe, prompts)

    def extra_loss(self, ctx):
        return torch.tensor(float("nan")) if ctx.step == self.config.fail_at else None

    def artifact(self, result):
        return Artifact("dummy", {"embedding": self.row.detach()[0].clone()}, {"losses": result.losses})


class DummyEditor(Editor):
    name = "dummy"
    Config = DummyConfig

    def prepare_training(self, pipeline, concept, handle, config):
        return DummySession(pipeline, concept, handle, config)

    def check_artifact(self, artifact, pipeline=None):
        if set(artifact.tensors) != {"embedding"}:
            raise ArtifactError(f"unknown tensors {sorted(artifact.tensors)}")

    def install(self, pipeline, artifacts, handle, settings):
        add_tokens(handle, pipeline, [artifacts[0].metadata["concept"]["placeholder"]],
                   artifacts[0].tensors["embedding"][None])


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture
def concept(tmp_path):
    return ConceptData("<thing>", "dog", write_images(tmp_path / "img", 3),
                       masks=write_images(tmp_path / "mask", 3, mode="L"))


def snapshot(pipe):
    return {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
            for name in ("unet", "text_encoder", "vae")}


def assert_same(pipe, snap):
    for name, sd in snap.items():
        now = getattr(pipe, name).state_dict()
        assert now.keys() == sd.keys()
        assert all(torch.equal(now[k], v) for k, v in sd.items()), name


# ---------------------------------------------------------------------------------------------------------------
# registry and editor construction
# ---------------------------------------------------------------------------------------------------------------

def test_registry_lists_builtins_and_rejects_unknown_names():
    names = methods.available()
    assert "perfusion" in names and names == sorted(names)
    assert methods.get("perfusion").name == "perfusion"
    with pytest.raises(EditbenchError, match="unknown method 'nope'.*perfusion"):
        methods.get("nope")


def test_register_rejects_non_editors_and_name_clashes():
    with pytest.raises(EditbenchError):
        methods.register(int)

    class Clash(Editor):
        name = "perfusion"

    with pytest.raises(EditbenchError, match="taken"):
        methods.register(Clash)
    assert methods.get("perfusion") is not Clash


def test_editor_config_overrides_are_checked():
    assert DummyEditor(steps=3).config.steps == 3
    with pytest.raises(EditbenchError, match="unknown dummy option.*'stepz'"):
        DummyEditor(stepz=3)
    for bad in ({"steps": 0}, {"batch_size": -1}, {"optimizer": "sgd"}, {"checkpoint_every": -1}):
        with pytest.raises(EditbenchError):
            DummyEditor(**bad)
    with pytest.raises(EditbenchError, match="unknown dummy inference setting"):
        DummyEditor().settings(1, beta=0.5)


def test_compose_without_merge_raises():
    with pytest.raises(EditbenchError, match="no merge"):
        DummyEditor().compose([])


def test_export_without_a_format_raises():
    assert not DummyEditor.can_export()
    with pytest.raises(EditbenchError, match="dummy has no diffusers export format"):
        DummyEditor().export(Artifact("dummy", {}), "unused")
    exporters = {n for n in methods.available() if methods.get(n).can_export()}
    assert {"textual_inversion", "lora", "dreambooth", "custom_diffusion"} <= exporters
    assert "perfusion" not in exporters


# ---------------------------------------------------------------------------------------------------------------
# ConceptData
# ---------------------------------------------------------------------------------------------------------------

def test_concept_data_loads_images_and_masks_at_model_resolution(pipe, concept):
    size = model_resolution(pipe)
    assert size == pipe.unet.config.sample_size * pipe.vae_scale_factor
    images, masks = concept.load_images(size), concept.load_masks(size)
    assert images.shape == (3, 3, size, size) and masks.shape == (3, 1, size, size)
    assert images.min() >= -1 and images.max() <= 1 and images.min() < -0.5 < 0.5 < images.max()
    assert masks.min() >= 0 and masks.max() <= 1
    assert concept.prompts()[0] == "a photo of a <thing>"
    assert concept.prompts("<new1> dog")[0] == "a photo of a <new1> dog"


def test_concept_data_rejects_bad_inputs(tmp_path, pipe):
    good = write_images(tmp_path / "ok", 2)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[0].read_bytes()[:60])
    cases = [
        ({"images": []}, "at least one image"),
        ({"images": str(good[0])}, "list"),
        ({"images": [tmp_path / "missing.png"]}, "does not exist"),
        ({"images": [corrupt]}, "corrupt"),
        ({"images": [truncated]}, "corrupt"),
        ({"images": good, "masks": good[:1]}, "1 masks for 2 images"),
        ({"images": good, "masks": write_images(tmp_path / "m", 2, size=(8, 8), mode="L")}, "must match"),
        ({"images": good, "templates": ["no placeholder here"]}, "exactly once"),
        ({"images": good, "placeholder": "two words"}, "placeholder"),
        ({"images": good, "placeholder": "dog"}, "same word"),
        ({"images": [torch.zeros(3, 4)]}, "tensor"),
    ]
    for kwargs, msg in cases:
        args = {"placeholder": "<thing>", "superclass": "dog"} | kwargs
        with pytest.raises(ConceptDataError, match=msg):
            ConceptData(**args)
    tok = pipe.tokenizer
    with pytest.raises(ConceptDataError, match="already a token"):
        ConceptData("cat", "dog", good).check_tokens(tok)
    with pytest.raises(ConceptDataError, match="exactly one"):
        ConceptData("<thing>", "xyzzyplughwobble", good).check_tokens(tok)
    with pytest.raises(ConceptDataError, match="single-token"):
        ConceptData("<thing>", "dog", good).check_tokens(tok, new_placeholder=False)
    ConceptData("sks", "dog", good).check_tokens(tok, new_placeholder=False)
    ConceptData("<thing>", "dog", good).check_tokens(tok)


# ---------------------------------------------------------------------------------------------------------------
# Artifact
# ---------------------------------------------------------------------------------------------------------------

def _artifact():
    g = torch.Generator().manual_seed(1)
    return Artifact("dummy", {"a": torch.randn(7, generator=g), "b": torch.randn(3, 4, generator=g),
                              "n": torch.arange(5)}, {"note": "hi", "base_fingerprint": "0123"})


def test_artifact_round_trip_is_exact_and_nbytes_is_the_file_size(tmp_path):
    art = _artifact()
    path = art.save(tmp_path / "a.safetensors")
    back = Artifact.load(path, method="dummy")
    assert back.method == "dummy" and back.tensors.keys() == art.tensors.keys()
    assert all(torch.equal(back.tensors[k], v) and back.tensors[k].dtype == v.dtype for k, v in art.tensors.items())
    assert back.metadata == art.metadata
    meta = back.metadata
    assert meta["note"] == "hi" and meta["shapes"]["b"] == [3, 4] and meta["dtypes"]["n"] == "int64"
    assert meta["format"] == "editbench-artifact/1" and meta["library_version"]
    assert back.nbytes == art.nbytes == os.path.getsize(path)
    assert Artifact("x", {"t": torch.zeros(3)}).nbytes > 12  # never saved: size it would have
    half = art.save(tmp_path / "h.safetensors", dtype=torch.float16)
    back16 = Artifact.load(half)
    assert back16.tensors["a"].dtype == torch.float16 and back16.tensors["n"].dtype == torch.int64
    assert back16.nbytes < back.nbytes


def test_artifact_load_reports_missing_truncated_corrupt_and_foreign_files(tmp_path):
    path = _artifact().save(tmp_path / "a.safetensors")
    raw = path.read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    cases = {"truncated": raw[:-7], "header_cut": raw[:30], "empty": b"", "garbage": b"not a file at all",
             "bitflip": raw[:header + 5] + bytes([raw[header + 5] ^ 0x10]) + raw[header + 6:]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ArtifactError, match="truncated|corrupt"):
            Artifact.load(tmp_path / name)
    with pytest.raises(ArtifactError, match="does not exist"):
        Artifact.load(tmp_path / "missing.safetensors")
    with pytest.raises(ArtifactError, match="not a file"):
        Artifact.load(tmp_path)
    with pytest.raises(ArtifactError, match="'dummy' artifact, not a 'perfusion'"):
        Artifact.load(path, method="perfusion")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ArtifactError, match="not an editbench artifact"):
        Artifact.load(tmp_path / "plain.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "fmt.safetensors"),
              metadata={"editbench": json.dumps({"format": "v99", "method": "dummy", "checksum": ""})})
    with pytest.raises(ArtifactError, match="format"):
        Artifact.load(tmp_path / "fmt.safetensors")


def test_artifact_save_is_atomic(tmp_path, monkeypatch):
    path = _artifact().save(tmp_path / "a.safetensors")
    before = path.read_bytes()
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        Artifact("dummy", {"a": torch.ones(3)}).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]  # no temporary file left behind
    with pytest.raises(EditbenchError, match="JSON"):
        Artifact("dummy", {"a": torch.ones(1)}, {"bad": object()}).save(tmp_path / "b.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# EditHandle and tokens
# ---------------------------------------------------------------------------------------------------------------

def test_edit_handle_undoes_last_in_first_out():
    class Obj:
        x = 1

    o = Obj()
    with EditHandle(None, "outer") as outer:
        outer.set_attr(o, "x", 2)
        inner = EditHandle(None, "inner")
        inner.set_attr(o, "x", 3)
        with pytest.raises(EditbenchError, match="undo the later edit first"):
            outer.undo()
        assert o.x == 3 and outer.active
        inner.undo()
        assert o.x == 2
    assert o.x == 1 and not outer.active
    outer.undo()  # idempotent


def test_add_tokens_leaves_the_base_untouched(pipe):
    tok, emb = pipe.tokenizer, pipe.text_encoder.get_input_embeddings()
    keys = set(pipe.text_encoder.state_dict())
    ids0 = tok(["a photo of a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    base_out = pipe.text_encoder(ids0)[0]
    rows = torch.randn(2, emb.weight.shape[1])
    with EditHandle(pipe, "t") as h:
        ids = add_tokens(h, pipe, ["<a>", "<b>"], rows)
        assert ids == [len(tok), len(tok) + 1] and pipe.tokenizer is not tok and len(tok) == 49408
        assert isinstance(pipe.text_encoder.get_input_embeddings(), ExtendedEmbedding)
        assert set(pipe.text_encoder.state_dict()) == keys  # state-dict keys unchanged
        e = pipe.text_encoder.get_input_embeddings()(torch.tensor([[ids[1], 1929, ids[0]]]))
        assert torch.equal(e[0, 0], rows[1]) and torch.equal(e[0, 2], rows[0])
        assert torch.equal(e[0, 1], emb.weight[1929])
        assert torch.equal(pipe.text_encoder(ids0)[0], base_out)
        assert pipe.tokenizer.batch_decode(ids0[:, :6]) == tok.batch_decode(ids0[:, :6])
        with pytest.raises(ConceptDataError, match="already a token"):
            add_tokens(h, pipe, ["<a>"], rows[:1])
        with pytest.raises(EditbenchError, match="share memory"):
            add_tokens(h, pipe, ["<c>"], pipe.text_encoder.get_input_embeddings().weight[5:6])
    assert pipe.tokenizer is tok and pipe.text_encoder.get_input_embeddings() is emb
    assert tok("<a>", add_special_tokens=False).input_ids != [ids[0]]


# ---------------------------------------------------------------------------------------------------------------
# the training loop
# ---------------------------------------------------------------------------------------------------------------

def test_masked_mse_weights_pixels():
    pred, target = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2)
    target[..., 0, 0] = 3.0
    mask = torch.zeros(1, 1, 2, 2)
    mask[..., 0, 0] = 1.0
    assert masked_mse(pred, target) == pytest.approx((2 * 9 + 6 * 1) / 8)
    assert masked_mse(pred, target, mask) == pytest.approx(9.0)
    assert masked_mse(pred, target, torch.ones(1, 1, 2, 2)) == pytest.approx(masked_mse(pred, target))


def test_fit_leaves_pipeline_untouched_and_records_metadata(pipe, concept):
    snap, tok, modes = snapshot(pipe), pipe.tokenizer, pipe.unet.training
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    art = DummyEditor(steps=2, batch_size=2, checkpoint_every=0).fit(pipe, concept, progress=False)
    assert_same(pipe, snap)
    assert pipe.tokenizer is tok and pipe.unet.training == modes
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags
    meta = art.metadata
    assert meta["base_fingerprint"] == DummyEditor().fingerprint(pipe) and meta["config"]["steps"] == 2
    assert meta["training"]["steps"] == 2 and meta["training"]["wall_time_s"] > 0
    assert meta["training"]["memory_kind"] in ("cpu_rss_peak_delta", "cuda_max_allocated")
    assert meta["concept"] == {"placeholder": "<thing>", "superclass": "dog", "images": 3}
    assert len(meta["losses"]) == 2


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(pipe, concept, tmp_path):
    kw = {"batch_size": 2, "grad_accum": 2, "checkpoint_every": 2}
    full = DummyEditor(steps=5, **kw).fit(pipe, concept, progress=False, checkpoint_dir=tmp_path / "a")
    part = DummyEditor(steps=3, **kw).fit(pipe, concept, progress=False, checkpoint_dir=tmp_path / "b")
    assert (tmp_path / "b" / CHECKPOINT_FILE).is_file()
    resumed = DummyEditor(steps=5, **kw).fit(pipe, concept, progress=False, checkpoint_dir=tmp_path / "b")
    assert resumed.metadata["training"]["resumed_from"] == 3
    assert torch.equal(resumed.tensors["embedding"], full.tensors["embedding"])
    assert not torch.equal(part.tensors["embedding"], full.tensors["embedding"])
    assert resumed.metadata["losses"] == full.metadata["losses"]
    with pytest.raises(TrainingError, match="another run"):  # other hyper-parameters: refuse the checkpoint
        DummyEditor(steps=6, lr=0.1, **kw).fit(pipe, concept, progress=False, checkpoint_dir=tmp_path / "b")
    with pytest.raises(TrainingError, match="beyond steps"):
        DummyEditor(steps=2, **kw).fit(pipe, concept, progress=False, checkpoint_dir=tmp_path / "b")


def test_non_finite_loss_names_the_step_and_keeps_the_last_checkpoint(pipe, concept, tmp_path):
    snap = snapshot(pipe)
    ckpt = tmp_path / CHECKPOINT_FILE
    with pytest.raises(TrainingError, match="at step 3.*last checkpoint"):
        DummyEditor(steps=5, batch_size=1, checkpoint_every=2, fail_at=3).fit(pipe, concept, progress=False,
                                                                              checkpoint_dir=tmp_path)
    kept = ckpt.read_bytes()
    assert json.loads(json.loads(kept[8:8 + int.from_bytes(kept[:8], "little")])["__metadata__"]
                      ["editbench_checkpoint"])["step"] == 2
    assert_same(pipe, snap)
    assert not isinstance(pipe.text_encoder.get_input_embeddings(), ExtendedEmbedding)


def test_apply_checks_fingerprints_and_undoes(pipe, concept):
    art = Artifact("dummy", {"embedding": torch.zeros(32)},
                   {"base_fingerprint": "ffffffffffffffff", "concept": {"placeholder": "<thing>", "superclass": "dog"}})
    with pytest.raises(EditbenchError, match="ffffffffffffffff.*" + DummyEditor().fingerprint(pipe)):
        DummyEditor().apply(pipe, art)
    tok = pipe.tokenizer
    with DummyEditor().apply(pipe, art, allow_fingerprint_mismatch=True) as handle:
        assert pipe.tokenizer is not tok and handle.active
    assert pipe.tokenizer is tok
    with pytest.raises(ArtifactError, match="'perfusion' artifact cannot"):
        DummyEditor().apply(pipe, Artifact("perfusion", {}), allow_fingerprint_mismatch=True)
    with pytest.raises(EditbenchError, match="at most 1"):
        DummyEditor().apply(pipe, [art, art], allow_fingerprint_mismatch=True)
