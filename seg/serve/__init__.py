"""Serving a trained model: the Predictor (photo in, labels out), export, the web demo and its guards, prediction
files."""

from seg.serve.predictor import Predictor

__all__ = ["Predictor"]
