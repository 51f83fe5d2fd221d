"""The capture's C++ hooks (``csrc/cpu/capture_hook.cpp``): per-example FactGraSS on the CPU.

For a plain contiguous CPU activation, a FactGraSS layer's forward hook is a C++ object: it
gathers the kept input columns and registers a C++ hook on the output that runs the fused
kernel when delta arrives. No Python runs per layer in the step, and autograd calls the
gradient hook without taking the GIL. The results are collected after backward. Any other
input goes to the Python hooks unchanged (``fallback``), and an output gradient that the kernel
refuses is reduced after backward through the checked path, which computes the same result or
raises the precise error.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class NativeHooks:
    """The C++ hooks of one ``GradientCapture``, by layer."""

    def __init__(self) -> None:
        self.hooks: dict[str, object] = {}

    def forward_hook(self, name: str, op, fallback: Callable) -> Callable:
        """The C++ forward hook of layer ``name`` (``op.native_hook``), with the Python hook
        ``fallback`` for the inputs it does not take; ``fallback`` itself where there is none
        (no extension, a shard view, every input column kept)."""
        make = getattr(op, "native_hook", None)
        hook = make(name, fallback) if make is not None else None
        if hook is None:
            return fallback
        self.hooks[name] = hook
        return hook

    def reset(self) -> None:
        """Drop what a failed step left behind (features, results)."""
        for hook in self.hooks.values():
            hook.reset()

    def clear(self) -> None:
        self.reset()
        self.hooks.clear()

    def collect(self, results: dict[str, torch.Tensor],
                reduce: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]) -> None:
        """Move this step's results into ``results``; a gradient the kernel refused goes through
        ``reduce[name](features, gradient)``, the checked path."""
        for name, hook in self.hooks.items():
            res, feats, grad = hook.take()
            if res is None and grad is not None:
                res = reduce[name](feats, grad)
            if res is None:
                continue
            if name in results:
                raise RuntimeError(two_gradients(name))
            results[name] = res


def two_gradients(name: str) -> str:
    """The error for a layer that got two output gradients in one step (the C++ hook raises
    the same words)."""
    return (f"layer {name} received two output gradients in one step; modules called more "
            "than once per forward are not supported")
