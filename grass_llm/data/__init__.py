"""Training data: read a corpus, tokenize it into examples with target labels, batch them.

Typical use::

    result = read_records("train.jsonl")
    tokenized = tokenize_records(result.records, tokenizer, max_length=1024)
    batches = token_budget_batches([len(e.input_ids) for e in tokenized.examples], 16384)
    batch = collate([tokenized.examples[i] for i in batches[0]], tokenizer.pad_token_id)

or, tokenized once on every core, cached and memory-mapped (the same examples)::

    corpus = TokenizedCorpus.open_or_build("train.jsonl", tokenizer, max_length=1024)
    corpus.example(i), corpus.lengths, corpus.n_targets, corpus.fingerprint
"""

from grass_llm.data.batching import PAD_SIDES, collate, token_budget_batches
from grass_llm.data.corpus import TokenizedCorpus
from grass_llm.data.readers import FORMATS, ReadResult, detect_format, read_records
from grass_llm.data.records import ON_ERROR_POLICIES, DataError, Record, Skipped
from grass_llm.data.tokenize import (
    IGNORE_INDEX,
    OVERFLOW_POLICIES,
    Example,
    TokenizeResult,
    tokenize_records,
)

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "ON_ERROR_POLICIES",
    "OVERFLOW_POLICIES",
    "PAD_SIDES",
    "DataError",
    "Example",
    "ReadResult",
    "Record",
    "Skipped",
    "TokenizeResult",
    "TokenizedCorpus",
    "collate",
    "detect_format",
    "read_records",
    "token_budget_batches",
    "tokenize_records",
]
