"""Fisher fits in a store: written beside the current one, made current in one step, read
lazily one layer at a time.

Layout (``grass_llm.store.verify`` checks it): ``fisher/<fit-id>/<layer>`` holds the lower
Cholesky factor of ``F_l + lambda_l I`` (``[k, k]`` float64), ``fisher/<fit-id>`` attrs the
fit's settings and per-layer report with ``complete`` set last, and the ``fisher`` group's
attribute ``current`` names the fit in use. A refit writes a new ``<fit-id>``, completes it, then
switches ``current`` (one metadata write, atomic on local disks and object stores), then deletes
the other fits. A crash at any point leaves the previous fit current and usable (or, before the
first fit completes, no fit), never a mix of two.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from zarr.codecs import Crc32cCodec

from grass_llm.store import GradientStore, StoreError
from grass_llm.store.verify import CURRENT_ATTR, FISHER_GROUP, fisher_problems


def begin_fit(store: GradientStore, settings: dict) -> str:
    """Create an empty, incomplete fit group beside the current fit (rank 0 only); its id."""
    _require_writable(store)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    fit_id = f"fit-{stamp:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    group = store.group.require_group(FISHER_GROUP)
    group.create_group(fit_id, attributes={**settings, "identity": store.identity,
                                           "created_at": stamp.isoformat(), "complete": False})
    return fit_id


def write_factor(store: GradientStore, fit_id: str, layer: str, chol: torch.Tensor) -> None:
    """Write one layer's factor into an incomplete fit (any rank; one writer per layer)."""
    _require_writable(store)
    L = chol.detach().to("cpu", torch.float64).numpy()
    fit = store.group[FISHER_GROUP][fit_id]
    arr = fit.create_array(layer, shape=L.shape, chunks=L.shape, dtype="float64",
                           compressors=[Crc32cCodec()], overwrite=True)
    arr[:] = L


def commit_fit(store: GradientStore, fit_id: str, report: dict) -> None:
    """Mark the fit complete, make it current, then delete every other fit (rank 0 only, after
    every factor is written)."""
    group = store.group[FISHER_GROUP]
    fit = group[fit_id]
    fit.attrs.update({"layers": report, "complete": True})
    group.attrs.update({CURRENT_ATTR: fit_id})  # the switch: one metadata write
    for name in list(group.keys()):
        if name != fit_id:  # old fits, interrupted fits, pre-fit-id factor arrays
            del group[name]


def _require_writable(store: GradientStore) -> None:
    if store.mode != "r+":
        raise StoreError("open the store with mode='r+' to write the Fisher factors")


class Factors(Mapping):
    """The current fit's per-layer Cholesky factors, read from the store on each access (so
    that no more than the factors a caller holds are in memory).

    ``factors[layer]`` is a ``[K, K]`` float64 tensor on ``device``; ``report`` the per-layer
    ``lambda``, ``trace`` and condition estimate; ``settings`` damping, mode, n.
    """

    def __init__(self, store: GradientStore, fit_id: str, device: torch.device | str = "cpu"):
        self.store, self.fit_id, self.device = store, fit_id, torch.device(device)
        self._group = store.group[FISHER_GROUP][fit_id]
        attrs = dict(self._group.attrs)
        self.report: dict = attrs.get("layers", {})
        self.settings = {k: attrs.get(k) for k in ("damping", "mode", "n", "created_at")}
        self._names = [x.name for x in store.layout.layers]

    def __getitem__(self, layer: str) -> torch.Tensor:
        if layer not in self._names:
            raise KeyError(layer)
        L = np.asarray(self._group[layer][:])
        return torch.from_numpy(L).to(self.device)

    def __contains__(self, layer) -> bool:  # without reading the factor (Mapping's would)
        return layer in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def load_factors(store: GradientStore, *, device: torch.device | str = "cpu") -> Factors:
    """The store's current, complete Fisher fit (factors read lazily, on ``device``).

    Raises:
        StoreError: no fit, an incomplete one, one of another run, or a factor missing or of
            the wrong shape (the checks of ``grass-llm verify --quick``).
    """
    if FISHER_GROUP not in store.group:
        raise StoreError(f"{store.url} has no Fisher factors; run `grass-llm fisher "
                         f"{store.url}` first")
    problems = fisher_problems(store, quick=True)
    if problems:
        raise StoreError(f"{store.url}: {problems[0]}")
    return Factors(store, store.group[FISHER_GROUP].attrs[CURRENT_ATTR], device)
