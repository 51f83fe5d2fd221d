"""Turn records into training examples: token ids plus the labels that say which are targets.

Labels follow the Hugging Face convention: ``labels[t]`` is the token at position ``t`` (not
shifted; the model shifts internally) and ``-100`` marks a position that is not a target. Three
record kinds are recognised, per record:

* ``text``: a plain document; every token is a target (``labels == input_ids``).
* ``prompt`` + ``completion``: only the completion's tokens are targets.
* ``messages`` (``[{"role", "content"}, ...]``): rendered with the tokenizer's chat template;
  only the tokens each assistant message adds are targets.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import jinja2

from grass_llm.data.records import DataError, Record, Reporter, Skipped, check_on_error

IGNORE_INDEX = -100
OVERFLOW_POLICIES = ("truncate", "chunk", "error")
_KINDS = {"text": ("text",), "prompt/completion": ("prompt", "completion"),
          "messages": ("messages",)}


class Invalid(Exception):
    """A record-level problem; ``tokenize_records`` applies the ``on_error`` policy to it."""


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
                     add_eos: bool = True, add_bos: bool | None = None) -> TokenizeResult:
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
            completions, so the model is scored on ending them. Ignored without an EOS token.
        add_bos: Put the tokenizer's BOS token before text documents and prompts: None does
            what the tokenizer does (``tokenizer(text)`` adds it or not), True always, False
            never. ``messages`` records get what their chat template renders.

    Returns:
        The examples and the skipped entries.

    Raises:
        DataError: A bad record (policy ``"error"``), a too-long one (``overflow="error"``), or a
            ``messages`` record with a tokenizer that has no chat template.
        ValueError: An argument is out of range, or ``add_bos=True`` with a tokenizer that
            has no BOS token.
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


@dataclass(frozen=True)
class Specials:
    """The special tokens added around documents: ``bos`` ([] or [id]), ``eos`` ([] or [id])."""

    bos: list[int]
    eos: list[int]

    @classmethod
    def of(cls, tokenizer, add_eos: bool, add_bos: bool | None = None) -> Specials:
        """See ``tokenize_records`` for ``add_eos`` and ``add_bos``."""
        bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        if add_bos and bos_id is None:
            raise ValueError("add_bos=True, but the tokenizer has no BOS token; pass "
                             "add_bos=None (as the tokenizer does) or False")
        if add_bos is None:
            # Whether the tokenizer itself adds BOS is read off its output, since that is what
            # the model was trained with (e.g. Llama adds <s>, GPT-2 and Qwen add nothing).
            plain = _ids(tokenizer, "a", add_special_tokens=False)
            full = _ids(tokenizer, "a", add_special_tokens=True)
            add_bos = bos_id is not None and full[:1] == [bos_id] and plain[:1] != [bos_id]
        return cls([bos_id] if add_bos else [], [eos_id] if add_eos and eos_id is not None
                   else [])


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
    return _encode_messages(record, tokenizer)


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise Invalid("field 'messages' must be a non-empty list of {'role', 'content'} "
                       f"objects, found {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise Invalid(f"messages[{i}] must be an object, found {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise Invalid(f"messages[{i}].{key} must be a string, found "
                               f"{type(message.get(key)).__name__}")


def _render(tokenizer, messages: list) -> list[int]:
    """``apply_chat_template(messages, tokenize=True)`` as a plain list of ids."""
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as err:
        raise Invalid(f"the chat template failed on messages[:{len(messages)}]: {err}") from err
    if isinstance(out, Mapping):  # some transformers versions return a BatchEncoding anyway
        out = out["input_ids"]
    return list(out)


def _encode_messages(record: Record, tokenizer) -> tuple[list[int], list[int]]:
    """Ids and labels of a conversation: targets are the tokens each assistant message adds.

    The conversation is rendered prefix by prefix; message i adds
    ``render(messages[:i+1])[len(render(messages[:i])):]``. This needs a template whose render of
    a prefix is a prefix of the render of the whole (most are; templates that rewrite earlier
    turns, e.g. dropping old reasoning, are not). Tokens the template emits before the first
    message (a default system prompt, say) count as added by the first message.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(record.location, "this 'messages' record needs a chat template, but the "
                        "tokenizer has none", "Set tokenizer.chat_template to a Jinja template, "
                        "or give the data as 'prompt'/'completion' or 'text'", record.id)
    messages = record.fields["messages"]
    _check_messages(messages)
    ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(messages):
        rendered = _render(tokenizer, messages[:i + 1])
        if rendered[:len(ids)] != ids:
            raise Invalid(f"the chat template renders messages[:{i}] differently once "
                           f"messages[{i}] follows, so the tokens of each turn are not "
                           "well defined; use 'prompt'/'completion' records instead")
        added = rendered[len(ids):]
        ids += added
        labels += added if message["role"] == "assistant" else [IGNORE_INDEX] * len(added)
    return ids, labels


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


__all__ = ["IGNORE_INDEX", "OVERFLOW_POLICIES", "Example", "Invalid", "Specials", "TokenizeResult",
           "encode_texts", "tokenize_record", "tokenize_records"]
