"""``python -m tests.loss_probe BLOCK_NUMEL``: the peak host memory one forward + backward of
``per_example_loss`` adds over 200 MiB of float32 logits (SmolLM2's vocabulary, 4 x 256
tokens), as a multiple of the logits' size, in a fresh process (tests/test_loss.py). Blocks
above 64 KiB are mmapped, so that RSS counts live memory, not glibc's cache of freed blocks.
Prints one JSON line.

The peak is the address space's own high-water mark (``VmHWM``), reset to the current RSS
just before the loss (``/proc/self/clear_refs``). Not ``ru_maxrss``: Linux carries the
parent's peak into a child through ``exec``, so under a large pytest process it read 0."""

import json
import sys

import torch

from grass_llm.capture import loss


def main(chunk_numel: int) -> None:
    loss.BLOCK_NUMEL = {"cpu": chunk_numel, "other": chunk_numel}
    gen = torch.Generator().manual_seed(0)
    B, T, V = 4, 256, 49152
    logits = torch.randn(B, T, V, generator=gen).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[:, :7] = loss.IGNORE
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status_bytes("VmRSS")
    total, _ = loss.per_example_loss(logits, labels)
    total.sum().backward()
    grew = _status_bytes("VmHWM") - before
    print(json.dumps({"grew_over_logits": grew / (logits.numel() * 4)}))


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(field)


if __name__ == "__main__":
    main(int(sys.argv[1]))
