"""``torchrun ... -m tests.load_rss CONFIG_JSON MODE OUT_JSON``: load a model the way
``grass-llm cache`` does under ``MODE`` (fsdp or deepspeed) and record, per rank, the host memory
the load added at its peak and the model's size, then, in ``OUT_JSON.threads<rank>``, the gloo
threads still alive after ``shutdown()`` (for tests/test_scale.py)."""

import glob
import json
import sys

from tests import strict_dist

strict_dist.install()

import torch  # noqa: E402

from grass_llm.config import RunConfig  # noqa: E402
from grass_llm.parallel import comm, init_distributed, shutdown  # noqa: E402
from grass_llm.sharding import load_on_ranks, shard_model  # noqa: E402
from tests.peak_memory import reset_peak, status_bytes  # noqa: E402


def main(config_json: str, mode: str, out: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    info = init_distributed()
    cfg = RunConfig(model=config_json, data="unused", out="unused", parallel=mode)
    # The model's size from a meta copy; building it also imports the model's code, so the
    # baseline below holds every import and what follows is the load alone.
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_json))
    n_bytes = sum(p.numel() * p.element_size() for p in meta.parameters())
    if mode == "deepspeed":
        import deepspeed  # noqa: F401
    before = reset_peak()
    model, _, _ = load_on_ranks(info, mode, model=cfg.model, dtype=cfg.dtype)
    setup = shard_model(model, info, mode, dtype=cfg.dtype)
    del model
    peak = status_bytes("VmHWM")  # this process's own peak (tests/peak_memory.py)
    rows = comm.all_gather_object({"rank": info.rank, "grew": peak - before})
    assert setup.module is not None
    if comm.rank() == 0:
        with open(out, "w") as f:
            json.dump({"model_bytes": n_bytes, "ranks": rows}, f)
    comm.barrier()
    del setup  # as when a command returns
    shutdown()  # as the CLI does: a group left to the interpreter's exit can abort it (exit -6)
    with open(f"{out}.threads{info.rank}", "w") as f:  # what the interpreter's exit would meet
        json.dump(_gloo_threads(), f)


def _gloo_threads() -> list[str]:
    """The names of this process's gloo threads (its transport loops and worker threads)."""
    names = []
    for comm_file in glob.glob("/proc/self/task/*/comm"):
        try:
            with open(comm_file) as f:
                names.append(f.read().strip())
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return sorted(n for n in names if "gloo" in n)


if __name__ == "__main__":
    main(*sys.argv[1:4])
