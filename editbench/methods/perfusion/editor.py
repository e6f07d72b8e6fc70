"""Perfusion (Tewel et al., SIGGRAPH 2023) on the editbench interface: training session, artifact, apply/undo.

Artifact tensors (float32 or float16):

* ``embedding`` ``(d_emb,)``: the concept word's token embedding (SDXL: its row in ``text_encoder``, and
  ``embedding_2`` ``(d_emb_2,)`` its row in ``text_encoder_2``);
* ``i_star`` ``(d,)``: the EMA of the concept token's encoding (the gate direction; SDXL: of the concatenated
  encoding ``[h_1 ; h_2]`` the K/V projections read, ``d = d_1 + d_2``);
* ``o_v.<site>`` ``(o_site,)``: the learned value target of every cross-attention layer ``<site>``
  (e.g. ``o_v.down_blocks.0.attentions.0.transformer_blocks.0.attn2``);
* ``o_k.<site>`` ``(k_site,)``: only in "trained keys" artifacts (``config.key_locking`` False in the metadata):
  the learned key target of every cross-attention layer.

With key-locking (the default) the key targets are not stored: ``o*_K = W_K i_super`` is recomputed from the
superclass word (per prompt while sampling; a template average as fallback). Trained-key artifacts use their
stored ``o*_K`` at every prompt; they cannot be applied with ``lock="global"`` (EditbenchError). ``C`` is not
stored either: it is a property of the base text encoder, computed once and cached on disk
(:func:`text_covariance`).
"""

from __future__ import annotations

import hashlib
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from editbench.concepts import DEFAULT_TEMPLATES, ConceptData
from editbench.errors import ArtifactError, EditbenchError, TrainingError
from editbench.fingerprint import fingerprint, module_tensors, text_encoder_fingerprint
from editbench.methods import register
from editbench.methods.base import Artifact, EditHandle, Editor
from editbench.methods.perfusion.config import GATE_TOKENS, PerfusionConfig, PerfusionSettings
from editbench.methods.perfusion.layers import ConceptBank, EncoderSlot, GatedRank1Linear
from editbench.methods.tokens import add_tokens, base_tokenizer, cap_norms_, single_token_id, token_position
from editbench.pipelines import TextStack, encode_text, text_stack
from editbench.safety import is_number
from editbench.sites import CrossAttentionSite, find_cross_attention_sites
from editbench.storage import cache_root
from editbench.training import ParamGroup, TrainingSession, TrainResult

__all__ = ["PerfusionEditor", "superclass_encoding", "text_covariance"]

_EMBEDDINGS = ("embedding", "embedding_2")
"""The artifact tensor of the concept word's row in each text encoder (SDXL: two)."""


# ----------------------------------------------------------------------------------------------------------------
# the text second moment C, cached per base text encoder
# ----------------------------------------------------------------------------------------------------------------

def text_covariance(pipeline: Any, *, progress: bool = False):
    """Second moment ``C`` of the context ``pipeline``'s K/V projections read (its text encoder's token vectors; SDXL:
    both encoders' concatenated penultimate states) over :func:`editbench.text_covariance.default_captions`.

    Cached at ``<cache_root>/cov/<text-encoder fingerprint>.safetensors`` (SDXL: of both encoders); recomputed if
    the file is unreadable or was built from another caption corpus.
    """
    from editbench.moments import SecondMoment
    from editbench.text_covariance import default_captions, estimate_pipeline_covariance

    tok = base_tokenizer(pipeline.tokenizer)
    second = getattr(pipeline, "text_encoder_2", None)
    key = text_encoder_fingerprint(pipeline.text_encoder, tok) if second is None else fingerprint(
        {**module_tensors(pipeline.text_encoder, "text_encoder."), **module_tensors(second, "text_encoder_2."),
         "penultimate": torch.tensor([-2])}, tok)
    path = cache_root() / "cov" / f"{key}.safetensors"
    captions = default_captions()
    corpus = hashlib.sha256(("\n".join(captions) + "\n").encode()).hexdigest()
    if path.is_file():
        try:
            moment = SecondMoment.load(path)
            if moment.metadata.get("corpus_sha256") == corpus:
                return moment
        except ArtifactError:
            pass
    moment = estimate_pipeline_covariance(pipeline, captions, progress=progress,
                                          corpus="editbench default captions")
    moment.save(path)
    return moment


def _cholesky(pipeline: Any, ridge: float) -> torch.Tensor:
    """Lower Cholesky factor ``(d, d)`` of ``C + ridge tr(C)/d I`` on the pipeline's device (float64 if possible)."""
    device = pipeline.text_encoder.device
    c = text_covariance(pipeline).matrix(ridge)                                      # (d, d) float64, CPU
    chol = torch.linalg.cholesky(c)
    return chol.to(device, torch.float32 if device.type == "mps" else torch.float64)


def superclass_encoding(pipeline: Any, superclass: str, templates=DEFAULT_TEMPLATES) -> torch.Tensor:
    """Mean encoding ``(d,)`` of the superclass token over ``templates`` filled with the superclass word (SDXL: the
    concatenated encoding of both encoders at its position); float32, or float64 for a float64 text encoder."""
    superclass_id = single_token_id(pipeline.tokenizer, superclass)
    with torch.no_grad():
        enc = encode_text(pipeline, [t.format(superclass) for t in templates])
    ids, hidden = enc.ids[0], enc.hidden                                             # (b, n), (b, n, d)
    pos = token_position(ids, superclass_id)                                         # (b,)
    if bool((pos < 0).any()):
        raise EditbenchError(f"superclass word {superclass!r} did not survive tokenization of the templates")
    return hidden[torch.arange(len(ids)), pos].to(torch.promote_types(hidden.dtype, torch.float32)).mean(0)


def _trained_keys(artifact: Artifact) -> bool:
    """Whether ``artifact`` has trained keys: its metadata ``config.key_locking`` is False (absent: key-locked)."""
    config = artifact.metadata.get("config") or {}
    value = config.get("key_locking", True) if isinstance(config, dict) else True
    if not isinstance(value, bool):
        raise ArtifactError(f"{artifact.path or 'artifact'}: metadata config.key_locking must be true or false, "
                            f"got {value!r}")
    return not value


def _slots(pipeline: Any, stack: TextStack, token_ids: list[list[int]], superclasses: list[str]) -> list[EncoderSlot]:
    """One :class:`EncoderSlot` per text encoder: its columns of the context, the hidden state the pipeline takes,
    and per concept its token id (``token_ids[e]``) and superclass id in that encoder's tokenizer."""
    return [EncoderSlot(p.start, p.stop, tuple(token_ids[e]),
                        tuple(single_token_id(p.get_tokenizer(pipeline), w) for w in superclasses), p.layer)
            for e, p in enumerate(stack.parts)]


def _sites(pipeline: Any) -> list[CrossAttentionSite]:
    unet = pipeline.unet
    if any(isinstance(m, GatedRank1Linear) for m in unet.modules()):
        raise EditbenchError("Perfusion is already applied to this pipeline; undo that handle first and apply all "
                             "concepts in one call: apply(pipeline, [a, b])")
    return find_cross_attention_sites(unet)


def _key_fallback(site: CrossAttentionSite, i_super: torch.Tensor) -> torch.Tensor:
    """``W_K i_super`` ``(c, o)`` in the key weight's dtype: the locked keys' fallback target (no gradient)."""
    return F.linear(i_super.to(site.key.weight), site.key.weight).detach()


def _install_layers(handle: EditHandle, pipeline: Any, sites: list[CrossAttentionSite], bank: ConceptBank,
                    i_super: torch.Tensor, o_v: dict[str, torch.Tensor],
                    o_k: dict[str, torch.Tensor] | None = None) -> dict[str, GatedRank1Linear]:
    """Swap every site's K and V projections for gated rank-1 layers; hook the text encoder for key-locking and
    for the concept-token gate's positions (skipped only if every concept has trained keys and gates every token:
    then nothing reads the stash).

    i_super ``(c, d)``: superclass template encodings (the locked keys' fallback targets); o_v: site -> ``(c, o)``;
    o_k: site -> ``(c, o)`` key targets (rows of trained-key concepts learned, the others ``W_K i_super``), or
    None for ``W_K i_super`` everywhere.
    """
    layers = {}
    for site in sites:
        k_target = _key_fallback(site, i_super) if o_k is None else o_k[site.name]    # (c, o)
        layers[site.key_name] = GatedRank1Linear(site.key, bank, "key", k_target)
        layers[site.value_name] = GatedRank1Linear(site.value, bank, "value", o_v[site.name])
    for path, layer in layers.items():
        handle.swap_module(pipeline.unet, path, layer)
    if not bank.all_keys_trained or bank.any_concept_only:
        for e, part in enumerate(text_stack(pipeline).parts):
            handle.add_hook(part.get_encoder(pipeline).register_forward_hook(bank.hook_for(e), with_kwargs=True),
                            f"key-lock hook ({part.encoder})")
    handle.info.update(bank=bank, layers=layers)
    return layers


# ----------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------

class PerfusionSession(TrainingSession):
    """Trains ``o*_V`` of every layer and the concept embedding (and, with ``key_locking=False``, ``o*_K`` of every
    layer); ``i*`` is an EMA with a straight-through term."""

    def __init__(self, pipeline: Any, concept: ConceptData, handle: EditHandle, config: PerfusionConfig):
        self.pipeline, self.concept, self.config = pipeline, concept, config
        sites = _sites(pipeline)
        self.stack = stack = text_stack(pipeline, PerfusionEditor.name)
        sup_id = single_token_id(pipeline.tokenizer, concept.superclass)
        i_super = superclass_encoding(pipeline, concept.superclass, concept.templates)[None]  # (1, d)
        # the concept word: one learned row per text encoder (SDXL: two), initialised from the superclass row
        self.embeddings, token_ids, self.limits = [], [], []
        for e, part in enumerate(stack.parts):
            sup_e = single_token_id(part.get_tokenizer(pipeline), concept.superclass)
            base_row = part.get_encoder(pipeline).get_input_embeddings().weight[sup_e]
            self.embeddings.append(torch.nn.Parameter(base_row.detach().float().clone()[None]))  # (1, d_emb_e)
            token_ids.append(add_tokens(handle, pipeline, [concept.placeholder], self.embeddings[-1], encoder=e))
            self.limits.append(config.norm_limits(pipeline, [concept.superclass], encoder=e))   # (1,) or None
        self.embedding = self.embeddings[0]
        self.token_id = token_ids[0][0]
        self.bank = ConceptBank(_cholesky(pipeline, config.cov_ridge), [self.token_id], [sup_id],
                                [config.beta_train], [config.tau_train],
                                trained_keys=[not config.key_locking],
                                concept_only=[config.gate_tokens == "concept"],
                                slots=_slots(pipeline, stack, token_ids, [concept.superclass]))
        self.o_v = {s.name: torch.nn.Parameter(F.linear(i_super.to(s.value.weight), s.value.weight).detach().float())
                    for s in sites}                                                           # site -> (1, o)
        # trained keys (ablation): o*_K learned per layer, initialised from W_K i_super exactly like o*_V
        self.o_k = None if config.key_locking else {
            s.name: torch.nn.Parameter(F.linear(i_super.to(s.key.weight), s.key.weight).detach().float())
            for s in sites}                                                                   # site -> (1, o)
        self.ema: torch.Tensor | None = None                                                   # (d,) float64
        self.bank.set_i_star(i_super)
        _install_layers(handle, pipeline, sites, self.bank, i_super, self.o_v, self.o_k)

    def param_groups(self) -> list[ParamGroup]:
        groups = [ParamGroup("values", list(self.o_v.values()), self.config.lr_values),
                  ParamGroup("embedding", list(self.embeddings), self.config.lr_embedding)]
        if self.o_k is not None:
            groups.append(ParamGroup("keys", list(self.o_k.values()), self.config.lr_keys))
        return groups

    def after_step(self, step: int) -> None:
        for rows, limits in zip(self.embeddings, self.limits):
            cap_norms_(rows, limits)

    def encode(self, prompts: list[str]) -> Any:
        enc = encode_text(self.pipeline, prompts, self.stack)   # the hooks stash the superclass encodings
        ids, hidden = enc.ids[0], enc.hidden                                      # (b, n), (b, n, d)
        pos = token_position(ids, self.token_id)                                  # (b,)
        if bool((pos < 0).any()):
            raise EditbenchError(f"a training prompt lost the placeholder {self.concept.placeholder!r} "
                                 "(truncated template?)")
        mean = hidden[torch.arange(len(ids)), pos].mean(0).to(self.bank.chol)     # (d,) batch mean of the concept token
        with torch.no_grad():
            d = self.config.ema_decay
            self.ema = mean.detach().clone() if self.ema is None else d * self.ema + (1 - d) * mean.detach()
        self.bank.set_i_star((self.ema + (mean - mean.detach()))[None])           # value: EMA; gradient: the batch
        return hidden if enc.pooled is None else enc                              # SDXL: + pooled embeddings

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.ema is None else {"ema_i_star": self.ema}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        ema = tensors.pop("ema_i_star", None)
        super().load_state_tensors(tensors)
        d = self.bank.chol.shape[0]
        if ema is not None and (ema.shape != (d,) or not ema.is_floating_point()
                                or not bool(torch.isfinite(ema).all())):
            raise TrainingError(f"the checkpoint's ema_i_star is {tuple(ema.shape)} {ema.dtype}, not a finite ({d},) "
                                "vector; delete the checkpoint to start over")
        self.ema = None if ema is None else ema.to(self.bank.chol)

    def artifact(self, result: TrainResult) -> Artifact:
        if self.ema is None:
            raise EditbenchError("no training step ran; nothing to save")
        tensors = {**{_EMBEDDINGS[e]: r.detach()[0].clone() for e, r in enumerate(self.embeddings)},
                   "i_star": self.ema.float().clone(),
                   **{f"o_v.{name}": p.detach()[0].clone() for name, p in self.o_v.items()}}
        if self.o_k is not None:
            tensors.update({f"o_k.{name}": p.detach()[0].clone() for name, p in self.o_k.items()})
        return Artifact(PerfusionEditor.name, tensors, {"beta_train": self.config.beta_train,
                                                        "tau_train": self.config.tau_train})


# ----------------------------------------------------------------------------------------------------------------
# the editor
# ----------------------------------------------------------------------------------------------------------------

@register
class PerfusionEditor(Editor):
    """Perfusion: key-locked, gated rank-1 edits of every cross-attention K and V projection.

    ``apply(pipeline, artifacts, beta=0.70, tau=0.15, lock="local")`` takes one or several separately trained
    concepts (exact multi-concept gating); ``compose`` is not needed and not offered.

    Trained-key artifacts (``PerfusionConfig(key_locking=False)``, tensors ``o_k.<layer>``) use their stored
    ``o*_K`` instead of ``W_K i_super``; they mix freely with key-locked artifacts under ``lock="local"`` (each
    concept keeps its own key target), and ``lock="global"`` with any trained-key artifact raises EditbenchError.
    """

    name = "perfusion"
    Config = PerfusionConfig
    Settings = PerfusionSettings
    max_artifacts = None
    metadata_schema: ClassVar[dict] = {"beta_train": (is_number, "a finite number"),
                                       "tau_train": (is_number, "a finite number")}

    def affected_tensors(self, pipeline: Any) -> dict[str, torch.Tensor]:
        text_stack(pipeline, self.name)
        tensors = module_tensors(pipeline.text_encoder, "text_encoder.")
        if getattr(pipeline, "text_encoder_2", None) is not None:
            tensors.update(module_tensors(pipeline.text_encoder_2, "text_encoder_2."))
        for s in find_cross_attention_sites(pipeline.unet):
            tensors[f"unet.{s.key_name}.weight"] = s.key.weight
            tensors[f"unet.{s.value_name}.weight"] = s.value.weight
        return tensors

    def check_pipeline(self, pipeline: Any) -> None:
        text_stack(pipeline, self.name)  # SD 1.x / 2.x and SDXL; any other pipeline class is refused by name
        _sites(pipeline)

    def prepare_training(self, pipeline: Any, concept: ConceptData, handle: EditHandle,
                         config: PerfusionConfig) -> PerfusionSession:
        return PerfusionSession(pipeline, concept, handle, config)

    def check_artifact(self, artifact: Artifact, pipeline: Any = None) -> None:
        t, where = artifact.tensors, artifact.path or "artifact"
        trained = _trained_keys(artifact)
        prefixes = ("o_v.", "o_k.") if trained else ("o_v.",)
        missing = sorted({"embedding", "i_star"} - set(t)) + [f"{p}<layer>" for p in prefixes
                                                             if not any(k.startswith(p) for k in t)]
        if missing:
            raise ArtifactError(f"{where} is not a complete Perfusion artifact"
                                f"{' (trained keys: config.key_locking is false)' if trained else ''}: "
                                f"missing {missing}")
        unknown = sorted(k for k in t if k not in (*_EMBEDDINGS, "i_star") and not k.startswith(prefixes))
        if unknown:
            hint = ("" if trained or not any(k.startswith("o_k.") for k in unknown) else
                    "; o_k.<layer> tensors belong to trained-key artifacts (metadata config.key_locking false)")
            raise ArtifactError(f"{where} has unknown tensors {unknown[:5]}; expected embedding (SDXL: and "
                                "embedding_2), i_star, "
                                f"{', '.join(p + '<layer>' for p in prefixes)}{hint}")
        for k, v in t.items():
            if v.ndim != 1 or not v.is_floating_point() or not bool(torch.isfinite(v).all()):
                raise ArtifactError(f"{where}: tensor {k!r} must be a finite float vector, got {tuple(v.shape)} "
                                    f"{v.dtype}")
        concept = artifact.metadata.get("concept", {})
        if not isinstance(concept, dict) or not {"placeholder", "superclass"} <= set(concept):
            raise ArtifactError(f"{where}: metadata lacks the concept's placeholder/superclass words")
        if pipeline is None:
            return
        sites = {s.name: s for s in find_cross_attention_sites(pipeline.unet)}
        for prefix, what in (("o_v.", "value"), ("o_k.", "key"))[:len(prefixes)]:
            names = {k[4:] for k in t if k.startswith(prefix)}
            if names != set(sites):
                extra, lacking = sorted(names - set(sites)), sorted(set(sites) - names)
                raise ArtifactError(f"{where} does not fit this UNet: {prefix}* layers not in the model {extra[:3]}, "
                                    f"model layers without a {what} target {lacking[:3]}")
        stack = text_stack(pipeline, self.name)
        rows = [k for k in _EMBEDDINGS if k in t]
        if len(rows) != len(stack.parts):
            raise ArtifactError(f"{where} holds concept-word rows {rows} but this pipeline has {len(stack.parts)} "
                                "text encoder(s) (SDXL: embedding and embedding_2): it was trained for another base "
                                "model")
        d = sites[next(iter(sites))].in_features
        d_emb = {k: p.get_encoder(pipeline).get_input_embeddings().weight.shape[1]
                 for k, p in zip(_EMBEDDINGS, stack.parts)}
        bad = [(k, tuple(v.shape)) for k, v in t.items()
               if v.shape != ((d_emb[k],) if k in d_emb else (d,) if k == "i_star"
                              else (sites[k[4:]].key_features,) if k.startswith("o_k.")
                              else (sites[k[4:]].value_features,))]
        if bad:
            raise ArtifactError(f"{where} does not fit this model (text width {d}, embedding widths "
                                f"{list(d_emb.values())}): wrong shapes {bad[:3]}")

    def install(self, pipeline: Any, artifacts: list[Artifact], handle: EditHandle,
                settings: PerfusionSettings) -> None:
        n = len(artifacts)
        words = [a.metadata["concept"] for a in artifacts]
        placeholders = [w["placeholder"] for w in words]
        if len(set(placeholders)) != n:
            raise EditbenchError(f"two artifacts use the same placeholder ({placeholders}); retrain one with another")
        ridges = {a.metadata.get("config", {}).get("cov_ridge", PerfusionConfig.cov_ridge) for a in artifacts}
        if len(ridges) != 1:
            raise EditbenchError(f"the artifacts were trained with different cov_ridge values {sorted(ridges)}")
        trained = [_trained_keys(a) for a in artifacts]
        if settings.lock == "global" and any(trained):
            names = [p for p, tr in zip(placeholders, trained) if tr]
            raise EditbenchError(f"lock='global' replaces every key with the superclass prompt's keys, but {names} "
                                 "were trained with key_locking=False (trained keys); apply them with lock='local'")
        sites = _sites(pipeline)
        stack = text_stack(pipeline, self.name)
        device = pipeline.text_encoder.device
        sup_ids = [single_token_id(pipeline.tokenizer, w["superclass"]) for w in words]
        i_super = torch.stack([superclass_encoding(pipeline, w["superclass"]) for w in words])  # (c, d)
        ids_per_encoder = []
        for e, part in enumerate(stack.parts):  # the concept words in every text encoder (SDXL: two rows each)
            emb = part.get_encoder(pipeline).get_input_embeddings().weight
            rows = torch.stack([a.tensors[_EMBEDDINGS[e]] for a in artifacts]).to(emb)      # (c, d_emb_e)
            ids_per_encoder.append(add_tokens(handle, pipeline, placeholders, rows, encoder=e))
        token_ids = ids_per_encoder[0]
        gates = [settings.gate_tokens or a.metadata.get("config", {}).get("gate_tokens", "all") for a in artifacts]
        if bad := sorted({g for g in gates if g not in GATE_TOKENS}, key=str):
            raise ArtifactError(f"artifact metadata has config.gate_tokens {bad}; expected one of {GATE_TOKENS}")
        bank = ConceptBank(_cholesky(pipeline, ridges.pop()), token_ids, sup_ids, settings.per_concept("beta", n),
                           settings.per_concept("tau", n), settings.lock, trained_keys=trained,
                           concept_only=[g == "concept" for g in gates],
                           slots=_slots(pipeline, stack, ids_per_encoder, [w["superclass"] for w in words]))
        bank.set_i_star(torch.stack([a.tensors["i_star"] for a in artifacts]).to(device))
        o_v = {s.name: torch.stack([a.tensors[f"o_v.{s.name}"] for a in artifacts]).to(s.value.weight)
               for s in sites}                                                               # site -> (c, o)
        o_k = None
        if any(trained):  # each concept its own key target: stored o*_K if trained, else W_K i_super (fallback)
            o_k = {}
            for s in sites:
                locked = _key_fallback(s, i_super)                                           # (c, o)
                o_k[s.name] = torch.stack([a.tensors[f"o_k.{s.name}"].to(locked) if tr else locked[c]
                                           for c, (a, tr) in enumerate(zip(artifacts, trained))])
        _install_layers(handle, pipeline, sites, bank, i_super, o_v, o_k)
        handle.info.update(token_ids=token_ids, placeholders=placeholders)
