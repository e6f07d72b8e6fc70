"""Perfusion: key-locked, gated rank-1 editing of cross-attention (Tewel et al., SIGGRAPH 2023).

See ``docs/methods/perfusion.md``. Registered as ``"perfusion"``; the public pieces:

* :class:`PerfusionEditor` (``fit`` / ``apply`` / ``load``), :class:`PerfusionConfig`, :class:`PerfusionSettings`;
* :func:`gated_rank1`, the exact (multi-concept) gated rank-1 projection as a pure function;
* :class:`GatedRank1Linear` and :class:`ConceptBank`, the layers swapped into a UNet;
* :func:`text_covariance`, the cached text second moment ``C``.
"""

from editbench.methods.perfusion.config import PerfusionConfig, PerfusionSettings
from editbench.methods.perfusion.editor import PerfusionEditor, superclass_encoding, text_covariance
from editbench.methods.perfusion.layers import ConceptBank, GatedRank1Linear, gate_projection, gated_rank1

__all__ = ["ConceptBank", "GatedRank1Linear", "PerfusionConfig", "PerfusionEditor", "PerfusionSettings",
           "gate_projection", "gated_rank1", "superclass_encoding", "text_covariance"]
