"""Perfusion's editor: key-locking inside a real pipeline call, apply/undo, artifacts, training, trained keys. (The
gated rank-1 math alone: ``test_perfusion_math.py``.)

The text covariance is computed over the first 400 default captions (patched) into a temporary cache, to keep
the run short; everything else is the real code path.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from _method_helpers import small_corpus_fixture
from test_perfusion_math import STEEP  # steep gates: the concept token hits its targets

from editbench.concepts import ConceptData
from editbench.errors import ArtifactError, ConceptDataError, EditbenchError
from editbench.methods import get
from editbench.methods.base import Artifact, EditHandle
from editbench.methods.perfusion import (
    GatedRank1Linear,
    PerfusionConfig,
    PerfusionEditor,
    text_covariance,
)
from editbench.methods.tokens import add_tokens, single_token_id, token_position
from editbench.sites import find_cross_attention_sites
from editbench.storage import cache_root
from editbench.testing import tiny_pipeline, unet_config
from editbench.training import encode_prompts, tokenize


small_corpus = small_corpus_fixture(400)  # Perfusion's covariance over 400 captions, cached per module


@pytest.fixture
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def concept(tmp_path_factory):
    folder = tmp_path_factory.mktemp("concept")
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(2):
        paths.append(folder / f"{i}.png")
        Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()).save(paths[-1])
    return ConceptData("<thing>", "dog", paths, templates=["a photo of a {}", "a {} on the grass"])


def snapshot(pipe):
    return {n: {k: v.clone() for k, v in getattr(pipe, n).state_dict().items()} for n in ("unet", "text_encoder")}


def unchanged(pipe, snap) -> bool:
    return all(torch.equal(getattr(pipe, n).state_dict()[k], v) for n, sd in snap.items() for k, v in sd.items())


def images(pipe, prompt, **kw):
    return pipe(prompt, num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                output_type="pt", **kw).images


# ---------------------------------------------------------------------------------------------------------------
# crafted artifacts: i* is exactly the concept token's encoding in a known prompt
# ---------------------------------------------------------------------------------------------------------------

def craft(pipe, words: list[tuple[str, str]], prompt: str, seed: int = 0) -> list[Artifact]:
    """One artifact per (placeholder, superclass): random embedding near the superclass row, random o*_V, and
    i* = the encoding of the placeholder in ``prompt`` (all placeholders present, as after apply)."""
    g = torch.Generator().manual_seed(seed)
    weight = pipe.text_encoder.get_input_embeddings().weight
    rows = torch.stack([weight[single_token_id(pipe.tokenizer, s)] for _, s in words]).detach().clone()
    rows += 0.5 * weight.std() * torch.randn(rows.shape, generator=g)
    with EditHandle(pipe, "probe") as h:
        ids_new = add_tokens(h, pipe, [p for p, _ in words], rows)
        ids = tokenize(pipe, [prompt])
        with torch.no_grad():
            hidden = pipe.text_encoder(ids)[0][0]                                        # (n, d)
        i_stars = [hidden[int(token_position(ids, t)[0])] for t in ids_new]
    fp = PerfusionEditor().fingerprint(pipe)
    sites = find_cross_attention_sites(pipe.unet)
    return [Artifact("perfusion", {"embedding": rows[k], "i_star": i_stars[k].clone(),
                                   **{f"o_v.{s.name}": torch.randn(s.value_features, generator=g) for s in sites}},
                     {"concept": {"placeholder": p, "superclass": s}, "base_fingerprint": fp,
                      "config": {"cov_ridge": PerfusionConfig.cov_ridge}})
            for k, (p, s) in enumerate(words)]


def capture(handle) -> dict[str, list]:
    """Record (input, output) of every Perfusion layer's first call."""
    seen: dict[str, list] = {}

    def hook(name):
        def record(mod, args, out):
            seen.setdefault(name, [args[0].detach(), out.detach()])  # returns None: output untouched
        return record

    for name, layer in handle.info["layers"].items():
        handle.add_hook(layer.register_forward_hook(hook(name)))
    return seen


@pytest.mark.parametrize("lock", ["local", "global"])
def test_key_locking_inside_an_ordinary_pipeline_call(pipe, lock):
    prompt, super_prompt = "a photo of a <thing> on the grass", "a photo of a dog on the grass"
    (art,) = craft(pipe, [("<thing>", "dog")], prompt)
    with torch.no_grad():
        x_super = encode_prompts(pipe, [super_prompt])[0]                                # (n, d) base encoder
    handle = PerfusionEditor().apply(pipe, art, lock=lock, **STEEP)
    seen = capture(handle)
    images(pipe, prompt)                                                                 # CFG batch [uncond, cond]
    pos = int(token_position(tokenize(pipe, [prompt]), handle.info["token_ids"][0])[0])
    assert pos == 5
    for name, layer in handle.info["layers"].items():
        x, out = seen[name]
        assert x.shape[0] == 2 and torch.equal(x[1, pos], art.tensors["i_star"])        # cond row, concept token
        w = layer.weight
        if layer.role == "key":
            expect = x_super @ w.T if lock == "global" else x_super[pos] @ w.T          # superclass keys
            got = out[1] if lock == "global" else out[1, pos]
            torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
        else:
            site = name.removesuffix(".to_v")
            torch.testing.assert_close(out[1, pos], art.tensors[f"o_v.{site}"], rtol=1e-4, atol=1e-5)
    handle.undo()


@pytest.mark.parametrize("source", ["settings", "artifact", "trained-keys"])
def test_concept_only_gate_inside_a_pipeline_call(pipe, source):
    prompt = "a photo of a <thing> on the grass"
    (art,) = craft(pipe, [("<thing>", "dog")], prompt)
    if source == "trained-keys":  # no key-locking: the text-encoder hook is still needed for the positions
        g = torch.Generator().manual_seed(5)
        art.metadata["config"]["key_locking"] = False
        art.tensors.update({f"o_k.{s.name}": torch.randn(s.key_features, generator=g)
                            for s in find_cross_attention_sites(pipe.unet)})
    if source != "settings":
        art.metadata["config"]["gate_tokens"] = "concept"
        handle = PerfusionEditor().apply(pipe, art, **STEEP)
    else:
        handle = PerfusionEditor().apply(pipe, art, gate_tokens="concept", **STEEP)
    seen = capture(handle)
    images(pipe, prompt)                                                                 # CFG batch [uncond, cond]
    pos = int(token_position(tokenize(pipe, [prompt]), handle.info["token_ids"][0])[0])
    handle.undo()
    full = PerfusionEditor().apply(pipe, art, gate_tokens="all", **STEEP)
    seen_all = capture(full)
    images(pipe, prompt)
    full.undo()
    for name, layer in handle.info["layers"].items():
        (x, out), (_, out_all) = seen[name], seen_all[name]
        base = F.linear(x, layer.weight, layer.bias)                                     # (2, n, o)
        others = torch.ones(x.shape[1], dtype=torch.bool)
        others[pos] = False
        torch.testing.assert_close(out[1, others], base[1, others], rtol=0, atol=1e-6)  # every other token: W x
        torch.testing.assert_close(out[0], base[0], rtol=0, atol=1e-6)                  # unconditional row: W x
        torch.testing.assert_close(out[1, pos], out_all[1, pos], rtol=1e-5, atol=1e-6)  # concept token: as "all"
    # the paper's gate does touch later tokens in this encoder (else the test above could not fail)
    assert any((seen_all[n][1][1, pos + 1:] - F.linear(seen_all[n][0][1, pos + 1:], lay.weight, lay.bias)).abs().max()
               > 1e-4 for n, lay in handle.info["layers"].items())
    with pytest.raises(EditbenchError, match="gate_tokens"):
        PerfusionEditor().apply(pipe, art, gate_tokens="prompt")
    with pytest.raises(EditbenchError, match="gate_tokens"):
        PerfusionConfig(gate_tokens="everywhere").validate()


def test_two_concepts_in_one_prompt_each_reach_their_own_targets(pipe):
    words = [("<thing>", "dog"), ("<other>", "cat")]
    prompt = "a <thing> and a <other> in a garden"
    arts = craft(pipe, words, prompt, seed=3)
    with torch.no_grad():
        x_super = encode_prompts(pipe, ["a dog and a cat in a garden"])[0]
    handle = PerfusionEditor().apply(pipe, arts, beta=[0.5, 0.5], tau=[1e-3, 1e-3])
    seen = capture(handle)
    images(pipe, prompt)
    ids = tokenize(pipe, [prompt])
    for k, tid in enumerate(handle.info["token_ids"]):
        pos = int(token_position(ids, tid)[0])
        for name, layer in handle.info["layers"].items():
            _, out = seen[name]
            expect = (x_super[pos] @ layer.weight.T if layer.role == "key"
                      else arts[k].tensors[f"o_v.{name.removesuffix('.to_v')}"])
            torch.testing.assert_close(out[1, pos], expect, rtol=1e-4, atol=1e-5)
    handle.undo()
    with pytest.raises(EditbenchError, match="same placeholder"):
        PerfusionEditor().apply(pipe, [arts[0], arts[0]])


def test_apply_then_undo_restores_the_base_bitwise(pipe):
    (art,) = craft(pipe, [("<thing>", "dog")], "a photo of a <thing>")
    tok, emb = pipe.tokenizer, pipe.text_encoder.get_input_embeddings()
    modules = dict(pipe.unet.named_modules())
    snap = snapshot(pipe)
    base = images(pipe, "a photo of a dog")
    with PerfusionEditor().apply(pipe, art) as handle:
        assert sum(isinstance(m, GatedRank1Linear) for m in pipe.unet.modules()) == len(handle.info["layers"])
        assert set(pipe.unet.state_dict()) == set(snap["unet"])                          # no new state-dict keys
        edited = images(pipe, "a photo of a <thing>")
        assert not torch.equal(edited, base)
        with pytest.raises(EditbenchError, match="already applied"):
            PerfusionEditor().apply(pipe, art)
    assert images(pipe, "a photo of a dog").equal(base)
    assert pipe.tokenizer is tok and pipe.text_encoder.get_input_embeddings() is emb
    assert all(dict(pipe.unet.named_modules())[n] is m for n, m in modules.items())
    assert unchanged(pipe, snap) and not pipe.text_encoder._forward_hooks


def test_settings_and_artifacts_are_validated(pipe):
    (art,) = craft(pipe, [("<thing>", "dog")], "a photo of a <thing>")
    editor = PerfusionEditor()
    for bad in ({"tau": 0.0}, {"lock": "sideways"}, {"beta": [0.6, 0.7]}, {"beta": "high"}, {"gamma": 1}):
        with pytest.raises(EditbenchError):
            editor.apply(pipe, art, **bad)
    t = art.tensors
    broken = {
        "unknown": {**t, "o_k.x": torch.zeros(3)},
        "missing": {k: v for k, v in t.items() if k != "i_star"},
        "width": {**t, "i_star": torch.zeros(5)},
        "layer": {**{k: v for k, v in t.items() if not k.endswith("mid_block.attentions.0.transformer_blocks.0.attn2")},
                  "o_v.nowhere.attn2": torch.zeros(4)},
        "nan": {**t, "embedding": torch.full_like(t["embedding"], float("nan"))},
    }
    for tensors in broken.values():
        with pytest.raises(ArtifactError):
            editor.apply(pipe, Artifact("perfusion", tensors, art.metadata))
    with pytest.raises(EditbenchError, match="trained on base model"):
        editor.apply(pipe, Artifact("perfusion", t, {**art.metadata, "base_fingerprint": "0" * 16}))
    with pytest.raises(EditbenchError):
        PerfusionEditor(lr_values=-1.0)
    assert len(dict(pipe.unet.named_modules())) and not any(isinstance(m, GatedRank1Linear)
                                                            for m in pipe.unet.modules())


def test_covariance_is_cached_per_text_encoder_and_never_stored_in_artifacts(pipe, trained, tmp_path):
    import json
    import shutil

    from safetensors import safe_open

    moment = text_covariance(pipe)
    files = list((cache_root() / "cov").glob("*.safetensors"))
    assert len(files) == 1 and moment.dim == 32 and moment.count > 32
    again = text_covariance(pipe)
    assert torch.equal(again.matrix(), moment.matrix())
    # a trained artifact, opened as a file: vectors only (embedding, i*, o*_V per layer), no (d, d) matrix, and
    # no covariance entry in the header (its config names the ridge, nothing else)
    trained_pipe, _, _, art = trained
    path = art.save(tmp_path / "thing.safetensors")
    with safe_open(str(path), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        header = json.loads(f.metadata()["editbench"])
    sites = find_cross_attention_sites(trained_pipe.unet)
    assert set(shapes) == {"embedding", "i_star", *(f"o_v.{s.name}" for s in sites)}
    assert all(len(shape) == 1 for shape in shapes.values()), shapes
    assert sum(n for (n,) in shapes.values()) < moment.dim ** 2                        # smaller than C alone

    def keys(x, prefix=""):
        if isinstance(x, dict):
            return [k for key, v in x.items() for k in [prefix + key, *keys(v, prefix + key + ".")]]
        return [k for v in x for k in keys(v, prefix)] if isinstance(x, list) else []

    assert [k for k in keys(header) if "cov" in k.lower()] == ["config.cov_ridge"]
    # so apply takes C from the text encoder: with the cache gone it is recomputed, and the images are the same
    with PerfusionEditor().apply(trained_pipe, path):
        cached = images(trained_pipe, "a <thing> in the snow")
    shutil.rmtree(cache_root() / "cov")
    with PerfusionEditor().apply(trained_pipe, path):
        assert torch.equal(images(trained_pipe, "a <thing> in the snow"), cached)
    assert [f.name for f in (cache_root() / "cov").glob("*.safetensors")] == [files[0].name]
    with torch.no_grad():
        pipe.text_encoder.get_input_embeddings().weight[0, 0] += 1.0                      # another base model
    text_covariance(pipe)
    assert len(list((cache_root() / "cov").glob("*.safetensors"))) == 2


def test_artifact_bytes_for_sd15_geometry(tmp_path):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config("sd15", full=True))
    sites = find_cross_attention_sites(unet)
    assert len(sites) == 16 and sum(s.value_features for s in sites) == 12480 and sites[0].in_features == 768
    tensors = {"embedding": torch.zeros(768), "i_star": torch.zeros(768),
               **{f"o_v.{s.name}": torch.zeros(s.value_features) for s in sites}}
    meta = {"concept": {"placeholder": "<my-teddy>", "superclass": "teddy", "images": 6}, "seed": 0,
            "base_fingerprint": "0123456789abcdef", "config": dataclasses.asdict(PerfusionConfig.reference()),
            "beta_train": 0.75, "tau_train": 0.1,
            "training": {"steps": 400, "wall_time_s": 312.5, "peak_memory_bytes": 123456789, "device": "cuda:0",
                         "memory_kind": "cuda_max_allocated", "resumed_from": 0, "loss_first": 0.2,
                         "loss_last": 0.1}}
    for dtype, width in ((None, 4), (torch.float16, 2)):
        path = Artifact("perfusion", tensors, meta).save(tmp_path / f"{width}.safetensors", dtype=dtype)
        raw = path.read_bytes()
        header = int.from_bytes(raw[:8], "little")
        assert len(raw) == 8 + header + width * (12480 + 768 + 768)
        assert len(raw) <= 110_000
        art = Artifact.load(path, method="perfusion")
        PerfusionEditor().check_artifact(art)
        assert art.nbytes == len(raw)


# ---------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------

def _fixed_loss(pipe, art, concept, n=24) -> float:
    """Diffusion loss of the concept images under ``art`` (training gates), on fixed noise and timesteps."""
    from diffusers import DDPMScheduler

    g = torch.Generator().manual_seed(123)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad(), PerfusionEditor().apply(pipe, art, beta=0.75, tau=0.10):
        x = concept.load_images(16)
        lat = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor       # (N, 4, 8, 8)
        lat = lat[torch.arange(n) % len(lat)]
        noise = torch.randn(lat.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=g)
        cond = encode_prompts(pipe, [concept.prompts()[k % 2] for k in range(n)])
        pred = pipe.unet(sched.add_noise(lat, noise, t), t, encoder_hidden_states=cond).sample
        return float((pred - noise).pow(2).mean())


@pytest.fixture(scope="module")
def trained(concept):
    pipe = tiny_pipeline()
    snap = snapshot(pipe)
    kw = {"batch_size": 4, "checkpoint_every": 0}
    init = PerfusionEditor(steps=1, lr_values=1e-12, lr_embedding=1e-12, **kw).fit(pipe, concept, progress=False)
    art = PerfusionEditor(steps=12, lr_values=0.05, lr_embedding=0.01, **kw).fit(pipe, concept, progress=False)
    return pipe, snap, init, art


def test_training_lowers_the_loss_and_changes_only_the_concept(trained, concept):
    pipe, snap, init, art = trained
    assert unchanged(pipe, snap)
    assert not any(isinstance(m, GatedRank1Linear) for m in pipe.unet.modules())
    assert set(art.tensors) == set(init.tensors)
    assert len(art.tensors) == 2 + len(find_cross_attention_sites(pipe.unet))
    for key in art.tensors:
        assert not torch.equal(art.tensors[key], init.tensors[key]), key
    sup = single_token_id(pipe.tokenizer, "dog")
    e_sup = pipe.text_encoder.get_input_embeddings().weight[sup]
    cap = PerfusionConfig().embedding_norm_cap  # the one step projects the row onto <= cap x |e_sup|
    want = e_sup if cap is None or cap >= 1 else cap * e_sup
    torch.testing.assert_close(init.tensors["embedding"], want)  # the row starts at the superclass word
    assert _fixed_loss(pipe, art, concept) < _fixed_loss(pipe, init, concept)
    meta = art.metadata
    assert meta["training"]["steps"] == 12 and meta["config"]["lr_values"] == 0.05
    assert meta["beta_train"] == PerfusionEditor.Config().beta_train


def test_trained_artifact_round_trips_and_applies_from_disk(trained, tmp_path):
    pipe, _, _, art = trained
    path = art.save(tmp_path / "thing.safetensors")
    back = get("perfusion")().load(path)
    assert all(torch.equal(back.tensors[k], v) for k, v in art.tensors.items()) and back.metadata == art.metadata
    assert back.nbytes == path.stat().st_size
    with PerfusionEditor().apply(pipe, art):
        a = images(pipe, "a <thing> in the snow")
    with PerfusionEditor().apply(pipe, path):
        b = images(pipe, "a <thing> in the snow")
    assert torch.equal(a, b)
    with pytest.raises(ConceptDataError, match="exactly one"):
        PerfusionEditor(steps=1).fit(pipe, ConceptData("<x>", "xyzzyplughwobble", [torch.rand(3, 8, 8)]))


@pytest.mark.slow
def test_perfusion_resume_is_bitwise_identical(concept, tmp_path):
    pipe = tiny_pipeline()
    kw = {"batch_size": 2, "checkpoint_every": 2}
    full = PerfusionEditor(steps=4, **kw).fit(pipe, concept, progress=False, checkpoint_dir=tmp_path / "a")
    PerfusionEditor(steps=2, **kw).fit(pipe, concept, progress=False, checkpoint_dir=tmp_path / "b")
    resumed = PerfusionEditor(steps=4, **kw).fit(pipe, concept, progress=False, checkpoint_dir=tmp_path / "b")
    assert all(torch.equal(resumed.tensors[k], v) for k, v in full.tensors.items())


# ---------------------------------------------------------------------------------------------------------------
# key-locking ablation: trained keys (config.key_locking = False, tensors o_k.<layer>)
# ---------------------------------------------------------------------------------------------------------------

def _i_super_ref(pipe, superclass, templates) -> torch.Tensor:
    """Template mean (d,) of the superclass token's encoding, from the base text encoder (independent of the code)."""
    sup = single_token_id(pipe.tokenizer, superclass)
    ids = tokenize(pipe, [t.format(superclass) for t in templates])
    with torch.no_grad():
        hidden = pipe.text_encoder(ids)[0]
    rows = [hidden[b, int((ids[b] == sup).nonzero()[0])] for b in range(len(ids))]
    return torch.stack(rows).double().mean(0)


def _with_exact_i_star(pipe, art, prompt) -> Artifact:
    """``art`` with i* = the encoding of its placeholder in ``prompt`` (so a steep gate hits the targets exactly)."""
    with EditHandle(pipe, "probe") as h:
        (tid,) = add_tokens(h, pipe, [art.metadata["concept"]["placeholder"]], art.tensors["embedding"][None].clone())
        ids = tokenize(pipe, [prompt])
        with torch.no_grad():
            i_star = pipe.text_encoder(ids)[0][0, int(token_position(ids, tid)[0])].clone()
    return Artifact("perfusion", {**art.tensors, "i_star": i_star}, art.metadata)


def with_trained_keys(pipe, art, seed=0) -> Artifact:
    """A crafted artifact turned into a trained-key one: random o*_K per layer, metadata key_locking False."""
    g = torch.Generator().manual_seed(100 + seed)
    o_k = {f"o_k.{s.name}": torch.randn(s.key_features, generator=g) for s in find_cross_attention_sites(pipe.unet)}
    meta = {**art.metadata, "config": {**art.metadata["config"], "key_locking": False}}
    return Artifact("perfusion", {**art.tensors, **o_k}, meta)


@pytest.fixture(scope="module")
def trained_keys(concept):
    pipe = tiny_pipeline()
    snap = snapshot(pipe)
    kw = {"batch_size": 4, "checkpoint_every": 0, "key_locking": False}
    init = PerfusionEditor(steps=1, lr_values=1e-12, lr_embedding=1e-12, lr_keys=1e-12, **kw).fit(
        pipe, concept, progress=False)
    art = PerfusionEditor(steps=6, lr_values=0.05, lr_embedding=0.01, lr_keys=0.05, **kw).fit(
        pipe, concept, progress=False)
    return pipe, snap, init, art


def test_default_artifacts_have_no_key_targets(trained):
    _, _, _, art = trained
    assert not any(k.startswith("o_k.") for k in art.tensors)
    assert art.metadata["config"]["key_locking"] is True
    assert set(art.tensors) == {"embedding", "i_star", *(f"o_v.{s.name}" for s in find_cross_attention_sites(
        trained[0].unet))}


def test_trained_keys_are_learned_stored_and_applied(trained_keys, concept, tmp_path):
    pipe, snap, init, art = trained_keys
    assert unchanged(pipe, snap) and not any(isinstance(m, GatedRank1Linear) for m in pipe.unet.modules())
    sites = find_cross_attention_sites(pipe.unet)
    assert set(art.tensors) == {"embedding", "i_star", *(f"o_v.{s.name}" for s in sites),
                                *(f"o_k.{s.name}" for s in sites)}
    assert art.metadata["config"]["key_locking"] is False and art.metadata["config"]["lr_keys"] == 0.05
    i_super = _i_super_ref(pipe, concept.superclass, concept.templates)                    # (d,) float64
    for s in sites:
        ref = s.key.weight.double() @ i_super                                               # W_K i_super
        assert art.tensors[f"o_k.{s.name}"].shape == (s.key_features,)
        assert art.tensors[f"o_k.{s.name}"].dtype == torch.float32
        torch.testing.assert_close(init.tensors[f"o_k.{s.name}"].double(), ref, rtol=1e-5, atol=1e-5)  # the init
        assert (art.tensors[f"o_k.{s.name}"].double() - ref).abs().max() > 1e-3, s.name       # moved away
    PerfusionEditor().check_artifact(art, pipe)
    # save / load round trip, exact
    path = art.save(tmp_path / "keys.safetensors")
    back = PerfusionEditor().load(path)
    assert set(back.tensors) == set(art.tensors) and back.metadata == art.metadata
    assert all(torch.equal(back.tensors[k], v) for k, v in art.tensors.items())
    # applied (steep gate, i* exact at the concept token): K output at the concept token = the stored o*_K,
    # not the superclass key; V output = o*_V
    prompt = "a photo of a <thing> on the grass"
    exact = _with_exact_i_star(pipe, back, prompt)
    with torch.no_grad():
        x_super = encode_prompts(pipe, ["a photo of a dog on the grass"])[0]                 # (n, d)
    with PerfusionEditor().apply(pipe, exact, **STEEP) as handle:   # undone even if an assertion fails
        seen = capture(handle)
        images(pipe, prompt)
        pos = int(token_position(tokenize(pipe, [prompt]), handle.info["token_ids"][0])[0])
        for name, layer in handle.info["layers"].items():
            x, out = seen[name]
            assert torch.equal(x[1, pos], exact.tensors["i_star"])
            if layer.role == "key":
                site = name.removesuffix(".to_k")
                torch.testing.assert_close(out[1, pos], back.tensors[f"o_k.{site}"], rtol=1e-4, atol=1e-5)
                assert (out[1, pos] - x_super[pos] @ layer.weight.T).abs().max() > 1e-3    # not the superclass key
            else:
                torch.testing.assert_close(out[1, pos], back.tensors[f"o_v.{name.removesuffix('.to_v')}"],
                                           rtol=1e-4, atol=1e-5)
    assert unchanged(pipe, snap)


def test_trained_keys_apply_then_undo_restores_the_base_bitwise(trained_keys):
    pipe, snap, _, art = trained_keys
    modules = dict(pipe.unet.named_modules())
    tok, emb = pipe.tokenizer, pipe.text_encoder.get_input_embeddings()
    base = images(pipe, "a dog in the snow")
    with PerfusionEditor().apply(pipe, art):
        edited = images(pipe, "a <thing> in the snow")
        assert set(pipe.unet.state_dict()) == set(snap["unet"])
    assert not torch.equal(edited, base)
    assert images(pipe, "a dog in the snow").equal(base)
    assert pipe.tokenizer is tok and pipe.text_encoder.get_input_embeddings() is emb
    assert all(dict(pipe.unet.named_modules())[n] is m for n, m in modules.items())
    assert unchanged(pipe, snap) and not pipe.text_encoder._forward_hooks


def test_trained_and_locked_keys_mix_in_one_apply(pipe):
    words = [("<thing>", "dog"), ("<other>", "cat")]
    prompt = "a <thing> and a <other> in a garden"
    locked, free = craft(pipe, words, prompt, seed=3)
    free = with_trained_keys(pipe, free)                      # <other>: trained keys; <thing>: key-locked
    with torch.no_grad():
        x_super = encode_prompts(pipe, ["a dog and a cat in a garden"])[0]
    snap = snapshot(pipe)
    with pytest.raises(EditbenchError, match="global"):
        PerfusionEditor().apply(pipe, [locked, free], lock="global")
    assert unchanged(pipe, snap) and not any(isinstance(m, GatedRank1Linear) for m in pipe.unet.modules())
    with PerfusionEditor().apply(pipe, [locked, free], beta=[0.5, 0.5], tau=[1e-3, 1e-3], lock="local") as handle:
        seen = capture(handle)
        images(pipe, prompt)
        ids = tokenize(pipe, [prompt])
        pos = [int(token_position(ids, t)[0]) for t in handle.info["token_ids"]]
        for name, layer in handle.info["layers"].items():
            _, out = seen[name]
            if layer.role != "key":
                continue
            site = name.removesuffix(".to_k")
            torch.testing.assert_close(out[1, pos[0]], x_super[pos[0]] @ layer.weight.T, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out[1, pos[1]], free.tensors[f"o_k.{site}"], rtol=1e-4, atol=1e-5)
            assert (out[1, pos[1]] - x_super[pos[1]] @ layer.weight.T).abs().max() > 1e-3
    assert unchanged(pipe, snap) and not pipe.text_encoder._forward_hooks


def test_trained_key_artifacts_and_config_are_validated(pipe):
    (art,) = craft(pipe, [("<thing>", "dog")], "a photo of a <thing>")
    good = with_trained_keys(pipe, art)
    editor = PerfusionEditor()
    editor.check_artifact(good, pipe)
    t, meta = good.tensors, good.metadata
    first = next(k for k in t if k.startswith("o_k."))
    broken = {
        "one o_k missing": ({k: v for k, v in t.items() if k != first}, meta),
        "all o_k missing": ({k: v for k, v in t.items() if not k.startswith("o_k.")}, meta),
        "o_k wrong width": ({**t, first: torch.zeros(t[first].shape[0] + 1)}, meta),
        "o_k unknown layer": ({**t, "o_k.nowhere.attn2": torch.zeros(4)}, meta),
        "o_k but key-locked": (t, {**meta, "config": {**meta["config"], "key_locking": True}}),
        "o_k without config": (t, {k: v for k, v in meta.items() if k != "config"}),
    }
    for tensors, m in broken.values():
        with pytest.raises(ArtifactError):
            editor.apply(pipe, Artifact("perfusion", tensors, m))
        with pytest.raises(ArtifactError):
            editor.check_artifact(Artifact("perfusion", tensors, m), pipe)
    with pytest.raises(ArtifactError):   # non-bool key_locking in the metadata
        editor.apply(pipe, Artifact("perfusion", t, {**meta, "config": {**meta["config"], "key_locking": 0}}))
    with pytest.raises(ArtifactError, match="without a key target"):
        editor.check_artifact(Artifact("perfusion", {k: v for k, v in t.items() if k != first}, meta), pipe)
    with pytest.raises(ArtifactError, match="missing"):
        editor.check_artifact(Artifact("perfusion", {k: v for k, v in t.items() if not k.startswith("o_k.")}, meta))
    for bad in ({"key_locking": "no"}, {"key_locking": 0}, {"key_locking": None}, {"lr_keys": 0.0},
                {"lr_keys": float("nan")}, {"lr_keys": True}):
        with pytest.raises(EditbenchError):
            PerfusionEditor(**bad)
    assert PerfusionConfig().key_locking is True and PerfusionConfig().lr_keys == PerfusionConfig().lr_values
    assert not any(isinstance(m, GatedRank1Linear) for m in pipe.unet.modules())


def test_trained_key_artifact_bytes_for_sd15_geometry(tmp_path):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config("sd15", full=True))
    sites = find_cross_attention_sites(unet)
    assert sum(s.key_features for s in sites) == 12480
    tensors = {"embedding": torch.zeros(768), "i_star": torch.zeros(768),
               **{f"o_v.{s.name}": torch.zeros(s.value_features) for s in sites},
               **{f"o_k.{s.name}": torch.zeros(s.key_features) for s in sites}}
    meta = {"concept": {"placeholder": "<my-teddy>", "superclass": "teddy"},
            "config": dataclasses.asdict(PerfusionConfig.reference(key_locking=False))}
    for dtype, width in ((None, 4), (torch.float16, 2)):
        path = Artifact("perfusion", tensors, meta).save(tmp_path / f"{width}.safetensors", dtype=dtype)
        raw = path.read_bytes()
        assert len(raw) == 8 + int.from_bytes(raw[:8], "little") + width * (2 * 12480 + 768 + 768)
        PerfusionEditor().check_artifact(Artifact.load(path, method="perfusion"))
