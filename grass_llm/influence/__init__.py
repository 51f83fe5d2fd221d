"""Influence from a store: blockwise Fisher fits, solves, one-pass streaming scores (top-k,
token level, self-influence, valuation), on the GPU when there is one and split over ranks
(DESIGN.md, Fisher and score contract)."""

from grass_llm.influence.factors import Factors, load_factors
from grass_llm.influence.fisher import compute_fisher, precondition
from grass_llm.influence.normalize import NORMALIZATIONS
from grass_llm.influence.query import QueryGrads, from_file, from_store, query_gradients
from grass_llm.influence.score import (
    ScoreRequest,
    ScoreResult,
    score_store,
    self_influence,
    stream_top_k,
    valuation,
)
from grass_llm.influence.topk import TopK, merge_top_k

__all__ = ["NORMALIZATIONS", "compute_fisher", "load_factors", "Factors", "precondition",
           "QueryGrads", "from_file", "from_store", "query_gradients", "ScoreRequest", "ScoreResult",
           "score_store", "TopK", "merge_top_k", "stream_top_k", "self_influence", "valuation"]
