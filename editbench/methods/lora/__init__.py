"""LoRA: peft low-rank adapters on the UNet attention projections, trained DreamBooth-style."""

from editbench.methods.lora.config import LoRAConfig, LoRASettings
from editbench.methods.lora.editor import DIFFUSERS_WEIGHT_NAME, LoRAEditor, export_diffusers, peft_config

__all__ = ["DIFFUSERS_WEIGHT_NAME", "LoRAConfig", "LoRAEditor", "LoRASettings", "export_diffusers", "peft_config"]
