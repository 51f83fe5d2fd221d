"""Minor page faults and RSS of host-heap patterns, run in a fresh process (a clean malloc
state) by tests/test_host_heap.py. Prints one JSON line."""

import contextlib
import json
import resource
import sys

import torch

from grass_llm import host_heap


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def capture_steps(steady: bool, steps: int) -> dict:
    """Per-step faults of a FactGraSS capture on the benchmarks' tiny Llama (16 x 128 tokens)."""
    from grass_llm.capture import GradientCapture
    from grass_llm.models import tiny_model

    model = tiny_model("llama", vocab_size=512, hidden_size=128, num_layers=4, num_heads=4,
                       num_kv_heads=4, intermediate_size=256, attn_implementation="sdpa")
    ids = torch.randint(0, 512, (16, 128), generator=torch.Generator().manual_seed(0))
    faults = []
    with host_heap.steady_heap() if steady else contextlib.nullcontext(), \
            GradientCapture(model, "factgrass:k=256,k_in=32,k_out=32", seed=0) as cap:
        for _ in range(steps):
            f = _faults()
            cap(ids)
            faults.append(_faults() - f)
    return {"faults": faults}


def retained(mib: int) -> dict:
    """RSS (bytes above the start) after freeing ``mib`` 1 MiB tensors: inside a nested
    steady_heap, after its inner exit, after its outer exit."""
    base = _rss()
    out = {}
    with host_heap.steady_heap():
        with host_heap.steady_heap():
            blocks = [torch.ones(1 << 18) for _ in range(mib)]  # 1 MiB each, touched
            out["held"] = _rss() - base
            del blocks
            out["freed inside"] = _rss() - base
        out["after inner exit"] = _rss() - base
        out["active inside"] = host_heap.active()
    out["after outer exit"] = _rss() - base
    out["active after"] = host_heap.active()
    return out


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "capture":
        print(json.dumps(capture_steps(sys.argv[2] == "steady", int(sys.argv[3]))))
    else:
        print(json.dumps(retained(int(sys.argv[2]))))
