"""Identities of what decides a corpus's token ids: the tokenizer. ``tokenizer_identity`` is
what a store records (re-exported by ``grass_llm.store.identity``); ``tokenizer_fingerprint``
adds what a tokenized-corpus cache key needs."""

from __future__ import annotations

import hashlib
import json

_PROBE = "Hello, world! 123 -- \u00fcn\u00efc\u00f6d\u00e9 \u4f60\u597d\n\ttabs  and   spaces"


def _digest() -> hashlib.blake2b:
    return hashlib.blake2b(digest_size=16)


def tokenizer_identity(tokenizer) -> dict:
    """``{"name", "class", "vocab_hash", "vocab_size"}``: the vocabulary (token -> id) and the
    special tokens, which is what decides the token ids a store's rows were computed from."""
    vocab = tokenizer.get_vocab()
    h = _digest()
    h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return {"name": getattr(tokenizer, "name_or_path", ""), "class": type(tokenizer).__name__,
            "vocab_hash": h.hexdigest(), "vocab_size": len(vocab)}


def tokenizer_fingerprint(tokenizer) -> dict:
    """What decides the token ids of a corpus, for a cache key: what ``tokenizer_identity``
    covers (for a fast tokenizer, its whole Rust definition — vocabulary, merges, normalizer,
    pre-tokenizer, post-processor, added tokens — which holds the vocabulary, and is quicker to
    hash than it), the special tokens, the chat template, and the output on a probe text. Not
    the name or path: a moved tokenizer is the same."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        out = tokenizer_identity(tokenizer)
        out.pop("name")
    else:
        out = {"class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
               "definition_hash": _digest_of(backend.to_str())}
    out["special_tokens"] = json.loads(json.dumps(tokenizer.special_tokens_map, sort_keys=True,
                                                  default=str))
    template = getattr(tokenizer, "chat_template", None)
    out["chat_template_hash"] = _digest_of(json.dumps(template, sort_keys=True, default=str))
    out["probe"] = [list(tokenizer(_PROBE, add_special_tokens=s)["input_ids"])
                    for s in (False, True)]
    return out


def _digest_of(text: str) -> str:
    h = _digest()
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()
