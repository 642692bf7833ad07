"""Mneme LightningModules: encoders, continual classifier, the CLI."""

from app.classifier import ContinualClassifier

__all__ = ["ContinualClassifier"]
