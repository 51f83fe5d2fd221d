"""``python -m tests.loss_probe BLOCK_NUMEL``: the peak host memory one forward + backward of
``per_example_loss`` adds over 200 MiB of float32 logits (SmolLM2's vocabulary, 4 x 256
tokens), as a multiple of the logits' size, in a fresh process (tests/test_loss.py). Blocks
above 64 KiB are mmapped, so that RSS counts live memory, not glibc's cache of freed blocks.
Prints one JSON line. The peak is the process's own (tests/peak_memory.py)."""

import json
import sys

import torch

from grass_llm.capture import loss
from tests.peak_memory import reset_peak, status_bytes


def main(chunk_numel: int) -> None:
    loss.BLOCK_NUMEL = {"cpu": chunk_numel, "other": chunk_numel}
    gen = torch.Generator().manual_seed(0)
    B, T, V = 4, 256, 49152
    logits = torch.randn(B, T, V, generator=gen).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[:, :7] = loss.IGNORE
    before = reset_peak()
    total, _ = loss.per_example_loss(logits, labels)
    total.sum().backward()
    grew = status_bytes("VmHWM") - before
    print(json.dumps({"grew_over_logits": grew / (logits.numel() * 4)}))


if __name__ == "__main__":
    main(int(sys.argv[1]))
