"""Continual-learning strategies and dashboards as Lightning callbacks."""

from callbacks.continual_metrics import ContinualMetrics
from callbacks.experience import ExperienceCallback

__all__ = ["ContinualMetrics", "ExperienceCallback"]
