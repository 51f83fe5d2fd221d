"""The special tokens put around documents and completions: BOS and EOS, resolved from a policy.

A model is scored only on what it was trained to predict. A tokenizer's own ``tokenizer(text)``
(with its default ``add_special_tokens``) says what its model saw during training: Llama's adds
``<s>`` in front and no EOS, GPT-2's and SmolLM2's add nothing. So the policy of each token is
``None`` (the default: exactly what the tokenizer adds, read off its output on a probe text),
``True`` (always add it) or ``False`` (never). An EOS a model never saw after a document has a
large loss whose gradient dominates every example's, and attribution then ranks documents by
that one token (see tests/test_special_tokens.py).

``messages`` records are not affected: they get what their chat template renders.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# The probe text whose encoding, with and without special tokens, shows what a tokenizer adds.
_PROBE = "a"


@dataclass(frozen=True)
class Specials:
    """The special tokens added around documents: ``bos`` ([] or [id]), ``eos`` ([] or [id])."""

    bos: list[int]
    eos: list[int]

    @classmethod
    def of(cls, tokenizer, add_eos: bool | None = None, add_bos: bool | None = None
           ) -> Specials:
        """Resolves the policy (see ``tokenize_records`` for ``add_eos`` and ``add_bos``).

        Raises:
            ValueError: ``add_bos=True`` or ``add_eos=True`` and the tokenizer has no such
                token.
        """
        adds_bos, adds_eos = tokenizer_adds(tokenizer)
        bos = _resolve("add_bos", add_bos, tokenizer.bos_token_id, adds_bos, "BOS")
        eos = _resolve("add_eos", add_eos, tokenizer.eos_token_id, adds_eos, "EOS")
        return cls(bos, eos)


def tokenizer_adds(tokenizer) -> tuple[bool, bool]:
    """Whether ``tokenizer(text)`` (its default special tokens) puts BOS in front, and EOS at
    the end, of a text whose plain encoding has neither there."""
    plain = _ids(tokenizer, _PROBE, add_special_tokens=False)
    full = _ids(tokenizer, _PROBE, add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    adds_bos = bos is not None and full[:1] == [bos] and plain[:1] != [bos]
    adds_eos = eos is not None and full[-1:] == [eos] and plain[-1:] != [eos]
    return adds_bos, adds_eos


def _resolve(name: str, policy: bool | None, token_id: int | None, adds: bool,
             what: str) -> list[int]:
    if policy is not None and not isinstance(policy, bool):  # 1 == True: not a policy
        raise ValueError(f"{name} must be true, false or null (as the tokenizer does), got "
                         f"{policy!r}")
    if policy and token_id is None:
        raise ValueError(f"{name}=True, but the tokenizer has no {what} token; pass {name}=None "
                         "(as the tokenizer does) or False")
    add = adds if policy is None else policy
    return [token_id] if add else []


def _ids(tokenizer, text: str, *, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def special_tokens_record(tokenizer, *, add_bos: bool | None, add_eos: bool | None) -> dict:
    """What a store records about the special tokens of its corpus: the policy, what the
    tokenizer adds by itself, the tokens, and the ids the policy resolved to (``[]`` or
    ``[id]``); ``describe_special_tokens`` turns it into a sentence."""
    specials = Specials.of(tokenizer, add_eos, add_bos)
    adds_bos, adds_eos = tokenizer_adds(tokenizer)
    return {"add_bos": add_bos, "add_eos": add_eos,
            "tokenizer_adds": {"bos": adds_bos, "eos": adds_eos},
            "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
            "bos": specials.bos, "eos": specials.eos}


def describe_special_tokens(record: Mapping | None) -> str:
    """One line saying which special tokens are added and which count as targets, e.g.
    ``special tokens: BOS '<s>' added, not a target (as the tokenizer does); EOS not added
    (the tokenizer does not add it; add_eos: true adds it as a target); chat messages: as
    their template renders them``; ``record`` None: a store of an older version."""
    if record is None:
        return ("special tokens: not recorded (a store of an older version): EOS, when the "
                "tokenizer has one, was added as a target after every document and "
                "completion, and is added to queries too; BOS as the tokenizer adds it; an "
                "assistant turn's template header was a target")
    bos, eos = record.get("bos_token"), record.get("eos_token")
    if record.get("bos"):
        first = f"BOS {bos!r} added, not a target ({_why('add_bos', record.get('add_bos'))})"
    else:
        first = f"BOS not added ({_why_not('add_bos', record.get('add_bos'), bos)})"
    if record.get("eos"):
        second = (f"EOS {eos!r} added as a target after documents and completions "
                  f"({_why('add_eos', record.get('add_eos'))})")
    else:
        hint = "; add_eos: true adds it as a target" if eos is not None and \
            record.get("add_eos") is None else ""
        second = f"EOS not added ({_why_not('add_eos', record.get('add_eos'), eos)}{hint})"
    return f"special tokens: {first}; {second}; chat messages: as their template renders them"


def _why(name: str, policy: bool | None) -> str:
    return "as the tokenizer does" if policy is None else f"{name}: true"


def _why_not(name: str, policy: bool | None, token: str | None) -> str:
    if token is None:
        return f"the tokenizer has no {name[4:].upper()} token"
    if policy is False:
        return f"{name}: false"
    return "the tokenizer does not add it"


def recorded_policy(meta: Mapping, tokenizer) -> dict[str, bool]:
    """The ``add_bos`` / ``add_eos`` keyword arguments of ``tokenize_records`` that tokenize
    queries and targets the way a store's corpus was, from the store's ``meta``: the special
    tokens its policy resolved to (``meta["special_tokens"]``), not the policy again, so a
    query gets exactly the tokens the training examples got.

    A store written before the policy was recorded has no ``special_tokens``; its corpus got
    EOS after every document and completion whenever the tokenizer has one (the default then),
    and BOS as the tokenizer adds it, so such a store keeps being queried that way.

    Raises:
        ValueError: ``tokenizer`` has other BOS/EOS ids than the store's corpus got.
    """
    record = meta.get("special_tokens")
    if record is None:
        old = {"add_bos": None, "add_eos": tokenizer.eos_token_id is not None}
        resolved = Specials.of(tokenizer, old["add_eos"], old["add_bos"])
        return {"add_bos": bool(resolved.bos), "add_eos": bool(resolved.eos)}
    policy = {"add_bos": bool(record["bos"]), "add_eos": bool(record["eos"])}
    got = Specials.of(tokenizer, policy["add_eos"], policy["add_bos"])
    if (got.bos, got.eos) != (list(record["bos"]), list(record["eos"])):
        raise ValueError(f"the tokenizer's special tokens (BOS {got.bos}, EOS {got.eos}) are "
                         f"not the ones the store's corpus got (BOS {record['bos']}, EOS "
                         f"{record['eos']}); use the store's tokenizer")
    return policy


__all__ = ["Specials", "describe_special_tokens", "recorded_policy", "special_tokens_record",
           "tokenizer_adds"]
