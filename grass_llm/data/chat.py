"""Chat (``messages``) records: rendered with the tokenizer's chat template; the targets are each
assistant message's content and its end-of-turn token.

A template wraps an assistant message in tokens that do not depend on what it says: a header
(``<|im_start|>assistant\\n``) and a trailer (``<|im_end|>\\n``). A chat model is trained to
write the content and to end its turn, not to predict the header (the serving code writes it),
nor a separator after the end-of-turn token. Templates differ, so these are found, per
message, by rendering the turn in its real context with two probe contents (``_PROBE_PAIRS``):
what the two renders share at the start is the header, at the end the trailer. The
end-of-turn token is the trailer's first token when it is a special token. The real turn's
header is as much of that as it starts with: where its content merges with the header's last
characters into one token (``"\\n"`` + ``"\\n\\nHi"`` -> ``"\\n\\n"``, ``"\\n"``, ...), that
token holds content and is a target; the same at the trailer. When no probe tells the parts
apart (the template fails on them, or renders earlier turns differently), that turn's targets
are all the tokens it adds, header included, with one warning.

(transformers' ``return_assistant_tokens_mask`` needs ``{% generation %}`` markers in the
template, which few templates have, SmolLM2's not among them.)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import jinja2

from grass_llm.data.records import IGNORE_INDEX, DataError, Invalid, Record

# Pairs of contents (None: the message's own) tried in turn until the two render with a token
# of their own each: two one-letter contents first (a header or trailer never starts or ends
# with them), the real one against a letter when both letters are one unknown token.
_PROBE_PAIRS = (("A", "B"), (None, "A"), (None, "B"))
_warned: set[str] = set()  # chat templates already warned about, in this process


def encode_messages(record: Record, tokenizer) -> tuple[list[int], list[int]]:
    """Ids and labels of a conversation: the targets are, per assistant message, its content
    and its end-of-turn token (see the module docstring).

    The conversation is rendered prefix by prefix; message i adds
    ``render(messages[:i+1])[len(render(messages[:i])):]``. This needs a template whose render of
    a prefix is a prefix of the render of the whole (most are; templates that rewrite earlier
    turns, e.g. dropping old reasoning, are not). Tokens the template emits before the first
    message (a default system prompt, say) count as added by the first message.

    Raises:
        Invalid: A malformed conversation, a template that fails on it or is not prefix-stable.
        DataError: The tokenizer has no chat template.
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
        if message["role"] == "assistant":
            labels += _assistant_labels(tokenizer, messages, i, ids, added, record.location)
        else:
            labels += [IGNORE_INDEX] * len(added)
        ids += added
    return ids, labels


def _assistant_labels(tokenizer, messages: list, i: int, before: list[int], added: list[int],
                      location: str) -> list[int]:
    """The labels of the tokens ``added`` by assistant message ``i`` (rendered after the
    tokens ``before``): its content and end-of-turn token are targets."""
    parts = turn_parts(tokenizer, messages, i, before, added)
    if parts is None:
        _warn_once(tokenizer, location, i)
        return list(added)
    head, tail, end_of_turn = parts
    body = len(added) - tail
    labels = [IGNORE_INDEX] * head + added[head:body] + [IGNORE_INDEX] * tail
    if end_of_turn:
        labels[body] = added[body]
    return labels


def turn_parts(tokenizer, messages: list, i: int, before: list[int], added: list[int]
               ) -> tuple[int, int, bool] | None:
    """``(header length, trailer length, whether the trailer starts with an end-of-turn special
    token)`` of the tokens ``added`` by message ``i`` (the header and trailer as far as
    ``added`` holds them unmerged with its content), or None when the template defeats the
    method (see the module docstring)."""
    turns: dict[str | None, list[int] | None] = {None: added}  # content -> the turn's tokens

    def turn(content: str | None) -> list[int] | None:
        if content not in turns:
            try:
                rendered = _render(tokenizer, messages[:i] + [{**messages[i],
                                                               "content": content}])
            except Invalid:  # the template rejects the probe, not the record's own content
                rendered = None
            turns[content] = rendered[len(before):] if rendered is not None \
                and rendered[:len(before)] == before else None
        return turns[content]

    for pair in _PROBE_PAIRS:
        a, b = turn(pair[0]), turn(pair[1])
        if a is None or b is None:
            return None
        head = _common_prefix(a, b)
        tail = _common_prefix(a[head:][::-1], b[head:][::-1])
        if min(len(a), len(b)) - head - tail < 1:  # a content left no token of its own
            continue  # e.g. both probes are unknown words of a word-level vocabulary
        trailer = a[len(a) - tail:]
        own_head = _common_prefix(added, a[:head])
        own_tail = _common_prefix(added[own_head:][::-1], trailer[::-1])
        end_of_turn = 0 < own_tail == tail and _is_special(tokenizer, trailer[0])
        return own_head, own_tail, end_of_turn
    return None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _is_special(tokenizer, token_id: int) -> bool:
    """A special token: one of the tokenizer's named ones, or an added token marked special
    (e.g. Llama 3's ``<|eot_id|>``)."""
    if token_id in tokenizer.all_special_ids:
        return True
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(token_id)
    return bool(getattr(added, "special", False))


def _warn_once(tokenizer, location: str, i: int) -> None:
    template = str(tokenizer.chat_template)
    if template in _warned:
        return
    _warned.add(template)
    warnings.warn(f"{location}: the chat template's header and trailer of assistant "
                  f"messages[{i}] cannot be told apart from its content (the template fails "
                  "on probe contents, or gives no token of their own), so every token such a "
                  "turn adds, header included, is a target (this warning is shown once per "
                  "template)", stacklevel=2)


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


__all__ = ["encode_messages", "turn_parts"]
