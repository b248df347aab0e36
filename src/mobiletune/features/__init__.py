"""Frozen features: the pass through the layers below the cut, computed once per image view and kept in a shared
store."""
