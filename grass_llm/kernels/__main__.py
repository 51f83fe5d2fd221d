"""``python -m grass_llm.kernels build|info|flags``.

- ``build [-v]``: build the extension ahead of time (with its CUDA kernels where a GPU is seen).
- ``info``: what the dispatcher will use (JSON).
- ``flags [nvcc|cxx]``: the flags, one per line, that the JIT build of the CUDA+CPU extension
  compiles ``.cu`` (``nvcc``, the default) or ``.cpp`` (``cxx``) files with; the compile check
  (tools/check_cuda_build.sh) uses exactly these. Without a GPU the targets are the defaults.
"""

from __future__ import annotations

import json
import sys

from grass_llm.kernels import build

USAGE = "usage: python -m grass_llm.kernels [build [-v] | info | flags [nvcc|cxx]]"


def main(argv: list[str]) -> int:
    cmd = argv[0] if argv else "info"
    if cmd == "build":
        mod = build.build(verbose="-v" in argv)
        print(f"built {mod.__name__} (CUDA kernels: {mod.with_cuda}) in {build.cache_dir()}")
        return 0
    if cmd == "info":
        print(json.dumps(build.info(), indent=2))
        return 0
    if cmd == "flags" and len(argv) <= 2:
        try:
            print("\n".join(build.compiler_flags(argv[1] if len(argv) > 1 else "nvcc")))
        except ValueError as err:
            print(f"{err}\n{USAGE}", file=sys.stderr)
            return 2
        return 0
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
