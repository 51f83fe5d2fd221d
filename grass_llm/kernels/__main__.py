"""``python -m grass_llm.kernels build|info``: build the extension ahead of time, or report."""

from __future__ import annotations

import json
import sys

from grass_llm.kernels import build


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "info"
    if cmd == "build":
        mod = build.build(verbose="-v" in argv)
        print(f"built {mod.__name__} (CUDA kernels: {mod.with_cuda}) in {build.cache_dir()}")
        return 0
    if cmd == "info":
        print(json.dumps(build.info(), indent=2))
        return 0
    print("usage: python -m grass_llm.kernels [build [-v] | info]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
