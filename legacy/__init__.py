"""Frozen re-implementations of the paper's original label relaxation code (see README.md)."""
