"""Where a model reads text: the key/value projections of its cross-attention layers ("sites").

Every editing method in editbench (Perfusion, Custom Diffusion, ROME-style edits) changes the pair of linear maps
that turn text-encoder vectors into attention keys and values. :func:`find_cross_attention_sites` lists them:
for a diffusers ``UNet2DConditionModel`` the ``attn2.to_k`` / ``attn2.to_v`` pairs, for any other model the
modules matching name patterns the caller gives.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import nn

from editbench.errors import EditbenchError

__all__ = ["CrossAttentionSite", "find_cross_attention_sites"]

Pattern = str | re.Pattern


@dataclass(frozen=True)
class CrossAttentionSite:
    """One cross-attention layer: its key and value projections (``nn.Linear``, text width -> attention width).

    ``name`` is the dotted path of the attention module (e.g.
    ``down_blocks.0.attentions.0.transformer_blocks.0.attn2``); ``key_name``/``value_name`` are the dotted paths
    of the projections (default ``name + ".to_k"`` / ``name + ".to_v"``, diffusers' naming).
    """

    name: str
    key: nn.Linear
    value: nn.Linear
    key_name: str = ""
    value_name: str = ""

    def __post_init__(self) -> None:
        if not self.key_name:
            object.__setattr__(self, "key_name", f"{self.name}.to_k")
        if not self.value_name:
            object.__setattr__(self, "value_name", f"{self.name}.to_v")

    @property
    def in_features(self) -> int:
        """Text width: the input width of both projections."""
        return self.key.in_features

    @property
    def key_features(self) -> int:
        """Output width of the key projection."""
        return self.key.out_features

    @property
    def value_features(self) -> int:
        """Output width of the value projection."""
        return self.value.out_features


def _matcher(pattern: Pattern, what: str) -> Callable[[str], bool]:
    """Compiled regexes must match the whole dotted name; strings are globs matching the name or a dotted suffix."""
    if isinstance(pattern, re.Pattern):
        return lambda name: pattern.fullmatch(name) is not None
    if isinstance(pattern, str) and pattern:
        return lambda name: fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)
    raise EditbenchError(f"{what} must be a non-empty glob string (e.g. 'cross.k_proj') or a compiled regex, "
                         f"got {pattern!r}")


def _linear(module: nn.Module, name: str) -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise EditbenchError(f"{name} is a {type(module).__name__}, not an nn.Linear; merge or remove adapters "
                             "(LoRA, ...) first, or point the pattern at the linear layer itself")
    return module


def _unet_sites(model: nn.Module, text_dim: int | None) -> list[CrossAttentionSite]:
    """Every ``attn2`` whose ``to_k``/``to_v`` read the text width of a diffusers UNet config."""
    config_dim = getattr(getattr(model, "config", None), "cross_attention_dim", None)
    if config_dim is None:
        raise EditbenchError(f"{type(model).__name__} is not a diffusers UNet2DConditionModel (no "
                             "config.cross_attention_dim); pass key_pattern= and value_pattern= naming its "
                             "cross-attention key/value projections")
    widths = set(config_dim) if isinstance(config_dim, (list, tuple)) else {config_dim}
    if text_dim is not None:
        if text_dim not in widths:
            raise EditbenchError(f"text_dim={text_dim} disagrees with model.config.cross_attention_dim="
                                 f"{config_dim}; pass the width of the text encoder this UNet was built for")
        widths = {text_dim}
    sites = []
    for name, module in model.named_modules():
        if name.rpartition(".")[2] != "attn2":
            continue
        k, v = getattr(module, "to_k", None), getattr(module, "to_v", None)
        if k is None or v is None:
            raise EditbenchError(f"{name} has {'no to_k' if k is None else 'no to_v'}: incomplete key/value pair")
        k, v = _linear(k, f"{name}.to_k"), _linear(v, f"{name}.to_v")
        if k.in_features not in widths and v.in_features not in widths:
            continue  # an attn2 that attends to the image (double self-attention), not to text
        if k.in_features != v.in_features:
            raise EditbenchError(f"{name}: to_k reads width {k.in_features} but to_v reads {v.in_features}; "
                                 "a cross-attention pair must read the same text vectors")
        sites.append(CrossAttentionSite(name, k, v))
    return sites


def _pattern_sites(model: nn.Module, key_pattern: Pattern, value_pattern: Pattern,
                   text_dim: int | None) -> list[CrossAttentionSite]:
    """Key and value modules matched by name, paired by their common parent path."""
    is_key, is_value = _matcher(key_pattern, "key_pattern"), _matcher(value_pattern, "value_pattern")
    keys: dict[str, tuple[str, nn.Module]] = {}
    values: dict[str, tuple[str, nn.Module]] = {}
    for name, module in model.named_modules():
        for table, hit, what in ((keys, is_key(name), "key"), (values, is_value(name), "value")):
            if not name or not hit:
                continue
            parent = name.rpartition(".")[0]
            if parent in table:
                raise EditbenchError(f"{what} pattern matches both {table[parent][0]} and {name} under {parent!r}; "
                                     "make the pattern specific enough to match one module per attention layer")
            table[parent] = (name, module)
    unpaired = sorted(set(keys) ^ set(values))
    if unpaired:
        p = unpaired[0]
        found, missing = (keys[p][0], "value") if p in keys else (values[p][0], "key")
        raise EditbenchError(f"incomplete pair: {found} has no {missing} projection matching the {missing}_pattern "
                             f"under the same parent {p!r}; fix the patterns so keys and values are siblings")
    sites = []
    for parent, (kname, kmod) in keys.items():
        vname, vmod = values[parent]
        k, v = _linear(kmod, kname), _linear(vmod, vname)
        if k is v:
            raise EditbenchError(f"key_pattern and value_pattern both match {kname}; give distinct patterns")
        if k.in_features != v.in_features:
            raise EditbenchError(f"{kname} reads width {k.in_features} but {vname} reads {v.in_features}; a "
                                 "cross-attention pair must read the same text vectors")
        sites.append(CrossAttentionSite(parent, k, v, key_name=kname, value_name=vname))
    widths = sorted({s.in_features for s in sites})
    if text_dim is not None and widths and widths != [text_dim]:
        bad = next(s for s in sites if s.in_features != text_dim)
        raise EditbenchError(f"{bad.key_name} reads width {bad.in_features}, not text_dim={text_dim}; fix the "
                             "patterns (they may match self-attention) or text_dim")
    if len(widths) > 1:
        raise EditbenchError(f"matched projections read different widths {widths}; pass text_dim to say which is "
                             "the text width, or narrow the patterns")
    return sites


def find_cross_attention_sites(model: nn.Module, *, key_pattern: Pattern | None = None,
                               value_pattern: Pattern | None = None,
                               text_dim: int | None = None) -> list[CrossAttentionSite]:
    """The cross-attention key/value projection pairs of ``model``, in ``model.named_modules()`` order.

    Without patterns ``model`` must be a diffusers ``UNet2DConditionModel`` (anything with
    ``config.cross_attention_dim``): every ``attn2`` whose ``to_k``/``to_v`` read the text width
    (``text_dim``, default the config's ``cross_attention_dim``) is a site. For any other module give both
    patterns: a string is a glob (``fnmatch``) that matches a module's full dotted name or a dotted suffix of it
    (``"cross.k_proj"`` matches ``layers.0.cross.k_proj``), a compiled ``re.Pattern`` must match the full name.
    A key and a value pair up when they have the same parent path, which becomes the site's ``name``.

    Raises :class:`EditbenchError` when nothing matches, a pair is incomplete or not ``nn.Linear``, or the
    input widths disagree with each other or with ``text_dim``.
    """
    if not isinstance(model, nn.Module):
        raise EditbenchError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if (key_pattern is None) != (value_pattern is None):
        raise EditbenchError("pass both key_pattern and value_pattern (or neither, for a diffusers UNet)")
    if text_dim is not None and (isinstance(text_dim, bool) or not isinstance(text_dim, int) or text_dim < 1):
        raise EditbenchError(f"text_dim must be a positive int, got {text_dim!r}")
    if key_pattern is None:
        sites = _unet_sites(model, text_dim)
        how = "attn2.to_k/attn2.to_v pairs reading the text width"
    else:
        sites = _pattern_sites(model, key_pattern, value_pattern, text_dim)
        how = f"modules matching key_pattern={key_pattern!r} and value_pattern={value_pattern!r}"
    if not sites:
        raise EditbenchError(f"no cross-attention sites found in {type(model).__name__}: no {how}; check the "
                             "patterns against [name for name, _ in model.named_modules()]")
    return sites
