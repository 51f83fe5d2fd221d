"""`python -m tests.kill_after_first_chunk cache ...`: the grass-llm CLI, except that rank 0
SIGKILLs itself right after writing its first chunk (a crash in the middle of a multi-process
run, for the resume test)."""

import os
import signal

from tests import strict_dist

strict_dist.install()

from grass_llm.cli import app  # noqa: E402  (after the strict patch, on purpose)
from grass_llm.store.store import GradientStore  # noqa: E402

_original = GradientStore.write_chunk


def _write_then_die(self, *args, **kwargs):
    _original(self, *args, **kwargs)
    if int(os.environ.get("RANK", "0")) == 0:
        os.kill(os.getpid(), signal.SIGKILL)


GradientStore.write_chunk = _write_then_die

if __name__ == "__main__":
    app()
