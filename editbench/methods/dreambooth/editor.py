"""DreamBooth (Ruiz et al., CVPR 2023): fine-tune the whole UNet on "<identifier> <class>" with prior preservation.

Artifact tensors: ``unet.<name>`` for every entry of the tuned UNet's state dict (in the base UNet's dtype) and,
with ``train_text_encoder``, ``text_encoder.<name>`` for the text encoder's (SDXL: both text encoders,
``text_encoder.<name>`` and ``text_encoder_2.<name>``, as diffusers' SDXL scripts train them). Metadata
``unet_config`` / ``text_encoder_config`` (/ ``text_encoder_2_config``) hold the model configs so that
:func:`export_diffusers` can write diffusers' folders.
The artifact is as large as the model: that is the method's storage cost, reported as it is.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch

from editbench.concepts import ConceptData
from editbench.errors import ArtifactError
from editbench.methods import register
from editbench.methods.base import Artifact, EditHandle, Editor
from editbench.methods.dreambooth.config import DreamBoothConfig
from editbench.methods.prior import ClassPromptSession, make_prior
from editbench.pipelines import text_stack
from editbench.safety import identifier
from editbench.training import ParamGroup, TrainingSession, TrainResult

__all__ = ["COMPONENTS", "DreamBoothEditor", "export_diffusers"]

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _components(pipeline: Any, train_text_encoder: bool) -> list[str]:
    """The components a run tunes: the UNet, plus every text encoder with ``train_text_encoder`` (SDXL: two)."""
    if not train_text_encoder:
        return ["unet"]
    return ["unet", "text_encoder"] + (["text_encoder_2"] if getattr(pipeline, "text_encoder_2", None) is not None
                                       else [])


def _config_of(module: torch.nn.Module) -> dict:
    if hasattr(module, "to_json_string"):          # diffusers ConfigMixin
        return json.loads(module.to_json_string())
    return module.config.to_dict()                 # transformers PretrainedConfig


class _Session(ClassPromptSession):
    def __init__(self, pipeline: Any, prior: Any, tuned: dict[str, torch.nn.Module], dtypes: dict[str, torch.dtype],
                 config: DreamBoothConfig):
        super().__init__(pipeline, prior)
        self.tuned, self.dtypes, self.config = tuned, dtypes, config

    def param_groups(self) -> list[ParamGroup]:
        c = self.config
        lrs = {"unet": c.lr, "text_encoder": c.lr_text_encoder or c.lr, "text_encoder_2": c.lr_text_encoder or c.lr}
        return [ParamGroup(name, list(m.parameters()), lrs[name], c.weight_decay) for name, m in self.tuned.items()]

    def artifact(self, result: TrainResult) -> Artifact:
        tensors = {f"{name}.{k}": v.detach().to(self.dtypes[name]).clone()
                   for name, m in self.tuned.items() for k, v in m.state_dict().items()}
        meta = {f"{name}_config": _config_of(m) for name, m in self.tuned.items()}
        return Artifact(DreamBoothEditor.name, tensors, {**meta, "components": list(self.tuned)})


@register
class DreamBoothEditor(Editor):
    """DreamBooth. The concept's placeholder is the rare identifier (e.g. ``"sks"``: a word already in the
    vocabulary, not a new token); prompts say "<identifier> <superclass>"."""

    name = "dreambooth"
    Config = DreamBoothConfig
    new_token = False
    max_artifacts = 1
    metadata_schema: ClassVar[dict] = {
        "components": (lambda x: isinstance(x, list) and 0 < len(x) <= 16 and all(identifier(c) for c in x),
                       "a list of component names"),
        "unet_config": (lambda x: isinstance(x, dict), "an object"),
        "text_encoder_config": (lambda x: isinstance(x, dict), "an object"),
        "text_encoder_2_config": (lambda x: isinstance(x, dict), "an object"),
    }

    def check_pipeline(self, pipeline: Any) -> None:
        text_stack(pipeline, self.name)  # SD 1.x / 2.x and SDXL; any other pipeline class is refused by name

    def shaped_session(self, pipeline: Any, concept: ConceptData, handle: EditHandle) -> TrainingSession:
        """The session around the pipeline's own modules, in their dtypes (no float32 copy)."""
        names = _components(pipeline, self.config.train_text_encoder)
        modules = {name: getattr(pipeline, name) for name in names}
        return _Session(pipeline, None, modules, {n: next(m.parameters()).dtype for n, m in modules.items()},
                        self.config)

    def prepare_training(self, pipeline: Any, concept: ConceptData, handle: EditHandle,
                         config: DreamBoothConfig) -> TrainingSession:
        prior = make_prior(pipeline, concept, config)  # class images from the unedited base model, first
        names = _components(pipeline, config.train_text_encoder)
        tuned, dtypes = {}, {}
        for name in names:  # train a copy in the master-weight dtype; the handle puts the base module back
            base = getattr(pipeline, name)
            dtypes[name] = next(base.parameters()).dtype
            tuned[name] = copy.deepcopy(base)
            if dtypes[name] != config.trainable_dtype:
                tuned[name].to(config.trainable_dtype)
            handle.set_attr(pipeline, name, tuned[name])
        return _Session(pipeline, prior, tuned, dtypes, config)

    def check_artifact(self, artifact: Artifact, pipeline: Any = None) -> None:
        comps = artifact.metadata.get("components")
        if not isinstance(comps, list) or "unet" not in comps or not set(comps) <= set(COMPONENTS):
            raise ArtifactError(f"a dreambooth artifact lists its components (unet[, text_encoder[, text_encoder_2]]), "
                                f"got {comps!r}")
        stray = [k for k in artifact.tensors if k.partition(".")[0] not in comps]
        if stray:
            raise ArtifactError(f"unexpected tensors in a dreambooth artifact: {stray[:3]}")
        if pipeline is None:
            return
        for name in comps:
            if getattr(pipeline, name, None) is None:
                raise ArtifactError(f"the artifact tunes a {name} but this pipeline has none: it was trained for "
                                    "another base model")
            want = {k: tuple(v.shape) for k, v in getattr(pipeline, name).state_dict().items()}
            have = {k[len(name) + 1:]: tuple(v.shape) for k, v in artifact.tensors.items() if k.startswith(name + ".")}
            if want != have:
                diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
                raise ArtifactError(f"the artifact's {name} does not fit this pipeline's ({len(diff)} tensors differ, "
                                    f"e.g. {diff[0]}: artifact {have.get(diff[0])}, model {want.get(diff[0])}); it "
                                    "was trained for another base model")

    def install(self, pipeline: Any, artifacts: list[Artifact], handle: EditHandle, settings: Any) -> None:
        art = artifacts[0]
        for name in art.metadata["components"]:
            base = getattr(pipeline, name)
            new = copy.deepcopy(base)  # same class, processors and placement; then the tuned weights
            state = {k[len(name) + 1:]: v for k, v in art.tensors.items() if k.startswith(name + ".")}
            new.load_state_dict(state, strict=True)
            handle.set_attr(pipeline, name, new)

    def export(self, artifact: Artifact, folder: str | os.PathLike, pipeline: Any = None) -> Path:
        """The tuned components in diffusers' folder layout, ``folder/unet/`` (+ ``folder/text_encoder/``)
        (:func:`export_diffusers`); returns ``folder``."""
        return export_diffusers(artifact, folder)

    def export_usage(self, artifact: Artifact, folder: str | os.PathLike) -> str:
        f = str(folder)
        lines = [f"unet = UNet2DConditionModel.from_pretrained({f!r}, subfolder='unet')"]
        parts = ["unet=unet"]
        comps = artifact.metadata["components"]
        if "text_encoder" in comps:
            lines.append(f"text_encoder = CLIPTextModel.from_pretrained({f!r}, subfolder='text_encoder')")
            parts.append("text_encoder=text_encoder")
        if "text_encoder_2" in comps:
            lines.append(f"text_encoder_2 = CLIPTextModelWithProjection.from_pretrained({f!r}, "
                         "subfolder='text_encoder_2')")
            parts.append("text_encoder_2=text_encoder_2")
        sdxl = "addition_embed_type" in artifact.metadata["unet_config"] and \
            artifact.metadata["unet_config"]["addition_embed_type"] == "text_time"
        cls = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
        lines.append(f"pipe = {cls}.from_pretrained(BASE_MODEL, {', '.join(parts)})  # prompt "
                     f"with {self.phrase(artifact)!r}")
        return "\n".join(lines)


def export_diffusers(artifact: Artifact, folder: str | os.PathLike) -> Path:
    """Write the tuned components in diffusers' folder layout: ``folder/unet/{config.json,
    diffusion_pytorch_model.safetensors}`` (+ ``folder/text_encoder/{config.json, model.safetensors}``, + for
    SDXL ``folder/text_encoder_2/`` as a ``CLIPTextModelWithProjection``).

    Load with ``UNet2DConditionModel.from_pretrained(folder, subfolder="unet")`` and pass it to the base
    pipeline (``StableDiffusionPipeline.from_pretrained(base, unet=unet)`` or ``StableDiffusionPipeline(**{
    **pipe.components, "unet": unet})``). Returns ``folder``.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    DreamBoothEditor().check_artifact(artifact)
    folder = Path(folder)
    text_classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    for name in artifact.metadata["components"]:
        cfg = artifact.metadata[f"{name}_config"]
        model = UNet2DConditionModel.from_config(cfg) if name == "unet" else text_classes[name](CLIPTextConfig(**cfg))
        state = {k[len(name) + 1:]: v for k, v in artifact.tensors.items() if k.startswith(name + ".")}
        model.load_state_dict(state, strict=True)
        dtype = next(iter(state.values())).dtype
        (model if dtype == torch.float32 else model.to(dtype)).save_pretrained(folder / name, safe_serialization=True)
    return folder
