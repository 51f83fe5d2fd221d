"""Which Linear layers to hook: name patterns over a model's modules.

Default: every ``nn.Linear`` inside the decoder blocks (``...layers.N...`` in Llama, Qwen2,
Mistral and GPT-NeoX; ``h.N`` / ``blocks.N`` elsewhere) — q/k/v/o and gate/up/down in a Llama.
``lm_head`` and embeddings are opt-in through ``include`` patterns. Patterns are globs matched
against the full module name (``fnmatch``), or regular expressions when prefixed ``re:``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from torch import nn

DECODER_BLOCK = re.compile(r"(^|\.)(layers|h|blocks|block)\.\d+\.")


def _matches(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` (subclasses included, e.g. quantization-free wrappers)."""
    return isinstance(module, nn.Linear)


def select_layers(model: nn.Module, include: Sequence[str] | None = None,
                  exclude: Sequence[str] | None = None) -> dict[str, nn.Linear]:
    """Pick the Linear layers to hook, in module order.

    Args:
        model: any ``nn.Module`` (a Hugging Face causal LM, possibly wrapped).
        include: patterns; a Linear is selected if any matches. ``None`` = every Linear inside a
            decoder block. Add ``"lm_head"`` to also hook the output head.
        exclude: patterns removed from the selection.

    Returns:
        ``{module name: module}``; raises ``ValueError`` if nothing matches.
    """
    chosen: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if not is_linear(module):
            continue
        if include is None:
            keep = DECODER_BLOCK.search(name) is not None
        else:
            keep = any(_matches(name, p) for p in include)
        if keep and not any(_matches(name, p) for p in (exclude or ())):
            chosen[name] = module
    if not chosen:
        linears = [n for n, m in model.named_modules() if is_linear(m)][:8]
        raise ValueError(f"no Linear layer matches include={include} exclude={exclude}; "
                         f"some Linear layers of this model: {linears}")
    return chosen
