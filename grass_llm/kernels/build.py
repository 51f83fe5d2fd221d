"""Build and load the C++/CUDA extension in csrc/, once per process, with one warning on failure.

``GRASS_LLM_KERNELS`` selects the backend:

- ``auto`` (default): build (or reuse) the extension on first use; if that fails, warn once and
  use the pure-torch reference.
- ``reference``: never build; always the pure-torch reference.
- ``extension``: the extension is required; a failed build raises.

The build is a JIT build with ``torch.utils.cpp_extension`` and ninja, cached under
``GRASS_LLM_KERNEL_CACHE`` (default ``~/.cache/grass_llm/kernels``) in a folder named by a hash
of the sources, the flags, torch and the CPU, so edits, upgrades and other machines never reuse
a stale or foreign binary. The CUDA kernels are compiled in when torch sees a GPU and finds the
CUDA toolkit; otherwise the extension is CPU-only. ``python -m grass_llm.kernels build`` builds
ahead of time (e.g. once per node before a multi-process run).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path

import torch

MODES = ("auto", "reference", "extension")
_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "ext": None, "error": None}


def mode() -> str:
    """The backend mode from ``GRASS_LLM_KERNELS`` (validated)."""
    value = os.environ.get("GRASS_LLM_KERNELS", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"GRASS_LLM_KERNELS={value!r}: expected one of {', '.join(MODES)}")
    return value


def csrc_dir() -> Path:
    """The kernel sources: ``csrc/`` of a source checkout, or the copy installed in the package."""
    for cand in (Path(__file__).resolve().parents[2] / "csrc",
                 Path(__file__).resolve().parents[1] / "_csrc"):
        if (cand / "bindings.cpp").is_file():
            return cand
    raise FileNotFoundError("grass_llm kernel sources (csrc/) not found next to the package")


def cache_dir() -> Path:
    root = os.environ.get("GRASS_LLM_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "grass_llm" / "kernels"


def want_cuda() -> bool:
    """Compile the CUDA kernels: a GPU is visible and the CUDA toolkit was found."""
    from torch.utils.cpp_extension import CUDA_HOME
    return torch.cuda.is_available() and torch.version.cuda is not None and CUDA_HOME is not None


def _sources(with_cuda: bool) -> list[Path]:
    root = csrc_dir()
    files = [root / "bindings.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    if with_cuda:
        files += sorted((root / "cuda").glob("*.cu"))
    return files


def _flags(with_cuda: bool) -> dict[str, list[str]]:
    # -march=native is safe because the build key includes the CPU's feature flags.
    cflags = ["-O3", "-fopenmp", "-march=native"]
    cuda = ["-O3", "-std=c++20", "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90,code=sm_90"]
    if with_cuda:
        cflags.append("-DGRASS_WITH_CUDA")
        cuda.append("-DGRASS_WITH_CUDA")
    return {"extra_cflags": cflags, "extra_cuda_cflags": cuda, "extra_ldflags": ["-fopenmp"]}


def _cpu_fingerprint() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_name(with_cuda: bool) -> str:
    """Extension name: a hash of sources, flags, torch, Python and CPU."""
    h = hashlib.sha256()
    root = csrc_dir()
    for f in sorted(root.rglob("*")):
        if f.suffix in (".cpp", ".h", ".cu", ".cuh"):
            h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    h.update(repr((_flags(with_cuda), torch.__version__, sys.version_info[:2],
                   _cpu_fingerprint())).encode())
    return f"grass_llm_kernels_{'cuda' if with_cuda else 'cpu'}_{h.hexdigest()[:12]}"


def build(verbose: bool = False, with_cuda: bool | None = None):
    """Compile (or load the cached) extension and return the module; raises on failure."""
    from torch.utils.cpp_extension import load

    with_cuda = want_cuda() if with_cuda is None else with_cuda
    name = build_name(with_cuda)
    out = cache_dir() / name
    out.mkdir(parents=True, exist_ok=True)
    if not any(out.glob(f"{name}*.so")):
        print(f"grass_llm: compiling the {'CUDA+CPU' if with_cuda else 'CPU'} kernels once "
              f"(about a minute), cached in {out}", file=sys.stderr, flush=True)
    root = csrc_dir()
    return load(name=name, sources=[str(s) for s in _sources(with_cuda)],
                extra_include_paths=[str(root)], build_directory=str(out),
                with_cuda=with_cuda, verbose=verbose, **_flags(with_cuda))


def extension():
    """The loaded extension module, or None for the reference path (warns once on failure)."""
    if _state["tried"]:
        return _state["ext"]
    with _lock:
        if not _state["tried"]:
            m = mode()
            if m != "reference":
                try:
                    _state["ext"] = build()
                except Exception as exc:  # noqa: BLE001 - any build failure falls back
                    _state["error"] = f"{type(exc).__name__}: {str(exc).strip()[-2000:]}"
                    if m == "extension":
                        _state["tried"] = True
                        raise RuntimeError("GRASS_LLM_KERNELS=extension but the grass_llm "
                                           f"kernels failed to build: {_state['error']}") from exc
                    warnings.warn("grass_llm: the fused kernels could not be built, using the "
                                  f"pure-torch reference instead ({_state['error'][-300:]})",
                                  RuntimeWarning, stacklevel=2)
            _state["tried"] = True
    return _state["ext"]


def reset() -> None:
    """Forget the loaded state (tests switch modes with this)."""
    with _lock:
        _state.update(tried=False, ext=None, error=None)


def info() -> dict[str, object]:
    """What the dispatcher will use, for ``python -m grass_llm.kernels info`` and bug reports."""
    ext = extension()
    return {"mode": mode(), "backend": "extension" if ext is not None else "reference",
            "cuda_kernels": bool(ext is not None and ext.with_cuda),
            "build_name": build_name(want_cuda()), "cache_dir": str(cache_dir()),
            "error": _state["error"]}
