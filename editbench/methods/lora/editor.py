"""LoRA (Hu et al., 2021) on the UNet attention projections, DreamBooth-style ("<identifier> <class>"), with peft.

Artifact tensors: peft's adapter state dict, ``<module>.lora_A.weight`` ``(r, in)`` and ``<module>.lora_B.weight``
``(out, r)`` for every targeted module (e.g. ``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``);
metadata ``lora`` = ``{r, lora_alpha, target_modules, init_lora_weights}``. The adapted layer computes
``W x + (lora_alpha / r) * weight * B A x``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, ClassVar

import torch

from editbench.concepts import ConceptData
from editbench.errors import ArtifactError
from editbench.methods import register
from editbench.methods.base import Artifact, EditHandle, Editor
from editbench.methods.lora.config import LoRAConfig, LoRASettings
from editbench.methods.prior import ClassPromptSession, make_prior
from editbench.pipelines import text_stack
from editbench.safety import is_int, is_number, token, words
from editbench.training import ParamGroup, TrainingSession, TrainResult

__all__ = ["DIFFUSERS_WEIGHT_NAME", "LoRAEditor", "export_diffusers", "peft_config"]

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def peft_config(meta: dict) -> Any:
    """The ``peft.LoraConfig`` described by an artifact's ``lora`` metadata."""
    from peft import LoraConfig

    return LoraConfig(r=int(meta["r"]), lora_alpha=float(meta["lora_alpha"]),
                      target_modules=list(meta["target_modules"]), init_lora_weights=meta["init_lora_weights"])


def _lora_entry(x: Any) -> bool:
    return (isinstance(x, dict) and is_int(x.get("r")) and 1 <= x["r"] <= 65536
            and is_number(x.get("lora_alpha")) and x["lora_alpha"] > 0
            and words(x.get("target_modules"))
            and (isinstance(x.get("init_lora_weights"), bool) or token(x.get("init_lora_weights"))))


def _inject(handle: EditHandle, unet: Any, configs: list[tuple[str, Any]]) -> None:
    """Add peft adapters ``(name, LoraConfig)`` to ``unet`` (diffusers' ``add_adapter``), recorded on ``handle``:
    undo deletes them and, if no other adapter is left, puts the original ``nn.Linear`` modules back."""
    loaded = getattr(unet, "_hf_peft_config_loaded", False)
    had_flag = "_hf_peft_config_loaded" in vars(unet)
    previous = unet.active_adapters() if loaded else []
    names = [n for n, _ in configs]
    grads = [(p, p.requires_grad) for p in unet.parameters()]  # add_adapter freezes every base weight

    def restore() -> None:
        if set(getattr(unet, "peft_config", None) or {}) <= set(names):
            unet.unload_lora()                  # restores every wrapped layer's original base_layer module
            if had_flag:
                unet._hf_peft_config_loaded = loaded
            else:
                vars(unet).pop("_hf_peft_config_loaded", None)
        else:
            unet.delete_adapters(names)
            if previous:
                unet.set_adapters(previous)
        for p, flag in grads:
            p.requires_grad_(flag)

    try:
        for name, cfg in configs:
            unet.add_adapter(cfg, adapter_name=name)
    finally:
        handle.on_undo(f"LoRA adapters {names}", restore)


class _Session(ClassPromptSession):
    def __init__(self, pipeline: Any, prior: Any, adapter: str, config: LoRAConfig):
        super().__init__(pipeline, prior)
        self.adapter, self.config = adapter, config
        self.params = [p for n, p in pipeline.unet.named_parameters() if f".{adapter}." in n and ".lora_" in n]
        for p in self.params:  # peft makes adapters in the base layer's dtype; on a half-precision pipeline they
            p.data = p.data.float()  # train in float32 (peft casts the input to them), as diffusers' scripts do

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("lora", self.params, self.config.lr, self.config.weight_decay)]

    def artifact(self, result: TrainResult) -> Artifact:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.pipeline.unet, adapter_name=self.adapter)
        c = self.config
        meta = {"r": c.rank, "lora_alpha": c.alpha, "target_modules": list(c.target_modules),
                "init_lora_weights": c.init_lora_weights}
        return Artifact(LoRAEditor.name, {k: v.detach().clone() for k, v in state.items()}, {"lora": meta})


@register
class LoRAEditor(Editor):
    """LoRA. ``apply`` takes several artifacts at once (one peft adapter each, combined with weights)."""

    name = "lora"
    Config = LoRAConfig
    Settings = LoRASettings
    new_token = False
    max_artifacts = None
    metadata_schema: ClassVar[dict] = {
        "lora": (_lora_entry, "{r: int 1..65536, lora_alpha: number > 0, target_modules: [words], init_lora_weights}"),
    }

    def check_pipeline(self, pipeline: Any) -> None:
        text_stack(pipeline, self.name)  # SD 1.x / 2.x and SDXL; any other pipeline class is refused by name

    def prepare_training(self, pipeline: Any, concept: ConceptData, handle: EditHandle,
                         config: LoRAConfig) -> TrainingSession:
        from peft import LoraConfig

        prior = make_prior(pipeline, concept, config)  # class images from the unedited base model, first
        taken = set(getattr(pipeline.unet, "peft_config", None) or {})
        adapter = next(f"editbench_train_{i}" for i in range(len(taken) + 1) if f"editbench_train_{i}" not in taken)
        cfg = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=list(config.target_modules),
                         init_lora_weights=config.init_lora_weights, lora_dropout=config.dropout)
        _inject(handle, pipeline.unet, [(adapter, cfg)])
        return _Session(pipeline, prior, adapter, config)

    def check_artifact(self, artifact: Artifact, pipeline: Any = None) -> None:
        meta = artifact.metadata.get("lora")
        if not isinstance(meta, dict) or not {"r", "lora_alpha", "target_modules", "init_lora_weights"} <= set(meta):
            raise ArtifactError(f"a lora artifact needs metadata 'lora' with r, lora_alpha, target_modules and "
                                f"init_lora_weights, got {meta!r}")
        modules: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in artifact.tensors.items():
            m = _KEY.match(key)
            if m is None or t.ndim != 2:
                raise ArtifactError(f"unexpected tensor {key!r} {tuple(t.shape)} in a lora artifact")
            modules.setdefault(m["module"], {})[m["ab"]] = t
        r = int(meta["r"])
        for name, ab in modules.items():
            if set(ab) != {"A", "B"} or ab["A"].shape[0] != r or ab["B"].shape[1] != r:
                raise ArtifactError(f"{name}: needs lora_A (r={r}, in) and lora_B (out, r={r}), got "
                                    f"{ {k: tuple(v.shape) for k, v in ab.items()} }")
        if not modules:
            raise ArtifactError("lora artifact holds no adapter weights")
        targets = meta["target_modules"]  # peft matches them as module-name suffixes
        hits = {t: [n for n in modules if isinstance(t, str) and (n == t or n.endswith("." + t))]
                for t in (targets if isinstance(targets, list) else [])}
        uncovered = [n for n in modules if not any(n in h for h in hits.values())]
        if not hits or uncovered or not all(hits.values()):
            raise ArtifactError(f"lora metadata target_modules {targets!r} do not match the adapter weights (e.g. "
                                f"{(uncovered or sorted(modules))[:1]}); the artifact is damaged")
        if pipeline is None:
            return
        for name, ab in modules.items():
            try:
                layer = pipeline.unet.get_submodule(name)
            except AttributeError:
                raise ArtifactError(f"this UNet has no module {name}: the artifact was trained for another base "
                                    "model") from None
            layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
            shape = (getattr(layer, "out_features", None), getattr(layer, "in_features", None))
            if shape != (ab["B"].shape[0], ab["A"].shape[1]):
                raise ArtifactError(f"{name}: the adapter maps {ab['A'].shape[1]} -> {ab['B'].shape[0]} but the layer "
                                    f"is {shape[1]} -> {shape[0]}: the artifact was trained for another base model")

    def install(self, pipeline: Any, artifacts: list[Artifact], handle: EditHandle, settings: LoRASettings) -> None:
        from peft import set_peft_model_state_dict

        unet = pipeline.unet
        taken = set(getattr(unet, "peft_config", None) or {})
        names = [f"editbench_{i}" for i in range(len(taken) + len(artifacts)) if f"editbench_{i}" not in taken]
        names = names[: len(artifacts)]
        _inject(handle, unet, [(n, peft_config(a.metadata["lora"])) for n, a in zip(names, artifacts)])
        for name, art in zip(names, artifacts):
            result = set_peft_model_state_dict(unet, art.tensors, adapter_name=name)
            if result.unexpected_keys:
                raise ArtifactError(f"the adapter weights do not fit this UNet: {result.unexpected_keys[:3]}")
        unet.set_adapters(names, settings.weights(len(artifacts)))
        handle.info["adapters"] = names

    def export(self, artifact: Artifact, folder: str | os.PathLike, pipeline: Any = None) -> Path:
        """diffusers' LoRA file ``folder/pytorch_lora_weights.safetensors`` (:func:`export_diffusers`)."""
        return export_diffusers(artifact, folder)

    def export_usage(self, artifact: Artifact, folder: str | os.PathLike) -> str:
        return (f"pipe.load_lora_weights({str(folder)!r}, adapter_name='concept')  # prompt with "
                f"{self.phrase(artifact)!r}; strength: pipe(..., cross_attention_kwargs={{'scale': s}}); several: "
                "pipe.set_adapters([...], adapter_weights=[...])")


def export_diffusers(artifact: Artifact, folder: str | os.PathLike) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` with diffusers' own writer
    (``StableDiffusionPipeline.save_lora_weights``, keys converted by ``convert_state_dict_to_diffusers``, the
    peft config in the header so that ``lora_alpha != r`` survives). Load with
    ``pipe.load_lora_weights(folder, adapter_name=...)``; combine with ``pipe.set_adapters([...],
    adapter_weights=[...])`` and scale with ``cross_attention_kwargs={"scale": s}``."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    LoRAEditor().check_artifact(artifact)
    layers = convert_state_dict_to_diffusers(dict(artifact.tensors))
    StableDiffusionPipeline.save_lora_weights(Path(folder), unet_lora_layers=layers, safe_serialization=True,
                                              unet_lora_adapter_metadata=peft_config(artifact.metadata["lora"]).to_dict())
    return Path(folder) / DIFFUSERS_WEIGHT_NAME
