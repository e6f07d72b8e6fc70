"""editbench: text-to-image personalization and cross-attention model editing on one harness."""

__version__ = "0.1.0"

from editbench.errors import EditbenchError  # noqa: E402

__all__ = ["EditbenchError", "__version__"]
