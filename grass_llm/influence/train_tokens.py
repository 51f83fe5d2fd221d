"""Train-side token attribution: the score of each token of a reported training example, from
the store's per-token rows (caches with ``token_mode`` ``"loss"`` or ``"position"``).

For a query ``q~`` (preconditioned, and for ``cosine`` already divided by its norm) and a
training example i with token rows ``g_is`` (``sum_s g_is = g_i``, store-format.md), token s
scores ``s(q, i_s) = sum_l q~_l^T g_isl``, divided by ``||g_i||`` (the example row's norm, not
the token row's) under ``cosine`` and ``train-unit``. The maps are linear, so
``sum_s s(q, i_s) = s(q, i)``: exactly in exact arithmetic; here in float64 over the stored
token rows, which differ from the stored example row only by its rounding at cache time (the
example row is the float32 sum of the token rows, rounded to the store's dtype): ~1e-7 of the
row's scale in a float32 store, ~1e-3 in float16.

What a token row is (``token_position``): in ``loss`` mode, the gradient of the loss on the
token at that position alone (how much predicting that token in the document moved the
query's score); in ``position`` mode, the term ``delta_t x_t^T`` of input position t.

Only the reported examples' token rows are read, after the pass (rank 0, no collectives):
one contiguous read per run of examples whose token chunks touch, per layer, so a token chunk
is decoded once per layer however many reported examples it holds. Shapes: Q queries, k
reported examples per query, T token rows of an example, K a layer's size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from grass_llm.influence.normalize import check_normalize
from grass_llm.influence.reader import decode_rows
from grass_llm.influence.texts import tokenized_corpus
from grass_llm.store import GradientStore, StoreError


@dataclass
class TrainTokens:
    """The tokens of one reported training example and their scores against one query.

    Attributes:
        positions: ``[T]`` each token row's position in the example (``token_position``).
        scores: ``[T]`` float64, summing to the example's score (see the module docstring).
        token_ids: the token at each position, from the tokenized corpus cache (None when
            the store's cache is not available).
        texts: each token decoded alone (None without the cache or a tokenizer).
    """

    positions: np.ndarray
    scores: np.ndarray
    token_ids: list[int] | None = None
    texts: list[str] | None = None


def require_token_rows(store: GradientStore) -> str:
    """The store's token mode, or a StoreError saying how to get per-token rows."""
    mode = store.layout.token_mode
    if mode is None:
        raise StoreError(f"{store.url} has no per-token rows (it was cached without "
                         "token_mode); train-side token scores need them: cache again with "
                         "`--set token_mode=loss` (each target token's own loss) or "
                         "`--set token_mode=position`")
    return mode


def train_token_scores(store: GradientStore, pre: Mapping[str, torch.Tensor],
                       indices: np.ndarray, *, normalize: str = "none",
                       tokenizer=None) -> list[list[TrainTokens | None]]:
    """Per-token scores of every reported training example of every query.

    Args:
        store: a store with per-token rows.
        pre: ``{layer: [Q, K]}`` the query rows as scored (preconditioned; for ``cosine``
            already divided by the query's norm).
        indices: ``[Q, k]`` reported rows per query (``-1``: an unfilled slot).
        normalize: the scores' normalization; ``cosine`` and ``train-unit`` divide by each
            example row's norm over all layers (the query side is ``pre``'s business).
        tokenizer: decodes the token texts (optional).

    Returns:
        ``out[j][r]``: a ``TrainTokens`` for ``indices[j, r]`` (None for an unfilled slot).
    """
    check_normalize(normalize)
    require_token_rows(store)
    indices = np.asarray(indices)
    rows = np.unique(indices[indices >= 0])
    if rows.size == 0:
        return [[None] * indices.shape[1] for _ in range(indices.shape[0])]
    # which queries report each row: the scores are computed for those only
    asking = {int(i): np.nonzero((indices == i).any(1))[0] for i in rows}
    spans = [store.layout.example_token_rows(int(i)) for i in rows]
    scores = {int(i): np.zeros((len(asking[int(i)]), e - s)) for i, (s, e) in zip(rows, spans)}
    for name in store.layer_names:
        q = pre[name].detach().to("cpu", torch.float64).numpy()
        for i, t in zip(rows, _token_rows(store, name, spans)):
            scores[int(i)] += q[asking[int(i)]] @ t.T
    if normalize != "none":
        sq = _example_norms_sq(store, rows)
        for i, n2 in zip(rows, sq):
            scores[int(i)] *= 0.0 if n2 == 0 else 1.0 / np.sqrt(n2)
    positions = _positions(store, rows, spans)
    tokens = _tokens(store, rows, positions, tokenizer)
    out: list[list[TrainTokens | None]] = []
    for j in range(indices.shape[0]):
        line = []
        for i in indices[j]:
            i = int(i)
            if i < 0:
                line.append(None)
                continue
            r = int(np.searchsorted(asking[i], j))
            ids, texts = tokens.get(i, (None, None))
            line.append(TrainTokens(positions[i], scores[i][r], ids, texts))
        out.append(line)
    return out


def _token_rows(store: GradientStore, layer: str, spans: list[tuple[int, int]]):
    """Each span's token rows ``[T, K]`` float64, in order; ``spans`` sorted by start.
    Spans whose token chunks touch are read in one slice, so each chunk is decoded once."""
    arr = store.array(f"tokens/{layer}")
    TR = store.layout.token_chunk_rows
    k = 0
    while k < len(spans):
        end = k + 1
        run_s, run_e = spans[k]
        while end < len(spans) and spans[end][0] // TR <= max(run_e - 1, run_s) // TR:
            run_e = max(run_e, spans[end][1])
            end += 1
        block = decode_rows(store, arr[run_s:run_e], torch.float64)
        for s, e in spans[k:end]:
            yield block[s - run_s: e - run_s]
        k = end


def _example_norms_sq(store: GradientStore, rows: np.ndarray) -> np.ndarray:
    """``||g_i||^2`` over all layers of the given example rows (float64)."""
    sq = np.zeros(len(rows))
    for name in store.layer_names:
        raw = store.array(f"grads/{name}").get_orthogonal_selection((rows, slice(None)))
        sq += np.square(decode_rows(store, raw, torch.float64)).sum(1)
    return sq


def _positions(store: GradientStore, rows: np.ndarray, spans: list[tuple[int, int]]
               ) -> dict[int, np.ndarray]:
    """``{row: token_position of its token rows}`` (one coordinate read for all rows)."""
    where = np.concatenate([np.arange(s, e) for s, e in spans]).astype(np.int64)
    pos = store.array("token_position").get_coordinate_selection(where) if where.size \
        else np.zeros(0, np.int32)
    cuts = np.cumsum([0] + [e - s for s, e in spans])
    return {int(i): np.asarray(pos[cuts[n]: cuts[n + 1]], dtype=np.int64)
            for n, i in enumerate(rows)}


def _tokens(store: GradientStore, rows: np.ndarray, positions: dict, tokenizer) -> dict:
    """``{row: (token ids, texts)}`` from the store's tokenized corpus cache (empty when it
    is not available or is not this store's corpus)."""
    corpus = tokenized_corpus(store)
    if corpus is None:
        return {}
    ids = store.array("example_id").get_coordinate_selection(rows)
    out = {}
    for i, ex_id in zip(rows, ids):
        i = int(i)
        if corpus.ids(i, i + 1) != [str(ex_id)]:
            return {}  # not the corpus these rows were cached from
        example = corpus.example(i).input_ids
        tok = [int(example[p]) for p in positions[i]]
        texts = None if tokenizer is None else [tokenizer.decode([t]) for t in tok]
        out[i] = (tok, texts)
    return out
