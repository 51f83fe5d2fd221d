"""Build and load the C++/CUDA extension in csrc/, once per process, with one warning on failure.

``GRASS_LLM_KERNELS`` selects the backend:

- ``auto`` (default): build (or reuse) the extension on first use; if that fails, or a kernel
  later fails to launch on a GPU, warn once and use the pure-torch reference.
- ``reference``: never build; always the pure-torch reference.
- ``extension``: the extension is required; a failed build or launch raises.

The build is a JIT build with ``torch.utils.cpp_extension`` and ninja, cached under
``GRASS_LLM_KERNEL_CACHE`` (default ``~/.cache/grass_llm/kernels``) in a folder named by a hash
of the sources, the flags (GPU targets included), torch and the CPU, so edits, upgrades and other
machines never reuse a stale or foreign binary. The sources are compiled from a copy inside that
folder, so every checkout or installed copy of the same sources shares one build (torch's
build.ninja names source paths: building from each checkout's own files would recompile on
every switch). The CUDA kernels are compiled in when torch sees a GPU and finds the CUDA
toolkit; otherwise the extension is CPU-only. GPU targets: SASS for every visible GPU's
capability (``GRASS_LLM_CUDA_ARCHS="8.0;9.0"`` overrides), plus PTX of the highest one, which
newer GPUs compile at load time. ``python -m grass_llm.kernels build`` builds ahead of time
(e.g. once per node before a multi-process run); ``... flags`` prints the exact compiler flags.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

MODES = ("auto", "reference", "extension")
# Compiled when no GPU is visible (the compile check in CI): A100 and H100/H200.
DEFAULT_CUDA_ARCHS = (80, 90)
SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")
_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "ext": None, "error": None, "launch": {}}


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


def _source_files(root: Path) -> list[Path]:
    """Every file of the sources (relative to ``root``) that the build hash covers."""
    return sorted(f.relative_to(root) for f in root.rglob("*")
                  if f.is_file() and f.suffix in SOURCE_SUFFIXES)


def _sources(root: Path, with_cuda: bool) -> list[Path]:
    files = [root / "bindings.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    if with_cuda:
        files += sorted((root / "cuda").glob("*.cu"))
    return files


@functools.lru_cache(maxsize=1)
def _nvcc_archs() -> tuple[int, ...] | None:
    """The compute capabilities (e.g. 90) the CUDA toolkit's nvcc can target, or None."""
    from torch.utils.cpp_extension import CUDA_HOME
    nvcc = str(Path(CUDA_HOME) / "bin" / "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc:
        return None
    try:
        out = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    archs = sorted({int(m) for m in re.findall(r"compute_(\d+)\b", out)})
    return tuple(archs) or None


def _parse_archs(text: str) -> list[int]:
    archs = []
    for item in re.split(r"[;,\s]+", text.strip()):
        m = re.fullmatch(r"(\d+)\.(\d)|(\d+)", item.removeprefix("sm_"))
        if item and not m:
            raise ValueError(f"GRASS_LLM_CUDA_ARCHS: {item!r} is not a capability like 9.0 or 90")
        if m:
            archs.append(int(m[1]) * 10 + int(m[2]) if m[1] else int(m[3]))
    return archs


def cuda_archs() -> list[int]:
    """The GPU capabilities to emit SASS for (e.g. ``[80, 90]``); PTX goes with the last.

    ``GRASS_LLM_CUDA_ARCHS`` if set, else every visible GPU's, else ``DEFAULT_CUDA_ARCHS``. A
    GPU newer than the toolkit is served by the PTX of the newest capability nvcc knows.
    """
    env = os.environ.get("GRASS_LLM_CUDA_ARCHS", "").strip()
    if env:
        return sorted(set(_parse_archs(env)))
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        return list(DEFAULT_CUDA_ARCHS)
    known = _nvcc_archs()
    archs = set()
    for i in range(n):
        major, minor = torch.cuda.get_device_capability(i)
        cap = major * 10 + minor
        if known is not None and cap not in known:
            newer = [a for a in known if a <= cap]
            if not newer:
                continue  # older than the toolkit supports: no code for it, launches fall back
            cap = newer[-1]
        archs.add(cap)
    return sorted(archs) or list(DEFAULT_CUDA_ARCHS)


def _gencode(archs: list[int]) -> list[str]:
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def _flags(with_cuda: bool) -> dict[str, list[str]]:
    """What the JIT build adds to torch's own flags (the one place the flags are set)."""
    # -march=native is safe because the build key includes the CPU's feature flags.
    cflags = ["-O3", "-fopenmp", "-march=native"]
    cuda = ["-O3", "-std=c++20"]
    if with_cuda:
        cflags.append("-DGRASS_WITH_CUDA")
        cuda += ["-DGRASS_WITH_CUDA", *_gencode(cuda_archs())]
    return {"extra_cflags": cflags, "extra_cuda_cflags": cuda, "extra_ldflags": ["-fopenmp"]}


def compiler_flags(kind: str = "nvcc") -> list[str]:
    """The full flags the JIT build compiles a CUDA+CPU extension's ``.cu`` (``nvcc``) or
    ``.cpp`` (``cxx``) files with, torch's part included, for a compile-only check."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    name = build_name(True)
    try:
        system = include_paths("cuda")
    except OSError:  # a CPU build of torch knows no CUDA_HOME; nvcc adds its own includes
        system = include_paths("cpu")
    incs = [f"-I{csrc_dir()}"]
    for path in system + [_python_include()]:
        incs += ["-isystem", path]
    common = [f"-DTORCH_EXTENSION_NAME={name}", "-DTORCH_API_INCLUDE_EXTENSION_H", *incs]
    flags = _flags(True)
    if kind == "nvcc":
        return [*common, *COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC",
                *flags["extra_cuda_cflags"]]
    if kind == "cxx":
        return [*common, "-fPIC", "-std=c++20", *flags["extra_cflags"]]
    raise ValueError(f"compiler_flags: kind must be 'nvcc' or 'cxx', got {kind!r}")


def _python_include() -> str:
    import sysconfig
    return sysconfig.get_path("include", scheme="posix_prefix")


def _cpu_fingerprint() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_name(with_cuda: bool, root: Path | None = None) -> str:
    """Extension name: a hash of sources, flags, torch, Python and CPU."""
    h = hashlib.sha256()
    root = root or csrc_dir()
    for rel in _source_files(root):
        h.update(rel.as_posix().encode() + (root / rel).read_bytes())
    h.update(repr((_flags(with_cuda), torch.__version__, sys.version_info[:2],
                   _cpu_fingerprint())).encode())
    return f"grass_llm_kernels_{'cuda' if with_cuda else 'cpu'}_{h.hexdigest()[:12]}"


def _staged_sources(root: Path, out: Path) -> Path:
    """A copy of the sources inside the build folder ``out`` (made once, atomically), so that
    the build never depends on where the sources it was hashed from live."""
    staged = out / "src"
    if staged.is_dir():
        return staged
    tmp = Path(tempfile.mkdtemp(prefix="src-", dir=out))
    for rel in _source_files(root):
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, tmp / rel)
    try:
        tmp.rename(staged)
    except OSError:  # another process staged the same sources first
        shutil.rmtree(tmp, ignore_errors=True)
    return staged


def build(verbose: bool = False, with_cuda: bool | None = None):
    """Compile (or load the cached) extension and return the module; raises on failure."""
    from torch.utils.cpp_extension import load

    with_cuda = want_cuda() if with_cuda is None else with_cuda
    root = csrc_dir()
    name = build_name(with_cuda, root)
    out = cache_dir() / name
    out.mkdir(parents=True, exist_ok=True)
    if not any(out.glob(f"{name}*.so")):
        print(f"grass_llm: compiling the {'CUDA+CPU' if with_cuda else 'CPU'} kernels once "
              f"(about a minute), cached in {out}", file=sys.stderr, flush=True)
    staged = _staged_sources(root, out)
    return load(name=name, sources=[str(s) for s in _sources(staged, with_cuda)],
                extra_include_paths=[str(staged)], build_directory=str(out),
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


def launch_failures() -> dict[str, str]:
    """``{device: error}`` for the devices where a kernel failed to launch (reference there)."""
    return _state["launch"]  # type: ignore[return-value]


def record_launch_failure(device: torch.device, error: str) -> None:
    """Stop using the extension on ``device`` for the rest of the process."""
    with _lock:
        _state["launch"] = {**launch_failures(), str(device): error.strip()[:2000]}


def reset() -> None:
    """Forget the loaded state (tests switch modes with this)."""
    with _lock:
        _state.update(tried=False, ext=None, error=None, launch={})


def info() -> dict[str, object]:
    """What the dispatcher will use, for ``python -m grass_llm.kernels info`` and bug reports."""
    ext = extension()
    cuda = want_cuda()
    return {"mode": mode(), "backend": "extension" if ext is not None else "reference",
            "cuda_kernels": bool(ext is not None and ext.with_cuda),
            "cuda_targets": [f"sm_{a}" for a in cuda_archs()] + [f"compute_{cuda_archs()[-1]}"]
            if cuda else [],
            "build_name": build_name(cuda), "cache_dir": str(cache_dir()),
            "error": _state["error"], "launch_failures": launch_failures()}
