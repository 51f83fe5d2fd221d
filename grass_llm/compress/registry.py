"""Registry of compressors, buildable from a spec string such as ``"factgrass:k=4096,k_in=128,
k_out=128"``. The canonical spec (``compressor.spec``) plus the seed is what a store records, so a
later query rebuilds the identical map with ``build_compressor(spec, seed=..., ...)``.
"""

from __future__ import annotations

import inspect

from grass_llm.compress.base import Compressor, FactorizedCompressor, VectorCompressor

_REGISTRY: dict[str, type[Compressor]] = {}
# Arguments a spec string may not set: they come from the layer (sizes) or the run (seed).
_CONTEXT_ARGS = {"p", "d_in", "d_out", "seed", "bias", "indices", "layer"}
# Parameters kept as text (a path, a hex digest), never parsed as numbers.
_TEXT_PARAMS = {"mask", "mask_sha256"}


def register_compressor(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator: make ``cls`` buildable by its ``name`` from a spec string."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no registry name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"compressor name {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available_compressors() -> dict[str, str]:
    """Registered names mapped to their kind ("vector" or "factorized")."""
    return {name: cls.kind for name, cls in sorted(_REGISTRY.items())}


def compressor_class(name: str) -> type[Compressor]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown compressor {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def _parse_value(text: str) -> object:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, dict[str, object]]:
    """``"name:a=1,b=2"`` -> ``("name", {"a": 1, "b": 2})``; raises ValueError on bad syntax."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"compressor spec must be a non-empty string, got {spec!r}")
    name, _, body = spec.strip().partition(":")
    params: dict[str, object] = {}
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ValueError(f"bad item {item!r} in compressor spec {spec!r}: expected key=value")
        if key.strip() in params:
            raise ValueError(f"{key.strip()!r} given twice in compressor spec {spec!r}")
        key, value = key.strip(), value.strip()
        params[key] = value if key in _TEXT_PARAMS else _parse_value(value)
    return name.strip().lower(), params


def build_compressor(spec: str, *, seed: int, p: int | None = None, d_in: int | None = None,
                     d_out: int | None = None, bias: bool = False, layer: str | None = None,
                     **extra) -> Compressor:
    """Build a compressor from a spec string and the layer's sizes.

    Args:
        spec: e.g. ``"grass:k=4096,k_prime=16384"`` or ``"logra:k_in=64,k_out=64"``.
        seed: per-layer seed (derive it with ``derive_seed(global_seed, layer_name)``).
        p: input size, for vector compressors.
        d_in, d_out: Linear layer sizes, for factorized compressors.
        bias: factorized compressors only: include the bias column.
        layer: the layer's name, for compressors with per-layer data (``factgrass`` with
            ``mask=PATH`` looks its masks up by it); ignored by the others.
        **extra: arguments that cannot live in a spec (e.g. ``indices`` of a SelectiveMask).
    """
    name, params = parse_spec(spec)
    cls = compressor_class(name)
    bad = _CONTEXT_ARGS.intersection(params)
    if bad:
        raise ValueError(f"compressor spec {spec!r} sets {sorted(bad)}, which come from the "
                         "layer or the run, not the spec")
    sig = inspect.signature(cls.__init__)
    for key in params:
        if key not in sig.parameters:
            allowed = sorted(set(sig.parameters) - _CONTEXT_ARGS - {"self"})
            raise ValueError(f"{name!r} has no parameter {key!r}; it takes {allowed}")
    kwargs: dict[str, object] = dict(params, **extra)
    if "seed" in sig.parameters:
        kwargs["seed"] = seed
    if "layer" in sig.parameters:
        kwargs["layer"] = layer
    if issubclass(cls, FactorizedCompressor):
        if d_in is None or d_out is None:
            raise ValueError(f"{name!r} is a factorized compressor: give d_in and d_out")
        kwargs.update(d_in=d_in, d_out=d_out, bias=bias)
    else:
        assert issubclass(cls, VectorCompressor)
        if p is None:
            raise ValueError(f"{name!r} is a vector compressor: give p")
        kwargs["p"] = p
    missing = [n for n, prm in sig.parameters.items()
               if n != "self" and prm.default is inspect.Parameter.empty and n not in kwargs]
    if missing:
        raise ValueError(f"compressor spec {spec!r} is missing {missing}")
    return cls(**kwargs)


def check_spec(spec: str) -> str:
    """Validate a spec before any layer is known (a run config's check) without building
    anything (a vector compressor's tables scale with the layer size, unknown here): its
    syntax, name and parameter names, and for ``mask=PATH`` that the file reads as a mask file
    whose layers all have the spec's ``k_in`` / ``k_out``. Values are checked against each
    layer's sizes when the compressors are built. Returns the name; raises ValueError."""
    name, params = parse_spec(spec)
    cls = compressor_class(name)
    bad = _CONTEXT_ARGS.intersection(params)
    if bad:
        raise ValueError(f"compressor spec {spec!r} sets {sorted(bad)}, which come from the "
                         "layer or the run, not the spec")
    sig = inspect.signature(cls.__init__)
    unknown = [key for key in params if key not in sig.parameters]
    if unknown:
        allowed = sorted(set(sig.parameters) - _CONTEXT_ARGS - {"self"})
        raise ValueError(f"{name!r} has no parameter {unknown[0]!r}; it takes {allowed}")
    if "mask" in params:
        _check_mask_file(params)
    return name


def _check_mask_file(params: dict) -> None:
    from grass_llm.compress.mask_file import read_mask_file

    mf = read_mask_file(params["mask"])
    want_sha = params.get("mask_sha256")
    if want_sha is not None and want_sha != mf.sha256:
        raise ValueError(f"mask file {mf.path} has SHA-256 {mf.sha256[:12]}... but the spec "
                         f"records {want_sha[:12]}...")
    want = (params.get("k_in"), params.get("k_out"))
    bad = [n for n, lm in mf.layers.items() if (lm.k_in, lm.k_out) != want]
    if bad:
        lm = mf.layers[bad[0]]
        raise ValueError(f"mask file {mf.path}: layer {bad[0]} has k_in={lm.k_in}, "
                         f"k_out={lm.k_out} but the spec asks k_in={want[0]}, "
                         f"k_out={want[1]}; fit the mask with this spec's sizes")
