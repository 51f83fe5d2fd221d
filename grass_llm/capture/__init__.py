"""Gradient capture on causal LMs: FactGraSS / LoGra hooks on Linear layers, per example and
per token, with no weight gradients computed."""

from grass_llm.capture.hooks import CaptureOutput, GradientCapture
from grass_llm.capture.layers import select_layers
from grass_llm.capture.loss import expand_per_token, per_example_loss

__all__ = ["GradientCapture", "CaptureOutput", "select_layers", "per_example_loss",
           "expand_per_token"]
