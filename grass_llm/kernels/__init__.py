"""Fused FactGraSS / SJLT kernels (csrc/) behind torch custom ops, with a pure-torch reference.

Dispatch per call: the CUDA extension for CUDA tensors, the CPU extension (C++/OpenMP) for CPU
tensors, else ``reference`` (see ``build`` for the ``GRASS_LLM_KERNELS`` switch and the build
cache). ``reference`` is the spec; tests compare every backend against it. ``tables`` checks
the index tables once each, so no kernel reads out of bounds.
"""

from grass_llm.kernels import tables
from grass_llm.kernels.build import extension, info, mode
from grass_llm.kernels.ops import (FactGraSSCall, backend_name, factgrass, host_calls, host_gather,
                                  native_hook, sjlt, sjlt_t)

__all__ = ["FactGraSSCall", "backend_name", "extension", "factgrass", "host_calls", "host_gather",
           "info", "mode", "native_hook", "sjlt", "sjlt_t", "tables"]
