"""Turn records into training examples: token ids plus the labels that say which are targets.

Labels follow the Hugging Face convention: ``labels[t]`` is the token at position ``t`` (not
shifted; the model shifts internally) and ``-100`` marks a position that is not a target. Three
record kinds are recognised, per record:

* ``text``: a plain document; every token is a target (``labels == input_ids``).
* ``prompt`` + ``completion``: only the completion's tokens are targets.
* ``messages`` (``[{"role", "content"}, ...]``): rendered with the tokenizer's chat template;
  only each assistant message's content and its end-of-turn token are targets
  (``grass_llm.data.chat``).

BOS and EOS go around documents and completions as the tokenizer itself puts them, unless told
otherwise (``grass_llm.data.specials``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from grass_llm.data.chat import encode_messages
from grass_llm.data.records import (
    IGNORE_INDEX,
    DataError,
    Invalid,
    Record,
    Reporter,
    Skipped,
    check_on_error,
)
from grass_llm.data.specials import Specials

OVERFLOW_POLICIES = ("truncate", "chunk", "error")
_KINDS = {"text": ("text",), "prompt/completion": ("prompt", "completion"),
          "messages": ("messages",)}


@dataclass
class Example:
    """One tokenized training example.

    Attributes:
        id: The record's id; ``"<id>#<k>"`` for window ``k`` of a chunked long document.
        input_ids: Token ids, length T.
        labels: Length T; ``labels[t] == input_ids[t]`` where token t is a target, else -100.
        location: Where the record is (see ``Record.location``).
    """

    id: str
    input_ids: list[int]
    labels: list[int]
    location: str

    @property
    def n_targets(self) -> int:
        """Number of target positions (labels other than -100)."""
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class TokenizeResult:
    """What ``tokenize_records`` produced.

    Attributes:
        examples: The examples, in record order (windows of a chunked record consecutively).
        skipped: Records left out under ``on_error="skip"``, and windows of chunked documents
            that hold no target token (under either policy), each with its reason.
    """

    examples: list[Example] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def tokenize_records(records: Iterable[Record], tokenizer, *, max_length: int = 1024,
                     overflow: str = "truncate", on_error: str = "error",
                     add_eos: bool | None = None, add_bos: bool | None = None
                     ) -> TokenizeResult:
    """Tokenizes records into examples with target labels.

    Args:
        records: Records, e.g. ``read_records(...).records``.
        tokenizer: A Hugging Face tokenizer (``PreTrainedTokenizerBase``). ``messages`` records
            need its ``chat_template``.
        max_length: Most tokens per example (>= 1).
        overflow: For a longer document: ``"truncate"`` keeps the first ``max_length`` tokens;
            ``"chunk"`` splits it into consecutive windows of ``max_length`` tokens with ids
            ``"<id>#0"``, ``"<id>#1"``, ... (windows without a target are dropped and listed in
            ``skipped``; note a window's first label has no context inside the window, so the
            model cannot be scored on it); ``"error"`` raises ``DataError``.
        on_error: ``"error"`` raises ``DataError`` at the first bad record (empty document,
            unknown or non-string fields, no target token left); ``"skip"`` lists it in
            ``skipped`` and goes on.
        add_eos: Append the tokenizer's EOS token (as a target) to text documents and
            completions, so the model is scored on ending them: None does what the tokenizer
            does (``tokenizer(text)`` ends with it or not; most do not, and a model trained
            without it was never taught to predict it), True always, False never.
        add_bos: Put the tokenizer's BOS token before text documents and prompts (never a
            target: nothing predicts position 0): None as the tokenizer does, True always,
            False never. ``messages`` records get what their chat template renders.

    Returns:
        The examples and the skipped entries.

    Raises:
        DataError: A bad record (policy ``"error"``), a too-long one (``overflow="error"``), or a
            ``messages`` record with a tokenizer that has no chat template.
        ValueError: An argument is out of range, or ``add_bos=True`` (``add_eos=True``) with
            a tokenizer that has no BOS (EOS) token.
    """
    check_tokenize_args(max_length, overflow, on_error)
    specials = Specials.of(tokenizer, add_eos, add_bos)
    reporter = Reporter(on_error)
    examples: list[Example] = []
    seen: dict[str, str] = {}
    for record in records:
        try:
            windows = tokenize_record(record, tokenizer, specials, max_length, overflow,
                                      reporter.skipped)
        except Invalid as problem:
            reporter.problem(record.location, str(problem), record.id)
            continue
        for example in windows:
            if example.id in seen:
                reporter.problem(record.location, duplicate_example_reason(
                    example.id, seen[example.id]), example.id)
                continue
            seen[example.id] = record.location
            examples.append(example)
    return TokenizeResult(examples, reporter.skipped)


def check_tokenize_args(max_length: int, overflow: str, on_error: str) -> None:
    """Raises ValueError for an argument of ``tokenize_records`` out of range."""
    check_on_error(on_error)
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")


def duplicate_example_reason(example_id: str, first_location: str) -> str:
    """The reason given for an example whose id one from ``first_location`` already has."""
    return f"duplicate example id {example_id!r} (first from {first_location})"


def tokenize_record(record: Record, tokenizer, specials: Specials, max_length: int,
                    overflow: str, skipped: list[Skipped],
                    encoded: Mapping[str, list[int]] | None = None) -> list[Example]:
    """The examples of one record (see ``tokenize_records``); appends target-less windows of a
    chunked record to ``skipped``.

    Args:
        encoded: Token ids (without special tokens) of texts already encoded, e.g. by
            ``encode_texts``; other texts are encoded here.

    Raises:
        Invalid: A bad record (``tokenize_records`` applies the ``on_error`` policy to it).
        DataError: A too-long record (``overflow="error"``), or a ``messages`` record with a
            tokenizer that has no chat template.
    """
    ids, labels = _encode(record, tokenizer, specials, encoded or {})
    return _fit(record, ids, labels, max_length, overflow, skipped)


def encode_texts(records: Iterable[Record], tokenizer) -> dict[str, list[int]]:
    """Token ids (no special tokens) of the ``text``/``prompt``/``completion`` strings of
    ``records``, in one batched tokenizer call (a fast tokenizer runs it in Rust, without a
    Python call per text): ``tokenizer([t1, t2], ...)`` gives each text the ids that
    ``tokenizer(t1, ...)`` does, so ``tokenize_record`` with these gives the same examples."""
    texts = {value: None for record in records if isinstance(record.fields, Mapping)
             for name in ("text", "prompt", "completion")
             if isinstance(value := record.fields.get(name), str)}
    if not texts:
        return {}
    try:
        out = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001 - let the text that fails raise where it is encoded
        return {}
    return dict(zip(texts, out))


def _ids(tokenizer, text: str, *, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _kind(fields: Mapping) -> str:
    """Which record kind ``fields`` is; raises ``Invalid`` for none, several, or half a pair."""
    found = [kind for kind, names in _KINDS.items() if any(n in fields for n in names)]
    if not found:
        expected = " or ".join(f"{'+'.join(names)!r}" for names in _KINDS.values())
        raise Invalid(f"no known field: found {sorted(fields)}, expected {expected}")
    if len(found) > 1:
        raise Invalid(f"ambiguous record: it has fields of several kinds ({', '.join(found)}); "
                       "keep only one")
    if found[0] == "prompt/completion":
        missing = [n for n in _KINDS["prompt/completion"] if n not in fields]
        if missing:
            raise Invalid(f"field {missing[0]!r} is missing (a record with 'prompt' or "
                           "'completion' needs both)")
    return found[0]


def _string(fields: Mapping, name: str, *, allow_empty: bool = False) -> str:
    value = fields[name]
    if not isinstance(value, str):
        raise Invalid(f"field {name!r} must be a string, found {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise Invalid(f"field {name!r} is empty")
    return value


def _encode(record: Record, tokenizer, specials: Specials,
            encoded: Mapping[str, list[int]]) -> tuple[list[int], list[int]]:
    """Token ids and labels of a whole record (before any truncation)."""
    fields = record.fields

    def plain(text: str) -> list[int]:  # a list from ``encoded`` is shared: never mutated
        ids = encoded.get(text)
        return _ids(tokenizer, text, add_special_tokens=False) if ids is None else ids

    kind = _kind(fields)
    if kind == "text":
        ids = specials.bos + plain(_string(fields, "text")) + specials.eos
        return ids, list(ids)
    if kind == "prompt/completion":
        # Tokenized apart and concatenated so that the prompt/target boundary is exact even where
        # a tokenizer would merge characters across it.
        prompt = specials.bos + plain(_string(fields, "prompt", allow_empty=True))
        completion = plain(_string(fields, "completion")) + specials.eos
        return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
    return encode_messages(record, tokenizer)


def _fit(record: Record, ids: list[int], labels: list[int], max_length: int, overflow: str,
         skipped: list[Skipped]) -> list[Example]:
    """Applies the overflow policy; appends target-less windows of a chunked record to ``skipped``.

    Raises:
        Invalid: The record has no target token (left).
        DataError: It is too long and ``overflow == "error"``.
    """
    targets = [t for t, label in enumerate(labels) if label != IGNORE_INDEX]
    if not targets:
        raise Invalid("no target tokens (e.g. a conversation without an assistant message)")
    if len(ids) <= max_length:
        return [Example(record.id, ids, labels, record.location)]
    if overflow == "error":
        raise DataError(record.location, f"{len(ids)} tokens exceed max_length={max_length}",
                        "Raise max_length, or pass overflow='truncate' or 'chunk'", record.id)
    if overflow == "truncate":
        if targets[0] >= max_length:
            raise Invalid(f"no target tokens left after truncation to max_length={max_length} "
                           f"(the first target is token {targets[0]})")
        return [Example(record.id, ids[:max_length], labels[:max_length], record.location)]
    windows = []
    for k, start in enumerate(range(0, len(ids), max_length)):
        end = min(start + max_length, len(ids))
        window_id = f"{record.id}#{k}"
        if all(label == IGNORE_INDEX for label in labels[start:end]):
            skipped.append(Skipped(window_id, record.location,
                                   f"window {k} (tokens {start}..{end - 1}) has no target token"))
            continue
        windows.append(Example(window_id, ids[start:end], labels[start:end], record.location))
    return windows


__all__ = ["IGNORE_INDEX", "OVERFLOW_POLICIES", "Example", "TokenizeResult", "encode_texts",
           "tokenize_record", "tokenize_records"]
