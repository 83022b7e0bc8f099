"""Callbacks that are always on (added by the CLI subclass, never through YAML lists)."""
from __future__ import annotations

from lightning_clip.callbacks.results import ResultsCallback
from lightning_clip.callbacks.retrieval import RetrievalCallback
from lightning_clip.callbacks.temperature import TemperatureCallback
from lightning_clip.callbacks.variance import VarianceCallback

__all__ = ["RetrievalCallback", "TemperatureCallback", "VarianceCallback", "ResultsCallback", "default_callbacks"]


def default_callbacks() -> list:
    """The project's always-on callbacks: retrieval metrics, temperature, variance, results.

    Retrieval comes first: the variance callback reads its ranks (either order works, the ranks are
    computed once per epoch on first use), and results runs after both have logged."""
    return [RetrievalCallback(), TemperatureCallback(), VarianceCallback(), ResultsCallback()]
