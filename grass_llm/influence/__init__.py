"""Influence from a store: blockwise Fisher solves, streaming top-k scores, token-level
influence, self-influence and data valuation (DESIGN.md, Fisher and score contract)."""

from grass_llm.influence.fisher import compute_fisher, load_factors, precondition
from grass_llm.influence.query import QueryGrads, from_file, from_store
from grass_llm.influence.score import TopK, self_influence, stream_top_k, valuation

__all__ = ["compute_fisher", "load_factors", "precondition", "QueryGrads", "from_file",
           "from_store", "TopK", "stream_top_k", "self_influence", "valuation"]
