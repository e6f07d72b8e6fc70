"""Custom Diffusion: fine-tune cross-attention K/V + a modifier token; closed-form multi-concept merge."""

from editbench.methods.custom_diffusion.config import CustomDiffusionConfig
from editbench.methods.custom_diffusion.editor import CustomDiffusionEditor, compress, deltas, projections
from editbench.methods.custom_diffusion.interop import WEIGHT_NAME, export_diffusers, load_diffusers
from editbench.methods.custom_diffusion.merge import MergeResult

__all__ = ["WEIGHT_NAME", "CustomDiffusionConfig", "CustomDiffusionEditor", "MergeResult", "compress", "deltas",
           "export_diffusers", "load_diffusers", "projections"]
