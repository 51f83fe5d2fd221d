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


class _Invalid(Exception):
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
                     add_eos: bool = True) -> TokenizeResult:
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

    Returns:
        The examples and the skipped entries.

    Raises:
        DataError: A bad record (policy ``"error"``), a too-long one (``overflow="error"``), or a
            ``messages`` record with a tokenizer that has no chat template.
        ValueError: An argument is out of range.
    """
    check_on_error(on_error)
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    specials = _Specials.of(tokenizer, add_eos)
    reporter = Reporter(on_error)
    examples: list[Example] = []
    seen: dict[str, str] = {}
    for record in records:
        try:
            ids, labels = _encode(record, tokenizer, specials)
            windows = _fit(record, ids, labels, max_length, overflow, reporter.skipped)
        except _Invalid as problem:
            reporter.problem(record.location, str(problem), record.id)
            continue
        for example in windows:
            if example.id in seen:
                reporter.problem(record.location, f"duplicate example id {example.id!r} (first "
                                                  f"from {seen[example.id]})", example.id)
                continue
            seen[example.id] = record.location
            examples.append(example)
    return TokenizeResult(examples, reporter.skipped)


@dataclass(frozen=True)
class _Specials:
    """The special tokens added around documents: ``bos`` ([] or [id]), ``eos`` ([] or [id])."""

    bos: list[int]
    eos: list[int]

    @classmethod
    def of(cls, tokenizer, add_eos: bool) -> _Specials:
        # Whether the tokenizer itself adds BOS is read off its output, since that is what the
        # model was trained with (e.g. Llama adds <s>, GPT-2 and Qwen add nothing).
        bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        plain = _ids(tokenizer, "a", add_special_tokens=False)
        full = _ids(tokenizer, "a", add_special_tokens=True)
        adds_bos = bos_id is not None and full[:1] == [bos_id] and plain[:1] != [bos_id]
        return cls([bos_id] if adds_bos else [], [eos_id] if add_eos and eos_id is not None
                   else [])


def _ids(tokenizer, text: str, *, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _kind(fields: Mapping) -> str:
    """Which record kind ``fields`` is; raises ``_Invalid`` for none, several, or half a pair."""
    found = [kind for kind, names in _KINDS.items() if any(n in fields for n in names)]
    if not found:
        expected = " or ".join(f"{'+'.join(names)!r}" for names in _KINDS.values())
        raise _Invalid(f"no known field: found {sorted(fields)}, expected {expected}")
    if len(found) > 1:
        raise _Invalid(f"ambiguous record: it has fields of several kinds ({', '.join(found)}); "
                       "keep only one")
    if found[0] == "prompt/completion":
        missing = [n for n in _KINDS["prompt/completion"] if n not in fields]
        if missing:
            raise _Invalid(f"field {missing[0]!r} is missing (a record with 'prompt' or "
                           "'completion' needs both)")
    return found[0]


def _string(fields: Mapping, name: str, *, allow_empty: bool = False) -> str:
    value = fields[name]
    if not isinstance(value, str):
        raise _Invalid(f"field {name!r} must be a string, found {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _Invalid(f"field {name!r} is empty")
    return value


def _encode(record: Record, tokenizer, specials: _Specials) -> tuple[list[int], list[int]]:
    """Token ids and labels of a whole record (before any truncation)."""
    fields = record.fields
    kind = _kind(fields)
    if kind == "text":
        text = _string(fields, "text")
        ids = specials.bos + _ids(tokenizer, text, add_special_tokens=False) + specials.eos
        return ids, list(ids)
    if kind == "prompt/completion":
        # Tokenized apart and concatenated so that the prompt/target boundary is exact even where
        # a tokenizer would merge characters across it.
        prompt = specials.bos + _ids(tokenizer, _string(fields, "prompt", allow_empty=True),
                                     add_special_tokens=False)
        completion = _ids(tokenizer, _string(fields, "completion"), add_special_tokens=False)
        completion += specials.eos
        return prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
    return _encode_messages(record, tokenizer)


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise _Invalid("field 'messages' must be a non-empty list of {'role', 'content'} "
                       f"objects, found {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise _Invalid(f"messages[{i}] must be an object, found {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise _Invalid(f"messages[{i}].{key} must be a string, found "
                               f"{type(message.get(key)).__name__}")


def _render(tokenizer, messages: list) -> list[int]:
    """``apply_chat_template(messages, tokenize=True)`` as a plain list of ids."""
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as err:
        raise _Invalid(f"the chat template failed on messages[:{len(messages)}]: {err}") from err
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
            raise _Invalid(f"the chat template renders messages[:{i}] differently once "
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
        _Invalid: The record has no target token (left).
        DataError: It is too long and ``overflow == "error"``.
    """
    targets = [t for t, label in enumerate(labels) if label != IGNORE_INDEX]
    if not targets:
        raise _Invalid("no target tokens (e.g. a conversation without an assistant message)")
    if len(ids) <= max_length:
        return [Example(record.id, ids, labels, record.location)]
    if overflow == "error":
        raise DataError(record.location, f"{len(ids)} tokens exceed max_length={max_length}",
                        "Raise max_length, or pass overflow='truncate' or 'chunk'", record.id)
    if overflow == "truncate":
        if targets[0] >= max_length:
            raise _Invalid(f"no target tokens left after truncation to max_length={max_length} "
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


__all__ = ["IGNORE_INDEX", "OVERFLOW_POLICIES", "Example", "TokenizeResult", "tokenize_records"]
