"""Metrics: float64 references, scales, composition score on constructed embeddings, model loading offline."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from editbench.errors import EditbenchError
from editbench.eval import metrics as M


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@settings(max_examples=30, deadline=None)
@given(arrays(np.float64, (5, 7), elements=st.floats(-10, 10)), arrays(np.float64, (3, 7), elements=st.floats(-10, 10)))
def test_cosine_matrix_matches_numpy(a, b):
    if (np.linalg.norm(a, axis=1) < 1e-3).any() or (np.linalg.norm(b, axis=1) < 1e-3).any():
        return
    got = M.cosine_matrix(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), _unit(a) @ _unit(b).T, atol=1e-6)  # float32 inputs, float64 math
    exact = M.cosine_matrix(torch.from_numpy(a), torch.from_numpy(b))
    np.testing.assert_allclose(exact.numpy(), _unit(a) @ _unit(b).T, atol=1e-12)


def test_scales_are_applied_per_item_and_aggregated_correctly():
    cos = torch.tensor([-0.2, 0.4], dtype=torch.float64)
    assert M.to_scale(cos, "cosine").tolist() == pytest.approx([-0.2, 0.4])
    assert M.to_scale(cos, "hessel").tolist() == pytest.approx([0.0, 1.0])       # 2.5 * max(cos, 0) per image
    assert M.to_scale(cos, "torchmetrics").tolist() == pytest.approx([-20.0, 40.0])
    assert M.aggregate(M.to_scale(cos, "hessel"), "hessel") == pytest.approx(0.5)
    assert M.aggregate(M.to_scale(cos, "torchmetrics"), "torchmetrics") == pytest.approx(10.0)
    neg = torch.tensor([-0.5, 0.1], dtype=torch.float64)
    # torchmetrics clamps after averaging: 0, not the mean of per-image clamped scores (5.0)
    assert M.aggregate(M.to_scale(neg, "torchmetrics"), "torchmetrics") == 0.0
    assert M.aggregate(M.to_scale(neg, "hessel"), "hessel") == pytest.approx(0.125)
    assert M.aggregate([1.0, float("nan"), 3.0], "cosine") == 2.0
    assert math.isnan(M.aggregate([], "cosine"))
    for bad in ("clip", "Cosine", ""):
        with pytest.raises(EditbenchError, match="scale"):
            M.to_scale(cos, bad)


def test_pair_alignment_is_the_mean_over_all_generated_reference_pairs():
    rng = np.random.default_rng(0)
    gen, ref = rng.normal(size=(6, 9)), rng.normal(size=(4, 9))
    cos = _unit(gen) @ _unit(ref).T
    per_image = M.pair_alignment(torch.from_numpy(gen), torch.from_numpy(ref))
    np.testing.assert_allclose(per_image.numpy(), cos.mean(1), atol=1e-12)
    assert float(per_image.mean()) == pytest.approx(cos.mean(), abs=1e-12)
    hes = M.pair_alignment(torch.from_numpy(gen), torch.from_numpy(ref), scale="hessel")
    np.testing.assert_allclose(hes.numpy(), (2.5 * np.maximum(cos, 0)).mean(1), atol=1e-12)


class _ToyClip(torch.nn.Module):
    """A deterministic 'CLIP': linear image and text towers (text = bag of character codes)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.wi = torch.nn.Parameter(torch.randn(3 * 4 * 4, 8, generator=g))
        self.wt = torch.nn.Parameter(torch.randn(32, 8, generator=g))

    def encode_image(self, x):
        return x.flatten(1) @ self.wi

    def encode_text(self, t):
        return t @ self.wt


def _toy_scorer():
    from torchvision.transforms.functional import to_tensor

    def tokenizer(texts):
        out = torch.zeros(len(texts), 32)
        for i, t in enumerate(texts):
            for ch in t:
                out[i, ord(ch) % 32] += 1
        return out

    model = _ToyClip()
    return M.ClipScorer(model, lambda img: to_tensor(img.resize((4, 4))), tokenizer, name="toy"), model


def _images(n, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)) for _ in range(n)]


def test_text_and_image_alignment_against_a_float64_reference():
    from torchvision.transforms.functional import to_tensor

    scorer, model = _toy_scorer()
    imgs, refs = _images(3), _images(2, seed=1)
    texts = ["a heart", "a star", "a heart"]
    with torch.no_grad():
        fi = model.encode_image(torch.stack([to_tensor(i) for i in imgs])).double().numpy()
        fr = model.encode_image(torch.stack([to_tensor(i) for i in refs])).double().numpy()
        ft = model.encode_text(scorer.tokenizer(texts)).double().numpy()
    want_t = (_unit(fi) * _unit(ft)).sum(1)
    np.testing.assert_allclose(M.text_alignment(scorer, imgs, texts).numpy(), want_t, atol=1e-6)
    np.testing.assert_allclose(M.text_alignment(scorer, imgs, texts, scale="hessel").numpy(),
                               2.5 * np.maximum(want_t, 0), atol=1e-5)
    np.testing.assert_allclose(M.image_alignment(scorer, imgs, refs).numpy(), (_unit(fi) @ _unit(fr).T).mean(1),
                               atol=1e-6)
    with pytest.raises(EditbenchError, match="one text per image"):
        M.text_alignment(scorer, imgs, ["a", "b"])
    with pytest.raises(EditbenchError, match="no images"):
        scorer.encode_images([])


def test_superclass_prompts():
    assert M.superclass_prompt("a {} on a red background", "heart") == "a heart on a red background"
    assert M.superclass_prompt("a {0} left of a {1}", ["heart", "star"]) == "a heart left of a star"
    assert M.fill_prompt("a {} in {braces}", ["<x> heart"]) == "a <x> heart in {braces}"
    with pytest.raises(EditbenchError, match="\\{1\\}"):
        M.superclass_prompt("a {0} alone", ["heart", "star"])


def test_composition_threshold_and_score_on_constructed_embeddings():
    # references of concept A: unit vectors near e0 with known pairwise cosines
    refs = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.8, 0.0, 0.6]], dtype=torch.float64)
    cos = (refs @ refs.T).numpy()
    loo = (cos.sum(1) - 1.0) / 2                                  # leave-one-out mean cosine of each reference
    assert loo.tolist() == pytest.approx([0.8, 0.72, 0.72])
    thr = M.composition_threshold(refs, quantile=0.5, margin=0.1)
    assert thr == pytest.approx(np.quantile(loo, 0.5) - 0.1)
    assert M.composition_threshold(refs, quantile=0.0, margin=0.0) == pytest.approx(0.72)
    assert math.isnan(M.composition_threshold(refs[:1]))
    with pytest.raises(EditbenchError, match="quantile"):
        M.composition_threshold(refs, quantile=1.5)

    align = torch.tensor([[0.9, 0.9], [0.9, 0.1], [0.1, 0.9], [0.7, 0.65]], dtype=torch.float64)
    hits = M.composition_hits(align, [0.6, 0.6])
    assert hits.tolist() == [True, False, False, True]
    assert M.composition_score(align, [0.6, 0.6]) == 0.5
    assert M.composition_score(align, [0.6, 0.7]) == 0.25           # per-concept thresholds
    assert math.isnan(M.composition_score(align, [0.6, math.nan]))
    with pytest.raises(EditbenchError, match="thresholds"):
        M.composition_hits(align, [0.5])


def test_artifact_stats_read_storage_time_and_memory(tmp_path):
    from editbench.methods.base import Artifact

    art = Artifact("x", {"w": torch.zeros(100)}, {"training": {"wall_time_s": 2.5, "peak_memory_bytes": 123,
                                                              "memory_kind": "cpu_rss_peak_delta", "steps": 7}})
    path = art.save(tmp_path / "a.safetensors")
    stats = M.artifact_stats(path)
    assert stats["storage_bytes"] == path.stat().st_size > 400
    assert (stats["train_time_s"], stats["peak_memory_bytes"], stats["train_steps"]) == (2.5, 123, 7)
    assert math.isnan(M.artifact_stats(Artifact("x", {"w": torch.zeros(1)}))["train_time_s"])


def test_load_clip_from_a_local_open_clip_folder(tmp_path):
    import open_clip
    from _eval_stubs import TINY_CLIP_CONFIG, tiny_clip
    from safetensors.torch import save_file

    ref = tiny_clip(seed=3)
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG,
                                                              "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in ref.model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    loaded = M.load_clip(folder)
    imgs = _images(2)
    np.testing.assert_allclose(loaded.encode_images(imgs).numpy(), ref.encode_images(imgs).numpy(), atol=1e-6)
    np.testing.assert_allclose(loaded.encode_texts(["a star"]).numpy(), ref.encode_texts(["a star"]).numpy(),
                               atol=1e-6)
    # a weights file plus its architecture name
    loaded2 = M.load_clip(folder / "open_clip_model.safetensors", arch="editbench-test-clip")
    np.testing.assert_allclose(loaded2.encode_images(imgs).numpy(), ref.encode_images(imgs).numpy(), atol=1e-6)
    assert "editbench-test-clip" in open_clip.list_models()
    with pytest.raises(EditbenchError, match="arch"):
        M.load_clip(folder / "open_clip_model.safetensors")
    with pytest.raises(EditbenchError, match="not found"):
        M.load_clip(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EditbenchError, match="open_clip_config.json"):
        M.load_clip(tmp_path / "empty")


def test_load_dino_from_a_transformers_folder_or_skip(tmp_path):
    from transformers import ViTConfig, ViTModel

    assert M.load_dino(None) is None                              # no weights: DINO scores are skipped
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                             num_attention_heads=2, intermediate_size=32), add_pooling_layer=False).eval()
    vit.save_pretrained(tmp_path / "dino")
    dino = M.load_dino(tmp_path / "dino")
    imgs = _images(3)
    emb = dino.encode_images(imgs)
    assert emb.shape == (3, 16) and torch.allclose(emb.norm(dim=1), torch.ones(3, dtype=torch.float64))
    with torch.no_grad():
        cls = vit(pixel_values=torch.stack([dino.transform(i) for i in imgs])).last_hidden_state[:, 0].double()
    np.testing.assert_allclose(emb.numpy(), (cls / cls.norm(dim=1, keepdim=True)).numpy(), atol=1e-6)
    with pytest.raises(EditbenchError, match="not found"):
        M.load_dino(tmp_path / "nope")


@pytest.mark.slow
def test_load_dino_from_a_timm_weights_file(tmp_path):
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    torch.save(model.state_dict(), tmp_path / "dino.pth")
    dino = M.load_dino(tmp_path / "dino.pth", arch="vit_tiny_patch16_224")
    assert dino.encode_images(_images(2)).shape == (2, 192)
    with pytest.raises(EditbenchError, match="do not fit"):
        M.load_dino(tmp_path / "dino.pth", arch="vit_small_patch16_224")
