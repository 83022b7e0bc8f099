"""Callbacks that are always on (added by the CLI subclass, never through YAML lists)."""
from __future__ import annotations


def default_callbacks() -> list:
    """The project's always-on callbacks: retrieval metrics, temperature, variance, results."""
    return []
