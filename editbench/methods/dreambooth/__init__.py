"""DreamBooth: full UNet fine-tune on a rare identifier with prior preservation."""

from editbench.methods.dreambooth.config import DEFAULT_IDENTIFIER, DreamBoothConfig
from editbench.methods.dreambooth.editor import DreamBoothEditor, export_diffusers

__all__ = ["DEFAULT_IDENTIFIER", "DreamBoothConfig", "DreamBoothEditor", "export_diffusers"]
