"""Coarse-to-fine hyperparameter search for PyTorch image classifiers, tracked in MLflow."""

__version__ = "0.1.0"
