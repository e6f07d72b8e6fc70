"""``read_tensors`` for tests/test_toyworld.py, the one importer left of this name; everything else reads and
writes through :mod:`editbench.storage`."""

from editbench.storage import read_tensors

__all__ = ["read_tensors"]
