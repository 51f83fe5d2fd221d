"""The Zarr v3 gradient store: layout, create/open/resume, chunk writes, verify."""

from grass_llm.store.layout import LayerInfo, StoreLayout
from grass_llm.store.store import (
    GradientStore,
    NonFiniteGradientError,
    StoreError,
    StoreMismatchError,
    create_store,
    open_store,
    store_identity,
)
from grass_llm.store.verify import verify_store

__all__ = ["LayerInfo", "StoreLayout", "GradientStore", "StoreError", "StoreMismatchError",
           "NonFiniteGradientError", "create_store", "open_store", "store_identity",
           "verify_store"]
