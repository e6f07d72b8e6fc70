"""Custom Diffusion (Kumari et al., CVPR 2023) on the shared Editor interface.

Artifact tensors (``P`` = the dotted name of a projection, e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k``):

* ``P.delta`` ``(o, d)``: ``W_tuned - W0`` for every cross-attention K and V projection, or, when compressed,
  ``P.delta_up`` ``(o, r)`` and ``P.delta_down`` ``(r, d)`` with ``delta = up @ down``;
* ``modifier_embeddings`` ``(k, d)``: one row per modifier token (metadata ``modifier_tokens``, ``categories``);
  SDXL: the token is new in both tokenizers, ``modifier_embeddings`` ``(k, d_1)`` holds its rows in ``text_encoder``
  and ``modifier_embeddings_2`` ``(k, d_2)`` in ``text_encoder_2``. The K/V projections read the concatenated
  context (``d = d_1 + d_2``, 2048 in SDXL).

Shape legend: b batch, d text width, o output width, r rank, k concepts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from editbench.concepts import ConceptData
from editbench.errors import ArtifactError, EditbenchError
from editbench.methods import register
from editbench.methods.base import Artifact, EditHandle, Editor, artifact_phrases
from editbench.methods.custom_diffusion.config import CustomDiffusionConfig
from editbench.methods.custom_diffusion.layers import KVLinear, low_rank, resize_augment
from editbench.methods.custom_diffusion.merge import MergeResult, concept_keys, merge_projections
from editbench.methods.prior import ClassPromptSession, PriorPreservation, make_prior
from editbench.methods.tokens import add_tokens, cap_norms_, initial_rows, n_encoders
from editbench.pipelines import text_stack
from editbench.safety import MAX_DIM, is_int, is_number, words
from editbench.sites import find_cross_attention_sites
from editbench.training import ParamGroup, TrainingSession, TrainResult

__all__ = ["EMBEDDINGS", "EMBEDDINGS_2", "CustomDiffusionEditor", "compress", "deltas", "projections"]

EMBEDDINGS = "modifier_embeddings"
EMBEDDINGS_2 = "modifier_embeddings_2"
ROWS = (EMBEDDINGS, EMBEDDINGS_2)
"""The artifact tensor of each text encoder's modifier rows (SDXL: two)."""


def projections(unet: nn.Module) -> dict[str, nn.Linear]:
    """``{name: module}`` of every cross-attention K and V projection of ``unet`` (``...attn2.to_k`` / ``.to_v``)."""
    out: dict[str, nn.Linear] = {}
    for s in find_cross_attention_sites(unet):
        out[s.key_name], out[s.value_name] = s.key, s.value
    return out


def _delta_tensors(name: str, delta: torch.Tensor, rank: int | None, energy: float | None) -> dict:
    if rank is None and energy is None:
        return {f"{name}.delta": delta}
    up, down = low_rank(delta, rank=rank, energy=energy)
    return {f"{name}.delta_up": up, f"{name}.delta_down": down}


def deltas(artifact: Artifact) -> dict[str, torch.Tensor]:
    """``{projection name: delta (o, d)}`` of an artifact, low-rank factors multiplied out (float32)."""
    out = {}
    for key, t in artifact.tensors.items():
        if key.endswith(".delta"):
            out[key[:-6]] = t.float()
        elif key.endswith(".delta_up"):
            out[key[:-9]] = t.float() @ artifact.tensors[key[:-9] + ".delta_down"].float()
    return out


def compress(artifact: Artifact, *, rank: int | None = None, energy: float | None = 0.6) -> Artifact:
    """A copy of ``artifact`` whose K/V deltas are truncated SVDs (see :func:`~.layers.low_rank`)."""
    if rank is None and energy is None:
        raise EditbenchError("pass rank and/or energy")
    tensors = {k: artifact.tensors[k] for k in ROWS if k in artifact.tensors}
    for name, d in deltas(artifact).items():
        tensors.update(_delta_tensors(name, d, rank, energy))
    meta = dict(artifact.metadata, compression={"rank": rank, "energy": energy})
    return Artifact(artifact.method, tensors, meta)


def _compression(x: Any) -> bool:
    return x is None or (isinstance(x, dict) and
                         (x.get("rank") is None or (is_int(x["rank"]) and 1 <= x["rank"] <= MAX_DIM)) and
                         (x.get("energy") is None or (is_number(x["energy"]) and 0 < x["energy"] <= 1)))


class _Session(ClassPromptSession):
    def __init__(self, pipeline: Any, concepts: list[ConceptData], layers: dict[str, KVLinear],
                 base: dict[str, torch.Tensor], rows: list[nn.Parameter], prior: PriorPreservation | None,
                 config: CustomDiffusionConfig):
        super().__init__(pipeline, prior)
        self.concepts, self.layers, self.base, self.rows, self.config = concepts, layers, base, rows, config
        self.augments = config.augment or config.hflip
        self.factor = int(pipeline.vae_scale_factor)
        self.limits = [config.norm_limits(pipeline, [x.superclass for x in concepts], encoder=e)
                       for e in range(len(rows))]                                # per encoder: (k,) or None

    def after_step(self, step: int) -> None:
        for rows, limits in zip(self.rows, self.limits):
            cap_norms_(rows, limits)

    def param_groups(self) -> list[ParamGroup]:
        c = self.config
        return [ParamGroup("kv", [m.weight for m in self.layers.values()], c.lr, c.weight_decay),
                ParamGroup("modifier", list(self.rows), c.lr_modifier or c.lr, c.weight_decay)]

    def augment(self, images: torch.Tensor, masks: torch.Tensor, prompts: list[str],
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        out_i, out_m, out_p = [], [], []
        for img, m, p in zip(images, masks, prompts):                            # (3, H, W), (1, H, W)
            if self.config.hflip and float(torch.rand((), generator=generator)) < 0.5:
                img, m = img.flip(-1), m.flip(-1)
            prefix = ""
            if self.config.augment:
                img, m, prefix = resize_augment(img, m, self.factor, generator)
            out_i.append(img)
            out_m.append(m)
            out_p.append(prefix + p)
        return torch.stack(out_i), torch.stack(out_m), out_p

    def artifact(self, result: TrainResult) -> Artifact:
        c = self.config
        tensors: dict[str, torch.Tensor] = {k: r.detach().clone() for k, r in zip(ROWS, self.rows)}
        for name, layer in self.layers.items():  # the update alone (bf16 master weights: from the rounded base)
            base = self.base[name].to(c.trainable_dtype).float()                       # (o, d)
            tensors.update(_delta_tensors(name, layer.weight.detach() - base, c.svd_rank, c.svd_energy))
        meta = {"modifier_tokens": [x.placeholder for x in self.concepts],
                "categories": [x.superclass for x in self.concepts],
                "compression": None if c.svd_rank is None and c.svd_energy is None
                else {"rank": c.svd_rank, "energy": c.svd_energy}}
        return Artifact(CustomDiffusionEditor.name, tensors, meta)


@register
class CustomDiffusionEditor(Editor):
    """Custom Diffusion. ``fit`` accepts several concepts (joint training); separately trained artifacts are
    merged with :meth:`compose` (closed form); ``apply`` takes one (possibly multi-concept) artifact."""

    name = "custom_diffusion"
    Config = CustomDiffusionConfig
    new_token = True
    max_artifacts = 1
    max_concepts = None
    metadata_schema: ClassVar[dict] = {
        "modifier_tokens": (words, "a non-empty list of words without whitespace"),
        "categories": (words, "a non-empty list of words without whitespace"),
        "compression": (_compression, "null or {rank: int >= 1 | null, energy: number in (0, 1] | null}"),
    }
    transform_settings = ("rank", "energy")
    export_needs_pipeline = True  # diffusers' format stores full weights: W0 from the base pipeline + the deltas

    def check_pipeline(self, pipeline: Any) -> None:
        text_stack(pipeline, self.name)  # SD 1.x / 2.x and SDXL; any other pipeline class is refused by name

    def transform(self, artifact: Artifact, **settings: Any) -> Artifact:
        """:func:`compress` the artifact (settings ``rank`` and/or ``energy``)."""
        return compress(artifact, **settings)

    def export(self, artifact: Artifact, folder: str | os.PathLike, pipeline: Any = None) -> Path:
        """diffusers' Custom Diffusion output (``folder/pytorch_custom_diffusion_weights.safetensors`` and one
        ``folder/<token>.safetensors`` per modifier token; :func:`~editbench.methods.custom_diffusion.interop.
        export_diffusers`). The format stores full K/V weights, so it needs the base ``pipeline`` the artifact was
        trained on (EditbenchError if it is None or another base model)."""
        from editbench.methods.custom_diffusion.interop import export_diffusers

        if pipeline is None:
            raise EditbenchError("custom_diffusion.export needs the base pipeline (diffusers' Custom Diffusion format "
                                 "stores full K/V weights, W0 + delta): export(artifact, folder, pipeline)")
        self.check_pipeline(pipeline)
        base_fp = self.fingerprint(pipeline)
        if artifact.base_fingerprint != base_fp:
            raise EditbenchError(f"artifact {artifact.path or ''} was trained on base model "
                                 f"{artifact.base_fingerprint} but this pipeline is {base_fp}; export it with the "
                                 "matching base model")
        return export_diffusers(artifact, pipeline, folder)

    def export_usage(self, artifact: Artifact, folder: str | os.PathLike) -> str:
        return ("from editbench.methods.custom_diffusion import load_diffusers\n"
                f"handle = load_diffusers(pipe, {str(folder)!r})  # K/V processors and modifier tokens; "
                "diffusers' own unet.load_attn_procs leaves the model unedited\n"
                f"# prompt with {' / '.join(repr(p) for p in artifact_phrases(artifact))}; handle.undo() removes it")

    def prepare_training(self, pipeline: Any, concept: ConceptData | Sequence[ConceptData], handle: EditHandle,
                         config: CustomDiffusionConfig) -> TrainingSession:
        concepts = [concept] if isinstance(concept, ConceptData) else list(concept)
        prior = make_prior(pipeline, concepts, config)  # class images from the unedited base model, first
        layers, base = {}, {}
        for name, lin in projections(pipeline.unet).items():
            base[name] = lin.weight.detach()
            layers[name] = KVLinear(lin)
            handle.swap_module(pipeline.unet, name, layers[name])
        inits = [config.initializers[j % len(config.initializers)] for j in range(len(concepts))]
        rows = []
        for e in range(n_encoders(pipeline)):  # SDXL: the modifier is new in both encoders, rows in each
            rows.append(initial_rows(pipeline, inits, encoder=e))                # (k, d_e)
            add_tokens(handle, pipeline, [c.placeholder for c in concepts], rows[-1], encoder=e)
        return _Session(pipeline, concepts, layers, base, rows, prior, config)

    def check_artifact(self, artifact: Artifact, pipeline: Any = None) -> None:
        t, meta = artifact.tensors, artifact.metadata
        emb = t.get(EMBEDDINGS)
        tokens, cats = meta.get("modifier_tokens"), meta.get("categories")
        if emb is None or emb.ndim != 2:
            raise ArtifactError(f"custom_diffusion artifact has no 2-D '{EMBEDDINGS}' tensor")
        if not isinstance(tokens, list) or not isinstance(cats, list) or not len(tokens) == len(cats) == len(emb):
            raise ArtifactError(f"metadata modifier_tokens/categories must list one entry per embedding row "
                                f"({len(emb)}), got {tokens!r} / {cats!r}")
        second = t.get(EMBEDDINGS_2)
        if second is not None and (second.ndim != 2 or second.shape[0] != emb.shape[0]):
            raise ArtifactError(f"'{EMBEDDINGS_2}' must be (k={emb.shape[0]}, d_2) like '{EMBEDDINGS}', got "
                                f"{tuple(second.shape)}")
        names = set()
        for key, v in t.items():
            stem, _, kind = key.rpartition(".")
            if key in ROWS:
                continue
            if kind not in ("delta", "delta_up", "delta_down") or v.ndim != 2:
                raise ArtifactError(f"unexpected tensor {key!r} {tuple(v.shape)} in a custom_diffusion artifact")
            if kind == "delta_up" and (stem + ".delta_down" not in t or t[stem + ".delta_down"].shape[0] != v.shape[1]):
                raise ArtifactError(f"{key} has no matching {stem}.delta_down of rank {v.shape[1]}")
            names.add(stem)
        shapes = {n: (t[n + ".delta"].shape if n + ".delta" in t
                      else (t[n + ".delta_up"].shape[0], t[n + ".delta_down"].shape[1])) for n in names}
        if not names:
            raise ArtifactError("custom_diffusion artifact holds no K/V deltas")
        if pipeline is None:
            return
        proj = projections(pipeline.unet)
        if set(proj) != names:
            raise ArtifactError(f"the artifact edits {len(names)} projections but this UNet has {len(proj)} "
                                f"cross-attention K/V projections (e.g. missing {sorted(set(proj) ^ names)[:2]}): "
                                "it was trained for another base model")
        for n, lin in proj.items():
            if tuple(shapes[n]) != tuple(lin.weight.shape):
                raise ArtifactError(f"{n}: the artifact's delta is {tuple(shapes[n])} but the UNet's weight is "
                                    f"{tuple(lin.weight.shape)}: it was trained for another base model")
        n = n_encoders(pipeline)
        if len([k for k in ROWS if k in t]) != n:
            raise ArtifactError(f"the artifact holds modifier rows for {len([k for k in ROWS if k in t])} text "
                                f"encoder(s) but this pipeline has {n}: it was trained for another base model")
        for key, enc in zip(ROWS, ("text_encoder", "text_encoder_2")[:n]):
            d = getattr(pipeline, enc).get_input_embeddings().weight.shape[1]
            if t[key].shape[1] != d:
                raise ArtifactError(f"modifier embeddings {key} have width {t[key].shape[1]}, the {enc} {d}")

    def install(self, pipeline: Any, artifacts: list[Artifact], handle: EditHandle, settings: Any) -> None:
        art = artifacts[0]
        for name, delta in deltas(art).items():
            old = pipeline.unet.get_submodule(name)
            new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None,
                            device=old.weight.device, dtype=old.weight.dtype)
            with torch.no_grad():
                new.weight.copy_((old.weight.float() + delta.to(old.weight.device)).to(old.weight.dtype))
                if old.bias is not None:
                    new.bias.copy_(old.bias)
            new.requires_grad_(old.weight.requires_grad)
            handle.swap_module(pipeline.unet, name, new)
        _add_modifiers(handle, pipeline, art.metadata["modifier_tokens"], [art.tensors[k] for k in ROWS
                                                                          if k in art.tensors])

    # ---- the closed-form merge ------------------------------------------------------------------------------

    def merge(self, pipeline: Any, artifacts: Iterable[Artifact], *, cov: torch.Tensor | None = None
              ) -> MergeResult:
        """The float64 merged K/V weights of ``artifacts`` for ``pipeline`` (see :mod:`.merge`).

        ``cov``: the ``(d, d)`` text second moment; default: estimated from the pipeline's text encoder over
        :func:`editbench.text_covariance.default_captions` (plus ``config.merge_ridge``).
        """
        from editbench.text_covariance import default_captions, estimate_pipeline_covariance

        arts = list(artifacts)
        if len(arts) < 1:
            raise EditbenchError("merge needs at least one artifact")
        fp = self.fingerprint(pipeline)
        for a in arts:
            if a.method != self.name:
                raise ArtifactError(f"cannot merge a {a.method!r} artifact with custom_diffusion")
            self.check_artifact(a, pipeline)
            if a.base_fingerprint != fp:
                raise EditbenchError(f"artifact {a.path or ''} was trained on base model {a.base_fingerprint}, "
                                     f"not on this pipeline ({fp})")
        tokens = [t for a in arts for t in a.metadata["modifier_tokens"]]
        if len(set(tokens)) != len(tokens):
            raise EditbenchError(f"the artifacts share modifier tokens {tokens}; concepts merged together need "
                                 "distinct placeholders (train them as '<new1>', '<new2>', ...)")
        if cov is None:
            moment = estimate_pipeline_covariance(pipeline, default_captions()[: self.config.merge_captions],
                                                  progress=False,
                                                  corpus=f"default_captions[:{self.config.merge_captions}]")
            cov = moment.matrix(ridge=self.config.merge_ridge)
        proj = projections(pipeline.unet)
        base = {n: m.weight.detach() for n, m in proj.items()}
        tuned = [{n: base[n].double() + d.double() for n, d in deltas(a).items()} for a in arts]
        with EditHandle(pipeline, "custom_diffusion merge keys") as handle:
            _add_modifiers(handle, pipeline, tokens, [torch.cat([a.tensors[k] for a in arts]) for k in ROWS
                                                      if k in arts[0].tensors])
            keys = [torch.cat([concept_keys(pipeline, t, c) for t, c in zip(a.metadata["modifier_tokens"],
                                                                           a.metadata["categories"])])
                    for a in arts]
        return merge_projections(base, tuned, keys, cov)

    def compose(self, artifacts: Iterable[Artifact], pipeline: Any = None, *,
                cov: torch.Tensor | None = None) -> Artifact:
        """Merge separately trained concepts into one artifact with the paper's closed form (needs the base
        ``pipeline``: its weights ``W0`` and text encoder define the problem). The merged deltas have rank at most
        the number of keys and are stored exactly as low-rank factors."""
        if pipeline is None:
            raise EditbenchError("custom_diffusion.compose needs the base pipeline: compose(artifacts, pipeline)")
        arts = list(artifacts)
        result = self.merge(pipeline, arts, cov=cov)
        n = result.keys.shape[0]
        tensors: dict[str, torch.Tensor] = {k: torch.cat([a.tensors[k].float() for a in arts]) for k in ROWS
                                            if k in arts[0].tensors}
        proj = projections(pipeline.unet)
        for name, w in result.weights.items():
            tensors.update(_delta_tensors(name, (w - proj[name].weight.double()).float(), n, None))
        meta = {"modifier_tokens": [t for a in arts for t in a.metadata["modifier_tokens"]],
                "categories": [c for a in arts for c in a.metadata["categories"]],
                "phrase": [p for a in arts for p in artifact_phrases(a)],
                "compression": {"rank": n, "energy": None, "exact": True},
                "base_fingerprint": self.fingerprint(pipeline),
                "config": json.loads(json.dumps(dataclasses.asdict(self.config))),
                "composed_from": [{"concepts": a.metadata["modifier_tokens"], "checksum": a.metadata.get("checksum"),
                                   "path": str(a.path) if a.path else None} for a in arts],
                "merge": {"keys": n, "captions": "default_captions" if cov is None else "given",
                          "ridge": self.config.merge_ridge}}
        return Artifact(self.name, tensors, meta)


def _add_modifiers(handle: EditHandle, pipeline: Any, tokens: list[str], rows: list[torch.Tensor]) -> list[int]:
    """Install modifier ``tokens`` with ``rows[e]`` ``(k, d_e)`` in text encoder ``e`` (SDXL: both); the ids in
    the first tokenizer go to ``handle.info["token_ids"]`` (and ``"token_ids_2"``)."""
    ids = []
    for e, r in enumerate(rows):
        ref = getattr(pipeline, ("text_encoder", "text_encoder_2")[e]).get_input_embeddings().weight
        ids.append(add_tokens(handle, pipeline, tokens, r.to(ref.device, ref.dtype), encoder=e))
        handle.info["token_ids" if e == 0 else "token_ids_2"] = ids[-1]
    return ids[0]
