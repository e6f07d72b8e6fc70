"""One parser for the values a user writes: ``--set key=value`` items and suite YAML files.

PyYAML implements YAML 1.1, whose float pattern needs a dot: it reads ``1e-4`` (and ``5E3``) as the *string*
``'1e-4'``, so ``--set lr=1e-4`` was refused as "not a number" while ``0.0001`` worked. :class:`Loader` is PyYAML's
safe loader with the YAML 1.2 core schema's float pattern instead (``1e-4``, ``1.5e3``, ``.5``, ``-2E+8``, ``.inf``,
``.nan``); everything else (ints, booleans, null, strings, lists, mappings) reads as before, and it constructs
plain Python data only, like ``yaml.safe_load``.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

__all__ = ["Loader", "load_yaml", "parse_value"]

_FLOAT = "tag:yaml.org,2002:float"
# YAML 1.2 core schema floats, plus the '_' digit separators PyYAML allows; an exponent without a dot included
_FLOAT_12 = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                          |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
                          |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
                          |[-+]?\.(?:inf|Inf|INF)
                          |\.(?:nan|NaN|NAN))$""", re.X)


class Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``1e-4`` style numbers as floats (see the module docstring)."""


Loader.yaml_implicit_resolvers = {  # a copy: SafeLoader's own table stays YAML 1.1
    first: [(tag, rx) for tag, rx in resolvers if tag != _FLOAT]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
Loader.add_implicit_resolver(_FLOAT, _FLOAT_12, list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse a YAML document with :class:`Loader` (``yaml.YAMLError`` on bad YAML)."""
    loader = Loader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_value(text: str) -> Any:
    """The value of ``--set key=TEXT``: a YAML scalar or flow collection (``0.7``, ``1e-4``, ``true``, ``null``,
    ``[1, 2]``); text that is not valid YAML stays the string it is."""
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text
